//! Process logging: the systemd journal with structured fields when stderr is connected to it
//! (`$JOURNAL_STREAM` matches stderr's device and inode), a plain stderr logger otherwise.
//!
//! Libraries log through the `log` macros only. Structured context goes in key-values
//! (`log::info!(pipeline = name; "...")`): the journal gets them as fields (`PIPELINE=`,
//! `MODEL=`, `MODEL_VERSION=`, `DEVICE=`), stderr as `key=value` after the message.

use std::fmt::Write as _;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Which records pass: our own at the configured level; dependencies' warnings and errors only
/// (everything when tracing).
fn enabled(level: LevelFilter, m: &Metadata<'_>) -> bool {
    let t = m.target();
    if t.starts_with("edgeinfer") {
        return m.level() <= level;
    }
    // rumqttd (demo broker only) forwards its tracing spans as ERROR-level `log` records; they
    // are noise unless explicitly tracing.
    if t.starts_with("rumqttd") {
        return level >= LevelFilter::Trace;
    }
    m.level() <= level && (m.level() <= Level::Warn || level >= LevelFilter::Trace)
}

struct StderrLogger {
    level: LevelFilter,
}

/// Appends ` key=value` for each key-value of a record.
struct KvSuffix<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for KvSuffix<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        enabled(self.level, m)
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut kv = String::new();
        let _ = r.key_values().visit(&mut KvSuffix(&mut kv));
        let _ = writeln!(
            std::io::stderr().lock(),
            "{} {:<5} {}: {}{kv}",
            rfc3339_now(),
            r.level(),
            r.target(),
            r.args()
        );
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// The journal logger with our filtering (it would otherwise forward everything).
struct JournalLogger {
    level: LevelFilter,
    inner: systemd_journal_logger::JournalLog,
}

impl Log for JournalLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        enabled(self.level, m)
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        match DEVICE.get() {
            // Every entry carries DEVICE= once the config named it.
            Some(device) => {
                let kvs = WithDevice { inner: r.key_values(), device };
                let rec = Record::builder()
                    .metadata(r.metadata().clone())
                    .args(*r.args())
                    .module_path(r.module_path())
                    .file(r.file())
                    .line(r.line())
                    .key_values(&kvs)
                    .build();
                self.inner.log(&rec);
            }
            None => self.inner.log(r),
        }
    }

    fn flush(&self) {}
}

static DEVICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Names the device in every later journal entry (`DEVICE=`).
pub fn set_device(device: &str) {
    let _ = DEVICE.set(device.to_string());
}

struct WithDevice<'a> {
    inner: &'a dyn log::kv::Source,
    device: &'a str,
}

impl log::kv::Source for WithDevice<'_> {
    fn visit<'kvs>(&'kvs self, v: &mut dyn VisitSource<'kvs>) -> Result<(), log::kv::Error> {
        self.inner.visit(v)?;
        v.visit_pair(Key::from_str("device"), Value::from(self.device))
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

/// Where log records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journal,
    Stderr,
}

/// Installs the logger once (later calls are ignored) and says which one.
pub fn init(level: LevelFilter) -> Sink {
    let journal = systemd_journal_logger::connected_to_journal()
        .then(|| systemd_journal_logger::JournalLog::new().ok())
        .flatten();
    let (logger, sink): (Box<dyn Log>, Sink) = match journal {
        Some(j) => {
            let inner = j.with_syslog_identifier("edgeinfer".to_string());
            (Box::new(JournalLogger { level, inner }), Sink::Journal)
        }
        None => (Box::new(StderrLogger { level }), Sink::Stderr),
    };
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
    sink
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
    fn levels_and_filtering() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("nope"), None);
        let meta =
            |target: &'static str, level| Metadata::builder().target(target).level(level).build();
        assert!(enabled(LevelFilter::Debug, &meta("edgeinfer::app", Level::Debug)));
        assert!(!enabled(LevelFilter::Info, &meta("edgeinfer::app", Level::Debug)));
        assert!(
            !enabled(LevelFilter::Debug, &meta("rumqttc::state", Level::Debug)),
            "dependency debug noise"
        );
        assert!(enabled(LevelFilter::Info, &meta("rumqttc::state", Level::Warn)));
        assert!(
            !enabled(LevelFilter::Debug, &meta("rumqttd::router", Level::Error)),
            "demo broker spans"
        );
    }

    #[test]
    fn key_values_render_as_suffix() {
        let kvs: &[(&str, &str)] = &[("pipeline", "digits"), ("model_version", "3")];
        let record = Record::builder().args(format_args!("x")).key_values(&kvs).build();
        let mut s = String::new();
        record.key_values().visit(&mut KvSuffix(&mut s)).expect("visit");
        assert_eq!(s, " pipeline=digits model_version=3");
    }
}
