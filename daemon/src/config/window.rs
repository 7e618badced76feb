//! Stream pipelines: the binary envelope (`envelope = "none" | "edgeinfer-v1"`) and the window
//! assembly of sample streams (`[pipelines.<name>.window]`: pcm_s16le audio chunks, raw
//! interleaved sensor samples).
//!
//! This module only reads and checks the keys against each other. Whether the window fits the
//! model's input signature is decided when the model is loaded (`pipeline::window`), since only
//! then is the input shape known.

use std::time::Duration;

use toml::Value;

use super::PayloadFormat;
use super::reader::{Problems, Section};

/// Whether binary frames start with the edgeinfer envelope (seq, device timestamp, deadline,
/// stream description; `docs/messages.md` has the byte layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Envelope {
    #[default]
    None,
    EdgeinferV1,
}

/// Sample type of a stream's chunks on the wire (little-endian, interleaved by channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireSample {
    I16,
    F32,
}

impl WireSample {
    pub fn size(self) -> usize {
        match self {
            WireSample::I16 => 2,
            WireSample::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireSample::I16 => "i16",
            WireSample::F32 => "f32",
        }
    }
}

/// Memory order of a window in the model input (without the batch axis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowLayout {
    /// `[1, channels, samples]`: one row per channel (1D convolutions over time).
    ChannelsFirst,
    /// `[1, samples, channels]`: interleaved, as on the wire (recurrent models, MLPs).
    ChannelsLast,
}

impl WindowLayout {
    pub fn name(self) -> &'static str {
        match self {
            WindowLayout::ChannelsFirst => "channels_first",
            WindowLayout::ChannelsLast => "channels_last",
        }
    }
}

/// What a missing stretch of a stream (chunks lost or dropped) does to the window being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapPolicy {
    /// Start over: the partial window is discarded.
    Reset,
    /// Fill the missing samples with zeros (silence) when they are at most `max_gap` per
    /// channel; a longer gap resets.
    ZeroFill,
}

/// How chunks from one device are assembled into the model's input windows.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowConfig {
    /// Window length in samples per channel.
    pub samples: usize,
    /// Samples per channel from one window's start to the next (`samples - hop` overlap).
    pub hop: usize,
    pub channels: usize,
    /// Samples per second per channel: checked against the envelope's stream description and
    /// used to derive a window's timestamp from its first chunk's.
    pub sample_rate: Option<u32>,
    pub dtype: WireSample,
    pub layout: WindowLayout,
    /// f32 inputs: each sample is multiplied by this (1/32768 maps i16 to [-1, 1)).
    pub scale: f32,
    pub gap: GapPolicy,
    /// Longest gap (samples per channel) that `zero_fill` fills.
    pub max_gap: usize,
    /// Chunks held back per device to put out-of-order chunks back in sequence (0: a chunk
    /// after a gap is taken at once and a late one is dropped).
    pub reorder: usize,
    /// Devices with assembly state at once; chunks from further devices are refused (counted).
    pub max_devices: usize,
    /// A device silent this long gives up its state to a new device.
    pub idle_timeout: Duration,
}

impl WindowConfig {
    /// Bytes of one frame (one sample of every channel) on the wire.
    pub fn frame_bytes(&self) -> usize {
        self.channels * self.dtype.size()
    }

    /// Upper bound of the assembly memory: every device's window buffer (the held chunks for
    /// reordering are references to received packets, bounded by `reorder * max_payload`).
    pub fn state_bytes(&self) -> u64 {
        self.max_devices as u64 * self.samples as u64 * self.channels as u64 * 4
    }
}

/// Largest window (samples x channels) per device.
pub const MAX_WINDOW_VALUES: usize = 1 << 22;
/// Largest total assembly state (`max_devices` windows of f32).
pub const MAX_STATE_BYTES: u64 = 256 << 20;
/// Most windows one chunk of `max_payload` bytes may complete (bounds the ingest task's work
/// per message).
pub const MAX_WINDOWS_PER_CHUNK: u64 = 1024;

/// Reads `envelope` and `window` of one pipeline (`max_payload` bounds the windows one chunk
/// can complete).
pub(super) fn parse(
    s: &mut Section<'_>,
    p: &mut Problems,
    format: PayloadFormat,
    max_payload: u64,
) -> (Envelope, Option<WindowConfig>) {
    let envelope = s
        .choice(p, "envelope", &[("none", Envelope::None), ("edgeinfer-v1", Envelope::EdgeinferV1)])
        .unwrap_or_default();
    if envelope != Envelope::None && matches!(format, PayloadFormat::Json | PayloadFormat::Cbor) {
        p.push(
            s.key("envelope"),
            None,
            "json and cbor frames carry seq, ts and deadline_ms as fields; the envelope is for \
             binary formats (raw, jpeg, png, pcm_s16le)",
        );
    }
    let has_image = s.has("raw") || s.has("preprocess");
    let window = s.table(p, "window").map(|t| window(t, p, format));
    let window = match (format, window) {
        (PayloadFormat::PcmS16le, None) => {
            p.push(
                s.key("window"),
                None,
                "missing: pcm_s16le chunks are assembled into windows; declare at least \
                 samples and channels in [window]",
            );
            None
        }
        (PayloadFormat::PcmS16le | PayloadFormat::Raw, w) => w.flatten(),
        (_, Some(_)) => {
            p.push(
                s.key("window"),
                None,
                "applies to sample streams: format = \"pcm_s16le\" or \"raw\"",
            );
            None
        }
        (_, None) => None,
    };
    if let Some(w) = &window {
        if has_image && format == PayloadFormat::Raw {
            p.push(
                s.key("window"),
                None,
                "a raw pipeline takes either image frames ([raw], [preprocess]) or a sample \
                 stream ([window]), not both",
            );
        }
        let chunk_frames = max_payload / w.frame_bytes() as u64;
        let windows = chunk_frames.div_ceil(w.hop as u64);
        if windows > MAX_WINDOWS_PER_CHUNK {
            p.push(
                s.key("max_payload"),
                None,
                format!(
                    "a chunk of max_payload = {max_payload} bytes could complete {windows} \
                     windows of hop {} (at most {MAX_WINDOWS_PER_CHUNK} per message); lower \
                     max_payload to at most {} bytes or raise window.hop",
                    w.hop,
                    MAX_WINDOWS_PER_CHUNK * w.hop as u64 * w.frame_bytes() as u64
                ),
            );
        }
    }
    (envelope, window)
}

fn window(mut t: Section<'_>, p: &mut Problems, format: PayloadFormat) -> Option<WindowConfig> {
    let samples = t.int(p, "samples", 1, MAX_WINDOW_VALUES as i64).map(|n| n as usize);
    let channels = t.int(p, "channels", 1, 256).map(|n| n as usize);
    let hop = t.int(p, "hop", 1, MAX_WINDOW_VALUES as i64).map(|n| n as usize);
    let sample_rate = t.int(p, "sample_rate", 1, 10_000_000).map(|n| n as u32);
    let dtype = t.choice(p, "dtype", &[("i16", WireSample::I16), ("f32", WireSample::F32)]);
    if format == PayloadFormat::PcmS16le && dtype == Some(WireSample::F32) {
        p.push(t.key("dtype"), Some(&Value::String("f32".into())), "pcm_s16le samples are i16");
    }
    let dtype = if format == PayloadFormat::PcmS16le {
        WireSample::I16
    } else {
        dtype.unwrap_or(WireSample::I16)
    };
    let layout = t
        .choice(
            p,
            "layout",
            &[
                ("channels_first", WindowLayout::ChannelsFirst),
                ("channels_last", WindowLayout::ChannelsLast),
            ],
        )
        .unwrap_or(WindowLayout::ChannelsFirst);
    let scale = t.float(p, "scale", -1e9, 1e9).map_or(1.0, |f| f as f32);
    let gap = t
        .choice(p, "gap", &[("reset", GapPolicy::Reset), ("zero_fill", GapPolicy::ZeroFill)])
        .unwrap_or(GapPolicy::Reset);
    let max_gap = t.int(p, "max_gap", 0, MAX_WINDOW_VALUES as i64).map(|n| n as usize);
    if max_gap.is_some() && gap != GapPolicy::ZeroFill {
        p.push(t.key("max_gap"), None, "only applies with gap = \"zero_fill\"");
    }
    let reorder = t.int(p, "reorder", 0, 64).map_or(4, |n| n as usize);
    let max_devices = t.int(p, "max_devices", 1, 65_536).map_or(64, |n| n as usize);
    let idle_timeout = t
        .duration(p, "idle_timeout", Duration::from_millis(100), Duration::from_secs(86_400))
        .unwrap_or(Duration::from_secs(60));
    for key in ["samples", "channels"] {
        if !t.has(key) {
            p.push(t.key(key), None, "missing: the window's length and channel count");
        }
    }
    let (samples, channels) = (samples?, channels?);
    let hop = hop.unwrap_or(samples);
    let mut ok = true;
    if hop > samples {
        p.push(
            t.key("hop"),
            None,
            format!("must not exceed samples ({samples}): windows would skip samples"),
        );
        ok = false;
    }
    if samples * channels > MAX_WINDOW_VALUES {
        p.push(
            t.key("samples"),
            None,
            format!("samples x channels must be at most {MAX_WINDOW_VALUES}"),
        );
        ok = false;
    }
    if let Some(g) = max_gap
        && gap == GapPolicy::ZeroFill
        && (g / hop) as u64 > MAX_WINDOWS_PER_CHUNK
    {
        // Each zero-filled sample past the window's first can complete a window: a gap must
        // never make more windows than a chunk may (one message, bounded work).
        p.push(
            t.key("max_gap"),
            None,
            format!(
                "a gap of max_gap = {g} samples could complete {} windows of hop {hop} \
                 (at most {MAX_WINDOWS_PER_CHUNK} per message); lower max_gap to at most {} or raise hop",
                g / hop,
                MAX_WINDOWS_PER_CHUNK * hop as u64
            ),
        );
        ok = false;
    }
    let cfg = WindowConfig {
        samples,
        hop,
        channels,
        sample_rate,
        dtype,
        layout,
        scale,
        gap,
        max_gap: max_gap.unwrap_or(samples.min(MAX_WINDOWS_PER_CHUNK as usize * hop)),
        reorder,
        max_devices,
        idle_timeout,
    };
    if cfg.state_bytes() > MAX_STATE_BYTES {
        p.push(
            t.key("max_devices"),
            None,
            format!(
                "{max_devices} devices x {samples} samples x {channels} channels of f32 is {} \
                 bytes of window state, over {MAX_STATE_BYTES}",
                cfg.state_bytes()
            ),
        );
        ok = false;
    }
    t.finish(p);
    ok.then_some(cfg)
}
