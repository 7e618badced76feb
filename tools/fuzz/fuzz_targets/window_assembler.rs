//! The window assembler driven by arbitrary chunk sequences (device, seq, clock steps, sizes)
//! under each gap policy and a small reorder buffer: never a panic, state bounded (devices,
//! held chunks), every window exactly the input's size.
#![no_main]
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgeinfer::config::window::{GapPolicy, WindowConfig, WindowLayout, WireSample};
use edgeinfer::model::{DType, Dim, TensorSpec};
use edgeinfer::pipeline::window::{Assembler, Chunk, WindowPlan, WindowStats};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut rest)) = data.split_first() else { return };
    let channels = 1 + usize::from(sel & 1);
    let samples = 3 + usize::from((sel >> 1) & 7);
    let cfg = WindowConfig {
        samples,
        hop: 1 + usize::from(sel >> 4) % samples,
        channels,
        sample_rate: Some(1000),
        dtype: WireSample::I16,
        layout: if sel & 0x08 != 0 { WindowLayout::ChannelsLast } else { WindowLayout::ChannelsFirst },
        scale: 1.0 / 32768.0,
        gap: if sel & 0x40 != 0 { GapPolicy::ZeroFill } else { GapPolicy::Reset },
        max_gap: samples,
        reorder: usize::from(sel >> 6),
        max_devices: 3,
        idle_timeout: Duration::from_millis(500),
    };
    let shape = match cfg.layout {
        WindowLayout::ChannelsFirst => vec![1, channels, samples],
        WindowLayout::ChannelsLast => vec![1, samples, channels],
    };
    let spec = TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        declared: shape.iter().map(|&d| Dim::Fixed(d)).collect(),
        shape,
    };
    let Ok(plan) = WindowPlan::new(&cfg, &spec) else { return };
    let want = spec.byte_len();
    let mut asm = Assembler::new(plan);
    let stats = WindowStats::default();
    let mut now = Instant::now();
    // Each chunk: [device, seq, clock step, frames] then frames * channels * 2 sample bytes.
    while let [dev, seq, step, frames, tail @ ..] = rest {
        let n = usize::from(*frames % 16) * channels * 2;
        let Some(samples) = tail.get(..n) else { break };
        now += Duration::from_millis(u64::from(*step) * 10);
        let chunk = Chunk {
            seq: (*seq != 0xff).then_some(u64::from(*seq)),
            ts: Some(f64::from(*seq)),
            samples: Bytes::copy_from_slice(samples),
        };
        let name = format!("d{}", dev % 5);
        asm.push(&name, chunk, now, &stats, &mut |w| assert_eq!(w.input.len(), want));
        assert!(asm.device_count() <= 3);
        rest = &tail[n..];
    }
    let held = stats.counters().iter().find(|(k, _)| *k == "held").map_or(0, |(_, v)| *v);
    assert!(held <= 3 * cfg.reorder as u64);
});
