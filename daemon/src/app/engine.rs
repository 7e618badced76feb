//! Start-up step "load models", the engine part: turns a pipeline's `threads`, `precision` and
//! `backend` keys into load options, and decides what `auto` means on this machine.
//!
//! - `backend = "cuda"` / `"auto"`: the tract-cuda plan is built and its outputs compared with
//!   the CPU f32 plan's on the sample input; it runs only when they agree within
//!   [`F16_TOLERANCE`] (the same bound as f16: cuDNN may compute f32 convolutions in TF32).
//!   On any failure `cuda` refuses to start (exit 78, the config asks for what this machine
//!   cannot give) and `auto` runs on the CPU, with one log line and the reason in health.
//! - `precision = "auto"` on the CPU: f16 only when the CPU reports FP16 arithmetic and the f16
//!   plan agrees with the f32 plan within [`F16_TOLERANCE`]; f32 otherwise, logged once with
//!   the reason. `"f16"` forces it (no self-check; a warning on a CPU without FP16).
//!
//! Each decision is logged once per load and kept on the model ([`EngineReport`]) for health.

use crate::config::PipelineConfig;
use crate::config::engine::{Backend, F16_TOLERANCE, Precision};
use crate::model::{Choice, LoadOptions, Model, ModelError};

use super::AppError;

/// Whether this CPU has FP16 arithmetic that tract's f16 kernels use (ARMv8.2 FEAT_FP16: Pi 5's
/// Cortex-A76, Orin's A78AE; not Pi 4's A72, not x86).
/// tract's own detection (hwcaps, CPU part numbers), so f16 is picked exactly when tract runs
/// its native f16 kernels.
pub fn cpu_has_fp16() -> bool {
    tract_onnx::tract_core::tract_linalg::has_fp16()
}

/// Loads a pipeline's model as its engine keys ask (see the module docs). `base` carries the
/// name, version, input shapes and cache directory.
pub fn load(pc: &PipelineConfig, base: LoadOptions) -> Result<Model, AppError> {
    let model_err = |source: ModelError| AppError::Model { pipeline: pc.name.clone(), source };
    let engine = pc.engine;
    let opts = LoadOptions { threads: engine.threads, half: false, cuda: false, ..base };

    let mut backend_reason = None;
    if engine.backend != Backend::Cpu {
        match load_cuda(&pc.model, &opts) {
            Ok(mut gpu) => {
                let (on_gpu, on_cpu) = gpu.placement.unwrap_or_default();
                log::info!(
                    pipeline = pc.name.as_str();
                    "backend cuda: {on_gpu} plan nodes on the GPU, {on_cpu} on the CPU; outputs agree with the CPU plan"
                );
                gpu.engine.backend.wanted = engine.backend.name();
                gpu.engine.precision.wanted = engine.precision.name();
                log_quantization(pc, &gpu);
                return Ok(gpu);
            }
            Err(reason) if engine.backend == Backend::Cuda => {
                return Err(AppError::Backend { pipeline: pc.name.clone(), reason });
            }
            Err(reason) => {
                log::warn!(
                    pipeline = pc.name.as_str();
                    "backend = \"auto\": running on the CPU: {reason}"
                );
                backend_reason = Some(reason);
            }
        }
    }

    let (mut model, precision_reason) = match engine.precision {
        Precision::F32 => (Model::load(&pc.model, &opts).map_err(model_err)?, None),
        Precision::F16 => {
            // Forced: no self-check (that is `auto`), so no second plan at start-up.
            if !cpu_has_fp16() {
                log::warn!(
                    pipeline = pc.name.as_str();
                    "precision = \"f16\" on a CPU without FP16 arithmetic (as tract detects it): f16 runs emulated and many times slower than f32"
                );
            }
            let half = Model::load(&pc.model, &LoadOptions { half: true, ..opts.clone() })
                .map_err(model_err)?;
            (half, None)
        }
        Precision::Auto => auto_precision(pc, &opts)?,
    };
    model.engine.backend =
        Choice { wanted: engine.backend.name(), running: "cpu", reason: backend_reason };
    model.engine.precision.wanted = engine.precision.name();
    model.engine.precision.reason = precision_reason;
    log_quantization(pc, &model);
    Ok(model)
}

/// Says once how a quantized model computes: a warning when it loads but computes in float
/// (QDQ), so nobody ships an "int8" model that is slower than the float one without knowing.
fn log_quantization(pc: &PipelineConfig, model: &Model) {
    let a = model.arithmetic();
    if let Some(note) = crate::model::quantization_note(&model.op_histogram, a) {
        if a.integer == 0 {
            log::warn!(pipeline = pc.name.as_str(); "{note}");
        } else {
            log::info!(pipeline = pc.name.as_str(); "{note}");
        }
    }
}

/// `precision = "auto"` on the CPU: the model, and why it is not f16 when it is not.
fn auto_precision(
    pc: &PipelineConfig,
    opts: &LoadOptions,
) -> Result<(Model, Option<String>), AppError> {
    let model_err = |source: ModelError| AppError::Model { pipeline: pc.name.clone(), source };
    let f32_plan = Model::load(&pc.model, opts).map_err(model_err)?;
    if !cpu_has_fp16() {
        let reason = format!(
            "this CPU has no FP16 arithmetic ({}), where f16 runs emulated and many times slower",
            std::env::consts::ARCH
        );
        log::info!(pipeline = pc.name.as_str(); "precision = \"auto\": f32, because {reason}");
        return Ok((f32_plan, Some(reason)));
    }
    let half = match Model::load(&pc.model, &LoadOptions { half: true, ..opts.clone() }) {
        Ok(m) => m,
        Err(e) => {
            let reason = format!("the f16 plan cannot be built: {e}");
            log::warn!(pipeline = pc.name.as_str(); "precision = \"auto\": f32, because {reason}");
            return Ok((f32_plan, Some(reason)));
        }
    };
    match half.deviation_from(&f32_plan) {
        Ok(d) if d <= F16_TOLERANCE => {
            log::info!(
                pipeline = pc.name.as_str();
                "precision = \"auto\": f16 (the CPU has FP16; outputs within {d:.2e} of the f32 plan, tolerance {F16_TOLERANCE:e})"
            );
            Ok((half, None))
        }
        Ok(d) => {
            let reason = format!(
                "the f16 plan's outputs deviate from the f32 plan's by {d:.2e} on the sample input, above the tolerance {F16_TOLERANCE:e}"
            );
            log::warn!(pipeline = pc.name.as_str(); "precision = \"auto\": f32, because {reason}");
            Ok((f32_plan, Some(reason)))
        }
        Err(e) => {
            let reason = format!("the f16 self-check failed: {e}");
            log::warn!(pipeline = pc.name.as_str(); "precision = \"auto\": f32, because {reason}");
            Ok((f32_plan, Some(reason)))
        }
    }
}

/// The CUDA plan, checked against the CPU f32 plan on the sample input; the reason as text
/// when it cannot run here.
fn load_cuda(path: &std::path::Path, opts: &LoadOptions) -> Result<Model, String> {
    if !crate::config::engine::CUDA_BUILT {
        // Say so before parsing the model twice for nothing.
        return Err("this edgeinfer was built without the `cuda` feature".into());
    }
    let gpu = Model::load(path, &LoadOptions { cuda: true, ..opts.clone() })
        .map_err(|e| error_chain(&e))?;
    let cpu = Model::load(path, opts).map_err(|e| error_chain(&e))?;
    match gpu.deviation_from(&cpu) {
        Ok(d) if d <= F16_TOLERANCE => Ok(gpu),
        Ok(d) => Err(format!(
            "the GPU plan's outputs deviate from the CPU plan's by {d:.2e} on the sample input, above the tolerance {F16_TOLERANCE:e}"
        )),
        Err(e) => Err(format!("the GPU plan failed its check run: {e}")),
    }
}

/// An error and its sources on one line (for health and the log line).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
