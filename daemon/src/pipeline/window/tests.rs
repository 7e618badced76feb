use std::time::Duration;

use super::*;
use crate::config::window::Envelope;
use crate::config::{NanPolicy, PayloadFormat};
use crate::model::Dim;
use crate::pipeline::decode::Decoder;
use crate::pipeline::decode::envelope::{self, Meta};
use crate::reject::RejectReason;

fn cfg(samples: usize, hop: usize, channels: usize) -> WindowConfig {
    WindowConfig {
        samples,
        hop,
        channels,
        sample_rate: Some(1000),
        dtype: WireSample::I16,
        layout: WindowLayout::ChannelsFirst,
        scale: 1.0,
        gap: GapPolicy::Reset,
        max_gap: samples,
        reorder: 0,
        max_devices: 4,
        idle_timeout: Duration::from_secs(10),
    }
}

fn spec(dtype: DType, shape: &[usize]) -> TensorSpec {
    TensorSpec { name: "x".into(), dtype, shape: shape.to_vec(), declared: vec![Dim::Unknown] }
}

fn plan(c: WindowConfig) -> WindowPlan {
    let s = spec(DType::F32, &[1, c.channels, c.samples]);
    WindowPlan::new(&c, &s).expect("plan")
}

/// A chunk of frames `first..first + frames` of a ramp (sample value = frame index * 10 +
/// channel), numbered `seq`, stamped at 1 ms per frame (sample_rate 1000).
fn ramp(seq: u64, first: usize, frames: usize, channels: usize) -> Chunk {
    let mut b = Vec::new();
    for f in first..first + frames {
        for c in 0..channels {
            b.extend_from_slice(&((f * 10 + c) as i16).to_le_bytes());
        }
    }
    Chunk { seq: Some(seq), ts: Some(first as f64), samples: Bytes::from(b) }
}

fn f32s(b: &Bytes) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

struct Rig {
    asm: Assembler,
    stats: WindowStats,
    now: Instant,
    out: Vec<Window>,
}

impl Rig {
    fn new(c: WindowConfig) -> Rig {
        Rig {
            asm: Assembler::new(plan(c)),
            stats: WindowStats::default(),
            now: Instant::now(),
            out: Vec::new(),
        }
    }
    fn push(&mut self, dev: &str, c: Chunk) {
        let out = &mut self.out;
        self.asm.push(dev, c, self.now, &self.stats, &mut |w| out.push(w));
    }
    /// First sample of channel 0 of every window, as the frame index it came from.
    fn starts(&self) -> Vec<f32> {
        self.out.iter().map(|w| f32s(&w.input)[0] / 10.0).collect()
    }
    fn stat(&self, name: &str) -> u64 {
        self.stats.counters().iter().find(|(k, _)| *k == name).map_or(u64::MAX, |(_, v)| *v)
    }
}

#[test]
fn overlapping_windows_carry_the_seq_and_ts_of_their_first_chunk() {
    // Windows of 4 with hop 2 over chunks of 3 frames: starts at frames 0, 2, 4, 6, ...
    let mut r = Rig::new(cfg(4, 2, 1));
    for seq in 0..4 {
        r.push("d", ramp(seq, seq as usize * 3, 3, 1));
    }
    assert_eq!(r.starts(), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
    assert_eq!(f32s(&r.out[1].input), vec![20.0, 30.0, 40.0, 50.0]);
    let meta: Vec<(Option<u64>, Option<f64>)> = r.out.iter().map(|w| (w.seq, w.ts)).collect();
    // Frame 2 is in chunk 0 (frames 0-2), 4 in chunk 1, 6 in chunk 2, 8 in chunk 2.
    assert_eq!(
        meta,
        vec![
            (Some(0), Some(0.0)),
            (Some(0), Some(2.0)),
            (Some(1), Some(4.0)),
            (Some(2), Some(6.0)),
            (Some(2), Some(8.0))
        ]
    );
    assert_eq!((r.stat("chunks"), r.stat("windows"), r.stat("gaps")), (4, 5, 0));
}

#[test]
fn layouts_and_dtypes() {
    // channels_first: [1, 2, 3] rows per channel; channels_last: interleaved as on the wire.
    let mut r = Rig::new(cfg(3, 3, 2));
    r.push("d", ramp(0, 0, 3, 2));
    assert_eq!(f32s(&r.out[0].input), vec![0.0, 10.0, 20.0, 1.0, 11.0, 21.0]);
    let mut last = cfg(3, 3, 2);
    last.layout = WindowLayout::ChannelsLast;
    let p = WindowPlan::new(&last, &spec(DType::F32, &[1, 3, 2])).expect("plan");
    let mut a = Assembler::new(p);
    let mut out = Vec::new();
    a.push("d", ramp(0, 0, 3, 2), Instant::now(), &WindowStats::default(), &mut |w| out.push(w));
    assert_eq!(f32s(&out[0].input), vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    // i16 inputs take the samples as they are; f32 inputs scaled (1/32768: i16 -> [-1, 1)).
    let mut c = cfg(2, 2, 1);
    let p = WindowPlan::new(&c, &spec(DType::I16, &[1, 2])).expect("i16 plan");
    let pcm = Chunk {
        seq: None,
        ts: None,
        samples: Bytes::from([(-32768i16).to_le_bytes(), 16384i16.to_le_bytes()].concat()),
    };
    let mut out = Vec::new();
    let stats = WindowStats::default();
    Assembler::new(p).push("d", pcm.clone(), Instant::now(), &stats, &mut |w| out.push(w));
    assert_eq!(out[0].input.as_ref(), pcm.samples.as_ref());
    c.scale = 1.0 / 32768.0;
    let p = WindowPlan::new(&c, &spec(DType::F32, &[1, 1, 2])).expect("f32 plan");
    let mut out = Vec::new();
    Assembler::new(p).push("d", pcm, Instant::now(), &stats, &mut |w| out.push(w));
    assert_eq!(f32s(&out[0].input), vec![-1.0, 0.5]);
    // Raw f32 sensor samples.
    c.dtype = WireSample::F32;
    c.scale = 2.0;
    let p = WindowPlan::new(&c, &spec(DType::F32, &[1, 2])).expect("plan");
    let imu = Chunk {
        seq: None,
        ts: None,
        samples: Bytes::from([0.25f32.to_le_bytes(), (-1.5f32).to_le_bytes()].concat()),
    };
    let mut out = Vec::new();
    Assembler::new(p).push("d", imu, Instant::now(), &stats, &mut |w| out.push(w));
    assert_eq!(f32s(&out[0].input), vec![0.5, -3.0]);
}

#[test]
fn out_of_order_chunks_are_put_back_in_order() {
    let mut c = cfg(4, 4, 1);
    c.reorder = 2;
    let mut r = Rig::new(c);
    for seq in [0u64, 2, 1, 3, 5, 4, 6, 7] {
        r.push("d", ramp(seq, seq as usize * 2, 2, 1));
    }
    // The same windows as in order: frames 0-3, 4-7, 8-11, 12-15.
    assert_eq!(r.starts(), vec![0.0, 4.0, 8.0, 12.0]);
    assert_eq!(f32s(&r.out[2].input), vec![80.0, 90.0, 100.0, 110.0]);
    assert_eq!((r.stat("reordered"), r.stat("gaps"), r.stat("late"), r.stat("held")), (2, 0, 0, 0));
}

#[test]
fn a_gap_resets_the_partial_window_and_late_chunks_are_dropped() {
    let mut r = Rig::new(cfg(4, 4, 1));
    r.push("d", ramp(0, 0, 3, 1));
    r.push("d", ramp(2, 6, 3, 1)); // chunk 1 lost: frames 0-2 discarded
    r.push("d", ramp(1, 3, 3, 1)); // arrives too late
    r.push("d", ramp(3, 9, 3, 1));
    assert_eq!(r.starts(), vec![6.0]);
    assert_eq!(r.out[0].seq, Some(2));
    assert_eq!((r.stat("gaps"), r.stat("resets"), r.stat("late")), (1, 1, 1));
    // Far ahead with no reorder buffer: a gap too long to fill, the partial window goes.
    r.push("d", ramp(200, 200, 2, 1));
    assert_eq!((r.stat("gaps"), r.stat("resets")), (2, 2));
    // Far behind: the device restarted its numbering, a new stream begins.
    r.push("d", ramp(0, 300, 4, 1));
    assert_eq!(r.starts(), vec![6.0, 300.0]);
    assert_eq!(r.out[1].seq, Some(0));
    assert_eq!((r.stat("resets"), r.stat("late")), (3, 1));
}

#[test]
fn zero_fill_fills_short_gaps_and_resets_on_long_ones() {
    let mut c = cfg(8, 8, 1);
    c.gap = GapPolicy::ZeroFill;
    c.max_gap = 2;
    let mut r = Rig::new(c);
    r.push("d", ramp(0, 0, 2, 1));
    r.push("d", ramp(2, 4, 2, 1)); // chunk 1 (2 frames) lost: filled with zeros
    r.push("d", ramp(3, 6, 2, 1));
    assert_eq!(f32s(&r.out[0].input), vec![0.0, 10.0, 0.0, 0.0, 40.0, 50.0, 60.0, 70.0]);
    assert_eq!((r.stat("gaps"), r.stat("zero_filled"), r.stat("resets")), (1, 2, 0));
    r.push("d", ramp(4, 8, 2, 1));
    r.push("d", ramp(7, 14, 2, 1)); // 2 chunks = 4 frames lost: over max_gap, reset
    assert_eq!((r.stat("gaps"), r.stat("zero_filled"), r.stat("resets")), (2, 2, 1));
    assert_eq!(r.out.len(), 1);
}

#[test]
fn a_full_reorder_buffer_gives_up_on_the_missing_chunk() {
    let mut c = cfg(2, 2, 1);
    c.reorder = 2;
    let mut r = Rig::new(c);
    r.push("d", ramp(0, 0, 1, 1));
    r.push("d", ramp(2, 2, 1, 1));
    r.push("d", ramp(3, 3, 1, 1));
    assert_eq!((r.out.len(), r.stat("held")), (0, 2), "waiting for chunk 1");
    r.push("d", ramp(4, 4, 1, 1)); // a third held chunk: 1 is given up (gap, reset)
    assert_eq!((r.stat("gaps"), r.stat("resets"), r.stat("held")), (1, 1, 0));
    assert_eq!(r.starts(), vec![2.0]);
    r.push("d", ramp(1, 1, 1, 1)); // far too late now
    assert_eq!(r.stat("late"), 1);
    r.push("d", ramp(5, 5, 1, 1));
    assert_eq!(r.starts(), vec![2.0, 4.0]);
    // A flood of chunks ahead, in reverse, never grows the buffer past `reorder`.
    for seq in (8..60).rev() {
        r.push("d", ramp(seq, 0, 1, 1));
        assert!(r.stat("held") <= 2);
    }
}

#[test]
fn devices_are_bounded_by_displacing_the_least_recently_heard_and_idle_ones_evicted() {
    let mut c = cfg(4, 4, 1);
    c.max_devices = 2;
    c.reorder = 1;
    let mut r = Rig::new(c);
    r.push("a", ramp(0, 0, 1, 1));
    r.push("b", ramp(0, 0, 1, 1));
    r.push("b", ramp(2, 2, 1, 1)); // held
    // Devices are independent streams; a is now the most recently heard.
    r.push("a", ramp(1, 1, 3, 1));
    assert_eq!(r.starts(), vec![0.0]);
    // A third device in a full table displaces b (and its held chunk), never refused.
    r.push("c", ramp(0, 0, 1, 1));
    assert_eq!((r.stat("displaced"), r.stat("discarded"), r.stat("held")), (1, 1, 0));
    assert_eq!((r.stat("devices"), r.asm.device_count()), (2, 2));
    // After idle_timeout, a new device first clears the idle ones.
    r.now += Duration::from_secs(11);
    r.push("d", ramp(0, 0, 4, 1));
    assert_eq!((r.stat("evicted"), r.stat("displaced"), r.stat("devices")), (2, 1, 1));
    assert_eq!(r.out.len(), 2);
}

/// Regression: 64 attacker ids locked a real device out of a windowed pipeline (a full table
/// refused new devices until one was idle for idle_timeout).
#[test]
fn a_flood_of_new_ids_never_locks_a_real_device_out() {
    let mut c = cfg(4, 4, 1);
    c.max_devices = 8;
    let mut r = Rig::new(c);
    for seq in 0..40u64 {
        for i in 0..4 {
            r.push(&format!("attacker-{seq}-{i}"), ramp(0, 0, 1, 1));
        }
        r.push("real", ramp(seq, seq as usize, 1, 1));
    }
    // The real device's 40 samples made windows at 0, 4, 8, ..., 36.
    let real: Vec<f32> = r.starts().into_iter().filter(|s| *s >= 0.0).collect();
    assert_eq!(real.len(), 10, "{real:?}");
    assert!(r.stat("displaced") >= 150);
    assert_eq!(r.stat("devices"), 8);
}

/// Regression: with hop = 1 and a huge max_gap (accepted then), one chunk with a seq jump made
/// 974,609 zero-filled windows and stalled the event loop for 25 s. Validate now bounds
/// max_gap / hop; the worst accepted config makes at most MAX_WINDOWS_PER_CHUNK windows from a
/// gap, and anything beyond resets instead.
#[test]
fn a_gap_never_makes_more_windows_than_a_chunk_may() {
    let mut c = cfg(8, 1, 1);
    c.gap = GapPolicy::ZeroFill;
    c.max_gap = MAX_WINDOWS_PER_CHUNK as usize; // hop 1: the most validate accepts
    c.reorder = 0;
    let mut r = Rig::new(c.clone());
    r.push("d", ramp(0, 0, 8, 1));
    let before = r.out.len();
    // 16 chunks of 64 frames missing: 1024 frames of zeros, the limit.
    r.push("d", ramp(17, 0, 64, 1));
    let made = r.out.len() - before;
    assert!(made as u64 <= MAX_WINDOWS_PER_CHUNK + 64, "{made}");
    assert_eq!(r.stat("zero_filled"), 1024);
    // One more missing chunk: over the limit, the window resets instead of filling.
    let mut r = Rig::new(c);
    r.push("d", ramp(0, 0, 8, 1));
    let before = r.out.len();
    r.push("d", ramp(30, 0, 64, 1));
    assert_eq!(r.stat("zero_filled"), 0);
    assert!(r.out.len() - before <= 64, "only the chunk's own windows");
}

#[test]
fn chunks_without_seq_are_taken_in_arrival_order() {
    let mut r = Rig::new(cfg(3, 3, 1));
    for first in [0usize, 2, 4] {
        let mut c = ramp(0, first, 2, 1);
        c.seq = None;
        r.push("d", c);
    }
    assert_eq!(r.starts(), vec![0.0, 3.0]);
    assert_eq!(r.out[1].seq, None);
}

#[test]
fn the_plan_says_what_disagrees_with_the_model() {
    let c = cfg(128, 64, 3);
    for (s, needle) in [
        (
            spec(DType::F32, &[1, 3, 100]),
            "samples: window.samples = 128, the input has 100 on axis 2",
        ),
        (
            spec(DType::F32, &[1, 6, 128]),
            "channels: window.channels = 3, the input has 6 on axis 1",
        ),
        (
            spec(DType::F32, &[1, 128, 3]),
            "channels: window.channels = 3, the input has 128 on axis 1",
        ),
        (spec(DType::F32, &[384]), "rank: a window is [1, channels, samples] (channels_first)"),
        (spec(DType::F32, &[2, 3, 128]), "batch: the input's axis 0 is 2"),
        (spec(DType::I64, &[1, 3, 128]), "dtype: windows feed f32 inputs"),
    ] {
        let e = WindowPlan::new(&c, &s).expect_err(needle);
        assert!(e.contains(needle), "{needle:?} not in {e}");
        assert!(e.contains("model input `x` is"), "{e}");
    }
    let mut scaled = cfg(2, 2, 1);
    scaled.scale = 0.5;
    let e = WindowPlan::new(&scaled, &spec(DType::I16, &[1, 2])).expect_err("scale");
    assert!(e.contains("applies to f32 inputs only"), "{e}");
}

fn pcm_decoder(envelope: Envelope) -> Decoder {
    let mut c = cfg(4, 4, 2);
    c.sample_rate = Some(16_000);
    Decoder::with_window(
        PayloadFormat::PcmS16le,
        vec![spec(DType::F32, &[1, 2, 4])],
        1 << 16,
        NanPolicy::Reject,
        &c,
    )
    .expect("decoder")
    .with_envelope(envelope)
}

#[test]
fn pcm_chunks_are_checked_and_kept_zero_copy() {
    let d = pcm_decoder(Envelope::None);
    let ok = Bytes::from(vec![0u8; 12]);
    let ptr = ok.as_ptr();
    assert_eq!(d.decode(ok).expect("3 stereo frames").inputs[0].as_ptr(), ptr);
    for n in [1usize, 3, 6, 13] {
        let r = d.decode(Bytes::from(vec![0u8; n])).expect_err("truncated");
        assert_eq!(r.reason, RejectReason::Truncated, "{n}");
        assert!(
            r.detail.contains("2 channel(s) x 2 bytes (i16) = 4 bytes per frame"),
            "{}",
            r.detail
        );
    }
}

#[test]
fn envelope_seq_ts_and_stream_checks() {
    let d = pcm_decoder(Envelope::EdgeinferV1);
    let meta =
        Meta { seq: Some(7), ts: Some(1.5e12), deadline_ms: None, stream: Some((16_000, 2)) };
    let msg = Bytes::from(envelope::encode(&meta, &[1u8; 8]));
    let out = d.decode(msg.clone()).expect("valid");
    assert_eq!((out.seq, out.ts), (Some(7), Some(1.5e12)));
    assert_eq!(out.inputs[0].as_ref(), &[1u8; 8]);
    assert_eq!(out.inputs[0].as_ptr(), msg[envelope::HEADER_LEN..].as_ptr(), "zero-copy");
    let cases = [
        (Meta { stream: Some((16_000, 1)), ..meta }, 8, RejectReason::WrongChannels, "1 channels"),
        (Meta { stream: Some((8_000, 2)), ..meta }, 8, RejectReason::WrongSampleRate, "8000 Hz"),
        (meta, 7, RejectReason::Truncated, "3 left over"),
        (meta, 0, RejectReason::Empty, "no payload"),
    ];
    for (m, n, reason, needle) in cases {
        let r = d.decode(Bytes::from(envelope::encode(&m, &vec![0u8; n]))).expect_err(needle);
        assert_eq!((r.reason, r.seq), (reason, Some(7)), "{needle}: {}", r.detail);
        assert!(r.detail.contains(needle), "{needle:?} not in {}", r.detail);
    }
    let r = d.decode(Bytes::from_static(&[0u8; 64])).expect_err("no magic");
    assert_eq!(r.reason, RejectReason::BadEnvelope);
}

#[test]
fn raw_and_image_frames_take_the_envelope_too() {
    let d =
        Decoder::new(PayloadFormat::Raw, vec![spec(DType::F32, &[1, 2])], 1024, NanPolicy::Reject)
            .expect("raw")
            .with_envelope(Envelope::EdgeinferV1);
    let body = [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat();
    let meta = Meta { seq: Some(3), ts: Some(10.0), deadline_ms: Some(25), stream: None };
    let out = d.decode(Bytes::from(envelope::encode(&meta, &body))).expect("valid");
    assert_eq!((out.seq, out.ts, out.deadline_ms), (Some(3), Some(10.0), Some(25.0)));
    assert_eq!(out.inputs[0].as_ref(), body.as_slice());
    // The size check applies to what follows the header.
    let r = d.decode(Bytes::from(envelope::encode(&meta, &body[..7]))).expect_err("short");
    assert_eq!((r.reason, r.seq), (RejectReason::WrongSize, Some(3)));
    // Without the envelope the raw bytes are a bad envelope, not a tensor.
    assert_eq!(d.decode(Bytes::from(body)).expect_err("bare").reason, RejectReason::BadEnvelope);
}
