//! Logging through `log` + `fern`: levels, timestamps, the thread (shard) name,
//! and an optional JSON-lines format. Connection ids are part of each message
//! (`conn=<shard>.<seq>`), so one connection's story can be grepped.

use std::io::Write as _;

use parking_lot::Mutex;

use crate::clock::rfc3339_now;
use crate::config::{LogFormat, parse_level};

/// Lines logged while the server starts, held back (see [`hold`]); `None`
/// when lines go straight to stderr.
static HELD: Mutex<Option<Vec<(log::Level, String)>>> = Mutex::new(None);
/// Start-up logs a few dozen lines; past this many the rest are dropped.
const MAX_HELD: usize = 10_000;

/// Hold log lines back until [`release`] or [`fail`]: a start that fails
/// (a port in use, a bad key file) then prints one line naming the problem,
/// not the INFO lines that came before it.
pub fn hold() {
    *HELD.lock() = Some(Vec::new());
}

/// The start succeeded: write the held lines, then log directly again.
pub fn release() {
    let mut held = HELD.lock();
    if let Some(lines) = held.take() {
        let mut err = std::io::stderr().lock();
        for (_, line) in lines {
            let _ = writeln!(err, "{line}");
        }
    }
}

/// The start failed: keep only held warnings and errors (they may explain
/// the failure); the caller prints the one line that says why.
pub fn fail() {
    let mut held = HELD.lock();
    if let Some(lines) = held.take() {
        let mut err = std::io::stderr().lock();
        for (level, line) in lines {
            if level <= log::Level::Warn {
                let _ = writeln!(err, "{line}");
            }
        }
    }
}

fn write_line(record: &log::Record<'_>) {
    let mut held = HELD.lock();
    match held.as_mut() {
        Some(lines) if lines.len() < MAX_HELD => {
            lines.push((record.level(), record.args().to_string()));
        }
        Some(_) => {}
        // Under the lock, so a released backlog never interleaves with new lines.
        None => {
            let _ = writeln!(std::io::stderr().lock(), "{}", record.args());
        }
    }
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
        .chain(fern::Output::call(write_line));
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
