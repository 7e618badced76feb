//! The pre-processing plan: a decoded image (any size, 1 or 3 channels, u8..f32 samples, HWC or
//! CHW) -> one row of the model's input tensor, in one pass.
//!
//! [`Plan::compile`] runs once per pipeline at start-up (and in `edgeinfer validate --models`):
//! it checks the declared steps against the model's input signature and folds scale, mean and
//! std into one multiply-add per channel. [`Plan::run`] then writes every output element exactly
//! once, straight into the pooled input tensor: resize, crop, letterbox padding and color
//! conversion are all expressed as where each output pixel samples the source, so there is no
//! intermediate image. The per-axis sampling tables live in the worker's [`PlanScratch`] and are
//! rebuilt only when the source size changes (a camera's frames all have one size).
//!
//! Geometry, for a source of `w x h` and a declared resize to `RW x RH`:
//! - `bilinear`: output `x` samples source `sx = (x + 0.5) * w / RW - 0.5`, clamped to
//!   `[0, w - 1]`, linear between `floor(sx)` and the next sample (half-pixel centres: OpenCV
//!   `INTER_LINEAR`, torch `interpolate(mode="bilinear", align_corners=False)`; *not* Pillow's
//!   `BILINEAR`, which widens its filter when downscaling).
//! - `letterbox`: `s = min(RW / w, RH / h)`, the image is resized bilinearly to
//!   `round(w * s) x round(h * s)` and placed at offset `((RW - nw) / 2, (RH - nh) / 2)` (rounded
//!   down); the rest is `pad`.
//! - `center_crop` `CW x CH` takes the window at `((RW - CW) / 2, (RH - CH) / 2)` (rounded down).
//! - Without resize the canvas is the source itself.
//!
//! Values: gray from color is ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B); every value is
//! then `(v * scale - mean[c]) / std[c]`, rounded to nearest and saturated for integer inputs.

use tract_onnx::prelude::f16;

use crate::config::image::{
    ColorOrder, PixelLayout, Preprocess, ResizeMode, SampleType, TensorLayout,
};
use crate::model::{DType, TensorSpec};
use crate::reject::{Reject, RejectReason};

/// A decoded image, borrowed: from the decoder's buffer or straight from a raw frame.
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    pub bytes: &'a [u8],
    pub dtype: SampleType,
    pub width: usize,
    pub height: usize,
    /// 1 or 3.
    pub channels: usize,
    pub layout: PixelLayout,
    /// Meaning of 3 channels (ignored for 1).
    pub order: ColorOrder,
}

impl<'a> ImageView<'a> {
    /// 8-bit interleaved (HWC) RGB or gray pixels, as the JPEG and PNG decoders produce them.
    pub fn u8_hwc(bytes: &'a [u8], width: usize, height: usize, channels: usize) -> Self {
        ImageView {
            bytes,
            dtype: SampleType::U8,
            width,
            height,
            channels,
            layout: PixelLayout::Hwc,
            order: ColorOrder::Rgb,
        }
    }
}

/// One output coordinate's two source taps along an axis.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tap {
    i0: u32,
    i1: u32,
    /// Weight of `i1` (`i0` gets `1 - w1`).
    w1: f32,
    /// False for letterbox padding.
    inside: bool,
}

/// Where the model's input pixels came from in the source image: continuous model coordinates
/// (`0..W` across the input tensor) to source pixel coordinates, per axis
/// `source = (model + shift) * scale`. It undoes the crop window, the letterbox offset and the
/// resize exactly as the plan sampled them (`scale = w / content width`, the content width
/// being the rounded resize), so detection boxes land on the source frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceMap {
    pub width: usize,
    pub height: usize,
    shift_x: f64,
    scale_x: f64,
    shift_y: f64,
    scale_y: f64,
}

impl SourceMap {
    /// Maps an `[x1, y1, x2, y2]` box in model input pixels to source pixels, clipped to the
    /// source frame.
    pub fn map_box(&self, b: [f32; 4]) -> [f32; 4] {
        let (w, h) = (self.width as f64, self.height as f64);
        let x = |v: f32| ((f64::from(v) + self.shift_x) * self.scale_x).clamp(0.0, w) as f32;
        let y = |v: f32| ((f64::from(v) + self.shift_y) * self.scale_y).clamp(0.0, h) as f32;
        [x(b[0]), y(b[1]), x(b[2]), y(b[3])]
    }
}

/// Per-worker buffers of a plan: sampling tables for the last source size seen.
#[derive(Debug, Default)]
pub struct PlanScratch {
    xs: Vec<Tap>,
    ys: Vec<Tap>,
    /// One output row in f32, before the dtype conversion.
    row: Vec<f32>,
    /// The plan and source size the tables were built for.
    source: Option<(u64, usize, usize)>,
    /// The geometry of those tables.
    map: Option<SourceMap>,
}

/// Distinguishes plans, so a scratch handed from one plan to another rebuilds its tables.
static NEXT_PLAN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A compiled pre-processing plan for one model input.
#[derive(Debug, Clone)]
pub struct Plan {
    id: u64,
    cfg: Preprocess,
    /// Output (model) height, width and channels.
    out_h: usize,
    out_w: usize,
    out_c: usize,
    dtype: DType,
    /// Per output channel: `v * a + b` = `(v * scale - mean) / std`.
    a: [f32; 3],
    b: [f32; 3],
    /// Letterbox padding, already normalized per output channel.
    pad: [f32; 3],
}

impl Plan {
    /// Checks the declared steps against the model's input and folds the arithmetic. The error
    /// lists every disagreement with what the plan produces and what the model takes.
    pub fn compile(cfg: &Preprocess, spec: &TensorSpec) -> Result<Plan, String> {
        let shape = &spec.shape;
        let sig = format!("model input `{}` is {} {:?}", spec.name, spec.dtype, shape);
        let rank = shape.len();
        if rank != 3 && rank != 4 {
            return Err(format!(
                "{sig}: an image pipeline needs a rank-4 input ([N, C, H, W] or [N, H, W, C]) \
                 or rank 3 ([C, H, W] or [H, W, C])"
            ));
        }
        let mut problems = Vec::new();
        if rank == 4 && shape[0] != 1 {
            problems.push(format!("batch axis is {} (1 expected per frame)", shape[0]));
        }
        let (c, h, w) = match cfg.layout {
            TensorLayout::Nchw => (shape[rank - 3], shape[rank - 2], shape[rank - 1]),
            TensorLayout::Nhwc => (shape[rank - 1], shape[rank - 3], shape[rank - 2]),
        };
        let layout = if cfg.layout == TensorLayout::Nchw { "nchw" } else { "nhwc" };
        let want_c = cfg.color.channels();
        if c != want_c {
            let mut m = format!(
                "channels: color = \"{}\" writes {want_c}, the input has {c} on the {} axis (layout = \"{layout}\")",
                cfg.color.name(),
                if cfg.layout == TensorLayout::Nchw { "C of NCHW" } else { "C of NHWC" },
            );
            let other = match cfg.layout {
                TensorLayout::Nchw => shape[rank - 1],
                TensorLayout::Nhwc => shape[rank - 3],
            };
            if other == want_c {
                let flip = if cfg.layout == TensorLayout::Nchw { "nhwc" } else { "nchw" };
                m.push_str(&format!(
                    "; hint: the input looks {}, set layout = \"{flip}\"",
                    flip.to_uppercase()
                ));
            }
            problems.push(m);
        }
        let (ow, oh, what) = match (cfg.center_crop, cfg.resize) {
            (Some((cw, ch)), _) => (Some(cw), Some(ch), "center_crop"),
            (None, Some(r)) => (Some(r.width), Some(r.height), "resize"),
            (None, None) => (None, None, ""),
        };
        if let (Some(ow), Some(oh)) = (ow, oh)
            && (ow != w || oh != h)
        {
            problems.push(format!(
                "size: {what} produces {ow}x{oh} (width x height), the input takes {w}x{h}"
            ));
        }
        if !matches!(spec.dtype, DType::F32 | DType::F16 | DType::F64 | DType::U8 | DType::I8) {
            problems.push(format!(
                "dtype: pre-processing writes f32, f16, f64, u8 or i8, not {}",
                spec.dtype
            ));
        }
        for (key, v) in [("mean", &cfg.mean), ("std", &cfg.std)] {
            if v.len() != 1 && v.len() != want_c {
                problems.push(format!("{key} has {} values for {want_c} channels", v.len()));
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "preprocess does not match the model: {sig}; {}",
                problems.join("; ")
            ));
        }
        let per = |v: &[f32], i: usize| if v.len() == 1 { v[0] } else { v[i] };
        let mut a = [0f32; 3];
        let mut b = [0f32; 3];
        let mut pad = [0f32; 3];
        let pad_value = match cfg.resize.map(|r| r.mode) {
            Some(ResizeMode::Letterbox { pad }) => pad,
            _ => 0.0,
        };
        for i in 0..want_c {
            let (m, s) = (per(&cfg.mean, i), per(&cfg.std, i));
            a[i] = cfg.scale / s;
            b[i] = -m / s;
            pad[i] = pad_value * a[i] + b[i];
        }
        let id = NEXT_PLAN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Plan {
            id,
            cfg: cfg.clone(),
            out_h: h,
            out_w: w,
            out_c: want_c,
            dtype: spec.dtype,
            a,
            b,
            pad,
        })
    }

    /// Output width, height and channels.
    pub fn output_size(&self) -> (usize, usize, usize) {
        (self.out_w, self.out_h, self.out_c)
    }

    /// The decompression-bomb budget (`width * height * channels` samples).
    pub fn max_decoded(&self) -> u64 {
        self.cfg.max_decoded
    }

    /// Writes `img` into `out` (one row of the input tensor: exactly `C * H * W` elements of the
    /// model's dtype) and says where the input's pixels came from in the image. Refuses an image
    /// the declared steps cannot bring to the model's size.
    pub fn run(
        &self,
        img: &ImageView<'_>,
        scratch: &mut PlanScratch,
        out: &mut [u8],
    ) -> Result<SourceMap, Reject> {
        let n = self.out_w * self.out_h * self.out_c;
        if out.len() != n * self.dtype.size() {
            // Sized from the same spec at compile time: a bug, reported as such.
            return Err(Reject::new(
                RejectReason::WrongShape,
                format!(
                    "internal: input row has {} bytes, the plan writes {n} elements",
                    out.len()
                ),
            ));
        }
        let need = img.width * img.height * img.channels * img.dtype.size();
        if img.bytes.len() < need || img.width == 0 || img.height == 0 {
            return Err(Reject::new(RejectReason::WrongSize, "image buffer shorter than its size"));
        }
        let map = match scratch.map {
            Some(m) if scratch.source == Some((self.id, img.width, img.height)) => m,
            _ => self.tables(img.width, img.height, scratch)?,
        };
        match img.dtype {
            SampleType::U8 => self.fill::<U8>(img, scratch, out),
            SampleType::I8 => self.fill::<I8>(img, scratch, out),
            SampleType::U16 => self.fill::<U16>(img, scratch, out),
            SampleType::I16 => self.fill::<I16>(img, scratch, out),
            SampleType::F16 => self.fill::<F16>(img, scratch, out),
            SampleType::F32 => self.fill::<F32>(img, scratch, out),
        }
        Ok(map)
    }

    /// Builds the sampling tables for a `w x h` source; returns their geometry.
    fn tables(&self, w: usize, h: usize, s: &mut PlanScratch) -> Result<SourceMap, Reject> {
        let (cw, ch) = match self.cfg.resize {
            Some(r) => (r.width, r.height),
            None => (w, h),
        };
        let (ow, oh) = (self.out_w, self.out_h);
        if ow > cw
            || oh > ch
            || (self.cfg.resize.is_none() && self.cfg.center_crop.is_none() && (w, h) != (ow, oh))
        {
            return Err(Reject::new(
                RejectReason::WrongShape,
                format!(
                    "image is {w}x{h}, the model takes {ow}x{oh}{}",
                    if self.cfg.resize.is_none() {
                        "; hint: declare [preprocess] resize to accept other sizes"
                    } else {
                        ""
                    }
                ),
            ));
        }
        // Crop window in canvas coordinates.
        let (x0, y0) = ((cw - ow) / 2, (ch - oh) / 2);
        let (content, offset) = match self.cfg.resize.map(|r| r.mode) {
            Some(ResizeMode::Letterbox { .. }) => {
                let sc = (cw as f64 / w as f64).min(ch as f64 / h as f64);
                let nw = ((w as f64 * sc).round() as usize).clamp(1, cw);
                let nh = ((h as f64 * sc).round() as usize).clamp(1, ch);
                ((nw, nh), ((cw - nw) / 2, (ch - nh) / 2))
            }
            _ => ((cw, ch), (0, 0)),
        };
        axis(&mut s.xs, w, content.0, offset.0, x0, ow);
        axis(&mut s.ys, h, content.1, offset.1, y0, oh);
        let map = SourceMap {
            width: w,
            height: h,
            shift_x: x0 as f64 - offset.0 as f64,
            scale_x: w as f64 / content.0 as f64,
            shift_y: y0 as f64 - offset.1 as f64,
            scale_y: h as f64 / content.1 as f64,
        };
        s.source = Some((self.id, w, h));
        s.map = Some(map);
        Ok(map)
    }

    /// One pass over the output, row by row: each output row is computed in f32 into the
    /// scratch row buffer (channel-major for NCHW, interleaved for NHWC, so it is contiguous in
    /// the tensor either way), then converted to the model's dtype with one dtype dispatch per
    /// row. The inner loops are branch-light and index-only, which the compiler vectorizes
    /// where the loads allow.
    fn fill<S: Sample>(&self, img: &ImageView<'_>, s: &mut PlanScratch, out: &mut [u8]) {
        let (w, h, c) = (img.width, img.height, img.channels);
        // Element strides of the source.
        let (sx, sy, sc) = match img.layout {
            PixelLayout::Hwc => (c, w * c, 1),
            PixelLayout::Chw => (1, w, w * h),
        };
        // Source channel of each of R, G, B.
        let src_rgb: [usize; 3] = if c == 1 {
            [0, 0, 0]
        } else if img.order == ColorOrder::Bgr {
            [2, 1, 0]
        } else {
            [0, 1, 2]
        };
        // Source channel feeding each output channel, or `None`: luma of R, G, B.
        let pick: Option<[usize; 3]> = match (self.cfg.color, c) {
            (ColorOrder::Gray, 3) => None,
            (ColorOrder::Gray, _) => Some([0, 0, 0]),
            (ColorOrder::Rgb, _) => Some(src_rgb),
            (ColorOrder::Bgr, _) => Some([src_rgb[2], src_rgb[1], src_rgb[0]]),
        };
        let oc = self.out_c;
        let (ow, plane) = (self.out_w, self.out_w * self.out_h);
        let nhwc = self.cfg.layout == TensorLayout::Nhwc;
        // Where output channel k, column x goes in the row buffer.
        let (k_stride, x_stride) = if nhwc { (1, oc) } else { (ow, 1) };
        let size = self.dtype.size();
        let bytes = img.bytes;
        let PlanScratch { xs, ys, row, .. } = s;
        row.clear();
        row.resize(ow * oc, 0.0);
        for (oy, ty) in ys.iter().enumerate() {
            let (r0, r1, wy) = (ty.i0 as usize * sy, ty.i1 as usize * sy, ty.w1);
            // Bilinear sample of source channel offset `base` at column tap `tx`.
            let sample = |base: usize, tx: &Tap| -> f32 {
                let (c0, c1) = (tx.i0 as usize * sx + base, tx.i1 as usize * sx + base);
                let top = S::load(bytes, r0 + c0) * (1.0 - tx.w1) + S::load(bytes, r0 + c1) * tx.w1;
                let bot = S::load(bytes, r1 + c0) * (1.0 - tx.w1) + S::load(bytes, r1 + c1) * tx.w1;
                top * (1.0 - wy) + bot * wy
            };
            for k in 0..oc {
                let (a, b, pad) = (self.a[k], self.b[k], self.pad[k]);
                for (ox, tx) in xs.iter().enumerate() {
                    let v = if !(ty.inside && tx.inside) {
                        pad
                    } else if let Some(src) = pick {
                        sample(src[k] * sc, tx) * a + b
                    } else {
                        let [r, g, bl] = src_rgb;
                        (0.299 * sample(r * sc, tx)
                            + 0.587 * sample(g * sc, tx)
                            + 0.114 * sample(bl * sc, tx))
                            * a
                            + b
                    };
                    row[k * k_stride + ox * x_stride] = v;
                }
            }
            if nhwc {
                let at = oy * ow * oc * size;
                store_row(self.dtype, &mut out[at..at + ow * oc * size], row);
            } else {
                for k in 0..oc {
                    let at = (k * plane + oy * ow) * size;
                    store_row(self.dtype, &mut out[at..at + ow * size], &row[k * ow..(k + 1) * ow]);
                }
            }
        }
    }
}

/// Writes `vals` as consecutive elements of `dt` (little-endian; integers rounded to nearest
/// and saturated).
fn store_row(dt: DType, out: &mut [u8], vals: &[f32]) {
    match dt {
        DType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(vals) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(vals) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::F64 => {
            for (o, v) in out.chunks_exact_mut(8).zip(vals) {
                o.copy_from_slice(&f64::from(*v).to_le_bytes());
            }
        }
        DType::U8 => {
            for (o, v) in out.iter_mut().zip(vals) {
                *o = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        DType::I8 => {
            for (o, v) in out.iter_mut().zip(vals) {
                *o = (v.round().clamp(-128.0, 127.0) as i8) as u8;
            }
        }
        // Refused by `Plan::compile`.
        _ => {}
    }
}

/// Sampling taps for `out` output coordinates starting at canvas coordinate `start`, where the
/// image's `src` samples are resized to `content` canvas samples starting at `offset`.
fn axis(taps: &mut Vec<Tap>, src: usize, content: usize, offset: usize, start: usize, out: usize) {
    taps.clear();
    let ratio = src as f64 / content as f64;
    let last = (src - 1) as f64;
    for o in 0..out {
        let x = (start + o) as isize - offset as isize;
        if x < 0 || x as usize >= content {
            taps.push(Tap { inside: false, ..Tap::default() });
            continue;
        }
        let sx = ((x as f64 + 0.5) * ratio - 0.5).clamp(0.0, last);
        let i0 = sx.floor();
        let i1 = (i0 + 1.0).min(last);
        taps.push(Tap { i0: i0 as u32, i1: i1 as u32, w1: (sx - i0) as f32, inside: true });
    }
}

/// Reads sample `i` (in elements) of a little-endian buffer as f32.
trait Sample {
    fn load(b: &[u8], i: usize) -> f32;
}

struct U8;
struct I8;
struct U16;
struct I16;
struct F16;
struct F32;

impl Sample for U8 {
    #[inline(always)]
    fn load(b: &[u8], i: usize) -> f32 {
        f32::from(b[i])
    }
}
impl Sample for I8 {
    #[inline(always)]
    fn load(b: &[u8], i: usize) -> f32 {
        f32::from(b[i] as i8)
    }
}
impl Sample for U16 {
    #[inline(always)]
    fn load(b: &[u8], i: usize) -> f32 {
        f32::from(u16::from_le_bytes([b[2 * i], b[2 * i + 1]]))
    }
}
impl Sample for I16 {
    #[inline(always)]
    fn load(b: &[u8], i: usize) -> f32 {
        f32::from(i16::from_le_bytes([b[2 * i], b[2 * i + 1]]))
    }
}
impl Sample for F16 {
    #[inline(always)]
    fn load(b: &[u8], i: usize) -> f32 {
        f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32()
    }
}
impl Sample for F32 {
    #[inline(always)]
    fn load(b: &[u8], i: usize) -> f32 {
        f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::image::Resize;
    use crate::model::Dim;

    fn spec(dtype: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: "x".into(), dtype, shape: shape.to_vec(), declared: vec![Dim::Unknown] }
    }

    fn view(bytes: &[u8], w: usize, h: usize, c: usize) -> ImageView<'_> {
        ImageView::u8_hwc(bytes, w, h, c)
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// Runs `cfg` on `img` for a model input of `shape` (f32) and returns the tensor.
    fn run(cfg: &Preprocess, shape: &[usize], img: &ImageView<'_>) -> Result<Vec<f32>, Reject> {
        let plan = Plan::compile(cfg, &spec(DType::F32, shape)).expect("plan");
        let mut out = vec![0u8; shape.iter().product::<usize>() * 4];
        plan.run(img, &mut PlanScratch::default(), &mut out)?;
        Ok(f32s(&out))
    }

    fn gray(cfg: Preprocess) -> Preprocess {
        Preprocess { color: ColorOrder::Gray, ..cfg }
    }

    fn bilinear(w: usize, h: usize) -> Option<Resize> {
        Some(Resize { width: w, height: h, mode: ResizeMode::Bilinear })
    }

    #[test]
    fn identity_hwc_to_nchw_with_normalization() {
        // 2x1 RGB: pixels (10,20,30) and (40,50,60).
        let px = [10, 20, 30, 40, 50, 60];
        let cfg = Preprocess {
            scale: 0.5,
            mean: vec![1.0, 2.0, 3.0],
            std: vec![1.0, 2.0, 4.0],
            ..Preprocess::default()
        };
        let out = run(&cfg, &[1, 3, 1, 2], &view(&px, 2, 1, 3)).expect("run");
        // (v * 0.5 - mean) / std, planes R, G, B.
        assert_eq!(out, vec![4.0, 19.0, 4.0, 11.5, 3.0, 6.75]);
        let nhwc = Preprocess { layout: TensorLayout::Nhwc, ..Preprocess::default() };
        let out = run(&nhwc, &[1, 1, 2, 3], &view(&px, 2, 1, 3)).expect("run");
        assert_eq!(out, vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
    }

    #[test]
    fn bilinear_uses_half_pixel_centres_and_clamps_edges() {
        let px = [0, 10, 20, 30];
        let down = gray(Preprocess { resize: bilinear(2, 1), ..Preprocess::default() });
        // sx = (x + 0.5) * 2 - 0.5 = 0.5, 2.5: means of neighbours.
        assert_eq!(run(&down, &[1, 1, 1, 2], &view(&px, 4, 1, 1)).expect("down"), vec![5.0, 25.0]);
        let up = gray(Preprocess { resize: bilinear(4, 1), ..Preprocess::default() });
        // sx = (x + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
        let px2 = [0, 100];
        assert_eq!(
            run(&up, &[1, 1, 1, 4], &view(&px2, 2, 1, 1)).expect("up"),
            vec![0.0, 25.0, 75.0, 100.0]
        );
    }

    #[test]
    fn letterbox_pads_and_centres() {
        // 2x1 gray -> 2x2 canvas: scale 1, content row 0 at offset (2 - 1) / 2 = 0, row 1 padded.
        let px = [8, 16];
        let cfg = gray(Preprocess {
            resize: Some(Resize {
                width: 2,
                height: 4,
                mode: ResizeMode::Letterbox { pad: 114.0 },
            }),
            scale: 0.5,
            ..Preprocess::default()
        });
        // 4 rows, content 2x1 at scale 1 -> offset 1: rows 0, 2, 3 pad (57 after scale).
        let out = run(&cfg, &[1, 1, 4, 2], &view(&px, 2, 1, 1)).expect("run");
        assert_eq!(out, vec![57.0, 57.0, 4.0, 8.0, 57.0, 57.0, 57.0, 57.0]);
    }

    #[test]
    fn center_crop_takes_the_middle_and_small_images_are_refused() {
        let px: Vec<u8> = (0..16).collect();
        let cfg = gray(Preprocess { center_crop: Some((2, 2)), ..Preprocess::default() });
        assert_eq!(
            run(&cfg, &[1, 1, 2, 2], &view(&px, 4, 4, 1)).expect("crop"),
            vec![5.0, 6.0, 9.0, 10.0]
        );
        let r = run(&cfg, &[1, 1, 2, 2], &view(&px[..1], 1, 1, 1)).expect_err("too small");
        assert_eq!(r.reason, RejectReason::WrongShape);
        // Without resize or crop the image must have the model's size.
        let exact = gray(Preprocess::default());
        let r = run(&exact, &[1, 1, 2, 2], &view(&px, 4, 4, 1)).expect_err("4x4 for 2x2");
        assert_eq!(r.reason, RejectReason::WrongShape);
        assert!(r.detail.contains("image is 4x4, the model takes 2x2"), "{}", r.detail);
    }

    #[test]
    fn color_conversions() {
        let px = [10, 20, 30];
        let bgr_model = Preprocess { color: ColorOrder::Bgr, ..Preprocess::default() };
        assert_eq!(
            run(&bgr_model, &[1, 3, 1, 1], &view(&px, 1, 1, 3)).expect("bgr"),
            vec![30.0, 20.0, 10.0]
        );
        let mut bgr_src = view(&px, 1, 1, 3);
        bgr_src.order = ColorOrder::Bgr;
        assert_eq!(
            run(&Preprocess::default(), &[1, 3, 1, 1], &bgr_src).expect("src"),
            vec![30.0, 20.0, 10.0]
        );
        let luma = run(&gray(Preprocess::default()), &[1, 1, 1, 1], &view(&px, 1, 1, 3));
        let want = 0.299 * 10.0 + 0.587 * 20.0 + 0.114 * 30.0;
        assert!((luma.expect("gray")[0] - want).abs() < 1e-4);
        let g = [7];
        assert_eq!(
            run(&Preprocess::default(), &[1, 3, 1, 1], &view(&g, 1, 1, 1)).expect("rep"),
            vec![7.0, 7.0, 7.0]
        );
    }

    #[test]
    fn planar_wide_sources_and_integer_outputs() {
        // CHW i16 source, 2x1, 3 channels.
        let vals: [i16; 6] = [-1, 2, 300, 400, -500, 600];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let img = ImageView {
            bytes: &bytes,
            dtype: SampleType::I16,
            width: 2,
            height: 1,
            channels: 3,
            layout: PixelLayout::Chw,
            order: ColorOrder::Rgb,
        };
        let out = run(&Preprocess::default(), &[1, 3, 1, 2], &img).expect("run");
        assert_eq!(out, vec![-1.0, 2.0, 300.0, 400.0, -500.0, 600.0]);
        let plan =
            Plan::compile(&Preprocess::default(), &spec(DType::U8, &[1, 3, 1, 2])).expect("u8");
        let mut o = vec![0u8; 6];
        plan.run(&img, &mut PlanScratch::default(), &mut o).expect("run");
        assert_eq!(o, vec![0, 2, 255, 255, 0, 255], "rounded and saturated");
    }

    #[test]
    fn compile_says_what_disagrees() {
        let cfg = Preprocess {
            resize: bilinear(256, 256),
            center_crop: Some((224, 224)),
            ..Preprocess::default()
        };
        assert!(Plan::compile(&cfg, &spec(DType::F32, &[1, 3, 224, 224])).is_ok());
        let e = Plan::compile(&cfg, &spec(DType::F32, &[1, 224, 224, 3])).expect_err("nhwc");
        assert!(e.contains("hint: the input looks NHWC, set layout = \"nhwc\""), "{e}");
        let e = Plan::compile(&cfg, &spec(DType::F32, &[1, 3, 200, 200])).expect_err("size");
        assert!(
            e.contains("center_crop produces 224x224 (width x height), the input takes 200x200"),
            "{e}"
        );
        let e =
            Plan::compile(&gray(cfg.clone()), &spec(DType::F32, &[1, 3, 224, 224])).expect_err("c");
        assert!(e.contains("color = \"gray\" writes 1, the input has 3"), "{e}");
        let e = Plan::compile(&cfg, &spec(DType::I64, &[1, 3, 224, 224])).expect_err("dtype");
        assert!(e.contains("dtype: pre-processing writes f32"), "{e}");
        let e = Plan::compile(&cfg, &spec(DType::F32, &[1, 64])).expect_err("rank");
        assert!(e.contains("needs a rank-4 input"), "{e}");
        assert!(e.contains("model input `x` is f32 [1, 64]"), "{e}");
    }

    #[test]
    fn tables_are_rebuilt_only_when_the_source_size_changes() {
        let cfg = gray(Preprocess { resize: bilinear(2, 2), ..Preprocess::default() });
        let plan = Plan::compile(&cfg, &spec(DType::F32, &[1, 1, 2, 2])).expect("plan");
        let mut s = PlanScratch::default();
        let mut out = vec![0u8; 16];
        let a = [1u8; 16];
        plan.run(&view(&a, 4, 4, 1), &mut s, &mut out).expect("4x4");
        let cap = (s.xs.capacity(), s.ys.capacity());
        plan.run(&view(&a, 4, 4, 1), &mut s, &mut out).expect("4x4 again");
        assert_eq!(s.source, Some((plan.id, 4, 4)));
        plan.run(&view(&a[..9], 3, 3, 1), &mut s, &mut out).expect("3x3");
        assert_eq!(s.source, Some((plan.id, 3, 3)));
        assert_eq!((s.xs.capacity(), s.ys.capacity()), cap, "tables reuse their buffers");
        assert_eq!(f32s(&out), vec![1.0; 4]);
    }
}
