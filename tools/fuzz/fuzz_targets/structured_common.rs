//! Shared by the structured-frame targets (json, cbor): one payload decoded for a one-input
//! (f32 [1,3,4]) and a two-input (f32 [1,3,4], i64 [1,2]) model under both NaN policies.
use bytes::Bytes;
use edgeinfer::config::{NanPolicy, PayloadFormat};
use edgeinfer::model::{DType, Dim, TensorSpec};
use edgeinfer::pipeline::decode::Decoder;

fn spec(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        declared: shape.iter().map(|&d| Dim::Fixed(d)).collect(),
    }
}

/// Decodes `data` as `format` frames for both models: a result or a reject, never a panic.
pub fn decode_all(format: PayloadFormat, data: &[u8]) {
    for specs in [
        vec![spec("x", DType::F32, &[1, 3, 4])],
        vec![spec("a", DType::F32, &[1, 3, 4]), spec("b", DType::I64, &[1, 2])],
    ] {
        for nan in [NanPolicy::Reject, NanPolicy::Allow] {
            let Ok(d) = Decoder::new(format, specs.clone(), 1 << 16, nan) else { return };
            let _ = d.decode(Bytes::copy_from_slice(data));
        }
    }
}
