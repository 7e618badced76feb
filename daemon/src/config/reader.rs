//! A small typed reader over a parsed TOML table that records every problem instead of stopping
//! at the first one. Serde's derive would stop at the first unknown key or wrong type; operators
//! fixing a config on a device want the whole list in one `edgeinfer validate` run.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use toml::{Table, Value};

use super::units;

#[cfg(test)]
thread_local! {
    /// Every key path the reader asked for on this thread (tests check docs against it).
    pub static KNOWN_KEYS: std::cell::RefCell<BTreeSet<String>> = const { std::cell::RefCell::new(BTreeSet::new()) };
}

/// One thing wrong with a config file: where, what was found, and what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `pipelines.digits.queue.capacity`.
    pub key: String,
    /// The offending value as written (TOML syntax), when there is one.
    pub value: Option<String>,
    /// What is wrong, and where useful a hint.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)?;
        if let Some(v) = &self.value {
            write!(f, " (got {v})")?;
        }
        Ok(())
    }
}

/// Collected problems.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(
        &mut self,
        key: impl Into<String>,
        value: Option<&Value>,
        message: impl Into<String>,
    ) {
        self.0.push(Problem {
            key: key.into(),
            value: value.map(render_value),
            message: message.into(),
        });
    }
}

/// Renders a value compactly for messages (long values are shortened).
fn render_value(v: &Value) -> String {
    let s = match v {
        Value::Table(_) => "a table".to_string(),
        other => other.to_string(),
    };
    if s.chars().count() > 80 {
        let short: String = s.chars().take(77).collect();
        format!("{short}...")
    } else {
        s
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// A view of one TOML table at a key path, remembering which keys were read.
pub struct Section<'a> {
    path: String,
    table: &'a Table,
    seen: BTreeSet<&'a str>,
}

impl<'a> Section<'a> {
    pub fn new(path: impl Into<String>, table: &'a Table) -> Self {
        Self { path: path.into(), table, seen: BTreeSet::new() }
    }

    /// Full dotted path of `key` in this section.
    pub fn key(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_string() } else { format!("{}.{key}", self.path) }
    }

    /// Whether `key` is present (does not mark it as known).
    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Raw access; marks the key as known.
    pub fn get(&mut self, key: &'a str) -> Option<&'a Value> {
        self.seen.insert(key);
        #[cfg(test)]
        KNOWN_KEYS.with(|k| k.borrow_mut().insert(self.key(key)));
        self.table.get(key)
    }

    fn typed<T>(
        &mut self,
        p: &mut Problems,
        key: &'a str,
        expected: &str,
        f: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Option<T> {
        let v = self.get(key)?;
        let out = f(v);
        if out.is_none() {
            p.push(self.key(key), Some(v), format!("expected {expected}, found {}", type_name(v)));
        }
        out
    }

    pub fn string(&mut self, p: &mut Problems, key: &'a str) -> Option<&'a str> {
        self.typed(p, key, "a string", Value::as_str)
    }

    pub fn bool(&mut self, p: &mut Problems, key: &'a str) -> Option<bool> {
        self.typed(p, key, "a boolean", Value::as_bool)
    }

    /// An integer within `min..=max`.
    pub fn int(&mut self, p: &mut Problems, key: &'a str, min: i64, max: i64) -> Option<i64> {
        let v = self.typed(p, key, "an integer", Value::as_integer)?;
        if v < min || v > max {
            p.push(self.key(key), self.table.get(key), format!("must be between {min} and {max}"));
            return None;
        }
        Some(v)
    }

    /// A duration string such as `10s`, within `min..=max`.
    pub fn duration(
        &mut self,
        p: &mut Problems,
        key: &'a str,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let raw = self.get(key)?;
        let Some(s) = raw.as_str() else {
            p.push(
                self.key(key),
                Some(raw),
                format!("expected a duration string such as \"10s\", found {}", type_name(raw)),
            );
            return None;
        };
        match units::parse_duration(s) {
            Ok(d) if d < min || d > max => {
                p.push(
                    self.key(key),
                    Some(raw),
                    format!(
                        "must be between {} and {}",
                        units::format_duration(min),
                        units::format_duration(max)
                    ),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                p.push(self.key(key), Some(raw), e);
                None
            }
        }
    }

    /// A byte size (`"4MiB"` or an integer number of bytes), within `min..=max`.
    pub fn size(&mut self, p: &mut Problems, key: &'a str, min: u64, max: u64) -> Option<u64> {
        let raw = self.get(key)?;
        let parsed = match raw {
            Value::Integer(i) => u64::try_from(*i).map_err(|_| "must not be negative".to_string()),
            Value::String(s) => units::parse_size(s),
            other => Err(format!(
                "expected a size such as \"4MiB\" or a number of bytes, found {}",
                type_name(other)
            )),
        };
        match parsed {
            Ok(n) if n < min || n > max => {
                p.push(self.key(key), Some(raw), format!("must be between {min} and {max} bytes"));
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                p.push(self.key(key), Some(raw), e);
                None
            }
        }
    }

    /// One of a fixed set of strings.
    pub fn choice<T: Copy>(
        &mut self,
        p: &mut Problems,
        key: &'a str,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let raw = self.get(key)?;
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let found = raw.as_str().and_then(|s| choices.iter().find(|(n, _)| *n == s));
        match found {
            Some((_, v)) => Some(*v),
            None => {
                p.push(self.key(key), Some(raw), format!("expected one of: {}", names.join(", ")));
                None
            }
        }
    }

    /// A number (integer or float) within `min..=max`.
    pub fn float(&mut self, p: &mut Problems, key: &'a str, min: f64, max: f64) -> Option<f64> {
        let raw = self.get(key)?;
        let v = match raw {
            Value::Float(f) => *f,
            Value::Integer(i) => *i as f64,
            other => {
                p.push(
                    self.key(key),
                    Some(other),
                    format!("expected a number, found {}", type_name(other)),
                );
                return None;
            }
        };
        if !(min..=max).contains(&v) {
            p.push(self.key(key), Some(raw), format!("must be between {min} and {max}"));
            return None;
        }
        Some(v)
    }

    /// An array of strings.
    pub fn string_array(&mut self, p: &mut Problems, key: &'a str) -> Option<Vec<String>> {
        let raw = self.get(key)?;
        let arr = raw.as_array().and_then(|a| {
            a.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<_>>>()
        });
        if arr.is_none() {
            p.push(self.key(key), Some(raw), "expected an array of strings");
        }
        arr
    }

    /// An array of integers within `min..=max`.
    pub fn int_array(
        &mut self,
        p: &mut Problems,
        key: &'a str,
        min: i64,
        max: i64,
    ) -> Option<Vec<i64>> {
        let raw = self.get(key)?;
        let Some(arr) = raw.as_array() else {
            p.push(
                self.key(key),
                Some(raw),
                format!("expected an array, found {}", type_name(raw)),
            );
            return None;
        };
        let mut out = Vec::with_capacity(arr.len());
        for (i, v) in arr.iter().enumerate() {
            match v.as_integer() {
                Some(n) if (min..=max).contains(&n) => out.push(n),
                _ => {
                    p.push(
                        format!("{}[{i}]", self.key(key)),
                        Some(v),
                        format!("expected an integer between {min} and {max}"),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    /// A nested table as its own section. A non-table value is a problem.
    pub fn table(&mut self, p: &mut Problems, key: &'a str) -> Option<Section<'a>> {
        let sub = self.key(key);
        self.typed(p, key, "a table", Value::as_table).map(|t| Section::new(sub, t))
    }

    /// Every key of this table (for maps keyed by user-chosen names, like `pipelines`).
    pub fn entries(&mut self) -> impl Iterator<Item = (&'a String, &'a Value)> + use<'a> {
        let table = self.table;
        for k in table.keys() {
            self.seen.insert(k.as_str());
        }
        table.iter()
    }

    /// Reports every key that was never read as unknown (typos, keys from a newer version).
    pub fn finish(self, p: &mut Problems) {
        for (k, v) in self.table {
            if !self.seen.contains(k.as_str()) {
                let known: Vec<&str> = self.seen.iter().copied().collect();
                let hint = closest(k, &known)
                    .map(|c| format!("; did you mean `{c}`?"))
                    .unwrap_or_default();
                p.push(self.key(k), Some(v), format!("unknown key{hint}"));
            }
        }
    }
}

/// The known key closest to `k` by edit distance, if it is close enough to be a likely typo.
fn closest<'k>(k: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|c| (levenshtein(k, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_every_problem_and_suggests_typos() {
        let t: Table =
            toml::from_str("port = \"x\"\nkeepalive = \"10\"\nhots = \"a\"\nmode = \"z\"\nn = 99")
                .expect("toml");
        let mut p = Problems::default();
        let mut s = Section::new("broker", &t);
        s.int(&mut p, "port", 1, 65535);
        s.duration(&mut p, "keepalive", Duration::ZERO, Duration::from_secs(60));
        s.string(&mut p, "host");
        s.choice(&mut p, "mode", &[("a", 1), ("b", 2)]);
        s.int(&mut p, "n", 0, 10);
        s.finish(&mut p);
        let msgs: Vec<String> = p.0.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 5, "{msgs:#?}");
        assert!(msgs[0].starts_with("broker.port: expected an integer, found a string"));
        assert!(msgs[1].contains("broker.keepalive") && msgs[1].contains("no unit"));
        assert!(msgs[2].contains("broker.mode: expected one of: a, b"));
        assert!(msgs[3].contains("broker.n: must be between 0 and 10 (got 99)"));
        assert!(msgs[4].contains("broker.hots: unknown key; did you mean `host`?"), "{}", msgs[4]);
    }
}
