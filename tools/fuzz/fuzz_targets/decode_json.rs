//! JSON frames for a one-input and a two-input model (f32 [1,3,4] and i64 [1,2]): decoded or
//! rejected with a reason, never a panic, and never more than the declared tensors allocated.
#![no_main]
use edgeinfer::config::PayloadFormat;
use libfuzzer_sys::fuzz_target;

#[path = "structured_common.rs"]
mod structured_common;

fuzz_target!(|data: &[u8]| structured_common::decode_all(PayloadFormat::Json, data));
