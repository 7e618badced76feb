//! Raw little-endian frames for every input dtype: decoded or rejected, never a panic.
#![no_main]
use bytes::Bytes;
use edgeinfer::config::{NanPolicy, PayloadFormat};
use edgeinfer::model::{DType, Dim, TensorSpec};
use edgeinfer::pipeline::decode::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, payload)) = data.split_first() else { return };
    let dtype = DType::ALL[usize::from(sel) % DType::ALL.len()];
    let shape = vec![1, 2, 3];
    let spec = TensorSpec {
        name: "x".into(),
        dtype,
        declared: shape.iter().map(|&d| Dim::Fixed(d)).collect(),
        shape,
    };
    let nan = if sel & 0x80 != 0 { NanPolicy::Allow } else { NanPolicy::Reject };
    if let Ok(d) = Decoder::new(PayloadFormat::Raw, vec![spec], 4096, nan) {
        let _ = d.decode(Bytes::copy_from_slice(payload));
    }
});
