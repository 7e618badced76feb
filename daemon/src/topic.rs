//! MQTT topic filters and output topic templates.
//!
//! Owns the pure string logic: parsing and validating subscription filters (`+`, `#`), matching a
//! concrete topic against a filter while recording what each wildcard captured, and rendering
//! output topic templates (`{device}`, `{pipeline}`, `{1}`, `{2}`…). It does no I/O and knows
//! nothing about pipelines or the broker; `config` validates with it and `pipeline` routes with it.

use std::fmt;
use std::ops::Range;

use smallvec::SmallVec;

/// Longest topic or filter we accept, in bytes. MQTT allows 65535; nothing sane needs that, and a
/// bound keeps rendered topics (and the memory behind them) small.
pub const MAX_TOPIC_LEN: usize = 1024;

/// One level of a subscription filter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+`: exactly one level.
    Single,
    /// `#`: this level and every level below it (also matches the parent itself).
    Multi,
}

/// A validated MQTT subscription filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    text: String,
    levels: Vec<Level>,
}

/// Byte ranges into the matched topic, one per wildcard in filter order. A `#` capture spans the
/// remaining levels including their `/` separators (it may be empty).
pub type Captures = SmallVec<[Range<usize>; 4]>;

impl TopicFilter {
    /// Parses and validates a filter according to MQTT 3.1.1 section 4.7.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("topic filter is empty".into());
        }
        if text.len() > MAX_TOPIC_LEN {
            return Err(format!("topic filter is longer than {MAX_TOPIC_LEN} bytes"));
        }
        if text.contains('\0') {
            return Err("topic filter contains a NUL character".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "+" => Level::Single,
                "#" if i + 1 == parts.len() => Level::Multi,
                "#" => return Err("`#` is only allowed as the last level".into()),
                p if p.contains('+') || p.contains('#') => {
                    return Err(format!(
                        "wildcard inside level `{p}`: `+` and `#` must occupy a whole level"
                    ));
                }
                p => Level::Literal(p.to_string()),
            };
            levels.push(level);
        }
        Ok(Self { text: text.to_string(), levels })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Number of wildcards, i.e. how many captures a match yields.
    pub fn wildcard_count(&self) -> usize {
        self.levels.iter().filter(|l| !matches!(l, Level::Literal(_))).count()
    }

    /// Matches a concrete topic; on success returns the byte range each wildcard captured.
    pub fn matches(&self, topic: &str) -> Option<Captures> {
        let mut caps = Captures::new();
        // Topics beginning with `$` (e.g. `$SYS/...`) are not matched by a leading wildcard.
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Literal(_))) {
            return None;
        }
        let mut pos = 0usize; // byte offset of the current level in `topic`
        let mut remaining = Some(topic);
        for level in &self.levels {
            match level {
                Level::Multi => {
                    // `a/#` also matches `a` itself: the capture is then empty.
                    let start = if remaining.is_some() { pos } else { topic.len() };
                    caps.push(start..topic.len());
                    return Some(caps);
                }
                Level::Single | Level::Literal(_) => {
                    let rest = remaining?;
                    let (this, next) = match rest.find('/') {
                        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                        None => (rest, None),
                    };
                    match level {
                        Level::Single => caps.push(pos..pos + this.len()),
                        Level::Literal(lit) if lit == this => {}
                        _ => return None,
                    }
                    pos += this.len() + 1;
                    remaining = next;
                }
            }
        }
        if remaining.is_some() { None } else { Some(caps) }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One piece of an output topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Device,
    Pipeline,
    /// 1-based wildcard capture index as written (`{1}`), stored 0-based.
    Capture(usize),
}

/// A validated output topic template such as `edgeinfer/{device}/results/{pipeline}/{1}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    text: String,
    parts: Vec<Part>,
}

impl TopicTemplate {
    /// Parses a template. `captures` is how many wildcard captures are available (0 for topics
    /// that are not derived from an input filter); `{N}` beyond that is an error.
    pub fn parse(text: &str, captures: usize) -> Result<Self, String> {
        if text.is_empty() {
            return Err("topic template is empty".into());
        }
        if text.len() > MAX_TOPIC_LEN {
            return Err(format!("topic template is longer than {MAX_TOPIC_LEN} bytes"));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("unmatched `}}` in `{text}`"));
            }
            literal.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| format!("unclosed `{{` in `{text}`"))?;
            let name = &after[..close];
            let part = match name {
                "device" => Part::Device,
                "pipeline" => Part::Pipeline,
                n => match n.parse::<usize>() {
                    Ok(0) => return Err("captures are numbered from {1}".into()),
                    Ok(i) if i <= captures => Part::Capture(i - 1),
                    Ok(i) => {
                        return Err(format!(
                            "`{{{i}}}` refers to wildcard {i}, but the input filter has {captures} wildcard(s)"
                        ));
                    }
                    Err(_) => {
                        return Err(format!(
                            "unknown placeholder `{{{n}}}`; known: {{device}}, {{pipeline}}, {{1}}..{{N}}"
                        ));
                    }
                },
            };
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(part);
            rest = &after[close + 1..];
        }
        literal.push_str(rest);
        if literal.contains(['+', '#'])
            || parts.iter().any(|p| matches!(p, Part::Literal(l) if l.contains(['+', '#'])))
        {
            return Err("an output topic cannot contain the wildcards `+` or `#`".into());
        }
        if literal.contains('\0') {
            return Err("topic template contains a NUL character".into());
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self { text: text.to_string(), parts })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the template refers to any wildcard capture.
    pub fn uses_captures(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Capture(_)))
    }

    /// Renders into `out` (cleared first). `captures` are ranges into `topic` from
    /// [`TopicFilter::matches`].
    pub fn render_into(
        &self,
        out: &mut String,
        device: &str,
        pipeline: &str,
        topic: &str,
        captures: &[Range<usize>],
    ) {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Device => out.push_str(device),
                Part::Pipeline => out.push_str(pipeline),
                Part::Capture(i) => {
                    if let Some(r) = captures.get(*i) {
                        out.push_str(topic.get(r.clone()).unwrap_or_default());
                    }
                }
            }
        }
    }

    /// Renders a template that uses no captures.
    pub fn render(&self, device: &str, pipeline: &str) -> String {
        let mut s = String::new();
        self.render_into(&mut s, device, pipeline, "", &[]);
        s
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The longest topic MQTT can encode (a u16 length prefix). A longer one would be written with
/// a truncated length and corrupt the connection's byte stream, so every topic is checked
/// against it before it reaches the client.
pub const MQTT_TOPIC_LIMIT: usize = 65_535;

/// At most the first `max` bytes of `topic` (cut at a character boundary), for log lines and
/// error messages about hostile topics.
pub fn shorten(topic: &str, max: usize) -> &str {
    if topic.len() <= max {
        return topic;
    }
    let mut end = max;
    while !topic.is_char_boundary(end) {
        end -= 1;
    }
    &topic[..end]
}

/// Checks that `s` can be used as one topic level (device ids, pipeline names): non-empty, no `/`,
/// no wildcards, no NUL, at most 64 bytes.
pub fn validate_level(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 64 {
        return Err("must be at most 64 bytes".into());
    }
    if let Some(c) = s.chars().find(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_control()) {
        return Err(format!("must not contain {c:?} (it is used as one MQTT topic level)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(filter: &str, topic: &str) -> Option<Vec<String>> {
        let f = TopicFilter::parse(filter).expect("valid filter");
        f.matches(topic).map(|c| c.iter().map(|r| topic[r.clone()].to_string()).collect())
    }

    #[test]
    fn literal_and_single_level_wildcards() {
        assert_eq!(caps("a/b", "a/b"), Some(vec![]));
        assert_eq!(caps("a/b", "a/c"), None);
        assert_eq!(caps("a/+/c", "a/dev1/c"), Some(vec!["dev1".into()]));
        assert_eq!(caps("a/+/c", "a/dev1/x/c"), None);
        assert_eq!(caps("+/+", "x/y"), Some(vec!["x".into(), "y".into()]));
        assert_eq!(caps("a/+", "a/"), Some(vec!["".into()]));
        assert_eq!(caps("a/+", "a"), None);
    }

    #[test]
    fn multi_level_wildcard_captures_the_rest() {
        assert_eq!(caps("a/#", "a/b/c"), Some(vec!["b/c".into()]));
        assert_eq!(caps("a/#", "a"), Some(vec!["".into()]));
        assert_eq!(caps("#", "x/y/z"), Some(vec!["x/y/z".into()]));
        assert_eq!(caps("a/+/#", "a/d/e/f"), Some(vec!["d".into(), "e/f".into()]));
        assert_eq!(caps("a/#", "b/c"), None);
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        assert_eq!(caps("#", "$SYS/broker"), None);
        assert_eq!(caps("+/broker", "$SYS/broker"), None);
        assert_eq!(caps("$SYS/#", "$SYS/broker"), Some(vec!["broker".into()]));
    }

    #[test]
    fn invalid_filters_are_rejected() {
        for bad in ["", "a/#/b", "a/b+", "a#", "a/+x/c"] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(TopicFilter::parse(&"a".repeat(MAX_TOPIC_LEN + 1)).is_err());
    }

    #[test]
    fn templates_render_placeholders_and_captures() {
        let f = TopicFilter::parse("sensors/+/imu/#").expect("filter");
        let t = TopicTemplate::parse("edgeinfer/{device}/{pipeline}/{1}/{2}", f.wildcard_count())
            .expect("template");
        let topic = "sensors/dev7/imu/left/arm";
        let c = f.matches(topic).expect("match");
        let mut out = String::new();
        t.render_into(&mut out, "edge-01", "har", topic, &c);
        assert_eq!(out, "edgeinfer/edge-01/har/dev7/left/arm");
        assert!(t.uses_captures());
    }

    #[test]
    fn template_errors_name_the_problem() {
        let e = TopicTemplate::parse("x/{2}", 1).expect_err("out of range");
        assert!(e.contains("wildcard 2"), "{e}");
        assert!(TopicTemplate::parse("x/{0}", 1).is_err());
        assert!(TopicTemplate::parse("x/{nope}", 1).expect_err("unknown").contains("unknown"));
        assert!(TopicTemplate::parse("x/{device", 1).is_err());
        assert!(TopicTemplate::parse("x/device}", 1).is_err());
        assert!(TopicTemplate::parse("x/+/y", 1).is_err());
        assert!(TopicTemplate::parse("x/{device}/#", 1).is_err());
    }

    #[test]
    fn shorten_cuts_at_a_character_boundary() {
        assert_eq!(shorten("abc", 8), "abc");
        assert_eq!(shorten("abcdef", 3), "abc");
        // 'é' is two bytes: a cut inside it moves back before it.
        assert_eq!(shorten("aé", 2), "a");
    }

    #[test]
    fn levels_reject_separators_and_wildcards() {
        assert!(validate_level("edge-01").is_ok());
        for bad in ["", "a/b", "a+", "#", &"x".repeat(65)] {
            assert!(validate_level(bad).is_err(), "{bad:?}");
        }
    }
}
