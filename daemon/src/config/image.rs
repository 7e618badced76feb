//! Image pipelines: the wire description of raw image frames (`[pipelines.<name>.raw]`) and the
//! declared pre-processing (`[pipelines.<name>.preprocess]`).
//!
//! This module only reads and checks the keys against each other. Whether the plan fits the
//! model's input signature is decided when the model is loaded (`pipeline::preprocess`), since
//! only then is the input shape known.

use super::PayloadFormat;
use super::reader::{Problems, Section};

/// Default ceiling of a decoded image (`width * height * channels` bytes): a 4K UHD RGB frame
/// (3840 x 2160 x 3 = 24.9 MB) fits, a decompression bomb does not.
pub const DEFAULT_MAX_DECODED: u64 = 32 << 20;

/// How a pipeline turns image frames into its model's input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    /// Geometry and sample type of `raw` image frames; `None` for jpeg/png.
    pub raw: Option<RawImage>,
    pub preprocess: Preprocess,
}

/// A raw image frame on the wire: `width * height * channels` samples of `dtype`, little-endian.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawImage {
    pub width: usize,
    pub height: usize,
    /// 1 (gray) or 3.
    pub channels: usize,
    pub dtype: SampleType,
    pub layout: PixelLayout,
    /// Channel order of 3-channel frames.
    pub order: ColorOrder,
}

/// Sample types a raw image frame may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleType {
    U8,
    I8,
    U16,
    I16,
    F16,
    F32,
}

impl SampleType {
    pub fn size(self) -> usize {
        match self {
            SampleType::U8 | SampleType::I8 => 1,
            SampleType::U16 | SampleType::I16 | SampleType::F16 => 2,
            SampleType::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SampleType::U8 => "u8",
            SampleType::I8 => "i8",
            SampleType::U16 => "u16",
            SampleType::I16 => "i16",
            SampleType::F16 => "f16",
            SampleType::F32 => "f32",
        }
    }
}

/// Memory order of an image's samples (without the batch axis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelLayout {
    /// Interleaved: `[height][width][channels]` (cameras, decoders).
    Hwc,
    /// Planar: `[channels][height][width]`.
    Chw,
}

/// Channel meaning of an image, on the wire or as the model wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorOrder {
    Rgb,
    Bgr,
    /// One luma channel (ITU-R BT.601 weights when converted from color).
    Gray,
}

impl ColorOrder {
    pub fn channels(self) -> usize {
        if self == ColorOrder::Gray { 1 } else { 3 }
    }

    pub fn name(self) -> &'static str {
        match self {
            ColorOrder::Rgb => "rgb",
            ColorOrder::Bgr => "bgr",
            ColorOrder::Gray => "gray",
        }
    }
}

/// Layout of the model's input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorLayout {
    Nchw,
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResizeMode {
    /// Stretch to the target size; bilinear with half-pixel centres (OpenCV `INTER_LINEAR`,
    /// `torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)`).
    Bilinear,
    /// Keep the aspect ratio: scale to fit, centre, fill the rest with `pad` (in source sample
    /// units, before scale/mean/std; 114 is the YOLO convention).
    Letterbox { pad: f32 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resize {
    pub width: usize,
    pub height: usize,
    pub mode: ResizeMode,
}

/// The declared pre-processing, applied in this order: resize, center crop, color conversion,
/// `(value * scale - mean[c]) / std[c]`, then the model's layout and dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// `None`: the image must already have the model's height and width.
    pub resize: Option<Resize>,
    /// Crop of the resized image, centred (torchvision `CenterCrop` rounding).
    pub center_crop: Option<(usize, usize)>,
    /// Channel order the model expects.
    pub color: ColorOrder,
    pub scale: f32,
    /// Per output channel, or one value for all.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub layout: TensorLayout,
    /// Decompression-bomb guard: `width * height * channels` of a decoded image, checked from
    /// its header before any pixel buffer is allocated.
    pub max_decoded: u64,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            resize: None,
            center_crop: None,
            color: ColorOrder::Rgb,
            scale: 1.0,
            mean: vec![0.0],
            std: vec![1.0],
            layout: TensorLayout::Nchw,
            max_decoded: DEFAULT_MAX_DECODED,
        }
    }
}

/// Largest image side we accept anywhere (the JPEG format's own limit).
const MAX_SIDE: i64 = 65_535;

/// Reads `raw` and `preprocess` of one pipeline. `None` when the pipeline does not take images.
pub(super) fn parse(
    s: &mut Section<'_>,
    p: &mut Problems,
    format: PayloadFormat,
) -> Option<ImageConfig> {
    let raw = s.table(p, "raw").map(|t| raw_image(t, p));
    let pre = s.table(p, "preprocess").map(|t| preprocess(t, p));
    let takes_images = match format {
        PayloadFormat::Jpeg | PayloadFormat::Png => {
            if raw.is_some() {
                p.push(
                    s.key("raw"),
                    None,
                    "describes raw frames; this pipeline's format is an encoded image \
                     (remove the table or set format = \"raw\")",
                );
            }
            true
        }
        PayloadFormat::Raw => {
            if pre.is_some() && raw.is_none() {
                p.push(
                    s.key("raw"),
                    None,
                    "missing: a raw pipeline with [preprocess] needs the frame's width, height, \
                     channels, dtype and layout in a [raw] table",
                );
            }
            raw.is_some()
        }
        PayloadFormat::Json | PayloadFormat::Cbor | PayloadFormat::PcmS16le => {
            for (key, present) in [("raw", raw.is_some()), ("preprocess", pre.is_some())] {
                if present {
                    p.push(
                        s.key(key),
                        None,
                        "applies to image frames: format = \"jpeg\", \"png\" or \"raw\"",
                    );
                }
            }
            false
        }
    };
    if !takes_images {
        return None;
    }
    let preprocess = pre.flatten().unwrap_or_default();
    let raw = raw.flatten();
    if let Some(r) = raw {
        let decoded = (r.width * r.height * r.channels) as u64;
        if decoded > preprocess.max_decoded {
            p.push(
                s.key("raw"),
                None,
                format!(
                    "a {}x{}x{} frame exceeds preprocess.max_decoded ({} samples)",
                    r.width, r.height, r.channels, preprocess.max_decoded
                ),
            );
        }
    }
    Some(ImageConfig { raw, preprocess })
}

fn raw_image(mut t: Section<'_>, p: &mut Problems) -> Option<RawImage> {
    let width = t.int(p, "width", 1, MAX_SIDE);
    let height = t.int(p, "height", 1, MAX_SIDE);
    let channels = t.int(p, "channels", 1, 4);
    if let Some(c) = channels.filter(|c| *c != 1 && *c != 3) {
        p.push(
            t.key("channels"),
            None,
            format!("{c} channels are not supported: 1 (gray) or 3 (rgb/bgr)"),
        );
    }
    let dtype = t
        .choice(
            p,
            "dtype",
            &[
                ("u8", SampleType::U8),
                ("i8", SampleType::I8),
                ("u16", SampleType::U16),
                ("i16", SampleType::I16),
                ("f16", SampleType::F16),
                ("f32", SampleType::F32),
            ],
        )
        .unwrap_or(SampleType::U8);
    let layout = t
        .choice(p, "layout", &[("hwc", PixelLayout::Hwc), ("chw", PixelLayout::Chw)])
        .unwrap_or(PixelLayout::Hwc);
    let order = t
        .choice(p, "order", &[("rgb", ColorOrder::Rgb), ("bgr", ColorOrder::Bgr)])
        .unwrap_or(ColorOrder::Rgb);
    for key in ["width", "height", "channels"] {
        if !t.has(key) {
            p.push(t.key(key), None, "missing: the raw frame's geometry must be declared");
        }
    }
    t.finish(p);
    Some(RawImage {
        width: width? as usize,
        height: height? as usize,
        channels: channels.filter(|c| *c == 1 || *c == 3)? as usize,
        dtype,
        layout,
        order,
    })
}

fn preprocess(mut t: Section<'_>, p: &mut Problems) -> Option<Preprocess> {
    let d = Preprocess::default();
    let mut ok = true;
    let resize = t.table(p, "resize").and_then(|mut r| {
        let width = r.int(p, "width", 1, MAX_SIDE);
        let height = r.int(p, "height", 1, MAX_SIDE);
        let mode = r.choice(p, "mode", &[("bilinear", 0), ("letterbox", 1)]).unwrap_or(0);
        // `pad` is read (and so known) only with letterbox: elsewhere it is an unknown key.
        let mode = if mode == 1 {
            let pad = r.float(p, "pad", -65504.0, 65504.0).unwrap_or(0.0) as f32;
            ResizeMode::Letterbox { pad }
        } else {
            ResizeMode::Bilinear
        };
        if width.is_none() || height.is_none() {
            p.push(r.key("width"), None, "resize needs both width and height");
        }
        r.finish(p);
        Some(Resize { width: width? as usize, height: height? as usize, mode })
    });
    let center_crop = t.table(p, "center_crop").and_then(|mut c| {
        let width = c.int(p, "width", 1, MAX_SIDE);
        let height = c.int(p, "height", 1, MAX_SIDE);
        if width.is_none() || height.is_none() {
            p.push(c.key("width"), None, "center_crop needs both width and height");
        }
        c.finish(p);
        Some((width? as usize, height? as usize))
    });
    if let (Some(r), Some((cw, ch))) = (resize, center_crop)
        && (cw > r.width || ch > r.height)
    {
        p.push(
            t.key("center_crop"),
            None,
            format!("a {cw}x{ch} crop does not fit in the {}x{} resized image", r.width, r.height),
        );
        ok = false;
    }
    let color = t
        .choice(
            p,
            "color",
            &[("rgb", ColorOrder::Rgb), ("bgr", ColorOrder::Bgr), ("gray", ColorOrder::Gray)],
        )
        .unwrap_or(d.color);
    let scale = t.float(p, "scale", -1e9, 1e9).map_or(d.scale, |f| f as f32);
    let mut per_channel = |key: &'static str, default: &[f32], nonzero: bool| -> Vec<f32> {
        let Some(v) = t.get(key) else { return default.to_vec() };
        let vals = v
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_float().or_else(|| x.as_integer().map(|i| i as f64)))
                    .collect::<Option<Vec<f64>>>()
            })
            .unwrap_or_else(|| {
                v.as_float().or_else(|| v.as_integer().map(|i| i as f64)).map(|f| vec![f])
            });
        match vals {
            Some(vals)
                if (vals.len() == 1 || vals.len() == color.channels())
                    && vals.iter().all(|x| x.is_finite() && (!nonzero || *x != 0.0)) =>
            {
                vals.into_iter().map(|x| x as f32).collect()
            }
            _ => {
                p.push(
                    t.key(key),
                    Some(v),
                    format!(
                        "expected one number or one per channel ({} for color = \"{}\"){}",
                        color.channels(),
                        color.name(),
                        if nonzero { ", none zero" } else { "" }
                    ),
                );
                default.to_vec()
            }
        }
    };
    let mean = per_channel("mean", &d.mean, false);
    let std = per_channel("std", &d.std, true);
    let layout = t
        .choice(p, "layout", &[("nchw", TensorLayout::Nchw), ("nhwc", TensorLayout::Nhwc)])
        .unwrap_or(d.layout);
    let max_decoded = t.size(p, "max_decoded", 64, 1 << 32).unwrap_or(d.max_decoded);
    t.finish(p);
    ok.then_some(Preprocess { resize, center_crop, color, scale, mean, std, layout, max_decoded })
}
