//! Topic filters, templates and matching: the input is split at the first NUL into a filter /
//! template text and a topic. Captures must lie inside the topic; rendering never panics.
#![no_main]
use edgeinfer::topic::{TopicFilter, TopicTemplate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (pattern, topic) = text.split_once('\0').unwrap_or((text, "a/b/c"));
    if let Ok(f) = TopicFilter::parse(pattern)
        && let Some(caps) = f.matches(topic)
    {
        for c in &caps {
            assert!(c.start <= c.end && c.end <= topic.len());
            assert!(topic.is_char_boundary(c.start) && topic.is_char_boundary(c.end));
        }
    }
    for captures in 0..3 {
        if let Ok(t) = TopicTemplate::parse(pattern, captures) {
            let _ = t.render("dev", "pipe");
        }
    }
});
