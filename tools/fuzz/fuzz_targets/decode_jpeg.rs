//! JPEG frames: decoded under a small decompression budget and pre-processed into an 8x8
//! tensor, or rejected with a reason; never a panic, never an allocation past the budget.
#![no_main]
use edgeinfer::config::image::{Preprocess, Resize, ResizeMode};
use edgeinfer::model::{DType, Dim, TensorSpec};
use edgeinfer::pipeline::image::decode_jpeg;
use edgeinfer::pipeline::preprocess::{Plan, PlanScratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut pixels = Vec::new();
    let Ok(view) = decode_jpeg(data, 1 << 22, &mut pixels) else { return };
    assert_eq!(view.bytes.len(), view.width * view.height * view.channels);
    let mode = if data.len() % 2 == 0 {
        ResizeMode::Bilinear
    } else {
        ResizeMode::Letterbox { pad: 114.0 }
    };
    let cfg = Preprocess {
        resize: Some(Resize { width: 8, height: 8, mode }),
        ..Preprocess::default()
    };
    let spec = TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![1, 3, 8, 8],
        declared: vec![Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)],
    };
    let plan = Plan::compile(&cfg, &spec).expect("plan");
    let mut out = vec![0u8; 3 * 8 * 8 * 4];
    plan.run(&view, &mut PlanScratch::default(), &mut out).expect("a decoded image always fits");
});
