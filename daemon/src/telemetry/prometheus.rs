//! Prometheus text exposition format 0.0.4: a writer that renders metric families into a reused
//! `String`.
//!
//! Owns the wire format only: escaping, number formatting, and how a [`Snapshot`] becomes
//! cumulative `le` buckets. It does not decide which metrics exist or what they are called (the
//! daemon's renderer does: `edgeinfer_` prefix, seconds and bytes, `_total` counters), and it does
//! no I/O (`app::metrics_http` serves the text).
//!
//! Histograms are exposed with one bucket per doubling (1 µs, 2 µs, 4 µs, ... 2^27 µs, `+Inf`):
//! every fourth internal bound. The internal buckets nest exactly inside those, so the exposed
//! cumulative counts are exact, not interpolated, and the `le` values are exact decimals printed
//! from integer nanoseconds, hence byte-identical on every scrape (Prometheus identifies a bucket
//! series by its `le` string).

use std::fmt::Write as _;

use super::histogram::{self, BUCKETS, Snapshot};

/// Internal buckets per exposed bucket: the histogram has four bounds per doubling, we expose one.
/// `tests::exposed_bounds_are_exact_doublings` guards the relation to `histogram.rs`.
const STRIDE: usize = 4;

/// The metric types this writer emits (`# TYPE` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic count; by convention the name ends in `_total`.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Cumulative `_bucket` series plus `_sum` and `_count`, written by [`Exposition::histogram`].
    Histogram,
}

impl Kind {
    /// The keyword used in the `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Text exposition being built. Reuse one across scrapes ([`Exposition::clear`]) so rendering
/// settles to no allocation once the buffer has grown to the output's size.
///
/// Usage: for each family, call [`Exposition::family`] once, then its samples
/// ([`Exposition::sample`] for counters and gauges, [`Exposition::histogram`] for histograms).
/// Names and label names come from the daemon's code, not from outside, so they are checked with
/// `debug_assert!` (tests catch a bad name) rather than at run time; label values and help texts
/// may contain anything and are escaped.
#[derive(Debug, Default)]
pub struct Exposition {
    buf: String,
    /// Byte range in `buf` of each declared family's name, with its kind. Kept as ranges rather
    /// than copies so declaring a family does not allocate; the last entry is the open family.
    families: Vec<(usize, usize, Kind)>,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything written, keeping the allocated capacity.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.families.clear();
    }

    /// The text so far: complete lines, each ending in `\n`.
    pub fn as_str(&self) -> &str {
        &self.buf
    }

    /// The text, giving up the buffer.
    pub fn into_string(self) -> String {
        self.buf
    }

    /// Starts a metric family: writes its `# HELP` (escaped) and `# TYPE` lines. Each family is
    /// declared once and its samples follow immediately; a second declaration of the same name is
    /// a caller bug (a `debug_assert!`), and in release builds writes no second header, because
    /// Prometheus rejects a scrape with a repeated `# TYPE` line.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(valid_name(name), "invalid metric name {name:?}");
        let declared = self.families.iter().any(|&(a, b, _)| &self.buf[a..b] == name);
        debug_assert!(!declared, "metric family {name} declared twice");
        if declared {
            return;
        }
        self.buf.push_str("# HELP ");
        self.buf.push_str(name);
        self.buf.push(' ');
        push_escaped(&mut self.buf, help, false);
        self.buf.push_str("\n# TYPE ");
        let start = self.buf.len();
        self.buf.push_str(name);
        self.families.push((start, self.buf.len(), kind));
        self.buf.push(' ');
        self.buf.push_str(kind.as_str());
        self.buf.push('\n');
    }

    /// Writes one counter or gauge sample: `name{labels} value`. `name` is the family's full
    /// name; label values are escaped; `value` follows Prometheus' number rules (see
    /// [`push_value`]).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        debug_assert!(valid_name(name), "invalid metric name {name:?}");
        debug_assert!(
            self.open_family().is_none_or(|(f, k)| f == name && k != Kind::Histogram),
            "sample {name} does not belong to the open family {:?}",
            self.open_family()
        );
        self.buf.push_str(name);
        if !labels.is_empty() {
            self.buf.push('{');
            push_label_pairs(&mut self.buf, labels);
            self.buf.push('}');
        }
        self.buf.push(' ');
        push_value(&mut self.buf, value);
        self.buf.push('\n');
    }

    /// Writes a histogram's series: `name_bucket{labels,le="..."}` with cumulative counts for one
    /// bound per doubling and `+Inf`, then `name_sum` in seconds and `name_count`.
    ///
    /// A snapshot whose `counts` has an unexpected length (e.g. built from a peer's message) is
    /// rendered without panicking: missing counts are zero and surplus ones only reach `+Inf`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], snap: &Snapshot) {
        debug_assert!(valid_name(name), "invalid metric name {name:?}");
        debug_assert!(labels.iter().all(|(k, _)| *k != "le"), "`le` is reserved for buckets");
        debug_assert!(
            self.open_family().is_none_or(|(f, k)| f == name && k == Kind::Histogram),
            "histogram {name} does not belong to the open family {:?}",
            self.open_family()
        );
        let bounds = histogram::bounds_ns();
        // Internal bucket i holds (bounds[i-1], bounds[i]] (bucket 0 also holds 0), so the count
        // at or below bounds[b] is the sum of counts[0..=b]; carry it forward between bounds.
        let mut cumulative = 0u64;
        let mut next = 0;
        for b in (0..BUCKETS).step_by(STRIDE) {
            cumulative = snap
                .counts
                .iter()
                .take(b + 1)
                .skip(next)
                .fold(cumulative, |acc, c| acc.saturating_add(*c));
            next = b + 1;
            self.bucket(name, labels, Some(bounds[b]), cumulative);
        }
        // Everything, including the overflow bucket (index BUCKETS): `+Inf` must equal `_count`.
        let total = snap.counts.iter().fold(0u64, |acc, c| acc.saturating_add(*c));
        self.bucket(name, labels, None, total);

        self.series_name(name, "_sum", labels);
        push_seconds(&mut self.buf, snap.sum_ns);
        self.buf.push('\n');
        self.series_name(name, "_count", labels);
        push_value(&mut self.buf, total as f64);
        self.buf.push('\n');
    }

    /// The family the next samples belong to.
    fn open_family(&self) -> Option<(&str, Kind)> {
        self.families.last().map(|&(a, b, k)| (&self.buf[a..b], k))
    }

    /// One `_bucket` line; `le_ns` `None` is `+Inf`.
    fn bucket(&mut self, name: &str, labels: &[(&str, &str)], le_ns: Option<u64>, count: u64) {
        self.buf.push_str(name);
        self.buf.push_str("_bucket{");
        push_label_pairs(&mut self.buf, labels);
        if !labels.is_empty() {
            self.buf.push(',');
        }
        self.buf.push_str("le=\"");
        match le_ns {
            Some(ns) => push_seconds(&mut self.buf, ns),
            None => self.buf.push_str("+Inf"),
        }
        self.buf.push_str("\"} ");
        push_value(&mut self.buf, count as f64);
        self.buf.push('\n');
    }

    /// `name` + `suffix` + `{labels}` + the space before the value.
    fn series_name(&mut self, name: &str, suffix: &str, labels: &[(&str, &str)]) {
        self.buf.push_str(name);
        self.buf.push_str(suffix);
        if !labels.is_empty() {
            self.buf.push('{');
            push_label_pairs(&mut self.buf, labels);
            self.buf.push('}');
        }
        self.buf.push(' ');
    }
}

/// Whether `name` is a valid metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// Whether `name` is a valid label name: `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`
/// (reserved for Prometheus' own labels).
pub fn valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with("__")
}

/// `k="v",k2="v2"` without braces; values escaped.
fn push_label_pairs(buf: &mut String, labels: &[(&str, &str)]) {
    for (i, (k, v)) in labels.iter().enumerate() {
        debug_assert!(valid_label_name(k), "invalid label name {k:?}");
        if i > 0 {
            buf.push(',');
        }
        buf.push_str(k);
        buf.push_str("=\"");
        push_escaped(buf, v, true);
        buf.push('"');
    }
}

/// Escapes backslash and newline (help text), and also double quote for label values: the only
/// escapes format 0.0.4 defines. Anything else, including non-ASCII, passes through as UTF-8.
fn push_escaped(buf: &mut String, s: &str, quote: bool) {
    let special = |c: char| c == '\\' || c == '\n' || (quote && c == '"');
    if !s.contains(special) {
        buf.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => buf.push_str("\\\\"),
            '\n' => buf.push_str("\\n"),
            '"' if quote => buf.push_str("\\\""),
            c => buf.push(c),
        }
    }
}

/// A sample value: `NaN`, `+Inf`, `-Inf`; integral values as plain integers (counters read
/// naturally and never as `1e6`); anything else as Rust's shortest round-trip representation,
/// which Go's `ParseFloat` (Prometheus) reads back exactly.
fn push_value(buf: &mut String, v: f64) {
    // 2^63: every integral f64 below it converts to i64 exactly.
    const I64_LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if v.is_nan() {
        buf.push_str("NaN");
    } else if v == f64::INFINITY {
        buf.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        buf.push_str("-Inf");
    } else if v.fract() == 0.0 && v.abs() < I64_LIMIT {
        // Writing into a String cannot fail.
        let _ = write!(buf, "{}", v as i64);
    } else {
        let _ = write!(buf, "{v:?}");
    }
}

/// Nanoseconds as an exact decimal number of seconds, without exponent or trailing zeros:
/// 1000 -> `0.000001`, 1_500_000_000 -> `1.5`. Integer arithmetic, so the text for a given
/// value never varies (bucket `le` labels must be identical across scrapes).
fn push_seconds(buf: &mut String, ns: u64) {
    let (secs, mut frac) = (ns / 1_000_000_000, ns % 1_000_000_000);
    let _ = write!(buf, "{secs}");
    if frac != 0 {
        let mut width = 9;
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        let _ = write!(buf, ".{frac:0width$}");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::telemetry::Histogram;

    /// One line of format 0.0.4 as this writer emits it.
    #[derive(Debug, PartialEq)]
    enum Line {
        Help { name: String, text: String },
        Type { name: String, kind: String },
        Sample { name: String, labels: Vec<(String, String)>, value: f64 },
    }

    /// A strict reader of one line: single spaces, no timestamps, no other comments, no leading
    /// or trailing whitespace. Undoes the escapes, so tests can compare with what was written
    /// (`prometheus-parse` does not unescape label values).
    fn parse_line(line: &str) -> Result<Line, String> {
        if line.trim() != line || line.is_empty() {
            return Err("blank line or stray whitespace".into());
        }
        let name_end = |s: &str| {
            s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(s.len())
        };
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').ok_or("HELP without text")?;
            if !valid_name(name) {
                return Err(format!("bad name {name:?}"));
            }
            return Ok(Line::Help { name: name.into(), text: unescape(text, false)? });
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or("TYPE without kind")?;
            if !valid_name(name) || !["counter", "gauge", "histogram"].contains(&kind) {
                return Err(format!("bad TYPE line {line:?}"));
            }
            return Ok(Line::Type { name: name.into(), kind: kind.into() });
        }
        let (name, mut rest) = line.split_at(name_end(line));
        if !valid_name(name) {
            return Err(format!("bad name in {line:?}"));
        }
        let mut labels = Vec::new();
        if let Some(mut l) = rest.strip_prefix('{') {
            loop {
                let (key, after) = l.split_once("=\"").ok_or("label without =\"")?;
                if !valid_label_name(key) {
                    return Err(format!("bad label name {key:?}"));
                }
                // The value ends at the first quote not preceded by an escaping backslash.
                let mut end = None;
                let mut escaped = false;
                for (i, c) in after.char_indices() {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' => escaped = true,
                        '"' => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.ok_or("unterminated label value")?;
                labels.push((key.to_string(), unescape(&after[..end], true)?));
                l = &after[end + 1..];
                if let Some(r) = l.strip_prefix(',') {
                    l = r;
                } else if let Some(r) = l.strip_prefix('}') {
                    rest = r;
                    break;
                } else {
                    return Err(format!("expected , or }} in {line:?}"));
                }
            }
        }
        let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v if v.chars().all(|c| c.is_ascii_digit() || "+-.e".contains(c)) => {
                v.parse().map_err(|e| format!("bad value {v:?}: {e}"))?
            }
            v => return Err(format!("bad value {v:?}")),
        };
        Ok(Line::Sample { name: name.into(), labels, value })
    }

    fn unescape(s: &str, quote: bool) -> Result<String, String> {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\n' => return Err("raw newline".into()),
                '"' if quote => return Err("raw quote".into()),
                '\\' => match chars.next() {
                    Some('\\') => out.push('\\'),
                    Some('n') => out.push('\n'),
                    Some('"') if quote => out.push('"'),
                    other => return Err(format!("bad escape \\{other:?}")),
                },
                c => out.push(c),
            }
        }
        Ok(out)
    }

    fn value_text(v: f64) -> String {
        let mut s = String::new();
        push_value(&mut s, v);
        s
    }

    fn seconds_text(ns: u64) -> String {
        let mut s = String::new();
        push_seconds(&mut s, ns);
        s
    }

    #[test]
    fn help_and_label_values_are_escaped() {
        let mut e = Exposition::new();
        e.family("edgeinfer_x_total", Kind::Counter, "a \\ b\nc \"q\"");
        e.sample("edgeinfer_x_total", &[("topic", "a\\b\"c\nd"), ("plain", "é{},=")], 1.0);
        assert_eq!(
            e.as_str(),
            "# HELP edgeinfer_x_total a \\\\ b\\nc \"q\"\n\
             # TYPE edgeinfer_x_total counter\n\
             edgeinfer_x_total{topic=\"a\\\\b\\\"c\\nd\",plain=\"é{},=\"} 1\n"
        );
    }

    #[test]
    fn values_follow_prometheus_number_rules() {
        let cases = [
            (0.0, "0"),
            (-0.0, "0"),
            (42.0, "42"),
            (-3.0, "-3"),
            (1_048_576.0, "1048576"),
            (2f64.powi(60), "1152921504606846976"),
            (1.5, "1.5"),
            (0.1, "0.1"),
            (-0.25, "-0.25"),
            (1e-7, "1e-7"),
            (u64::MAX as f64, "1.8446744073709552e19"),
            (1e300, "1e300"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
        ];
        for (v, want) in cases {
            let got = value_text(v);
            assert_eq!(got, want, "formatting {v:?}");
            if v.is_finite() {
                assert_eq!(got.parse::<f64>(), Ok(v), "{got} must read back exactly");
            }
        }
    }

    #[test]
    fn seconds_from_nanoseconds_are_exact_decimals() {
        assert_eq!(seconds_text(0), "0");
        assert_eq!(seconds_text(1), "0.000000001");
        assert_eq!(seconds_text(1_000), "0.000001");
        assert_eq!(seconds_text(2_000), "0.000002");
        assert_eq!(seconds_text(1_500_000_000), "1.5");
        assert_eq!(seconds_text(3_000_000_000), "3");
        assert_eq!(seconds_text(134_217_728_000), "134.217728");
        assert_eq!(seconds_text(u64::MAX), "18446744073.709551615");
    }

    #[test]
    fn exposed_bounds_are_exact_doublings() {
        // The exposed buckets are exact only if every STRIDE-th internal bound is a doubling of
        // 1 µs; this breaks if histogram.rs changes its resolution.
        let b = histogram::bounds_ns();
        let exposed: Vec<u64> = (0..BUCKETS).step_by(STRIDE).map(|i| b[i]).collect();
        let doublings: Vec<u64> = (0..exposed.len()).map(|k| 1_000u64 << k).collect();
        assert_eq!(exposed, doublings);
        assert_eq!((BUCKETS - 1) % STRIDE, 0, "the last internal bound is exposed");
    }

    /// Durations in ns chosen around the edges: zero, exactly on exposed and internal bounds
    /// (inclusive), just above them, and beyond the last bound (overflow).
    const EDGES_NS: [u64; 14] = [
        0,
        1_000,
        1_001,
        1_300,
        1_414,
        2_000,
        3_000,
        4_001,
        999_999,
        1_000_000,
        12_345_678,
        134_217_728_000,
        134_217_728_001,
        1_000_000_000_000,
    ];

    fn edges_snapshot() -> Snapshot {
        let h = Histogram::default();
        for ns in EDGES_NS {
            h.record(Duration::from_nanos(ns));
        }
        h.snapshot()
    }

    fn render_sample_exposition(snap: &Snapshot) -> String {
        let mut e = Exposition::new();
        e.family("edgeinfer_frames_received_total", Kind::Counter, "Frames received.");
        e.sample("edgeinfer_frames_received_total", &[("pipeline", "cam")], 12.0);
        e.sample("edgeinfer_frames_received_total", &[("pipeline", "mic")], 0.0);
        e.family("edgeinfer_queue_depth", Kind::Gauge, "Frames waiting in the queue.");
        e.sample("edgeinfer_queue_depth", &[("pipeline", "cam"), ("model", "v2")], 3.0);
        e.family("edgeinfer_resident_memory_bytes", Kind::Gauge, "Resident set size.");
        e.sample("edgeinfer_resident_memory_bytes", &[], 1_048_576.0);
        e.family("edgeinfer_cpu_share", Kind::Gauge, "Share of one CPU.");
        e.sample("edgeinfer_cpu_share", &[], 0.25);
        e.family("edgeinfer_test_duration_seconds", Kind::Histogram, "Arrival to result, seconds.");
        e.histogram("edgeinfer_test_duration_seconds", &[("pipeline", "cam")], snap);
        e.histogram(
            "edgeinfer_test_duration_seconds",
            &[("pipeline", "mic")],
            &Snapshot::default(),
        );
        e.family("edgeinfer_unlabelled_seconds", Kind::Histogram, "No labels.");
        e.histogram("edgeinfer_unlabelled_seconds", &[], snap);
        e.into_string()
    }

    #[test]
    fn histogram_round_trips_through_a_real_parser() {
        use prometheus_parse::{Scrape, Value};

        let snap = edges_snapshot();
        let text = render_sample_exposition(&snap);
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
        let find = |metric: &str, pipeline: Option<&str>| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == metric && s.labels.get("pipeline") == pipeline)
                .unwrap_or_else(|| panic!("{metric} {pipeline:?} missing from\n{text}"))
        };

        // Counters and gauges: values, types and labels.
        assert_eq!(
            find("edgeinfer_frames_received_total", Some("cam")).value,
            Value::Counter(12.0)
        );
        assert_eq!(find("edgeinfer_frames_received_total", Some("mic")).value, Value::Counter(0.0));
        let depth = find("edgeinfer_queue_depth", Some("cam"));
        assert_eq!(depth.value, Value::Gauge(3.0));
        assert_eq!(depth.labels.get("model"), Some("v2"));
        assert_eq!(find("edgeinfer_resident_memory_bytes", None).value, Value::Gauge(1_048_576.0));
        assert_eq!(find("edgeinfer_cpu_share", None).value, Value::Gauge(0.25));
        assert_eq!(
            scrape.docs.get("edgeinfer_queue_depth").map(String::as_str),
            Some("Frames waiting in the queue.")
        );

        let bounds: Vec<u64> = (0..28).map(|k| 1_000u64 << k).collect();
        for (metric, pipeline) in [
            ("edgeinfer_test_duration_seconds", Some("cam")),
            ("edgeinfer_unlabelled_seconds", None),
        ] {
            let Value::Histogram(buckets) = &find(metric, pipeline).value else {
                panic!("{metric} is not a histogram");
            };
            assert_eq!(buckets.len(), bounds.len() + 1, "one bucket per doubling plus +Inf");
            for (bucket, le_ns) in buckets.iter().zip(&bounds) {
                assert_eq!(bucket.less_than, *le_ns as f64 / 1e9);
                // Brute force over the raw durations: cumulative means "at or below le".
                let want = EDGES_NS.iter().filter(|ns| **ns <= *le_ns).count() as f64;
                assert_eq!(bucket.count, want, "{metric} le={}", bucket.less_than);
            }
            assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count), "monotonic");
            let inf = buckets.last().expect("+Inf bucket");
            assert_eq!(inf.less_than, f64::INFINITY);
            assert_eq!(inf.count, EDGES_NS.len() as f64);
            assert!(buckets[bounds.len() - 1].count < inf.count, "overflow only in +Inf");

            // `_sum` and `_count` have no TYPE of their own, so the parser calls them untyped.
            let sum_ns: u64 = EDGES_NS.iter().sum();
            assert_eq!(
                find(&format!("{metric}_sum"), pipeline).value,
                Value::Untyped(sum_ns as f64 / 1e9)
            );
            assert_eq!(
                find(&format!("{metric}_count"), pipeline).value,
                Value::Untyped(EDGES_NS.len() as f64)
            );
        }

        let Value::Histogram(empty) = &find("edgeinfer_test_duration_seconds", Some("mic")).value
        else {
            panic!("empty histogram missing");
        };
        assert!(empty.iter().all(|b| b.count == 0.0) && empty.len() == bounds.len() + 1);
    }

    /// Help text and label value with every character that needs escaping, and some that do not.
    const NASTY: &str = "a \"quoted\" \\ back\\slash\nnew line, {braces}=é";

    fn render_nasty_family(text: &mut String) {
        let mut e = Exposition::new();
        e.family("edgeinfer_nasty_total", Kind::Counter, NASTY);
        e.sample("edgeinfer_nasty_total", &[("topic", NASTY), ("empty", "")], 7.0);
        text.push_str(e.as_str());
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let mut text = render_sample_exposition(&edges_snapshot());
        render_nasty_family(&mut text);
        let nasty = NASTY;

        assert!(text.ends_with('\n'), "the last line is terminated");
        let lines: Vec<Line> = text
            .lines()
            .map(|l| parse_line(l).unwrap_or_else(|err| panic!("{err}: {l:?}")))
            .collect();
        assert!(
            lines
                .contains(&Line::Help { name: "edgeinfer_nasty_total".into(), text: nasty.into() })
        );
        assert!(lines.contains(&Line::Sample {
            name: "edgeinfer_nasty_total".into(),
            labels: vec![("topic".into(), nasty.into()), ("empty".into(), String::new())],
            value: 7.0,
        }));
        // HELP then TYPE once per family, in that order.
        let types: Vec<&str> = lines
            .iter()
            .filter_map(|l| match l {
                Line::Type { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        let mut unique = types.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), types.len(), "one TYPE line per family");
        for (i, l) in lines.iter().enumerate() {
            if let Line::Type { name, kind } = l {
                assert!(
                    matches!(&lines[i - 1], Line::Help { name: h, .. } if h == name),
                    "HELP precedes TYPE for {name} ({kind})"
                );
            }
        }
    }

    #[test]
    fn bucket_labels_are_identical_across_renders() {
        let le_labels = |text: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.split_once("le=\"").and_then(|(_, r)| r.split_once('"')))
                .map(|(le, _)| le.to_string())
                .collect()
        };
        let mut e = Exposition::new();
        e.family("edgeinfer_d_seconds", Kind::Histogram, "d");
        e.histogram("edgeinfer_d_seconds", &[], &edges_snapshot());
        let first = le_labels(e.as_str());
        e.clear();
        e.family("edgeinfer_d_seconds", Kind::Histogram, "d");
        e.histogram("edgeinfer_d_seconds", &[], &Snapshot::default());
        assert_eq!(le_labels(e.as_str()), first);
        assert_eq!(&first[..4], ["0.000001", "0.000002", "0.000004", "0.000008"]);
        assert_eq!(first[first.len() - 2..], ["134.217728", "+Inf"]);
    }

    #[test]
    fn histogram_with_odd_counts_length_does_not_panic() {
        let short = Snapshot { counts: vec![1, 2], sum_ns: 5, max_ns: 3 };
        let long = Snapshot { counts: vec![1; BUCKETS + 5], sum_ns: 5, max_ns: 3 };
        let mut e = Exposition::new();
        e.family("edgeinfer_odd_seconds", Kind::Histogram, "odd");
        e.histogram("edgeinfer_odd_seconds", &[("s", "short")], &short);
        e.histogram("edgeinfer_odd_seconds", &[("s", "long")], &long);
        let text = e.as_str();
        assert!(text.contains("edgeinfer_odd_seconds_bucket{s=\"short\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("edgeinfer_odd_seconds_count{s=\"long\"} 114\n"));
        assert!(text.contains("edgeinfer_odd_seconds_bucket{s=\"long\",le=\"+Inf\"} 114\n"));
    }

    #[test]
    fn clear_keeps_the_buffer() {
        let snap = edges_snapshot();
        let mut e = Exposition::new();
        e.family("edgeinfer_d_seconds", Kind::Histogram, "d");
        e.histogram("edgeinfer_d_seconds", &[], &snap);
        let first = e.as_str().to_owned();
        let capacity = e.buf.capacity();
        e.clear();
        assert!(e.as_str().is_empty());
        e.family("edgeinfer_d_seconds", Kind::Histogram, "d");
        e.histogram("edgeinfer_d_seconds", &[], &snap);
        assert_eq!(e.as_str(), first);
        assert_eq!(e.buf.capacity(), capacity, "re-rendering the same metrics does not grow");
    }

    #[test]
    fn names_are_validated() {
        for ok in ["a", "_x", "edgeinfer_frames_total", "ns:rule:rate5m", "A9"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "9a", "a-b", "a b", "é", "a.b"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_label_name("pipeline") && valid_label_name("_x"));
        for bad in ["", "__name__", "a:b", "1a", "le-x"] {
            assert!(!valid_label_name(bad), "{bad}");
        }
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "declared twice")]
    fn declaring_a_family_twice_is_caught() {
        let mut e = Exposition::new();
        e.family("edgeinfer_a", Kind::Gauge, "a");
        e.family("edgeinfer_b", Kind::Gauge, "b");
        e.family("edgeinfer_a", Kind::Gauge, "a");
    }

    /// Cross-check with Prometheus' own linter. Needs `promtool` on PATH (Debian: `apt-get
    /// install prometheus`); run with `cargo test -p edgeinfer --lib promtool -- --ignored`.
    #[test]
    #[ignore = "needs promtool on PATH"]
    fn promtool_accepts_the_output() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};

        let mut text = render_sample_exposition(&edges_snapshot());
        render_nasty_family(&mut text);
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool on PATH (Debian package `prometheus`)");
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
        let out = child.wait_with_output().expect("promtool runs");
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
