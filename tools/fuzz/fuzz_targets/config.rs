//! The config file: any text gives a config or a list of problems, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = edgeinfer::config::Config::parse_str(text, "fuzz.toml", None);
    }
});
