//! The edgeinfer-v1 envelope in front of a raw frame (f32 [1,2]) and a pcm_s16le chunk (stereo
//! window): parsed or rejected (bad_envelope, wrong size, truncated, wrong channels/rate),
//! never a panic; what is accepted round-trips through `envelope::encode`.
#![no_main]
use bytes::Bytes;
use edgeinfer::config::window::{Envelope, GapPolicy, WindowConfig, WindowLayout, WireSample};
use edgeinfer::config::{NanPolicy, PayloadFormat};
use edgeinfer::model::{DType, Dim, TensorSpec};
use edgeinfer::pipeline::decode::Decoder;
use edgeinfer::pipeline::decode::envelope;
use libfuzzer_sys::fuzz_target;

fn spec(shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        declared: shape.iter().map(|&d| Dim::Fixed(d)).collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((meta, at)) = envelope::parse(data) {
        assert!(at >= envelope::HEADER_LEN && at <= data.len());
        let again = envelope::encode(&meta, &data[at..]);
        assert_eq!(envelope::parse(&again).map(|(m, _)| m).ok(), Some(meta));
    }
    if let Ok(d) = Decoder::new(PayloadFormat::Raw, vec![spec(&[1, 2])], 4096, NanPolicy::Reject) {
        let _ = d.with_envelope(Envelope::EdgeinferV1).decode(Bytes::copy_from_slice(data));
    }
    let window = WindowConfig {
        samples: 4,
        hop: 2,
        channels: 2,
        sample_rate: Some(16_000),
        dtype: WireSample::I16,
        layout: WindowLayout::ChannelsFirst,
        scale: 1.0 / 32768.0,
        gap: GapPolicy::Reset,
        max_gap: 4,
        reorder: 2,
        max_devices: 4,
        idle_timeout: std::time::Duration::from_secs(1),
    };
    if let Ok(d) = Decoder::with_window(
        PayloadFormat::PcmS16le,
        vec![spec(&[1, 2, 4])],
        4096,
        NanPolicy::Reject,
        &window,
    ) {
        let _ = d.with_envelope(Envelope::EdgeinferV1).decode(Bytes::copy_from_slice(data));
    }
});
