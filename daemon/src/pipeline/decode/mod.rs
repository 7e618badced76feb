//! Payload decoding: wire bytes -> validated input buffers in the model's dtype and layout.
//!
//! Tensor formats:
//! - `raw`: the payload *is* the tensor (little-endian, C order, exactly the input's byte size).
//!   It is kept as a zero-copy slice of the MQTT packet buffer.
//! - `json`: `{"seq": 7, "ts": 1700000000123.5, "data": [...]}` for single-input models, or
//!   `{"seq": 7, "inputs": {"a": [...], "b": [...]}}`; arrays nested to the input's shape or flat
//!   with exactly the element count. Numbers stream straight into the little-endian buffer
//!   (no intermediate `serde_json::Value` tree).
//! - `cbor`: the json structure in CBOR; a tensor may also be a byte string or an RFC 8746
//!   typed array, sliced zero-copy ([`cbor`]).
//!
//! Binary frames may start with the edgeinfer-v1 envelope (seq, ts, deadline; [`super::envelope`]),
//! stripped here by slicing.
//!
//! Sample streams (`pcm_s16le`, `raw` with a `[window]`): the chunk is checked to be whole
//! frames of the declared channels (and, when the envelope describes the stream, its channel
//! count and sample rate); the assembler ([`super::window`]) makes the windows.
//!
//! Image formats (`jpeg`, `png`, and `raw` with a `[raw]` geometry): only cheap checks here
//! (signature, exact size, non-finite samples); the payload is queued as it came and a worker
//! decodes and pre-processes it into the input tensor ([`super::image`]).
//!
//! Every failure is a [`Reject`] with a reason and a one-line detail; nothing here panics on input.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeSeed;
use serde_json::value::RawValue;
use smallvec::SmallVec;

pub mod cbor;
pub mod envelope;
mod json;
mod sink;

use super::image::ImageInput;
use super::window::WindowPlan;
use crate::config::image::{ImageConfig, SampleType};
use crate::config::window::{Envelope, WindowConfig, WireSample};
use crate::config::{NanPolicy, PayloadFormat};
use crate::model::{DType, TensorSpec};
use crate::reject::{Reject, RejectReason};
use json::Node;
pub use sink::Decoded;
use sink::{Sink, check_finite};

/// Decoder for one pipeline's payloads, built once from the model's input signature.
#[derive(Debug, Clone)]
pub struct Decoder {
    format: PayloadFormat,
    specs: Vec<TensorSpec>,
    max_payload: usize,
    nan: NanPolicy,
    /// Image frames: what the workers decode and how they pre-process it.
    image: Option<ImageInput>,
    /// Sample streams: the window the chunks are assembled into.
    window: Option<WindowPlan>,
    envelope: Envelope,
}

impl Decoder {
    /// Fails when the format cannot carry the model's inputs (raw needs exactly one input).
    pub fn new(
        format: PayloadFormat,
        specs: Vec<TensorSpec>,
        max_payload: u64,
        nan: NanPolicy,
    ) -> Result<Self, String> {
        if !matches!(format, PayloadFormat::Json | PayloadFormat::Cbor) && specs.len() != 1 {
            let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(format!(
                "format \"{}\" carries exactly one input tensor, but the model has {} ({names:?}); \
                 use format = \"json\" or \"cbor\" with named inputs",
                format.as_str(),
                specs.len()
            ));
        }
        if matches!(format, PayloadFormat::Jpeg | PayloadFormat::Png) {
            return Err(format!(
                "format \"{}\" needs a pre-processing plan (Decoder::with_image)",
                format.as_str()
            ));
        }
        if format == PayloadFormat::PcmS16le {
            return Err("format \"pcm_s16le\" needs a window (Decoder::with_window)".into());
        }
        Ok(Self::base(format, specs, max_payload, nan))
    }

    /// A tensor-frame decoder; the image and window constructors add their part.
    fn base(
        format: PayloadFormat,
        specs: Vec<TensorSpec>,
        max_payload: u64,
        nan: NanPolicy,
    ) -> Self {
        Self {
            format,
            specs,
            max_payload: usize::try_from(max_payload).unwrap_or(usize::MAX),
            nan,
            image: None,
            window: None,
            envelope: Envelope::None,
        }
    }

    /// The model's only input, or why `what` cannot feed this model.
    fn only_input<'a>(specs: &'a [TensorSpec], what: &str) -> Result<&'a TensorSpec, String> {
        match specs {
            [spec] => Ok(spec),
            _ => {
                let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                Err(format!(
                    "{what} feed exactly one input tensor, but the model has {} ({names:?})",
                    specs.len()
                ))
            }
        }
    }

    /// A decoder for sample streams (`pcm_s16le`, or `raw` with a `[window]`): checks the
    /// window against the model's single input, or says what disagrees.
    pub fn with_window(
        format: PayloadFormat,
        specs: Vec<TensorSpec>,
        max_payload: u64,
        nan: NanPolicy,
        window: &WindowConfig,
    ) -> Result<Self, String> {
        if !matches!(format, PayloadFormat::PcmS16le | PayloadFormat::Raw) {
            return Err(format!("format \"{}\" does not carry sample streams", format.as_str()));
        }
        let spec = Self::only_input(&specs, "windows")?;
        let plan = WindowPlan::new(window, spec)
            .map_err(|e| format!("{} stream: {e}", format.as_str()))?;
        Ok(Self { window: Some(plan), ..Self::base(format, specs, max_payload, nan) })
    }

    /// Binary frames start with an envelope (`envelope = "edgeinfer-v1"`).
    pub fn with_envelope(mut self, envelope: Envelope) -> Self {
        self.envelope = envelope;
        self
    }

    /// The window plan, when frames are chunks of a sample stream.
    pub fn window(&self) -> Option<&WindowPlan> {
        self.window.as_ref()
    }

    /// A decoder for image frames (`jpeg`, `png`, or `raw` with a declared geometry): compiles
    /// the pre-processing plan against the model's single input, or says what disagrees.
    pub fn with_image(
        format: PayloadFormat,
        specs: Vec<TensorSpec>,
        max_payload: u64,
        nan: NanPolicy,
        image: &ImageConfig,
    ) -> Result<Self, String> {
        if format == PayloadFormat::Json {
            return Err("json frames carry tensors, not images".into());
        }
        let spec = Self::only_input(&specs, "image frames")?;
        let image = ImageInput::new(format, image, spec)?;
        Ok(Self { image: Some(image), ..Self::base(format, specs, max_payload, nan) })
    }

    /// The image input, when frames are images the workers decode.
    pub fn image(&self) -> Option<&ImageInput> {
        self.image.as_ref()
    }

    pub fn decode(&self, payload: Bytes) -> Result<Decoded, Reject> {
        if payload.is_empty() {
            return Err(Reject::new(
                RejectReason::Empty,
                "empty payload (e.g. a cleared retained message)",
            ));
        }
        if payload.len() > self.max_payload {
            return Err(Reject::new(
                RejectReason::Oversized,
                format!("payload is {} bytes, max_payload is {}", payload.len(), self.max_payload),
            ));
        }
        if self.envelope == Envelope::None {
            return self.decode_body(payload, None);
        }
        let (meta, at) = envelope::parse(&payload)?;
        let with_seq = |mut r: Reject| {
            r.seq = r.seq.or(meta.seq);
            r
        };
        if at == payload.len() {
            return Err(with_seq(Reject::new(
                RejectReason::Empty,
                "the envelope carries no payload",
            )));
        }
        let mut d = self.decode_body(payload.slice(at..), Some(&meta)).map_err(with_seq)?;
        d.seq = meta.seq;
        d.ts = meta.ts;
        d.deadline_ms = meta.deadline_ms.map(f64::from);
        Ok(d)
    }

    fn decode_body(
        &self,
        payload: Bytes,
        meta: Option<&envelope::Meta>,
    ) -> Result<Decoded, Reject> {
        if let Some(plan) = &self.window {
            return self.check_chunk(plan, payload, meta);
        }
        if let Some(img) = &self.image {
            return self.check_image(img, payload);
        }
        match self.format {
            PayloadFormat::Json => self.decode_json(&payload),
            PayloadFormat::Cbor => cbor::decode(&payload, &self.specs, self.nan),
            _ => self.decode_raw(payload),
        }
    }

    /// Sample stream chunks: whole frames of the declared channels; the envelope's stream
    /// description (when given) must be the window's. The chunk is kept as it came (zero-copy).
    fn check_chunk(
        &self,
        plan: &WindowPlan,
        payload: Bytes,
        meta: Option<&envelope::Meta>,
    ) -> Result<Decoded, Reject> {
        let cfg = &plan.cfg;
        if let Some((rate, channels)) = meta.and_then(|m| m.stream) {
            if usize::from(channels) != cfg.channels {
                return Err(Reject::new(
                    RejectReason::WrongChannels,
                    format!(
                        "the chunk has {channels} channels (envelope), the pipeline's window has {}",
                        cfg.channels
                    ),
                ));
            }
            if let Some(want) = cfg.sample_rate
                && rate != want
            {
                return Err(Reject::new(
                    RejectReason::WrongSampleRate,
                    format!(
                        "the chunk is sampled at {rate} Hz (envelope), the window at {want} Hz"
                    ),
                ));
            }
        }
        let frame = plan.frame_bytes();
        if !payload.len().is_multiple_of(frame) {
            return Err(Reject::new(
                RejectReason::Truncated,
                format!(
                    "{} bytes is not a whole number of frames: {} channel(s) x {} bytes ({}) = \
                     {frame} bytes per frame, {} left over",
                    payload.len(),
                    cfg.channels,
                    cfg.dtype.size(),
                    cfg.dtype.name(),
                    payload.len() % frame
                ),
            ));
        }
        if cfg.dtype == WireSample::F32 {
            check_finite(self.nan, DType::F32, &payload, |i| format!("sample {i} of the chunk"))?;
        }
        Ok(single(payload))
    }

    /// Image frames: cheap checks only, the payload is queued as it came (zero-copy).
    fn check_image(&self, img: &ImageInput, payload: Bytes) -> Result<Decoded, Reject> {
        img.check(&payload)?;
        let float = match img.raw_dtype() {
            Some(SampleType::F32) => Some(DType::F32),
            Some(SampleType::F16) => Some(DType::F16),
            _ => None,
        };
        if let Some(dt) = float {
            check_finite(self.nan, dt, &payload, |i| format!("sample {i} of the raw image"))?;
        }
        Ok(single(payload))
    }

    fn decode_raw(&self, payload: Bytes) -> Result<Decoded, Reject> {
        let spec = &self.specs[0];
        if payload.len() != spec.byte_len() {
            return Err(Reject::new(
                RejectReason::WrongSize,
                format!(
                    "expected {} bytes ({} {:?} little-endian for input `{}`), got {}",
                    spec.byte_len(),
                    spec.dtype,
                    spec.shape,
                    spec.name,
                    payload.len()
                ),
            ));
        }
        check_finite(self.nan, spec.dtype, &payload, |i| {
            format!("element {i} of input `{}`", spec.name)
        })?;
        Ok(single(payload))
    }

    fn decode_json(&self, payload: &[u8]) -> Result<Decoded, Reject> {
        #[derive(Deserialize)]
        struct Frame<'a> {
            #[serde(default)]
            seq: Option<u64>,
            #[serde(default)]
            ts: Option<f64>,
            #[serde(default)]
            deadline_ms: Option<f64>,
            #[serde(borrow, default)]
            data: Option<&'a RawValue>,
            #[serde(borrow, default)]
            inputs: Option<BTreeMap<Cow<'a, str>, &'a RawValue>>,
        }
        let malformed = |e: serde_json::Error| {
            Reject::new(RejectReason::Malformed, format!("invalid JSON frame: {e}"))
        };
        let frame: Frame<'_> = serde_json::from_slice(payload).map_err(malformed)?;
        let with_seq = |mut r: Reject| {
            r.seq = frame.seq;
            r
        };
        if let Some(ts) = frame.ts
            && !ts.is_finite()
        {
            return Err(with_seq(Reject::new(
                RejectReason::Malformed,
                "`ts` must be a finite number",
            )));
        }
        let mut inputs = SmallVec::new();
        match (frame.data, &frame.inputs) {
            (Some(_), Some(_)) => {
                return Err(with_seq(Reject::new(
                    RejectReason::Malformed,
                    "give either `data` or `inputs`, not both",
                )));
            }
            (None, None) => {
                return Err(with_seq(Reject::new(
                    RejectReason::Malformed,
                    "missing `data` (single-input models) or `inputs` (named inputs)",
                )));
            }
            (Some(data), None) => {
                if self.specs.len() != 1 {
                    let names: Vec<&str> = self.specs.iter().map(|s| s.name.as_str()).collect();
                    return Err(with_seq(Reject::new(
                        RejectReason::Malformed,
                        format!(
                            "the model has {} inputs {names:?}: send them by name in `inputs`",
                            self.specs.len()
                        ),
                    )));
                }
                inputs.push(self.tensor(&self.specs[0], data).map_err(with_seq)?);
            }
            (None, Some(named)) => {
                if let Some(unknown) =
                    named.keys().find(|k| !self.specs.iter().any(|s| s.name == **k))
                {
                    let names: Vec<&str> = self.specs.iter().map(|s| s.name.as_str()).collect();
                    return Err(with_seq(Reject::new(
                        RejectReason::Malformed,
                        format!("unknown input `{unknown}`; the model's inputs are {names:?}"),
                    )));
                }
                for spec in &self.specs {
                    let Some(raw) = named.get(spec.name.as_str()) else {
                        return Err(with_seq(Reject::new(
                            RejectReason::Malformed,
                            format!("missing input `{}`", spec.name),
                        )));
                    };
                    inputs.push(self.tensor(spec, raw).map_err(with_seq)?);
                }
            }
        }
        // A negative or non-finite budget is meaningless; ignoring it serves the frame normally.
        let deadline_ms = frame.deadline_ms.filter(|d| d.is_finite() && *d >= 0.0);
        Ok(Decoded { seq: frame.seq, ts: frame.ts, deadline_ms, inputs })
    }

    /// Parses one JSON array into `spec`'s little-endian byte layout.
    fn tensor(&self, spec: &TensorSpec, raw: &RawValue) -> Result<Bytes, Reject> {
        let mut sink = Sink::new(spec, self.nan);
        let mut de = serde_json::Deserializer::from_str(raw.get());
        let res = Node { sink: &mut sink, depth: 0 }.deserialize(&mut de);
        if let Some(r) = sink.reject.take() {
            return Err(r);
        }
        if let Err(e) = res {
            return Err(Reject::new(
                RejectReason::Malformed,
                format!("input `{}`: {e}", spec.name),
            ));
        }
        if sink.leaves != sink.total {
            return Err(sink.shape_error(format!("has {} elements", sink.leaves)));
        }
        Ok(Bytes::from(sink.out))
    }
}

/// A frame that is its one payload, queued as it came (zero-copy), without frame metadata.
fn single(payload: Bytes) -> Decoded {
    let mut inputs = SmallVec::new();
    inputs.push(payload);
    Decoded { seq: None, ts: None, deadline_ms: None, inputs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Dim;

    fn spec(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.to_vec(), declared: vec![Dim::Unknown] }
    }

    fn json_dec(specs: Vec<TensorSpec>) -> Decoder {
        Decoder::new(PayloadFormat::Json, specs, 1 << 20, NanPolicy::Reject).expect("decoder")
    }

    fn f32s(b: &Bytes) -> Vec<f32> {
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    fn reason(r: Result<Decoded, Reject>) -> RejectReason {
        match r {
            Ok(d) => panic!("expected a reject, decoded {d:?}"),
            Err(r) => r.reason,
        }
    }

    #[test]
    fn raw_is_zero_copy_and_size_checked() {
        let d = Decoder::new(
            PayloadFormat::Raw,
            vec![spec("x", DType::F32, &[1, 2])],
            1024,
            NanPolicy::Reject,
        )
        .expect("decoder");
        let payload = Bytes::from([1f32.to_le_bytes(), 2f32.to_le_bytes()].concat());
        let ptr = payload.as_ptr();
        let out = d.decode(payload).expect("valid");
        assert_eq!(out.inputs[0].as_ptr(), ptr, "raw frames must not be copied");
        let short = d.decode(Bytes::from_static(&[0u8; 7])).expect_err("short");
        assert_eq!(short.reason, RejectReason::WrongSize);
        assert!(
            short
                .detail
                .contains("expected 8 bytes (f32 [1, 2] little-endian for input `x`), got 7"),
            "{}",
            short.detail
        );
        assert_eq!(reason(d.decode(Bytes::new())), RejectReason::Empty);
        assert_eq!(reason(d.decode(Bytes::from(vec![0u8; 2000]))), RejectReason::Oversized);
        let nan = Bytes::from([1f32.to_le_bytes(), f32::NAN.to_le_bytes()].concat());
        let r = d.decode(nan.clone()).expect_err("nan");
        assert_eq!((r.reason, r.detail.contains("element 1")), (RejectReason::NonFinite, true));
        let allow = Decoder::new(
            PayloadFormat::Raw,
            vec![spec("x", DType::F32, &[1, 2])],
            1024,
            NanPolicy::Allow,
        )
        .expect("decoder");
        assert!(allow.decode(nan).is_ok());
    }

    #[test]
    fn raw_needs_exactly_one_input() {
        let e = Decoder::new(
            PayloadFormat::Raw,
            vec![spec("a", DType::F32, &[1]), spec("b", DType::F32, &[1])],
            1024,
            NanPolicy::Reject,
        )
        .expect_err("two inputs");
        assert!(e.contains("use format = \"json\""), "{e}");
    }

    #[test]
    fn json_nested_and_flat_forms_give_the_same_bytes() {
        let d = json_dec(vec![spec("x", DType::F32, &[1, 2, 3])]);
        let nested = d
            .decode(Bytes::from_static(br#"{"seq":9,"ts":1.5,"data":[[[1,2,3],[4,5,6.5]]]}"#))
            .expect("nested");
        let flat = d.decode(Bytes::from_static(br#"{"data":[1,2,3,4,5,6.5]}"#)).expect("flat");
        assert_eq!(f32s(&nested.inputs[0]), vec![1., 2., 3., 4., 5., 6.5]);
        assert_eq!(nested.inputs[0], flat.inputs[0]);
        assert_eq!((nested.seq, nested.ts), (Some(9), Some(1.5)));
    }

    #[test]
    fn json_shape_errors() {
        let d = json_dec(vec![spec("x", DType::F32, &[2, 2])]);
        for bad in [
            r#"{"data":[1,2,3]}"#,
            r#"{"data":[1,2,3,4,5]}"#,
            r#"{"data":[[1,2],[3]]}"#,
            r#"{"data":[[1,2],[3,4],[5,6]]}"#,
            r#"{"data":[[1,2],3,4]}"#,
            r#"{"data":[[[1],[2]],[[3],[4]]]}"#,
            r#"{"data":[]}"#,
            r#"{"data":5}"#,
            r#"{"data":{"a":1}}"#,
        ] {
            assert_eq!(reason(d.decode(Bytes::from(bad))), RejectReason::WrongShape, "{bad}");
        }
    }

    #[test]
    fn json_dtype_and_value_errors() {
        let d = json_dec(vec![spec("k", DType::I64, &[1]), spec("u", DType::U8, &[2])]);
        let ok = d.decode(Bytes::from_static(br#"{"inputs":{"k":[-3],"u":[0,255]}}"#)).expect("ok");
        assert_eq!(ok.inputs[0].as_ref(), (-3i64).to_le_bytes());
        assert_eq!(ok.inputs[1].as_ref(), [0u8, 255]);
        for bad in [
            r#"{"inputs":{"k":[1.5],"u":[0,1]}}"#,
            r#"{"inputs":{"k":[1],"u":[0,256]}}"#,
            r#"{"inputs":{"k":[1],"u":[0,-1]}}"#,
            r#"{"inputs":{"k":["1"],"u":[0,1]}}"#,
            r#"{"inputs":{"k":[null],"u":[0,1]}}"#,
        ] {
            assert_eq!(reason(d.decode(Bytes::from(bad))), RejectReason::WrongDtype, "{bad}");
        }
        let f = json_dec(vec![spec("x", DType::F32, &[1])]);
        assert_eq!(
            reason(f.decode(Bytes::from_static(br#"{"data":[1e39]}"#))),
            RejectReason::NonFinite
        );
    }

    #[test]
    fn json_structure_errors_are_malformed_and_keep_seq() {
        let d = json_dec(vec![spec("a", DType::F32, &[1]), spec("b", DType::F32, &[1])]);
        for bad in [
            "not json",
            r#"{"seq":1,"data":[1]}"#,
            r#"{"seq":1}"#,
            r#"{"seq":1,"inputs":{"a":[1]}}"#,
            r#"{"seq":1,"inputs":{"a":[1],"b":[2],"c":[3]}}"#,
            r#"{"seq":1,"data":[1],"inputs":{"a":[1],"b":[2]}}"#,
            r#"{"seq":"one","inputs":{"a":[1],"b":[2]}}"#,
            r#"[1,2]"#,
        ] {
            let r = d.decode(Bytes::from(bad)).expect_err(bad);
            assert_eq!(r.reason, RejectReason::Malformed, "{bad}: {}", r.detail);
            if bad.starts_with(r#"{"seq":1,"#) {
                assert_eq!(r.seq, Some(1), "{bad}");
            }
        }
    }

    #[test]
    fn oversized_json_arrays_stop_early() {
        let d = json_dec(vec![spec("x", DType::F32, &[4])]);
        let big = format!("{{\"data\":[{}]}}", vec!["1"; 10_000].join(","));
        let r = d.decode(Bytes::from(big)).expect_err("too many");
        assert_eq!(r.reason, RejectReason::WrongShape);
        assert!(r.detail.contains("more than 4 elements"), "{}", r.detail);
    }
}
