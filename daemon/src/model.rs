//! ONNX models behind our own type: loading with tract, fixing input shapes, optimizing, warming
//! up, and per-worker inference sessions.
//!
//! Owns everything tract: no other module names a tract type, so a tract upgrade (or another
//! runtime) stays inside this file. It does not know about MQTT, queues or payload formats: a
//! [`Session`] exposes its input tensors as byte buffers in the model's own dtype and layout, and
//! its outputs as typed [`OutputTensor`] views.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

pub mod cache;
mod describe;
mod profile;
mod spec;

use spec::dims_to_string;
pub use spec::{DType, Dim, Parsed, TensorSpec};

pub use describe::{Declared, DeclaredTensor, describe};
pub use profile::{NodeTime, OpTime, Profile};

/// Errors from loading or running a model. Each names the model file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model {path} is not a valid ONNX file: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error(
        "model {path} uses operator `{op}` (node `{node}`), which tract {tract} does not support; \
         hint: re-export the model without it (e.g. another opset or exporter option)"
    )]
    UnsupportedOp { path: PathBuf, op: String, node: String, tract: &'static str },
    #[error(
        "model {path}: input `{input}` has shape {shape} with unresolved dimension(s); hint: set \
         pipelines.<name>.input_shapes.{input} = [..] in the config"
    )]
    SymbolicInput { path: PathBuf, input: String, shape: String },
    #[error("model {path}: input_shapes names `{input}`, but the model's inputs are {known:?}")]
    UnknownInput { path: PathBuf, input: String, known: Vec<String> },
    #[error(
        "model {path}: input `{input}` is declared {model_shape} in the model, config gives {config_shape:?}"
    )]
    ShapeConflict { path: PathBuf, input: String, model_shape: String, config_shape: Vec<usize> },
    #[error("model {path}: tensor `{name}` has type {dtype}, which edgeinfer does not handle")]
    UnsupportedType { path: PathBuf, name: String, dtype: String },
    #[error("model {path} could not be prepared for inference: {detail}")]
    Optimize { path: PathBuf, detail: String },
    #[error("model {path}: the CUDA backend is not usable: {detail}")]
    Backend { path: PathBuf, detail: String },
    #[error("{threads} threads per inference need a build with the `multithread` feature")]
    Threads { threads: usize },
    #[error("inference failed: {detail}")]
    Run { detail: String },
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Name reported in results and health (the pipeline name by default).
    pub name: String,
    /// Version override; otherwise ONNX `model_version`, else a hash prefix.
    pub version: Option<String>,
    /// Concrete shapes for inputs with symbolic or unknown dimensions.
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    /// Threads for one inference in sessions from [`Model::session`] (tract's multithread
    /// executor, a pool per session); 0 or 1: single-threaded. Workers build one pool each,
    /// after pinning themselves, with [`Threads`] and [`Model::session_on`].
    pub threads: usize,
    /// Convert f32 weights and activations to f16 (fast on ARMv8.2+ with FP16 arithmetic). The
    /// plan keeps the model's f32 inputs and outputs (casts at both ends), so the wire format
    /// does not depend on the precision.
    pub half: bool,
    /// Build the plan for tract-cuda (feature `cuda`) instead of the CPU.
    pub cuda: bool,
    /// Directory of the optimized-model cache (`None`: no cache). See `model::cache`.
    pub cache_dir: Option<PathBuf>,
}

/// A loaded, optimized, runnable model. Cheap to share between workers (`Arc` inside).
#[derive(Clone)]
pub struct Model {
    pub name: String,
    pub version: String,
    /// Lowercase hex SHA-256 of the model file.
    pub sha256: String,
    pub path: PathBuf,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Nodes in the ONNX graph as parsed.
    pub onnx_nodes: usize,
    /// Nodes in the optimized plan tract runs.
    pub optimized_nodes: usize,
    /// Distinct ONNX operator types with their node counts.
    pub op_histogram: BTreeMap<String, usize>,
    /// Reading and parsing the file, and fixing input facts.
    pub load_time: Duration,
    /// Type inference, decluttering and optimization into a runnable plan.
    pub optimize_time: Duration,
    /// Loaded from the optimized-model cache (ONNX parsing and decluttering skipped).
    pub from_cache: bool,
    /// Where the load and optimize time went, stage by stage, in order (`inspect` prints it).
    pub stages: Stages,
    /// The plan computes in f16 (inputs and outputs stay f32).
    pub half: bool,
    /// `"cpu"` or `"cuda"`.
    pub backend: &'static str,
    /// For a CUDA plan: (nodes on the GPU, nodes on the CPU), sources, constants and host/device
    /// copies left out.
    pub placement: Option<(usize, usize)>,
    /// Threads per inference of [`Model::session`].
    pub threads: usize,
    /// What was asked for and what runs (backend, precision), with the reason when they
    /// differ; set by whoever chose the load options (`app::engine`), reported in health.
    pub engine: EngineReport,
    plan: Arc<TypedSimplePlan>,
}

/// Wall-clock time of each load stage, in order: `read`, `hash`, then either `cache read` or
/// `parse` (protobuf), `translate` (ONNX nodes to tract's), `analyse` (type and shape
/// inference), `declutter`, `f16`, `cache write`; then `optimize` and `plan`.
#[derive(Debug, Clone, Default)]
pub struct Stages {
    pub times: Vec<(&'static str, Duration)>,
    last: Option<Instant>,
}

impl Stages {
    fn start() -> Stages {
        Stages { times: Vec::new(), last: Some(Instant::now()) }
    }

    /// Ends stage `name` now.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        let since = self.last.unwrap_or(now);
        self.times.push((name, now - since));
        self.last = Some(now);
    }

    pub fn total(&self) -> Duration {
        self.times.iter().map(|(_, d)| *d).sum()
    }

    /// `read 1.2ms, hash 3.4ms, ...`
    pub fn text(&self) -> String {
        self.times.iter().map(|(n, d)| format!("{n} {d:.1?}")).collect::<Vec<_>>().join(", ")
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.times
                .iter()
                .map(|(n, d)| serde_json::json!({"stage": n, "us": d.as_micros() as u64}))
                .collect(),
        )
    }
}

/// Matrix-product nodes of a plan by the arithmetic they compute in (see [`Model::arithmetic`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Arithmetic {
    pub integer: usize,
    pub f16: usize,
    pub f32: usize,
}

impl Arithmetic {
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({"integer": self.integer, "f16": self.f16, "f32": self.f32})
    }
}

/// One engine decision: what the config asked for, what runs, and why when they differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub wanted: &'static str,
    pub running: &'static str,
    pub reason: Option<String>,
}

impl Choice {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"wanted": self.wanted, "running": self.running, "reason": self.reason})
    }
}

/// How a model runs: backend and precision decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineReport {
    pub backend: Choice,
    pub precision: Choice,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("sha256", &self.sha256)
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

/// The tract version we were built against (reported by `inspect` and in errors).
pub const TRACT_VERSION: &str = "0.23";

impl Model {
    /// Loads, checks and optimizes a model. Does not run it (see [`Model::warm_up`]).
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model, ModelError> {
        let t0 = Instant::now();
        let mut stages = Stages::start();
        let bytes =
            std::fs::read(path).map_err(|source| ModelError::Read { path: path.into(), source })?;
        stages.mark("read");
        let sha256 = crate::sys::fsutil::hex(&Sha256::digest(&bytes));
        stages.mark("hash");
        // Fast start: a cached decluttered graph skips parsing, type inference and decluttering.
        let cache_key =
            opts.cache_dir.as_ref().map(|_| cache::key(&sha256, &opts.input_shapes, opts.half));
        if let (Some(dir), Some(key)) = (&opts.cache_dir, &cache_key) {
            match cache::load(dir, key) {
                Ok(Some((typed, meta))) => {
                    let inputs: Option<Vec<TensorSpec>> =
                        meta.inputs.iter().map(cache::SpecMeta::to_spec).collect();
                    if let Some(inputs) = inputs {
                        let parsed = Parsed {
                            inputs,
                            output_names: meta.output_names,
                            onnx_version: meta.onnx_version,
                            onnx_nodes: meta.onnx_nodes,
                            op_histogram: meta.op_histogram,
                        };
                        stages.mark("cache read");
                        let load_time = t0.elapsed();
                        return Self::finish(
                            path, opts, sha256, typed, parsed, load_time, stages, true,
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => log::warn!(
                    "model cache entry for {} is unreadable ({e}); loading the ONNX file and rewriting the entry",
                    path.display()
                ),
            }
        }
        let perr = |detail: String| ModelError::Parse { path: path.into(), detail };
        // Stored intermediate shapes (value_info) may use symbols that disagree with the concrete
        // input shapes we set; tract re-infers every intermediate shape anyway, so ignore them.
        let onnx = tract_onnx::onnx().with_ignore_value_info(true);
        let proto =
            onnx.proto_model_for_read(&mut bytes.as_slice()).map_err(|e| perr(format!("{e:#}")))?;
        stages.mark("parse");
        let onnx_version = proto.model_version;
        // Operator types as the ONNX file names them (tract renames some while parsing).
        let mut op_histogram = BTreeMap::new();
        if let Some(g) = &proto.graph {
            for n in &g.node {
                *op_histogram.entry(n.op_type.clone()).or_insert(0) += 1;
            }
        }
        let dir = path.parent().and_then(Path::to_str);
        let parsed = onnx.parse(&proto, dir).map_err(|e| perr(format!("{e:#}")))?;
        stages.mark("translate");
        if !parsed.unresolved_inputs.is_empty() {
            return Err(perr(format!("unresolved inputs {:?}", parsed.unresolved_inputs)));
        }
        let mut model = parsed.model;

        for node in model.nodes() {
            let op = node.op.name();
            // Unknown operators parse into placeholder nodes named `Unimplemented(OpType)`; report
            // the first one precisely instead of tract's later, vaguer analysis error.
            if let Some(op_type) =
                op.strip_prefix("Unimplemented(").and_then(|s| s.strip_suffix(')'))
            {
                return Err(ModelError::UnsupportedOp {
                    path: path.into(),
                    op: op_type.to_string(),
                    node: node.name.clone(),
                    tract: TRACT_VERSION,
                });
            }
        }
        let onnx_nodes = proto.graph.as_ref().map_or(0, |g| g.node.len());

        let input_outlets: Vec<OutletId> =
            model.input_outlets().map_err(|e| perr(format!("{e:#}")))?.to_vec();
        let input_names: Vec<String> =
            input_outlets.iter().map(|o| model.node(o.node).name.clone()).collect();
        for name in opts.input_shapes.keys() {
            if !input_names.contains(name) {
                return Err(ModelError::UnknownInput {
                    path: path.into(),
                    input: name.clone(),
                    known: input_names.clone(),
                });
            }
        }
        let mut inputs = Vec::with_capacity(input_outlets.len());
        for (ix, name) in input_names.iter().enumerate() {
            let fact = model.input_fact(ix).map_err(|e| perr(format!("{e:#}")))?.clone();
            let declared: Vec<Dim> = if fact.shape.is_open() {
                Vec::new()
            } else {
                fact.shape
                    .dims()
                    .map(|d| match d.concretize() {
                        Some(td) => match td.to_i64() {
                            Ok(n) if n >= 0 => Dim::Fixed(n as usize),
                            Ok(_) => Dim::Unknown,
                            Err(_) => Dim::Symbol(td.to_string()),
                        },
                        None => Dim::Unknown,
                    })
                    .collect()
            };
            let dt = fact
                .datum_type
                .concretize()
                .ok_or_else(|| perr(format!("input `{name}` has no declared element type")))?;
            let dtype = DType::from_tract(dt).ok_or_else(|| ModelError::UnsupportedType {
                path: path.into(),
                name: name.clone(),
                dtype: format!("{dt:?}"),
            })?;
            let shape = resolve_shape(path, name, &declared, opts.input_shapes.get(name))?;
            model
                .set_input_fact(ix, InferenceFact::dt_shape(dt, shape.clone()))
                .map_err(|e| perr(format!("{e:#}")))?;
            inputs.push(TensorSpec { name: name.clone(), dtype, shape, declared });
        }
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(|e| perr(format!("{e:#}")))?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map_or_else(|| model.node(o.node).name.clone(), str::to_string)
            })
            .collect();
        let oerr =
            |e: TractError| ModelError::Optimize { path: path.into(), detail: format!("{e:#}") };
        let mut typed = model.into_typed().map_err(oerr)?;
        stages.mark("analyse");
        typed.declutter().map_err(oerr)?;
        stages.mark("declutter");
        if opts.half {
            to_f16_keeping_f32_interface(&mut typed).map_err(oerr)?;
            stages.mark("f16");
        }
        let parsed = Parsed { inputs, output_names, onnx_version, onnx_nodes, op_histogram };
        if let (Some(dir), Some(key)) = (&opts.cache_dir, &cache_key) {
            let meta = cache::Meta::of(&parsed);
            match cache::store(dir, key, &typed, &meta) {
                Ok(()) => log::debug!("model {} cached in {}", path.display(), dir.display()),
                Err(e) => log::warn!(
                    "cannot cache the decluttered model in {} ({e}); the next start parses the ONNX file again",
                    dir.display()
                ),
            }
            stages.mark("cache write");
        }
        let load_time = t0.elapsed();
        Self::finish(path, opts, sha256, typed, parsed, load_time, stages, false)
    }

    /// Optimizes a decluttered graph into a runnable plan and describes it (both load paths).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        path: &Path,
        opts: &LoadOptions,
        sha256: String,
        typed: TypedModel,
        parsed: Parsed,
        load_time: Duration,
        mut stages: Stages,
        from_cache: bool,
    ) -> Result<Model, ModelError> {
        let t1 = Instant::now();
        let Parsed { inputs, output_names, onnx_version, onnx_nodes, op_histogram } = parsed;
        let oerr =
            |e: TractError| ModelError::Optimize { path: path.into(), detail: format!("{e:#}") };
        if opts.threads > 1 && !cfg!(feature = "multithread") {
            return Err(ModelError::Threads { threads: opts.threads });
        }
        // One plan for every session: single-threaded; a session with threads runs it inside
        // its own pool (`Threads`), so each worker's pool lives on that worker's CPUs.
        let plan = if opts.cuda {
            let plan = cuda_plan(typed)
                .map_err(|e| ModelError::Backend { path: path.into(), detail: format!("{e:#}") })?;
            stages.mark("cuda plan");
            plan
        } else {
            let mut typed = typed;
            // The fresh path hands over a decluttered graph: `optimize` alone, not tract's
            // `into_optimized`, which would run the whole declutter pass list again. A graph
            // read back from the cache is decluttered again (NNEF's reader rebuilds some ops
            // in their un-decluttered form).
            if from_cache {
                typed.declutter().map_err(oerr)?;
                stages.mark("declutter");
            }
            // After the last declutter (whose axis propagation would fold the moves back in).
            softmax_on_last_axis(&mut typed).map_err(oerr)?;
            typed.optimize().map_err(oerr)?;
            stages.mark("optimize");
            let plan = typed.into_runnable().map_err(oerr)?;
            stages.mark("plan");
            plan
        };
        let typed = plan.model();
        let placement = opts.cuda.then(|| gpu_placement(typed));
        let mut outputs = Vec::with_capacity(output_names.len());
        for (ix, name) in output_names.into_iter().enumerate() {
            let fact = typed.output_fact(ix).map_err(oerr)?;
            let dtype =
                DType::from_tract(fact.datum_type).ok_or_else(|| ModelError::UnsupportedType {
                    path: path.into(),
                    name: name.clone(),
                    dtype: format!("{:?}", fact.datum_type),
                })?;
            let shape: Vec<usize> = fact
                .shape
                .as_concrete()
                .ok_or_else(|| ModelError::Optimize {
                    path: path.into(),
                    detail: format!("output `{name}` has a non-concrete shape {:?}", fact.shape),
                })?
                .to_vec();
            let declared = shape.iter().map(|d| Dim::Fixed(*d)).collect();
            outputs.push(TensorSpec { name, dtype, shape, declared });
        }
        let optimized_nodes = typed.nodes().len();
        let optimize_time = t1.elapsed();

        let version = opts
            .version
            .clone()
            .or_else(|| (onnx_version != 0).then(|| onnx_version.to_string()))
            .unwrap_or_else(|| sha256[..12].to_string());
        let name = if opts.name.is_empty() {
            path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        } else {
            opts.name.clone()
        };
        Ok(Model {
            name,
            version,
            sha256,
            path: path.into(),
            inputs,
            outputs,
            onnx_nodes,
            optimized_nodes,
            op_histogram,
            load_time,
            optimize_time,
            from_cache,
            stages,
            half: opts.half,
            backend: if opts.cuda { "cuda" } else { "cpu" },
            placement,
            threads: opts.threads.max(1),
            engine: EngineReport {
                backend: Choice {
                    wanted: if opts.cuda { "cuda" } else { "cpu" },
                    running: if opts.cuda { "cuda" } else { "cpu" },
                    reason: None,
                },
                precision: Choice {
                    wanted: if opts.half { "f16" } else { "f32" },
                    running: if opts.half { "f16" } else { "f32" },
                    reason: None,
                },
            },
            plan,
        })
    }

    /// A fresh inference session (state plus input buffers), with its own thread pool when
    /// the model was loaded with `threads > 1`.
    pub fn session(&self) -> Result<Session, ModelError> {
        let threads = Threads::new(self.threads)?;
        self.session_on(&threads)
    }

    /// A fresh inference session whose runs use `threads` (shared by the sessions of one
    /// worker: its single and batched plans).
    pub fn session_on(&self, threads: &Threads) -> Result<Session, ModelError> {
        let state = self.plan.spawn().map_err(|e| ModelError::Run { detail: format!("{e:#}") })?;
        let inputs = self
            .inputs
            .iter()
            .map(|s| {
                Tensor::zero_dt(s.dtype.to_tract(), &s.shape)
                    .map(Arc::new)
                    .map_err(|e| ModelError::Run { detail: format!("{e:#}") })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Session {
            state,
            inputs,
            outputs: TVec::new(),
            specs: self.inputs.clone(),
            executor: threads.0.clone(),
        })
    }

    /// How the plan's matrix products (convolutions and matmuls, after tract's lowering) compute.
    /// For tract's matmul nodes, from the kernel it picked (`info()` names it, e.g.
    /// `fma_mmm_f32_16x6`, `*_i32_*` for int8 inputs accumulated in i32, `*_f16_*`); for the
    /// other convolutions (depthwise, direct), from their input's element type. A QDQ model
    /// whose convolutions tract leaves in float shows up as float here, which is how `inspect`
    /// and the start-up log tell "runs in int8" from "loads, but computes in float between
    /// quantize/dequantize pairs".
    pub fn arithmetic(&self) -> Arithmetic {
        let model = self.plan.model();
        let mut a = Arithmetic::default();
        for n in model.nodes() {
            let name = n.op.name();
            if !(name.contains("MatMul") || name.contains("Conv")) || name.contains("Pack") {
                continue;
            }
            if name.contains("MatMul") {
                let info = n.op.info().map(|v| v.join(" ")).unwrap_or_default();
                if info.contains("i32") {
                    a.integer += 1;
                } else if info.contains("f16") {
                    a.f16 += 1;
                } else {
                    a.f32 += 1;
                }
                continue;
            }
            match n.inputs.first().and_then(|i| model.outlet_fact(*i).ok()).map(|f| f.datum_type) {
                Some(dt) if dt.is_integer() || dt.is_quantized() => a.integer += 1,
                Some(DatumType::F16) => a.f16 += 1,
                Some(_) => a.f32 += 1,
                None => {}
            }
        }
        a
    }

    /// Runs this model and `reference` on the same sample input ([`Session::fill_sample`]) and
    /// returns the largest output deviation, per output `max |a - ref| / max(1, max |ref|)`
    /// (the golden-pair measure). Both must have the same signature.
    pub fn deviation_from(&self, reference: &Model) -> Result<f64, ModelError> {
        let mismatch = |what: String| ModelError::Run { detail: what };
        if self
            .inputs
            .iter()
            .map(|i| (&i.shape, i.dtype))
            .ne(reference.inputs.iter().map(|i| (&i.shape, i.dtype)))
        {
            return Err(mismatch("the two plans take different inputs".into()));
        }
        let mut a = self.session()?;
        let mut b = reference.session()?;
        a.fill_sample();
        b.fill_sample();
        a.run()?;
        b.run()?;
        let mut worst = 0f64;
        for (ix, (x, r)) in a.outputs().zip(b.outputs()).enumerate() {
            if x.shape() != r.shape() || x.len() != r.len() {
                return Err(mismatch(format!(
                    "output {ix} has shape {:?}, the reference {:?}",
                    x.shape(),
                    r.shape()
                )));
            }
            let scale = (0..r.len()).filter_map(|i| r.get_f64(i)).fold(1f64, |m, v| m.max(v.abs()));
            let mut diff = 0f64;
            for i in 0..r.len() {
                let (xv, rv) = (x.get_f64(i).unwrap_or(f64::NAN), r.get_f64(i).unwrap_or(f64::NAN));
                let d = (xv - rv).abs();
                // NaN on either side is the worst possible disagreement.
                diff = if d.is_nan() { f64::INFINITY } else { diff.max(d) };
            }
            worst = worst.max(diff / scale);
        }
        Ok(worst)
    }

    /// Runs one inference on all-zero inputs, so the first real frame does not pay for lazy
    /// initialization, and a model that cannot run fails at start-up. Returns the run time.
    pub fn warm_up(&self) -> Result<Duration, ModelError> {
        let mut s = self.session()?;
        let t = Instant::now();
        s.run()?;
        Ok(t.elapsed())
    }
}

use tract_onnx::tract_core::tract_linalg::multithread::Executor;

/// A thread pool for intra-op parallelism (tract's multithreaded executor), or none. Its
/// threads are created by [`Threads::new`] and inherit the creating thread's CPU affinity and
/// cgroup, so a worker creates its pool after pinning itself to its CPUs.
#[derive(Clone, Default)]
pub struct Threads(Option<Executor>);

impl fmt::Debug for Threads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Threads({})", if self.0.is_some() { "pool" } else { "single" })
    }
}

impl Threads {
    /// `n <= 1`: single-threaded (no pool); otherwise a pool of `n` threads named `ei-mm-<i>`.
    pub fn new(n: usize) -> Result<Threads, ModelError> {
        if n <= 1 {
            return Ok(Threads(None));
        }
        Self::pool(n)
    }

    #[cfg(feature = "multithread")]
    fn pool(n: usize) -> Result<Threads, ModelError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("ei-mm-{i}"))
            .build()
            .map_err(|e| ModelError::Run {
                detail: format!("cannot start {n} inference threads: {e}"),
            })?;
        Ok(Threads(Some(Executor::MultiThread(Arc::new(pool)))))
    }

    #[cfg(not(feature = "multithread"))]
    fn pool(n: usize) -> Result<Threads, ModelError> {
        Err(ModelError::Threads { threads: n })
    }
}

/// Converts a decluttered f32 graph to f16 arithmetic with tract's float translator, then puts
/// the f32 interface back: the translator turns f32 sources and outputs into f16 too, which
/// would change what a frame must carry depending on the precision the daemon picked.
fn to_f16_keeping_f32_interface(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::cast::cast;
    use tract_onnx::tract_core::ops::source::TypedSource;
    use tract_onnx::tract_core::transform::ModelTransform;
    let was_f32_in: Vec<bool> = (0..model.inputs.len())
        .map(|ix| model.input_fact(ix).map(|f| f.datum_type == DatumType::F32))
        .collect::<TractResult<_>>()?;
    let was_f32_out: Vec<bool> = (0..model.outputs.len())
        .map(|ix| model.output_fact(ix).map(|f| f.datum_type == DatumType::F32))
        .collect::<TractResult<_>>()?;
    tract_onnx::tract_core::floats::FloatPrecisionTranslator::new(DatumType::F32, DatumType::F16)
        .transform(model)?;
    for (ix, was_f32) in was_f32_in.into_iter().enumerate() {
        let src = model.inputs[ix];
        if !was_f32 || model.outlet_fact(src)?.datum_type != DatumType::F16 {
            continue;
        }
        let mut fact = model.outlet_fact(src)?.clone();
        fact.datum_type = DatumType::F32;
        let successors = model.node(src.node).outputs[src.slot].successors.clone();
        model.set_outlet_fact(src, fact.clone())?;
        if let Some(op) = model.node_mut(src.node).op_as_mut::<TypedSource>() {
            op.fact = fact;
        }
        let name = format!("{}.to_f16", model.node(src.node).name);
        let casted = model.wire_node(name, cast(DatumType::F16), &[src])?[0];
        for inlet in successors {
            model.add_edge(casted, inlet)?;
        }
    }
    for (ix, was_f32) in was_f32_out.into_iter().enumerate() {
        let out = model.outputs[ix];
        if !was_f32 || model.outlet_fact(out)?.datum_type != DatumType::F16 {
            continue;
        }
        let label = model.outlet_label(out).map(str::to_string);
        let name = format!("{}.to_f32", model.node(out.node).name);
        let casted = model.wire_node(name, cast(DatumType::F32), &[out])?[0];
        model.outputs[ix] = casted;
        if let Some(label) = label {
            model.set_outlet_label(casted, label)?;
        }
    }
    model.declutter()
}

/// Rewrites every softmax over a single axis that is not the last one into: move that axis
/// last, softmax over the last axis, move it back. tract 0.23.9 has a vectorized kernel for
/// softmax over trailing axes of a contiguous tensor and walks every other case lane by lane
/// through ndarray views: YOLOv8's DFL head (softmax over the 16 bins on axis 1 of
/// `[1, 16, 4, anchors]`) spent ~580 instructions per element there, 37% of the detector
/// fixture's instructions (callgrind), where the two transposes cost a few per element.
/// Returns how many were rewritten.
fn softmax_on_last_axis(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::model::TypedModelPatch;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    use tract_onnx::tract_core::ops::nn::Softmax;
    let mut rewritten = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<Softmax>() else { continue };
        let Some(input) = node.inputs.first().copied() else { continue };
        let rank = model.outlet_fact(input)?.rank();
        if op.axes.len() != 1 || op.axes[0] + 1 == rank || rank < 2 {
            continue;
        }
        let axis = op.axes[0];
        let last_axis = Softmax { axes: tvec!(rank - 1), ..op.clone() };
        let name = node.name.clone();
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, input)?;
        let moved =
            patch.wire_node(format!("{name}.axis_last"), AxisOp::Move(axis, rank - 1), &[x])?;
        let y = patch.wire_node(format!("{name}.on_last"), last_axis, &moved)?;
        let back =
            patch.wire_node(format!("{name}.axis_back"), AxisOp::Move(rank - 1, axis), &y)?;
        patch.shunt_outside(model, OutletId::new(id, 0), back[0])?;
        patch.apply(model)?;
        rewritten += 1;
    }
    if rewritten > 0 {
        model.compact()?;
    }
    Ok(rewritten)
}

/// The plan tract-cuda builds from a decluttered graph: its transform moves the ops it has
/// kernels for to the GPU (cuDNN convolutions, cuBLAS matmuls), keeps the rest on the CPU
/// inside the same plan, and inserts host/device copies at the edges.
#[cfg(feature = "tract-cuda")]
fn cuda_plan(typed: TypedModel) -> TractResult<Arc<TypedSimplePlan>> {
    // Probe first: driver, then every library cudarc loads at run time (cudart, cuBLAS, cuDNN,
    // NVRTC), with tract-cuda's own message naming the missing one.
    tract_cuda::utils::ensure_cuda_runtime_dependencies(
        "the CUDA backend needs the NVIDIA driver and the CUDA runtime libraries",
    )?;
    let runtime = tract_onnx::tract_core::runtime::runtime_for_name("cuda")?
        .ok_or_else(|| TractError::msg("tract-cuda's runtime is not registered in this binary"))?;
    let runnable = runtime.prepare(typed)?;
    runnable
        .typed_plan()
        .cloned()
        .ok_or_else(|| TractError::msg("tract-cuda returned a plan edgeinfer cannot run"))
}

#[cfg(not(feature = "tract-cuda"))]
fn cuda_plan(_typed: TypedModel) -> TractResult<Arc<TypedSimplePlan>> {
    Err(TractError::msg(
        "this edgeinfer was built without the `cuda` feature (hint: the Jetson image's CUDA build has it)",
    ))
}

/// (GPU nodes, CPU nodes) of a plan tract-cuda built: its GPU ops are named `Cuda*` (and
/// `Gpu*` for the shared gpu crate's); sources, constants and host/device copies are neither.
fn gpu_placement(model: &TypedModel) -> (usize, usize) {
    let mut gpu = 0;
    let mut cpu = 0;
    for n in model.nodes() {
        let name = n.op.name();
        if name.starts_with("Cuda") || name.starts_with("Gpu") {
            gpu += 1;
        } else if !matches!(name.as_ref(), "Source" | "Const" | "DeviceSync")
            && !name.contains("Sync")
        {
            cpu += 1;
        }
    }
    (gpu, cpu)
}

/// ONNX operators that carry int8 arithmetic themselves (the QOperator format).
const INTEGER_OPS: [&str; 4] = ["QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"];

/// What to tell an operator about a quantized model, from its ONNX operators and the plan's
/// arithmetic (`None` for a model without quantize/dequantize operators):
/// - QDQ (QuantizeLinear/DequantizeLinear around float Conv/MatMul): tract 0.23 does not fuse
///   the pattern (sonos/tract#2725), so the products run in f32 with quantize/dequantize work
///   added: slower and less accurate than the float model;
/// - QOperator (QLinearConv, QLinearMatMul): the products run in int8 kernels.
pub fn quantization_note(ops: &BTreeMap<String, usize>, a: Arithmetic) -> Option<String> {
    let qdq = ops.contains_key("QuantizeLinear") || ops.contains_key("DequantizeLinear");
    let qop = INTEGER_OPS.iter().any(|o| ops.contains_key(*o));
    if !qdq && !qop {
        return None;
    }
    Some(if a.integer == 0 {
        format!(
            "quantized model (QDQ format), but none of its {} matrix products runs in integers: \
             tract {TRACT_VERSION} computes QDQ convolutions in float between quantize/dequantize \
             pairs (sonos/tract#2725), which costs more than the float model; hint: serve the \
             float model, or export QLinearConv/QLinearMatMul (onnxruntime.quantization \
             QuantFormat.QOperator with op_types_to_quantize=[\"Conv\", \"MatMul\"])",
            a.f32 + a.f16
        )
    } else {
        format!(
            "quantized model: {} matrix products run in int8 kernels, {} in float",
            a.integer,
            a.f32 + a.f16
        )
    })
}

/// Picks the concrete shape of one input: the config's when given (it must agree with every fixed
/// dimension in the file), else the file's, with a symbolic leading (batch) axis taken as 1.
fn resolve_shape(
    path: &Path,
    name: &str,
    declared: &[Dim],
    configured: Option<&Vec<usize>>,
) -> Result<Vec<usize>, ModelError> {
    if let Some(c) = configured {
        let conflict = !declared.is_empty()
            && (declared.len() != c.len()
                || declared.iter().zip(c).any(|(d, c)| matches!(d, Dim::Fixed(n) if n != c)));
        if conflict {
            return Err(ModelError::ShapeConflict {
                path: path.into(),
                input: name.into(),
                model_shape: dims_to_string(declared),
                config_shape: c.clone(),
            });
        }
        return Ok(c.clone());
    }
    let unresolved = || ModelError::SymbolicInput {
        path: path.into(),
        input: name.into(),
        shape: if declared.is_empty() { "unknown".into() } else { dims_to_string(declared) },
    };
    if declared.is_empty() {
        return Err(unresolved());
    }
    declared
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Fixed(n) => Ok(*n),
            Dim::Symbol(_) if i == 0 => Ok(1),
            _ => Err(unresolved()),
        })
        .collect()
}

/// Per-worker inference state: tract's state plus one reusable buffer per input.
pub struct Session {
    state: TypedSimpleState,
    inputs: Vec<Arc<Tensor>>,
    outputs: TVec<TValue>,
    specs: Vec<TensorSpec>,
    /// The pool its runs use (`None`: single-threaded).
    executor: Option<Executor>,
}

impl Session {
    /// The bytes of input `ix` (the model's dtype, little-endian, C order) to fill before
    /// [`Session::run`]. The buffer is reused across frames: no allocation per frame.
    pub fn input_mut(&mut self, ix: usize) -> &mut [u8] {
        let slot = &mut self.inputs[ix];
        // tract hands inputs back when a run ends, so the Arc is normally unique again; if an op
        // kept a reference, start a fresh buffer rather than touch shared memory.
        if Arc::get_mut(slot).is_none() {
            let spec = &self.specs[ix];
            let fresh = Tensor::zero_dt(spec.dtype.to_tract(), &spec.shape)
                .unwrap_or_else(|_| Tensor::from(0f32));
            *slot = Arc::new(fresh);
        }
        match Arc::get_mut(slot) {
            Some(t) => t.as_bytes_mut(),
            None => &mut [],
        }
    }

    /// Runs inference on the current input buffers. Outputs stay valid until the next run.
    pub fn run(&mut self) -> Result<(), ModelError> {
        self.outputs.clear();
        let inputs: TVec<TValue> =
            self.inputs.iter().map(|t| TValue::from_const(Arc::clone(t))).collect();
        let state = &mut self.state;
        let result = match &self.executor {
            // Cloning an executor clones an Arc: no allocation on the hot path.
            Some(e) => tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
                e.clone(),
                || state.run(inputs),
            ),
            None => state.run(inputs),
        };
        self.outputs = result.map_err(|e| ModelError::Run { detail: format!("{e:#}") })?;
        Ok(())
    }

    /// Fills every input with the deterministic sample input: floats from a fixed
    /// pseudo-random sequence in [-1, 1), integers and booleans zero. Used where zeros would
    /// not do representative work (profiling) or would hide numerical differences (the f16
    /// self-check).
    pub fn fill_sample(&mut self) {
        for ix in 0..self.inputs.len() {
            let dtype = self.specs[ix].dtype;
            let buf = self.input_mut(ix);
            let mut x: u32 = 0x9e37_79b9 ^ ix as u32;
            let mut next = || {
                // xorshift32: fixed sequence, no dependency, good enough to exercise kernels.
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            };
            match dtype {
                DType::F32 => buf.chunks_exact_mut(4).for_each(|c| {
                    c.copy_from_slice(&next().to_le_bytes());
                }),
                DType::F16 => buf.chunks_exact_mut(2).for_each(|c| {
                    c.copy_from_slice(&f16::from_f32(next()).to_bits().to_le_bytes());
                }),
                DType::F64 => buf.chunks_exact_mut(8).for_each(|c| {
                    c.copy_from_slice(&f64::from(next()).to_le_bytes());
                }),
                _ => buf.fill(0),
            }
        }
    }

    /// [`Session::run`] with a timer around each node's evaluation: adds each node's time to
    /// `per_node[node id]` and marks it in `evaluated` (both sized to the plan's node count).
    pub(crate) fn run_timed(
        &mut self,
        per_node: &mut [Duration],
        evaluated: &mut [bool],
    ) -> Result<(), ModelError> {
        self.outputs.clear();
        let inputs: TVec<TValue> =
            self.inputs.iter().map(|t| TValue::from_const(Arc::clone(t))).collect();
        let state = &mut self.state;
        let run = || {
            state.run_plan_with_eval(inputs, |ctx, op_state, node, input| {
                let t = Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                if let Some(d) = per_node.get_mut(node.id) {
                    *d += t.elapsed();
                }
                if let Some(e) = evaluated.get_mut(node.id) {
                    *e = true;
                }
                r
            })
        };
        let result = match &self.executor {
            Some(e) => tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
                e.clone(),
                run,
            ),
            None => run(),
        };
        self.outputs = result.map_err(|e| ModelError::Run { detail: format!("{e:#}") })?;
        Ok(())
    }

    /// Rows on the leading (batch) axis this session runs at once (1 unless the model was
    /// loaded with a batch size).
    pub fn rows(&self) -> usize {
        self.specs.first().and_then(|s| s.shape.first().copied()).unwrap_or(1).max(1)
    }

    /// The bytes of row `row` of input `ix` (one frame's share of a batched input).
    pub fn input_row_mut(&mut self, ix: usize, row: usize) -> &mut [u8] {
        let rows = self.rows();
        let buf = self.input_mut(ix);
        let len = buf.len() / rows;
        buf.get_mut(row * len..(row + 1) * len).unwrap_or(&mut [])
    }

    /// Outputs of the last run.
    pub fn outputs(&self) -> impl ExactSizeIterator<Item = OutputTensor<'_>> {
        self.outputs.iter().map(|v| OutputTensor::whole(v))
    }

    pub fn output(&self, ix: usize) -> Option<OutputTensor<'_>> {
        self.outputs.get(ix).map(|v| OutputTensor::whole(v))
    }

    /// Output `ix` of the last run as seen by the frame in row `row`: that row of the leading
    /// axis (shape `[1, ...]`) when the output is batched like the inputs, else the whole tensor.
    pub fn output_row(&self, ix: usize, row: usize) -> Option<OutputTensor<'_>> {
        let t = self.outputs.get(ix)?;
        let rows = self.rows();
        if rows <= 1 || t.shape().first() != Some(&rows) {
            return Some(OutputTensor::whole(t));
        }
        let mut v = OutputTensor::whole(t);
        let len = v.bytes.len() / rows;
        v.bytes = v.bytes.get(row * len..(row + 1) * len)?;
        v.shape[0] = 1;
        Some(v)
    }

    /// Every output for row `row` (see [`Session::output_row`]).
    pub fn outputs_row(&self, row: usize) -> impl Iterator<Item = OutputTensor<'_>> {
        (0..self.outputs.len()).filter_map(move |ix| self.output_row(ix, row))
    }
}

/// A read-only view of one output tensor, or of one row of it.
pub struct OutputTensor<'a> {
    shape: smallvec::SmallVec<[usize; 6]>,
    dtype: Option<DType>,
    bytes: &'a [u8],
}

impl<'a> OutputTensor<'a> {
    fn whole(t: &'a Tensor) -> Self {
        OutputTensor {
            shape: t.shape().iter().copied().collect(),
            dtype: DType::from_tract(t.datum_type()),
            bytes: t.as_plain_ram().map(|v| v.as_bytes()).unwrap_or(&[]),
        }
    }

    /// A view of little-endian tensor bytes (tests build outputs without running a model).
    #[cfg(test)]
    pub fn from_bytes(shape: &[usize], dtype: DType, bytes: &'a [u8]) -> Self {
        OutputTensor { shape: shape.iter().copied().collect(), dtype: Some(dtype), bytes }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// Raw little-endian bytes (empty for tensors not held in plain memory).
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    /// Element `i` as f64 (for ranking and JSON), whatever the dtype.
    pub fn get_f64(&self, i: usize) -> Option<f64> {
        let dt = self.dtype?;
        let b = self.bytes.get(i * dt.size()..(i + 1) * dt.size())?;
        Some(decode_le(dt, b))
    }

    pub fn len(&self) -> usize {
        self.dtype.map_or(0, |dt| self.bytes.len() / dt.size().max(1))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decodes one little-endian element of `dt` from exactly `dt.size()` bytes.
pub fn decode_le(dt: DType, b: &[u8]) -> f64 {
    fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[..N]);
        a
    }
    match dt {
        DType::F16 => f16::from_bits(u16::from_le_bytes(arr(b))).to_f64(),
        DType::F32 => f32::from_le_bytes(arr(b)) as f64,
        DType::F64 => f64::from_le_bytes(arr(b)),
        DType::I8 => i8::from_le_bytes(arr(b)) as f64,
        DType::I16 => i16::from_le_bytes(arr(b)) as f64,
        DType::I32 => i32::from_le_bytes(arr(b)) as f64,
        DType::I64 => i64::from_le_bytes(arr(b)) as f64,
        DType::U8 => b[0] as f64,
        DType::U16 => u16::from_le_bytes(arr(b)) as f64,
        DType::U32 => u32::from_le_bytes(arr(b)) as f64,
        DType::U64 => u64::from_le_bytes(arr(b)) as f64,
        DType::Bool => f64::from(u8::from(b[0] != 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_resolution() {
        let p = Path::new("m.onnx");
        let sym = vec![Dim::Symbol("batch".into()), Dim::Fixed(3), Dim::Fixed(128)];
        assert_eq!(resolve_shape(p, "x", &sym, None).expect("batch=1"), vec![1, 3, 128]);
        assert_eq!(
            resolve_shape(p, "x", &sym, Some(&vec![4, 3, 128])).expect("cfg"),
            vec![4, 3, 128]
        );
        assert!(matches!(
            resolve_shape(p, "x", &sym, Some(&vec![1, 4, 128])),
            Err(ModelError::ShapeConflict { .. })
        ));
        let inner = vec![Dim::Fixed(1), Dim::Symbol("len".into())];
        let e = resolve_shape(p, "x", &inner, None).expect_err("inner symbol");
        assert!(e.to_string().contains("input_shapes.x"), "{e}");
        assert!(resolve_shape(p, "x", &[], None).is_err());
        assert_eq!(resolve_shape(p, "x", &[], Some(&vec![2, 2])).expect("open"), vec![2, 2]);
    }

    /// The f16 plan keeps the f32 interface: f32 in, f32 out, within the f16 tolerance of the
    /// f32 plan on the sample input (x86 runs f16 emulated: correct, just slow).
    #[test]
    fn an_f16_plan_takes_and_returns_f32_and_agrees_with_the_f32_plan() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/sensor_cnn/model.onnx");
        let f32_plan = Model::load(&path, &LoadOptions::default()).expect("f32");
        let f16_plan =
            Model::load(&path, &LoadOptions { half: true, ..Default::default() }).expect("f16");
        assert!(f16_plan.half && !f32_plan.half);
        assert_eq!(f16_plan.inputs, f32_plan.inputs, "same wire format");
        assert_eq!(
            f16_plan.outputs.iter().map(|o| (o.dtype, &o.shape)).collect::<Vec<_>>(),
            f32_plan.outputs.iter().map(|o| (o.dtype, &o.shape)).collect::<Vec<_>>()
        );
        // Both convolutions in f16; tract may hoist the output cast above the final Gemm,
        // which then computes in f32.
        let a = f16_plan.arithmetic();
        assert!(a.integer == 0 && a.f16 >= 2 && a.f16 > a.f32, "{a:?}");
        assert_eq!(f32_plan.arithmetic(), Arithmetic { integer: 0, f16: 0, f32: 3 });
        let d = f16_plan.deviation_from(&f32_plan).expect("compare");
        assert!(d > 0.0, "f16 rounds differently from f32");
        assert!(d < crate::config::engine::F16_TOLERANCE, "{d}");
        assert_eq!(f32_plan.deviation_from(&f32_plan).expect("self"), 0.0);
    }

    /// Threads from a pool give the same outputs as one thread.
    #[test]
    fn a_session_with_a_thread_pool_gives_the_same_outputs() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/mobilenet/model.onnx");
        let one = Model::load(&path, &LoadOptions::default()).expect("1 thread");
        let two = Model::load(&path, &LoadOptions { threads: 2, ..Default::default() });
        if !cfg!(feature = "multithread") {
            assert!(matches!(two, Err(ModelError::Threads { threads: 2 })));
            return;
        }
        let two = two.expect("2 threads");
        assert_eq!(two.threads, 2);
        assert!(two.deviation_from(&one).expect("compare") < 1e-5);
    }

    /// The detector's DFL softmax (axis 1 of [1, 16, 4, anchors]) runs on the last axis in the
    /// plan, and the outputs still match onnxruntime's reference.
    #[test]
    fn softmax_runs_on_the_last_axis_and_keeps_the_reference_outputs() {
        use tract_onnx::tract_core::ops::nn::Softmax;
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/detector_v8");
        let m = Model::load(&dir.join("model.onnx"), &LoadOptions::default()).expect("load");
        let plan = m.plan.model();
        let softmaxes: Vec<(usize, usize)> = plan
            .nodes()
            .iter()
            .filter_map(|n| {
                let op = n.op_as::<Softmax>()?;
                let rank = plan.outlet_fact(n.inputs[0]).ok()?.rank();
                Some((op.axes[0], rank))
            })
            .collect();
        assert!(!softmaxes.is_empty(), "the DFL softmax is in the plan");
        assert!(softmaxes.iter().all(|(axis, rank)| axis + 1 == *rank), "{softmaxes:?}");
        let input = std::fs::read(dir.join("samples/000/input.images.bin")).expect("input");
        let want = std::fs::read(dir.join("samples/000/output.output0.bin")).expect("output");
        let mut s = m.session().expect("session");
        s.input_mut(0).copy_from_slice(&input);
        s.run().expect("run");
        let got = s.output(0).expect("output");
        let want: Vec<f32> =
            want.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let scale = want.iter().fold(1f32, |a, v| a.max(v.abs())) as f64;
        let worst = (0..want.len())
            .map(|i| (got.get_f64(i).unwrap_or(f64::NAN) - want[i] as f64).abs())
            .fold(0f64, f64::max);
        assert!(worst <= 1e-4 * scale, "max |tract - onnxruntime| = {worst}");
    }

    #[test]
    fn quantized_models_say_how_they_compute() {
        let fx = |c: &str| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/models")
                .join(c)
                .join("model.onnx")
        };
        let qdq = Model::load(&fx("sensor_cnn_qdq"), &LoadOptions::default()).expect("qdq loads");
        let a = qdq.arithmetic();
        assert_eq!(a.integer, 0, "tract 0.23 runs QDQ convolutions in float: {a:?}");
        let note = quantization_note(&qdq.op_histogram, a).expect("a quantized model");
        assert!(note.contains("sonos/tract#2725"), "{note}");
        let ql = Model::load(&fx("sensor_cnn_qlinear"), &LoadOptions::default()).expect("qlinear");
        let a = ql.arithmetic();
        assert!(a.integer >= 2, "QLinearConv runs in int8 kernels: {a:?}");
        assert!(quantization_note(&ql.op_histogram, a).expect("note").contains("int8 kernels"));
        let float = Model::load(&fx("sensor_cnn"), &LoadOptions::default()).expect("float");
        assert!(quantization_note(&float.op_histogram, float.arithmetic()).is_none());
        match Model::load(&fx("sensor_cnn_qcontrib"), &LoadOptions::default()) {
            Err(ModelError::UnsupportedOp { op, .. }) => assert_eq!(op, "QGemm"),
            other => panic!("onnxruntime's contrib QGemm must be refused: {other:?}"),
        }
    }

    /// Where a cold start's load time goes, and what the declutter pass this module no longer
    /// runs twice costs, side by side in one run. Release:
    /// `cargo test --release -p edgeinfer --lib cold_start_stages -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn cold_start_stages() {
        for case in ["mobilenet", "detector_v8", "sensor_cnn"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/models")
                .join(case)
                .join("model.onnx");
            let m = Model::load(&path, &LoadOptions::default()).expect("load");
            let warm = m.warm_up().expect("warm-up");
            // The pass tract's `into_optimized` would add: declutter on a decluttered graph.
            let onnx = tract_onnx::onnx().with_ignore_value_info(true);
            let mut typed = onnx
                .model_for_path(&path)
                .and_then(|mut im| {
                    for (ix, i) in m.inputs.iter().enumerate() {
                        im.set_input_fact(
                            ix,
                            InferenceFact::dt_shape(i.dtype.to_tract(), i.shape.clone()),
                        )?;
                    }
                    im.into_typed()
                })
                .and_then(|t| t.into_decluttered())
                .expect("decluttered");
            let t = Instant::now();
            typed.declutter().expect("second declutter");
            let redundant = t.elapsed();
            let total = m.stages.total() + warm;
            println!(
                "{case}: {}, warm-up {warm:.1?}; total {total:.1?}; a second declutter would add {redundant:.1?} ({:.0}% of the total)",
                m.stages.text(),
                100.0 * redundant.as_secs_f64() / total.as_secs_f64()
            );
        }
    }

    #[test]
    fn little_endian_decoding() {
        assert_eq!(decode_le(DType::F32, &1.5f32.to_le_bytes()), 1.5);
        assert_eq!(decode_le(DType::I64, &(-7i64).to_le_bytes()), -7.0);
        assert_eq!(decode_le(DType::U8, &[200]), 200.0);
        assert_eq!(decode_le(DType::F16, &f16::from_f32(0.5).to_bits().to_le_bytes()), 0.5);
    }
}
