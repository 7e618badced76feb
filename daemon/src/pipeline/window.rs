//! Sample streams: chunks of interleaved samples (pcm_s16le audio, raw i16/f32 sensor samples)
//! from one device assembled into consecutive, possibly overlapping windows, each one model
//! input.
//!
//! What it owns: the [`WindowPlan`] (the declared window checked against the model input at
//! start-up), the per-device [`Assembler`] state (window buffer, expected seq, a small reorder
//! buffer) and its counters. What it does not: envelope parsing and the chunk's size checks
//! (`decode`), queueing the windows (`Pipeline::ingest`).
//!
//! Stream semantics (`docs/messages.md`, "Sample streams"):
//! - A device is one topic (as for duplicate detection): two topics never share a window.
//! - Chunks with a `seq` (from the envelope) are put in order: the next expected seq is
//!   appended at once; a chunk ahead of it waits in a reorder buffer of `reorder` chunks until
//!   the missing ones arrive; when the buffer is full, the missing chunks are a gap. A chunk
//!   behind the expected seq by at most [`LATE_SPAN`] is late and dropped; further behind, the
//!   device restarted its numbering and the stream resets.
//! - A gap (missing chunks, counted as the chunks' length times the following chunk's length)
//!   resets the partial window, or with `gap = "zero_fill"` is filled with zeros when it is at
//!   most `max_gap` samples per channel.
//! - Chunks without a seq are appended in arrival order.
//! - A window's seq is that of the chunk holding its first sample; its ts is that chunk's ts
//!   plus the first sample's offset in it divided by `sample_rate` (the chunk's ts when no
//!   sample rate is declared). A window starting in zero-filled samples takes the chunk before
//!   the gap as its first chunk.
//!
//! Memory: one window buffer per device (`samples * channels` f32, allocated when the device
//! appears), at most `max_devices` devices in a [`devices::Table`] keyed by a hash of the topic
//! (a silent device gives its place up after `idle_timeout`; a new device in a full table
//! displaces the least recently heard one, counted, so a flood of new ids never locks a real
//! device out), the reorder
//! buffer holds references to at most `reorder` received packets per device, and the chunk
//! markers are a fixed ring. Appending a chunk allocates nothing; each completed window is one
//! allocation (the tensor buffer the queue holds). Work per chunk is bounded: a chunk completes
//! at most `MAX_WINDOWS_PER_CHUNK` windows (validate bounds `max_payload / hop` and
//! `max_gap / hop`), and a gap that would zero-fill more resets the window instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::window::{
    GapPolicy, MAX_WINDOWS_PER_CHUNK, WindowConfig, WindowLayout, WireSample,
};
use crate::model::{DType, TensorSpec};
use crate::pipeline::devices::{self, DeviceKey};

/// A chunk this far (in seq) behind the expected one is late; further behind, the device
/// restarted its numbering.
pub const LATE_SPAN: u64 = 64;
/// Chunk markers kept per device (chunks shorter than `samples / MARKS` may share one).
pub const MARKS: usize = 64;
/// Every this many chunks, devices idle past `idle_timeout` are evicted.
const SWEEP_EVERY: u64 = 1024;

/// The declared window, checked against the model's input.
#[derive(Debug, Clone)]
pub struct WindowPlan {
    pub cfg: WindowConfig,
    /// The input's element type: f32, or i16 for i16 streams fed unscaled.
    out: DType,
    byte_len: usize,
}

impl WindowPlan {
    /// Checks the window against the model input `spec`; the error says what disagrees.
    pub fn new(cfg: &WindowConfig, spec: &TensorSpec) -> Result<WindowPlan, String> {
        let (n, c) = (cfg.samples, cfg.channels);
        let want = match cfg.layout {
            WindowLayout::ChannelsFirst => vec![1, c, n],
            WindowLayout::ChannelsLast => vec![1, n, c],
        };
        let input = format!("model input `{}` is {} {:?}", spec.name, spec.dtype, spec.shape);
        let fits = spec.shape == want || (c == 1 && spec.shape == [1, n]);
        if !fits {
            let mut why = Vec::new();
            if spec.shape.len() != 3 && !(c == 1 && spec.shape.len() == 2) {
                why.push(format!(
                    "rank: a window is [1, {}] ({}){}, the input has rank {}",
                    if cfg.layout == WindowLayout::ChannelsFirst {
                        "channels, samples"
                    } else {
                        "samples, channels"
                    },
                    cfg.layout.name(),
                    if c == 1 { " or [1, samples] for one channel" } else { "" },
                    spec.shape.len()
                ));
            } else if spec.shape.len() == 3 {
                let (ci, ni) = match cfg.layout {
                    WindowLayout::ChannelsFirst => (1, 2),
                    WindowLayout::ChannelsLast => (2, 1),
                };
                if spec.shape[0] != 1 {
                    why.push(format!(
                        "batch: the input's axis 0 is {}, a window is 1",
                        spec.shape[0]
                    ));
                }
                if spec.shape[ci] != c {
                    why.push(format!(
                        "channels: window.channels = {c}, the input has {} on axis {ci} ({})",
                        spec.shape[ci],
                        cfg.layout.name()
                    ));
                }
                if spec.shape[ni] != n {
                    why.push(format!(
                        "samples: window.samples = {n}, the input has {} on axis {ni} ({})",
                        spec.shape[ni],
                        cfg.layout.name()
                    ));
                }
            } else {
                why.push(format!("samples: window.samples = {n}, the input is {:?}", spec.shape));
            }
            return Err(format!("window does not match the model: {input}; {}", why.join("; ")));
        }
        let out = match (spec.dtype, cfg.dtype) {
            (DType::F32, _) => DType::F32,
            (DType::I16, WireSample::I16) if cfg.scale == 1.0 => DType::I16,
            (DType::I16, WireSample::I16) => {
                return Err(format!(
                    "window does not match the model: {input}; window.scale = {} applies to f32 \
                     inputs only (an i16 input takes the samples as they are)",
                    cfg.scale
                ));
            }
            (dt, wire) => {
                return Err(format!(
                    "window does not match the model: {input}; dtype: windows feed f32 inputs \
                     (or i16 inputs from i16 samples), not {dt} from {} samples",
                    wire.name()
                ));
            }
        };
        Ok(WindowPlan { cfg: cfg.clone(), out, byte_len: spec.byte_len() })
    }

    /// Bytes of one frame (every channel's sample) on the wire.
    pub fn frame_bytes(&self) -> usize {
        self.cfg.frame_bytes()
    }

    /// Writes the window in `buf` (interleaved frames) into a new input tensor.
    fn tensor(&self, buf: &[f32]) -> Bytes {
        let (n, c) = (self.cfg.samples, self.cfg.channels);
        let mut out = Vec::with_capacity(self.byte_len);
        let mut put = |v: f32| match self.out {
            DType::I16 => out.extend_from_slice(&(v as i16).to_le_bytes()),
            _ => out.extend_from_slice(&v.to_le_bytes()),
        };
        if self.cfg.layout == WindowLayout::ChannelsLast || c == 1 {
            buf[..n * c].iter().for_each(|v| put(*v));
        } else {
            for ch in 0..c {
                buf[ch..n * c].iter().step_by(c).for_each(|v| put(*v));
            }
        }
        Bytes::from(out)
    }
}

/// A chunk of one device's stream, after the decoder's checks (a whole number of frames).
#[derive(Debug, Clone)]
pub struct Chunk {
    pub seq: Option<u64>,
    pub ts: Option<f64>,
    /// Interleaved little-endian samples (a slice of the received packet).
    pub samples: Bytes,
}

/// One assembled window: a model input and the metadata of its first chunk.
#[derive(Debug, Clone)]
pub struct Window {
    pub seq: Option<u64>,
    pub ts: Option<f64>,
    pub input: Bytes,
}

/// Counters of one pipeline's assembly (health `window`, metrics `edgeinfer_window_*`).
#[derive(Debug, Default)]
pub struct WindowStats {
    /// Chunks that reached the assembler (valid, not duplicates).
    pub chunks: AtomicU64,
    /// Chunks appended to a window buffer.
    pub assembled: AtomicU64,
    /// Windows completed (each one a frame offered to the queue).
    pub windows: AtomicU64,
    /// Gaps found (missing chunks between two received ones).
    pub gaps: AtomicU64,
    /// Samples per channel written as zeros for gaps.
    pub zero_filled: AtomicU64,
    /// Chunks that arrived ahead of a missing one and were put back in order.
    pub reordered: AtomicU64,
    /// Chunks dropped because they arrived after their place in the stream had passed.
    pub late: AtomicU64,
    /// Partial windows discarded (gap too long, restarted numbering).
    pub resets: AtomicU64,
    /// Devices whose state was dropped after `idle_timeout` of silence.
    pub evicted: AtomicU64,
    /// Devices forgotten (the least recently heard) to make room for a new one while
    /// `max_devices` devices had state.
    pub displaced: AtomicU64,
    /// Held chunks discarded with an evicted device's state or a restarted stream.
    pub discarded: AtomicU64,
    /// Devices with state now.
    pub devices: AtomicU64,
    /// Chunks waiting in reorder buffers now.
    pub held: AtomicU64,
}

impl WindowStats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Named counters, in a fixed order (health, metrics, Prometheus).
    pub fn counters(&self) -> [(&'static str, u64); 13] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("chunks", g(&self.chunks)),
            ("assembled", g(&self.assembled)),
            ("windows", g(&self.windows)),
            ("gaps", g(&self.gaps)),
            ("zero_filled", g(&self.zero_filled)),
            ("reordered", g(&self.reordered)),
            ("late", g(&self.late)),
            ("resets", g(&self.resets)),
            ("evicted", g(&self.evicted)),
            ("displaced", g(&self.displaced)),
            ("discarded", g(&self.discarded)),
            ("devices", g(&self.devices)),
            ("held", g(&self.held)),
        ]
    }

    pub fn json(&self) -> Value {
        let m: serde_json::Map<String, Value> =
            self.counters().into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        Value::Object(m)
    }
}

/// Where the chunk that starts at `frame` (relative to the buffer start; negative: before it)
/// came from.
#[derive(Debug, Clone, Copy)]
struct Mark {
    frame: i64,
    seq: Option<u64>,
    ts: Option<f64>,
}

/// One device's stream state.
#[derive(Debug)]
struct Stream {
    /// Interleaved frames; `samples * channels` values.
    buf: Vec<f32>,
    /// Frames in `buf`.
    fill: usize,
    next_seq: Option<u64>,
    marks: VecDeque<Mark>,
    /// Chunks ahead of `next_seq`, ascending by seq.
    held: VecDeque<(u64, Chunk)>,
    last_seen: Instant,
}

impl Stream {
    fn new(plan: &WindowPlan, now: Instant) -> Stream {
        Stream {
            buf: vec![0.0; plan.cfg.samples * plan.cfg.channels],
            fill: 0,
            next_seq: None,
            marks: VecDeque::with_capacity(MARKS),
            held: VecDeque::with_capacity(plan.cfg.reorder + 1),
            last_seen: now,
        }
    }

    fn reset(&mut self) {
        self.fill = 0;
        self.marks.clear();
    }
}

/// Per-device window assembly of one pipeline.
#[derive(Debug)]
pub struct Assembler {
    plan: WindowPlan,
    devices: devices::Table<Stream>,
    pushes: u64,
}

impl Assembler {
    pub fn new(plan: WindowPlan) -> Assembler {
        let devices = devices::Table::new(plan.cfg.max_devices);
        Assembler { plan, devices, pushes: 0 }
    }

    pub fn plan(&self) -> &WindowPlan {
        &self.plan
    }

    /// Adds `chunk` from `device`; every window it completes goes to `emit`, in stream order.
    pub fn push(
        &mut self,
        device: &str,
        chunk: Chunk,
        now: Instant,
        stats: &WindowStats,
        emit: &mut dyn FnMut(Window),
    ) {
        WindowStats::add(&stats.chunks, 1);
        self.pushes += 1;
        if self.pushes.is_multiple_of(SWEEP_EVERY) {
            self.evict_idle(now, stats);
        }
        let key = DeviceKey::of(device);
        if self.devices.peek(key).is_none() && self.devices.len() >= self.plan.cfg.max_devices {
            self.evict_idle(now, stats);
        }
        let plan = &self.plan;
        let (_, new, displaced) = self.devices.get_or_insert_with(key, || Stream::new(plan, now));
        if let Some(old) = displaced {
            WindowStats::add(&stats.displaced, 1);
            WindowStats::add(&stats.discarded, old.held.len() as u64);
            stats.held.fetch_sub(old.held.len() as u64, Ordering::Relaxed);
        }
        if new {
            stats.devices.store(self.devices.len() as u64, Ordering::Relaxed);
        }
        let Some(st) = self.devices.get_mut(key) else { return };
        st.last_seen = now;
        let held_before = st.held.len();
        accept(plan, st, chunk, stats, emit);
        let held_after = st.held.len();
        if held_after >= held_before {
            WindowStats::add(&stats.held, (held_after - held_before) as u64);
        } else {
            stats.held.fetch_sub((held_before - held_after) as u64, Ordering::Relaxed);
        }
    }

    /// Drops the state of devices silent for `idle_timeout` (their held chunks are counted as
    /// discarded).
    pub fn evict_idle(&mut self, now: Instant, stats: &WindowStats) {
        let timeout = self.plan.cfg.idle_timeout;
        let gone = self.devices.retain(|st| now.saturating_duration_since(st.last_seen) < timeout);
        for st in &gone {
            WindowStats::add(&stats.discarded, st.held.len() as u64);
            stats.held.fetch_sub(st.held.len() as u64, Ordering::Relaxed);
        }
        WindowStats::add(&stats.evicted, gone.len() as u64);
        stats.devices.store(self.devices.len() as u64, Ordering::Relaxed);
    }

    /// Devices with state (tests).
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }
}

/// Puts `chunk` in its place in the stream (see the module's semantics).
fn accept(
    plan: &WindowPlan,
    st: &mut Stream,
    chunk: Chunk,
    stats: &WindowStats,
    emit: &mut dyn FnMut(Window),
) {
    let (Some(seq), Some(next)) = (chunk.seq, st.next_seq) else {
        // No numbering to check (or the first chunk): take it as it comes.
        st.next_seq = chunk.seq.map(|s| s.wrapping_add(1));
        append(plan, st, &chunk, stats, emit);
        return drain(plan, st, stats, emit);
    };
    if seq == next {
        st.next_seq = Some(seq.wrapping_add(1));
        append(plan, st, &chunk, stats, emit);
        return drain(plan, st, stats, emit);
    }
    if seq < next {
        if next - seq <= LATE_SPAN {
            WindowStats::add(&stats.late, 1);
        } else {
            // The device restarted its numbering: a new stream.
            WindowStats::add(&stats.resets, 1);
            WindowStats::add(&stats.discarded, st.held.len() as u64);
            st.reset();
            st.held.clear();
            st.next_seq = Some(seq.wrapping_add(1));
            append(plan, st, &chunk, stats, emit);
        }
        return;
    }
    // Ahead of the expected chunk: hold it for a while, unless it is far ahead.
    if plan.cfg.reorder > 0 && seq - next <= LATE_SPAN {
        if st.held.iter().any(|(s, _)| *s == seq) {
            WindowStats::add(&stats.late, 1);
            return;
        }
        let at = st.held.iter().position(|(s, _)| *s > seq).unwrap_or(st.held.len());
        st.held.insert(at, (seq, chunk));
        if st.held.len() <= plan.cfg.reorder {
            return;
        }
        // The buffer is full: the missing chunks are not coming. Go on from the first held.
        if let Some((s, c)) = st.held.pop_front() {
            gap(plan, st, s - next, c.samples.len() / plan.frame_bytes(), stats, emit);
            st.next_seq = Some(s.wrapping_add(1));
            append(plan, st, &c, stats, emit);
        }
        return drain(plan, st, stats, emit);
    }
    gap(plan, st, seq - next, chunk.samples.len() / plan.frame_bytes(), stats, emit);
    st.next_seq = Some(seq.wrapping_add(1));
    append(plan, st, &chunk, stats, emit);
    drain(plan, st, stats, emit)
}

/// Appends held chunks that are now next in line.
fn drain(plan: &WindowPlan, st: &mut Stream, stats: &WindowStats, emit: &mut dyn FnMut(Window)) {
    while let (Some((s, _)), Some(next)) = (st.held.front(), st.next_seq) {
        if *s != next {
            break;
        }
        let Some((s, c)) = st.held.pop_front() else { break };
        WindowStats::add(&stats.reordered, 1);
        st.next_seq = Some(s.wrapping_add(1));
        append(plan, st, &c, stats, emit);
    }
}

/// `missing` chunks of about `frames` frames each did not arrive.
fn gap(
    plan: &WindowPlan,
    st: &mut Stream,
    missing: u64,
    frames: usize,
    stats: &WindowStats,
    emit: &mut dyn FnMut(Window),
) {
    WindowStats::add(&stats.gaps, 1);
    let lost = missing.saturating_mul(frames as u64);
    // Never unbounded work for one chunk: a fill that would complete more windows than a chunk
    // may (validate keeps max_gap / hop within it) resets instead.
    let windows = lost / plan.cfg.hop.max(1) as u64;
    if plan.cfg.gap == GapPolicy::ZeroFill
        && lost <= plan.cfg.max_gap as u64
        && windows <= MAX_WINDOWS_PER_CHUNK
    {
        WindowStats::add(&stats.zero_filled, lost);
        fill(plan, st, lost as usize, None, stats, emit);
    } else {
        if st.fill > 0 {
            WindowStats::add(&stats.resets, 1);
        }
        st.reset();
    }
}

/// Appends one chunk's samples (converted to f32) to the stream.
fn append(
    plan: &WindowPlan,
    st: &mut Stream,
    chunk: &Chunk,
    stats: &WindowStats,
    emit: &mut dyn FnMut(Window),
) {
    WindowStats::add(&stats.assembled, 1);
    let frames = chunk.samples.len() / plan.frame_bytes();
    // Bounded: with the ring full (chunks much shorter than a window), a window starting in an
    // unmarked chunk takes the mark before it, its ts extrapolated by the sample rate.
    if st.marks.len() < MARKS {
        st.marks.push_back(Mark { frame: st.fill as i64, seq: chunk.seq, ts: chunk.ts });
    }
    fill(plan, st, frames, Some(&chunk.samples), stats, emit);
}

/// Writes `frames` frames (from `src`, or zeros) into the buffer, emitting every window that
/// completes and sliding by `hop`.
fn fill(
    plan: &WindowPlan,
    st: &mut Stream,
    frames: usize,
    src: Option<&[u8]>,
    stats: &WindowStats,
    emit: &mut dyn FnMut(Window),
) {
    let cfg = &plan.cfg;
    let c = cfg.channels;
    let mut done = 0;
    while done < frames {
        let n = (cfg.samples - st.fill).min(frames - done);
        let dst = &mut st.buf[st.fill * c..(st.fill + n) * c];
        match src {
            None => dst.fill(0.0),
            Some(b) => {
                let b = &b[done * plan.frame_bytes()..(done + n) * plan.frame_bytes()];
                convert(cfg.dtype, cfg.scale, plan.out == DType::I16, b, dst);
            }
        }
        st.fill += n;
        done += n;
        if st.fill == cfg.samples {
            let (seq, ts) = first_chunk(st, cfg.sample_rate);
            WindowStats::add(&stats.windows, 1);
            emit(Window { seq, ts, input: plan.tensor(&st.buf) });
            // Slide: keep the overlap, shift the chunk marks with it.
            let hop = cfg.hop;
            st.buf.copy_within(hop * c.., 0);
            st.fill -= hop;
            for m in st.marks.iter_mut() {
                m.frame -= hop as i64;
            }
            while st.marks.len() > 1 && st.marks[1].frame <= 0 {
                st.marks.pop_front();
            }
        }
    }
}

/// The seq and ts of the window starting at the buffer's first frame.
fn first_chunk(st: &Stream, rate: Option<u32>) -> (Option<u64>, Option<f64>) {
    let Some(m) = st.marks.iter().rev().find(|m| m.frame <= 0).or(st.marks.front()) else {
        return (None, None);
    };
    let offset = -m.frame as f64;
    let ts = match rate {
        Some(r) => m.ts.map(|t| t + offset * 1000.0 / f64::from(r)),
        None => m.ts,
    };
    (m.seq, ts)
}

/// Wire samples to f32 (scaled for f32 inputs; as they are for i16 inputs).
fn convert(dtype: WireSample, scale: f32, raw_i16: bool, b: &[u8], dst: &mut [f32]) {
    match dtype {
        WireSample::I16 => {
            let s = if raw_i16 { 1.0 } else { scale };
            for (d, c) in dst.iter_mut().zip(b.chunks_exact(2)) {
                *d = f32::from(i16::from_le_bytes([c[0], c[1]])) * s;
            }
        }
        WireSample::F32 => {
            for (d, c) in dst.iter_mut().zip(b.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * scale;
            }
        }
    }
}

#[cfg(test)]
mod tests;
