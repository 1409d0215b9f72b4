//! Logging through `log` + `fern`: levels, timestamps, the thread (shard) name,
//! and an optional JSON-lines format. Connection ids are part of each message
//! (`conn=<shard>.<seq>`), so one connection's story can be grepped.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;

/// `debug`, `info`, `warn`/`warning`, `error` (the seed's levels), plus `trace` and `off`.
pub fn parse_level(s: &str) -> Option<log::LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "trace" => Some(log::LevelFilter::Trace),
        "debug" => Some(log::LevelFilter::Debug),
        "info" => Some(log::LevelFilter::Info),
        "warn" | "warning" => Some(log::LevelFilter::Warn),
        "error" => Some(log::LevelFilter::Error),
        "off" => Some(log::LevelFilter::Off),
        _ => None,
    }
}

/// RFC 3339 UTC timestamp with milliseconds, without a date-time crate.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_millis())
}

/// Format seconds since the Unix epoch (civil-from-days, Howard Hinnant's algorithm).
/// RFC 3339 UTC with milliseconds for a time in ms since the epoch.
pub fn rfc3339_ms(ms: i64) -> String {
    rfc3339(ms.div_euclid(1000), ms.rem_euclid(1000) as u32)
}

pub fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Install the global logger. Safe to call more than once (later calls are ignored),
/// so tests that start several servers in one process do not fail.
pub fn init(level: &str, format: LogFormat) {
    let level = parse_level(level).unwrap_or(log::LevelFilter::Info);
    let dispatch = fern::Dispatch::new()
        .level(level)
        // rustls logs every handshake detail at debug; keep it to warnings.
        .level_for("rustls", log::LevelFilter::Warn.min(level))
        .format(move |out, message, record| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("?");
            match format {
                LogFormat::Text => out.finish(format_args!(
                    "{} {:<5} [{}] {}",
                    rfc3339_now(),
                    record.level(),
                    name,
                    message
                )),
                LogFormat::Json => {
                    let line = serde_json::json!({
                        "ts": rfc3339_now(),
                        "level": record.level().as_str(),
                        "thread": name,
                        "target": record.target(),
                        "msg": message.to_string(),
                    });
                    out.finish(format_args!("{line}"))
                }
            }
        })
        .chain(std::io::stderr());
    let _ = dispatch.apply();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(
            rfc3339(1_795_305_600 + 3661, 999),
            "2026-11-22T01:01:01.999Z"
        );
    }

    #[test]
    fn levels() {
        assert_eq!(parse_level("WARNING"), Some(log::LevelFilter::Warn));
        assert_eq!(parse_level("chatty"), None);
    }
}
