//! Logging through `log` + `fern`: levels, timestamps, the thread (shard) name,
//! and an optional JSON-lines format. Connection ids are part of each message
//! (`conn=<shard>.<seq>`), so one connection's story can be grepped.

use crate::clock::rfc3339_now;
use crate::config::{LogFormat, parse_level};

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
    fn levels() {
        assert_eq!(parse_level("WARNING"), Some(log::LevelFilter::Warn));
        assert_eq!(parse_level("chatty"), None);
    }
}
