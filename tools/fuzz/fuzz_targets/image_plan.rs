//! Raw image frames of any declared geometry, sample type and layout through pre-processing
//! plans of any resize/crop/color/layout/dtype: written or rejected, never a panic or an
//! out-of-bounds access.
#![no_main]
use edgeinfer::config::PayloadFormat;
use edgeinfer::config::image::{
    ColorOrder, ImageConfig, PixelLayout, Preprocess, RawImage, Resize, ResizeMode, SampleType,
    TensorLayout,
};
use edgeinfer::model::{DType, Dim, TensorSpec};
use edgeinfer::pipeline::image::{ImageInput, ImageScratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, payload)) = data.split_first_chunk::<8>() else { return };
    let dim = |b: u8| usize::from(b % 16) + 1;
    let dtypes = [
        SampleType::U8,
        SampleType::I8,
        SampleType::U16,
        SampleType::I16,
        SampleType::F16,
        SampleType::F32,
    ];
    let raw = RawImage {
        width: dim(head[0]),
        height: dim(head[1]),
        channels: if head[2] & 1 == 0 { 1 } else { 3 },
        dtype: dtypes[usize::from(head[2] >> 1) % dtypes.len()],
        layout: if head[2] & 0x80 == 0 { PixelLayout::Hwc } else { PixelLayout::Chw },
        order: if head[3] & 1 == 0 { ColorOrder::Rgb } else { ColorOrder::Bgr },
    };
    let color = [ColorOrder::Rgb, ColorOrder::Bgr, ColorOrder::Gray][usize::from(head[3] >> 1) % 3];
    let (ow, oh) = (dim(head[4]), dim(head[5]));
    let resize = match head[6] % 3 {
        0 => None,
        1 => Some(Resize { width: ow, height: oh, mode: ResizeMode::Bilinear }),
        _ => Some(Resize { width: ow, height: oh, mode: ResizeMode::Letterbox { pad: 7.0 } }),
    };
    let layout = if head[7] & 1 == 0 { TensorLayout::Nchw } else { TensorLayout::Nhwc };
    let dtype =
        [DType::F32, DType::F16, DType::F64, DType::U8, DType::I8][usize::from(head[7] >> 1) % 5];
    let c = color.channels();
    let shape = match layout {
        TensorLayout::Nchw => vec![1, c, oh, ow],
        TensorLayout::Nhwc => vec![1, oh, ow, c],
    };
    let spec = TensorSpec {
        name: "x".into(),
        dtype,
        declared: shape.iter().map(|&d| Dim::Fixed(d)).collect(),
        shape,
    };
    let cfg = ImageConfig {
        raw: Some(raw),
        preprocess: Preprocess { resize, color, layout, scale: 0.5, ..Preprocess::default() },
    };
    let Ok(input) = ImageInput::new(PayloadFormat::Raw, &cfg, &spec) else { return };
    let mut out = vec![0u8; c * ow * oh * dtype.size()];
    let _ = input.write(payload, &mut ImageScratch::default(), &mut out);
});
