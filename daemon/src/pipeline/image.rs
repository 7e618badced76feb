//! Image frames: JPEG and PNG decoding (pure Rust: `zune-jpeg`, `png`) and raw image frames,
//! each turned into an [`ImageView`] and written into the model input by the pipeline's
//! [`Plan`].
//!
//! Where the work happens: the ingest task ([`ImageInput::check`]) only looks at the first
//! bytes (format signature, or a raw frame's exact size), so it stays cheap on the single tokio
//! I/O thread that also drives the MQTT event loop. Decoding a 640x480 JPEG costs milliseconds of
//! CPU; done at ingest it would stall every pipeline's intake and the broker keep-alive behind
//! one camera, and it would run on the I/O CPU set instead of the inference CPUs. So the queue
//! holds the encoded frame (smaller than the tensor, too) and the worker decodes it
//! ([`ImageInput::write`]) into its own reusable buffer, right before inference.
//!
//! Decompression bombs: the header is read first and `width * height * channels` is compared
//! with `preprocess.max_decoded` before any pixel buffer grows; the worker's buffer keeps its
//! high-water size (bounded by that budget) so steady-state frames allocate no pixel memory.
//! The decoders' own small state (Huffman tables, PNG line buffers) is theirs.

use std::io::Cursor;

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

use super::preprocess::{ImageView, Plan, PlanScratch, SourceMap};
use crate::config::PayloadFormat;
use crate::config::image::{ImageConfig, PixelLayout, RawImage, SampleType};
use crate::model::TensorSpec;
use crate::reject::{Reject, RejectReason};

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// One pipeline's image input: the wire format and the compiled plan.
#[derive(Debug, Clone)]
pub struct ImageInput {
    format: PayloadFormat,
    raw: Option<RawImage>,
    plan: Plan,
}

/// A worker's reusable buffers: decoded pixels and the plan's sampling tables.
#[derive(Debug, Default)]
pub struct ImageScratch {
    pixels: Vec<u8>,
    plan: PlanScratch,
}

impl ImageInput {
    /// Compiles the plan against the model input; the error says what disagrees.
    pub fn new(
        format: PayloadFormat,
        cfg: &ImageConfig,
        spec: &TensorSpec,
    ) -> Result<ImageInput, String> {
        let plan = Plan::compile(&cfg.preprocess, spec)
            .map_err(|e| format!("{} frames: {e}", format.as_str()))?;
        if format == PayloadFormat::Raw && cfg.raw.is_none() {
            return Err("raw image frames need a [raw] table (width, height, channels)".into());
        }
        Ok(ImageInput { format, raw: cfg.raw, plan })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Byte size of a raw image frame (`None` for encoded formats).
    pub fn raw_len(&self) -> Option<usize> {
        self.raw.map(|r| r.width * r.height * r.channels * r.dtype.size())
    }

    /// The sample type of raw frames, for the non-finite check.
    pub fn raw_dtype(&self) -> Option<SampleType> {
        self.raw.map(|r| r.dtype)
    }

    /// Cheap checks on the ingest task: signature or exact size. Decoding is the worker's.
    pub fn check(&self, payload: &[u8]) -> Result<(), Reject> {
        match self.format {
            PayloadFormat::Jpeg if !payload.starts_with(&[0xff, 0xd8]) => Err(Reject::new(
                RejectReason::CorruptImage,
                "not a JPEG: no start-of-image marker (FF D8)",
            )),
            PayloadFormat::Png if !payload.starts_with(&PNG_SIGNATURE) => {
                Err(Reject::new(RejectReason::CorruptImage, "not a PNG: no PNG signature"))
            }
            _ => match (self.raw, self.raw_len()) {
                (Some(r), Some(len)) if payload.len() != len => Err(Reject::new(
                    RejectReason::WrongSize,
                    format!(
                        "expected {len} bytes ({}x{}x{} {} {}), got {}",
                        r.width,
                        r.height,
                        r.channels,
                        r.dtype.name(),
                        if r.layout == PixelLayout::Hwc { "hwc" } else { "chw" },
                        payload.len()
                    ),
                )),
                _ => Ok(()),
            },
        }
    }

    /// Decodes `payload` and writes the pre-processed tensor row into `out`; returns where the
    /// input's pixels came from in the image.
    pub fn write(
        &self,
        payload: &[u8],
        scratch: &mut ImageScratch,
        out: &mut [u8],
    ) -> Result<SourceMap, Reject> {
        self.check(payload)?;
        let budget = self.plan.max_decoded();
        let view = match (self.format, self.raw) {
            (PayloadFormat::Jpeg, _) => decode_jpeg(payload, budget, &mut scratch.pixels)?,
            (PayloadFormat::Png, _) => decode_png(payload, budget, &mut scratch.pixels)?,
            (_, Some(r)) => ImageView {
                bytes: payload,
                dtype: r.dtype,
                width: r.width,
                height: r.height,
                channels: r.channels,
                layout: r.layout,
                order: r.order,
            },
            (_, None) => {
                return Err(Reject::new(RejectReason::Malformed, "no image description"));
            }
        };
        self.plan.run(&view, &mut scratch.plan, out)
    }
}

fn too_large(w: usize, h: usize, c: usize, budget: u64) -> Reject {
    Reject::new(
        RejectReason::ImageTooLarge,
        format!(
            "image header says {w}x{h}x{c} = {} samples, over preprocess.max_decoded ({budget})",
            w as u64 * h as u64 * c as u64
        ),
    )
}

/// Grows `buf` to `n` bytes (keeping its high-water capacity) and returns that prefix.
fn sized(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// Decodes a baseline or progressive JPEG into `buf` as 8-bit gray or RGB (HWC).
pub fn decode_jpeg<'b>(
    payload: &[u8],
    budget: u64,
    buf: &'b mut Vec<u8>,
) -> Result<ImageView<'b>, Reject> {
    let corrupt = |e: &dyn std::fmt::Display| {
        Reject::new(RejectReason::CorruptImage, format!("corrupt or truncated JPEG: {e}"))
    };
    // Strict: a truncated or damaged scan is an error, not a silently grey bottom half.
    let opts = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(usize::from(u16::MAX))
        .set_max_height(usize::from(u16::MAX));
    let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(payload), opts);
    d.decode_headers().map_err(|e| corrupt(&e))?;
    let Some(info) = d.info() else { return Err(corrupt(&"no frame header")) };
    let (w, h) = (usize::from(info.width), usize::from(info.height));
    let (out, c) = match d.input_colorspace() {
        Some(ColorSpace::Luma) => (ColorSpace::Luma, 1),
        Some(ColorSpace::YCbCr | ColorSpace::RGB) => (ColorSpace::RGB, 3),
        other => {
            return Err(Reject::new(
                RejectReason::WrongChannels,
                format!(
                    "JPEG with {} components ({other:?}) is not supported; send grayscale or color (YCbCr)",
                    info.components
                ),
            ));
        }
    };
    if (w * h * c) as u64 > budget {
        return Err(too_large(w, h, c, budget));
    }
    d.set_options(opts.jpeg_set_out_colorspace(out));
    let n = d.output_buffer_size().ok_or_else(|| corrupt(&"image size overflows"))?;
    if n != w * h * c {
        return Err(corrupt(&format!("unexpected output size {n}")));
    }
    let px = sized(buf, n);
    d.decode_into(px).map_err(|e| corrupt(&e))?;
    Ok(ImageView::u8_hwc(&buf[..n], w, h, c))
}

/// Width, height, color type and bit depth from a PNG's IHDR (the first chunk, fixed offsets).
fn png_header(payload: &[u8]) -> Option<(usize, usize, u8, u8)> {
    let ihdr = payload.get(8..29)?;
    if &ihdr[4..8] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    Some((be(&ihdr[8..12]), be(&ihdr[12..16]), ihdr[17], ihdr[16]))
}

/// Decodes a PNG into `buf` as 8-bit gray or RGB (palette expanded, 16-bit reduced to 8).
pub fn decode_png<'b>(
    payload: &[u8],
    budget: u64,
    buf: &'b mut Vec<u8>,
) -> Result<ImageView<'b>, Reject> {
    let corrupt = |e: &dyn std::fmt::Display| {
        Reject::new(RejectReason::CorruptImage, format!("corrupt or truncated PNG: {e}"))
    };
    let Some((w, h, color, _depth)) = png_header(payload) else {
        return Err(corrupt(&"no IHDR chunk after the signature"));
    };
    let c = match color {
        0 => 1,
        2 | 3 => 3,
        4 | 6 => {
            return Err(Reject::new(
                RejectReason::WrongChannels,
                format!(
                    "PNG with an alpha channel ({} channels) is not supported; send gray or RGB",
                    if color == 4 { 2 } else { 4 }
                ),
            ));
        }
        other => return Err(corrupt(&format!("invalid color type {other}"))),
    };
    // Before the decoder exists: nothing has been allocated for this image yet.
    if w as u64 * h as u64 * c as u64 > budget {
        return Err(too_large(w, h, c, budget));
    }
    let mut d = png::Decoder::new(Cursor::new(payload));
    d.set_transformations(png::Transformations::normalize_to_color8());
    d.set_ignore_text_chunk(true);
    d.set_ignore_iccp_chunk(true);
    let mut r = d.read_info().map_err(|e| corrupt(&e))?;
    let c = match r.output_color_type().0 {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        other => {
            // A palette with transparency expands to RGBA.
            return Err(Reject::new(
                RejectReason::WrongChannels,
                format!(
                    "PNG decodes to {other:?} (transparency) which is not supported; send gray or RGB"
                ),
            ));
        }
    };
    let n = r.output_buffer_size().ok_or_else(|| corrupt(&"image size overflows"))?;
    if n != w * h * c {
        return Err(corrupt(&format!("unexpected output size {n} for {w}x{h}x{c}")));
    }
    let px = sized(buf, n);
    r.next_frame(px).map_err(|e| corrupt(&e))?;
    Ok(ImageView::u8_hwc(&buf[..n], w, h, c))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::image::{ColorOrder, Preprocess, Resize, ResizeMode, TensorLayout};
    use crate::model::{DType, Dim};

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images")
    }

    fn read(name: &str) -> Vec<u8> {
        std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// The plans of tests/fixtures/images/generate.py.
    fn plan(name: &str) -> Preprocess {
        let imagenet = Preprocess {
            scale: 1.0 / 255.0,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            layout: TensorLayout::Nchw,
            ..Preprocess::default()
        };
        let r = |w, h, mode| Some(Resize { width: w, height: h, mode });
        match name {
            "classify" => Preprocess {
                resize: r(256, 256, ResizeMode::Bilinear),
                center_crop: Some((224, 224)),
                ..imagenet
            },
            "letterbox" => {
                Preprocess { resize: r(224, 224, ResizeMode::Letterbox { pad: 114.0 }), ..imagenet }
            }
            "bgr" => Preprocess {
                resize: r(224, 224, ResizeMode::Bilinear),
                color: ColorOrder::Bgr,
                ..imagenet
            },
            other => panic!("no plan {other}"),
        }
    }

    fn input(format: PayloadFormat, plan_name: &str) -> ImageInput {
        let spec = TensorSpec {
            name: "image".into(),
            dtype: DType::F32,
            shape: vec![1, 3, 224, 224],
            declared: vec![Dim::Unknown],
        };
        ImageInput::new(format, &ImageConfig { raw: None, preprocess: plan(plan_name) }, &spec)
            .expect("plan compiles")
    }

    fn format_of(name: &str) -> PayloadFormat {
        if name.ends_with(".png") { PayloadFormat::Png } else { PayloadFormat::Jpeg }
    }

    /// max |a - b|, mean |a - b|.
    fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
        assert_eq!(a.len(), b.len());
        let d: Vec<f32> = a.iter().zip(b).map(|(x, y)| (x - y).abs()).collect();
        (d.iter().copied().fold(0.0, f32::max), d.iter().sum::<f32>() / d.len() as f32)
    }

    /// Golden: every good fixture image through the same plans as the Python reference.
    /// PNG decoding is lossless, so the only differences are f32 vs f64 arithmetic: max 1e-5
    /// in normalized units (one grey level is 1 / (255 * std) ~ 0.017; measured 1e-6). JPEG
    /// decoders may differ (IDCT precision, chroma upsampling): zune-jpeg vs Pillow's
    /// libjpeg-turbo measured max 0.044 / mean 0.0007 (4:2:0), 0.025 / 0.00007 (4:4:4); the
    /// bounds are max 0.1 (~6 grey levels) and mean 0.002.
    #[test]
    fn golden_tensors_match_the_numpy_reference() {
        let cases = [
            ("scene.png", "classify"),
            ("scene.png", "letterbox"),
            ("gray.png", "classify"),
            ("scene.jpg", "classify"),
            ("scene.jpg", "bgr"),
            ("scene444.jpg", "classify"),
            ("gray.jpg", "classify"),
        ];
        let mut scratch = ImageScratch::default();
        for (name, plan_name) in cases {
            let stem = name.replace('.', "_");
            let inp = input(format_of(name), plan_name);
            let mut out = vec![0u8; 3 * 224 * 224 * 4];
            inp.write(&read(name), &mut scratch, &mut out).expect(name);
            let want = f32s(&read(&format!("{stem}.{plan_name}.input.bin")));
            let (max, mean) = diff(&f32s(&out), &want);
            // Shown with --nocapture: the numbers behind the documented tolerances.
            eprintln!("{name} {plan_name}: tensor max |diff| {max:.6}, mean {mean:.6}");
            let (max_tol, mean_tol) =
                if name.ends_with(".png") { (1e-5, 1e-6) } else { (0.1, 0.002) };
            assert!(
                max <= max_tol && mean <= mean_tol,
                "{name} {plan_name}: max {max} (<= {max_tol}), mean {mean} (<= {mean_tol})"
            );
        }
    }

    /// The decoded pixels themselves: PNG exact; JPEG within a few grey levels of libjpeg-turbo
    /// (measured max 4 / mean 0.036 for 4:2:0, 2 / 0.004 for 4:4:4, 1 / 0.002 for gray).
    #[test]
    fn decoded_pixels_match_pillow() {
        for (name, max_tol, mean_tol) in [
            ("scene.png", 0, 0.0),
            ("gray.png", 0, 0.0),
            ("scene.jpg", 6, 0.1),
            ("scene444.jpg", 3, 0.05),
            ("gray.jpg", 2, 0.05),
        ] {
            let mut buf = Vec::new();
            let data = read(name);
            let v = if name.ends_with(".png") {
                decode_png(&data, 1 << 24, &mut buf)
            } else {
                decode_jpeg(&data, 1 << 24, &mut buf)
            }
            .expect(name);
            let want = read(&format!("{}.pixels.u8", name.replace('.', "_")));
            assert_eq!(v.bytes.len(), want.len(), "{name}");
            let d: Vec<u8> = v.bytes.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).collect();
            let max = d.iter().copied().max().unwrap_or(0);
            let mean = d.iter().map(|x| f64::from(*x)).sum::<f64>() / d.len() as f64;
            eprintln!("{name}: pixel max |diff| {max}, mean {mean:.4}");
            assert!(max <= max_tol && mean <= mean_tol, "{name}: max {max}, mean {mean:.3}");
        }
    }

    #[test]
    fn broken_images_are_rejected_with_their_reason_before_allocating() {
        for (name, reason) in [
            ("truncated.png", RejectReason::CorruptImage),
            ("truncated.jpg", RejectReason::CorruptImage),
            ("corrupt.jpg", RejectReason::CorruptImage),
            ("rgba.png", RejectReason::WrongChannels),
            ("bomb.png", RejectReason::ImageTooLarge),
            ("bomb.jpg", RejectReason::ImageTooLarge),
        ] {
            let inp = input(format_of(name), "classify");
            let mut scratch = ImageScratch::default();
            let mut out = vec![0u8; 3 * 224 * 224 * 4];
            let r = inp.write(&read(name), &mut scratch, &mut out).expect_err(name);
            assert_eq!(r.reason, reason, "{name}: {}", r.detail);
            if reason != RejectReason::CorruptImage {
                assert_eq!(scratch.pixels.capacity(), 0, "{name}: refused before allocating");
            }
        }
        let inp = input(PayloadFormat::Jpeg, "classify");
        let r = inp.check(&read("scene.png")).expect_err("png as jpeg");
        assert_eq!(r.reason, RejectReason::CorruptImage);
        assert!(r.detail.contains("not a JPEG"), "{}", r.detail);
    }

    #[test]
    fn raw_image_frames_are_size_checked_and_match_the_png_path() {
        let raw = RawImage {
            width: 300,
            height: 200,
            channels: 3,
            dtype: SampleType::U8,
            layout: PixelLayout::Hwc,
            order: ColorOrder::Rgb,
        };
        let spec = TensorSpec {
            name: "image".into(),
            dtype: DType::F32,
            shape: vec![1, 3, 224, 224],
            declared: vec![Dim::Unknown],
        };
        let cfg = ImageConfig { raw: Some(raw), preprocess: plan("classify") };
        let inp = ImageInput::new(PayloadFormat::Raw, &cfg, &spec).expect("raw");
        let pixels = read("scene_png.pixels.u8");
        let mut out = vec![0u8; 3 * 224 * 224 * 4];
        let mut scratch = ImageScratch::default();
        inp.write(&pixels, &mut scratch, &mut out).expect("raw frame");
        let (max, _) = diff(&f32s(&out), &f32s(&read("scene_png.classify.input.bin")));
        assert!(max <= 1e-4, "{max}");
        let r = inp.check(&pixels[1..]).expect_err("short");
        assert_eq!(r.reason, RejectReason::WrongSize);
        assert!(
            r.detail.contains("expected 180000 bytes (300x200x3 u8 hwc), got 179999"),
            "{}",
            r.detail
        );
    }
}
