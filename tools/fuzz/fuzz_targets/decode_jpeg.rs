//! JPEG frames: decoded under a small decompression budget and pre-processed into an 8x8
//! tensor, or rejected with a reason; never a panic, never an allocation past the budget.
#![no_main]
use edgeinfer::pipeline::image::decode_jpeg;
use libfuzzer_sys::fuzz_target;

#[path = "image_common.rs"]
mod image_common;

fuzz_target!(|data: &[u8]| {
    let mut pixels = Vec::new();
    if let Ok(view) = decode_jpeg(data, image_common::BUDGET, &mut pixels) {
        image_common::preprocess(data, &view);
    }
});
