//! Shared by the image decoder targets: a decoded image is pre-processed into an 8x8 f32 tensor
//! (bilinear or letterbox, picked by the input's length), which must always succeed.
use edgeinfer::config::image::{Preprocess, Resize, ResizeMode};
use edgeinfer::model::{DType, Dim, TensorSpec};
use edgeinfer::pipeline::preprocess::{ImageView, Plan, PlanScratch};

/// Decompression budget for the targets: small, so a bomb is refused quickly.
pub const BUDGET: u64 = 1 << 22;

pub fn preprocess(data: &[u8], view: &ImageView<'_>) {
    assert_eq!(view.bytes.len(), view.width * view.height * view.channels);
    let mode = if data.len() % 2 == 0 {
        ResizeMode::Bilinear
    } else {
        ResizeMode::Letterbox { pad: 114.0 }
    };
    let cfg =
        Preprocess { resize: Some(Resize { width: 8, height: 8, mode }), ..Preprocess::default() };
    let spec = TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![1, 3, 8, 8],
        declared: vec![Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)],
    };
    let plan = Plan::compile(&cfg, &spec).expect("plan");
    let mut out = vec![0u8; 3 * 8 * 8 * 4];
    plan.run(view, &mut PlanScratch::default(), &mut out).expect("a decoded image always fits");
}
