//! CBOR frames for a one-input (f32 [1,3,4]) and a two-input (f32 [1,3,4], i64 [1,2]) model:
//! decoded or rejected with a reason, never a panic, never an allocation sized by a length the
//! payload claims.
#![no_main]
use edgeinfer::config::PayloadFormat;
use libfuzzer_sys::fuzz_target;

#[path = "structured_common.rs"]
mod structured_common;

fuzz_target!(|data: &[u8]| structured_common::decode_all(PayloadFormat::Cbor, data));
