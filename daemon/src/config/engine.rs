//! How a pipeline's model runs (issue 15): intra-op `threads`, arithmetic `precision` and the
//! `backend` (CPU or a CUDA GPU). Reading the keys and checking them against each other and
//! against the pipeline's CPUs here; what they do is `model` (plans) and `app` (fallback).

use super::reader::{Problems, Section};

/// Arithmetic the plan runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// f32 weights and activations converted to f16 (ARMv8.2 FP16 arithmetic).
    F16,
    /// f16 when the CPU reports FP16 and the f16 plan agrees with the f32 plan on a sample
    /// input within [`F16_TOLERANCE`]; f32 otherwise (logged once with the reason).
    Auto,
}

/// Where the plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    /// tract-cuda (build with the `cuda` feature); the daemon refuses to start without a GPU.
    Cuda,
    /// The GPU when one is usable and agrees with the CPU plan, else the CPU (logged once, and
    /// reported in health).
    Auto,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Auto => "auto",
        }
    }
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Auto => "auto",
        }
    }
}

/// `precision = "auto"` accepts the f16 plan when every output of the self-check stays within
/// this bound: `max |f16 - f32| <= F16_TOLERANCE * max(1, max |f32|)`, per output. f16 has an
/// 11-bit significand (relative step 2^-11 ~ 4.9e-4) and a convnet accumulates many roundings:
/// measured against onnxruntime's f32 references on the static aarch64 binary under
/// `qemu-aarch64-static -cpu max`, the fixtures stay within 2e-2 except MobileNetV3-small's
/// logits at 3.3e-2 (0.19 on logits of magnitude 5.7), which keeps its top classes.
pub const F16_TOLERANCE: f64 = 5e-2;

/// The engine keys of one pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Threads for one inference (tract's multithreaded executor); 1: single-threaded.
    pub threads: usize,
    pub precision: Precision,
    pub backend: Backend,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { threads: 1, precision: Precision::Auto, backend: Backend::Cpu }
    }
}

/// Whether this build has tract's multithreaded executor (feature `multithread`).
pub const MULTITHREAD_BUILT: bool = cfg!(feature = "multithread");
/// Whether this build has the CUDA backend (feature `cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "tract-cuda");

/// Most threads one inference may use.
pub const MAX_THREADS: usize = 64;

/// Reads `threads`, `precision` and `backend` of a pipeline section.
pub fn parse(s: &mut Section<'_>, p: &mut Problems) -> EngineConfig {
    let d = EngineConfig::default();
    let threads = s.int(p, "threads", 1, MAX_THREADS as i64).map_or(d.threads, |n| n as usize);
    if threads > 1 && !MULTITHREAD_BUILT {
        p.push(
            s.key("threads"),
            None,
            "more than one thread per inference needs a build with the `multithread` feature; \
             hint: set threads = 1, or rebuild with --features multithread",
        );
    }
    let precision = s
        .choice(
            p,
            "precision",
            &[("f32", Precision::F32), ("f16", Precision::F16), ("auto", Precision::Auto)],
        )
        .unwrap_or(d.precision);
    let backend = s
        .choice(
            p,
            "backend",
            &[("cpu", Backend::Cpu), ("cuda", Backend::Cuda), ("auto", Backend::Auto)],
        )
        .unwrap_or(d.backend);
    if backend == Backend::Cuda && !CUDA_BUILT {
        p.push(
            s.key("backend"),
            None,
            "this edgeinfer was built without the `cuda` feature; hint: use backend = \"cpu\" \
             (or \"auto\", which runs on the CPU in this build), or install the CUDA build",
        );
    }
    if backend != Backend::Cpu && precision == Precision::F16 {
        p.push(
            s.key("precision"),
            None,
            "precision = \"f16\" is a CPU lever (ARMv8.2 FP16); hint: use \"auto\" or \"f32\" with \
             backend = \"cuda\" or \"auto\"",
        );
    }
    EngineConfig { threads, precision, backend }
}

/// Workers x threads must fit the CPUs a pipeline's workers run on (its `cpus`, else the
/// inference set): each worker gets `threads` CPUs of its own, so intra-op threads never
/// share a core with another inference. Checked only for `threads > 1`: single-threaded
/// workers may share CPUs as before (round-robin).
pub fn check_cpus(
    key: &str,
    workers: usize,
    engine: &EngineConfig,
    pipeline_cpus: &[usize],
    inference_cpus: usize,
    p: &mut Problems,
) {
    if engine.threads <= 1 {
        return;
    }
    let (available, which) = if pipeline_cpus.is_empty() {
        (
            inference_cpus,
            "the inference CPUs (system.inference_cpus, or all allowed CPUs but the I/O one)",
        )
    } else {
        (pipeline_cpus.len(), "this pipeline's cpus")
    };
    let needed = workers * engine.threads;
    if needed > available {
        p.push(
            format!("{key}.threads"),
            None,
            format!(
                "workers ({workers}) x threads ({}) = {needed} CPUs, but {which} are {available}; \
                 hint: lower workers or threads, or give the pipeline more cpus",
                engine.threads
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::reader::Problems;

    fn parse_str(text: &str) -> (EngineConfig, Vec<String>) {
        let t: toml::Table = toml::from_str(text).expect("toml");
        let mut p = Problems::default();
        let mut s = Section::new("pipelines.x", &t);
        let e = parse(&mut s, &mut p);
        (e, p.0.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn defaults_and_choices() {
        let (e, probs) = parse_str("");
        assert_eq!(e, EngineConfig::default());
        assert!(probs.is_empty());
        assert_eq!(
            (e.threads, e.precision, e.backend),
            (1, Precision::Auto, Backend::Cpu),
            "documented defaults"
        );
        let (e, probs) = parse_str("precision = \"f32\"\nbackend = \"auto\"\n");
        assert!(probs.is_empty(), "{probs:?}");
        assert_eq!((e.precision, e.backend), (Precision::F32, Backend::Auto));
        let (_, probs) = parse_str("precision = \"bf16\"\nbackend = \"gpu\"\nthreads = 0\n");
        assert_eq!(probs.len(), 3, "{probs:?}");
        assert!(probs.iter().any(|m| m.contains("pipelines.x.precision")));
        assert!(probs.iter().any(|m| m.contains("pipelines.x.backend")));
        assert!(probs.iter().any(|m| m.contains("pipelines.x.threads")));
    }

    #[test]
    fn cuda_without_the_feature_and_f16_on_a_gpu_are_refused() {
        let (_, probs) = parse_str("backend = \"cuda\"\n");
        assert_eq!(probs.is_empty(), CUDA_BUILT, "{probs:?}");
        if !CUDA_BUILT {
            assert!(probs[0].contains("without the `cuda` feature"), "{probs:?}");
        }
        let (_, probs) = parse_str("backend = \"auto\"\nprecision = \"f16\"\n");
        assert!(probs.iter().any(|m| m.contains("CPU lever")), "{probs:?}");
    }

    #[test]
    fn workers_times_threads_must_fit_the_cpus() {
        let two = EngineConfig { threads: 2, ..EngineConfig::default() };
        let one = EngineConfig::default();
        let check = |workers, e: &EngineConfig, cpus: &[usize], inference| {
            let mut p = Problems::default();
            check_cpus("pipelines.x", workers, e, cpus, inference, &mut p);
            p.0.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert!(check(2, &two, &[1, 2, 3, 4], 1).is_empty(), "4 CPUs for 2 x 2");
        let e = check(2, &two, &[1, 2, 3], 8);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].contains("workers (2) x threads (2) = 4 CPUs") && e[0].contains("are 3"),
            "{e:?}"
        );
        assert!(check(1, &two, &[], 2).is_empty(), "the inference set");
        assert!(check(1, &two, &[], 1)[0].contains("inference CPUs"));
        assert!(check(8, &one, &[1], 1).is_empty(), "one thread: workers may share CPUs");
    }

    #[test]
    fn pipelines_carry_their_engine_keys_and_validation_sees_them() {
        let text = "[pipelines.p]\nmodel = \"m.onnx\"\ninput = \"a/+\"\nprecision = \"f32\"\nbackend = \"auto\"\n";
        let cfg = crate::config::Config::parse_str(text, "t.toml", None).expect("valid");
        assert_eq!(
            cfg.pipelines[0].engine,
            EngineConfig { threads: 1, precision: Precision::F32, backend: Backend::Auto }
        );
        let cpu = crate::sys::cpus::allowed().iter().next().expect("a CPU");
        let text = format!(
            "[pipelines.p]\nmodel = \"m.onnx\"\ninput = \"a/+\"\nthreads = 2\ncpus = [{cpu}]\n"
        );
        let e =
            crate::config::Config::parse_str(&text, "t.toml", None).expect_err("2 threads, 1 CPU");
        let msgs: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("pipelines.p.threads: workers (1) x threads (2) = 2 CPUs")),
            "{msgs:?}"
        );
    }
}
