//! Spool segment files as found on disk after a crash or media damage: parsed or refused.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgeinfer::spool::decode_segment(data);
});
