//! Process logging: a small stderr logger with timestamps and levels.
//!
//! Libraries log through the `log` macros only; the binary installs this at start. (When started
//! by systemd with `JOURNAL_STREAM`, journald adds its own timestamps; structured journal fields
//! come with the system-integration work.)

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    level: LevelFilter,
    timestamps: bool,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        let t = m.target();
        if t.starts_with("edgeinfer") {
            return m.level() <= self.level;
        }
        // rumqttd (demo broker only) forwards its tracing spans as ERROR-level `log` records;
        // they are noise unless explicitly tracing.
        if t.starts_with("rumqttd") {
            return self.level >= LevelFilter::Trace;
        }
        // Dependencies: only their warnings and errors, unless tracing.
        m.level() <= self.level && (m.level() <= Level::Warn || self.level >= LevelFilter::Trace)
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut out = std::io::stderr().lock();
        if self.timestamps {
            let _ = write!(out, "{} ", rfc3339_now());
        }
        let _ = writeln!(out, "{:<5} {}: {}", r.level(), r.target(), r.args());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// UTC timestamp with milliseconds, e.g. `2026-11-27T19:00:00.123Z`.
fn rfc3339_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Parses a level name (`error`, `warn`, `info`, `debug`, `trace`, `off`).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    s.parse().ok()
}

/// Installs the logger once; later calls are ignored. Timestamps are left out under journald,
/// which records its own.
pub fn init(level: LevelFilter) {
    let timestamps = std::env::var_os("JOURNAL_STREAM").is_none();
    if log::set_boxed_logger(Box::new(StderrLogger { level, timestamps })).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_shape() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T", "{t}");
    }

    #[test]
    fn levels() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("nope"), None);
    }
}
