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
    #[error("inference failed: {detail}")]
    Run { detail: String },
}

/// Element types edgeinfer moves across the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl DType {
    /// Every element type, in declaration order.
    pub const ALL: [DType; 12] = [
        DType::F16,
        DType::F32,
        DType::F64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// Short name used in config, meta files and messages (`f32`, `i64`, ...).
    /// The inverse of [`DType::name`].
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::F32 | DType::F64)
    }

    fn from_tract(dt: DatumType) -> Option<DType> {
        Some(match dt {
            DatumType::F16 => DType::F16,
            DatumType::F32 => DType::F32,
            DatumType::F64 => DType::F64,
            DatumType::I8 => DType::I8,
            DatumType::I16 => DType::I16,
            DatumType::I32 => DType::I32,
            DatumType::I64 => DType::I64,
            DatumType::U8 => DType::U8,
            DatumType::U16 => DType::U16,
            DatumType::U32 => DType::U32,
            DatumType::U64 => DType::U64,
            DatumType::Bool => DType::Bool,
            _ => return None,
        })
    }

    fn to_tract(self) -> DatumType {
        match self {
            DType::F16 => DatumType::F16,
            DType::F32 => DatumType::F32,
            DType::F64 => DatumType::F64,
            DType::I8 => DatumType::I8,
            DType::I16 => DatumType::I16,
            DType::I32 => DatumType::I32,
            DType::I64 => DatumType::I64,
            DType::U8 => DatumType::U8,
            DType::U16 => DatumType::U16,
            DType::U32 => DatumType::U32,
            DType::U64 => DatumType::U64,
            DType::Bool => DatumType::Bool,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension as stored in the ONNX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Symbol(String),
    Unknown,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

fn dims_to_string(d: &[Dim]) -> String {
    let parts: Vec<String> = d.iter().map(ToString::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// A model input or output with its concrete shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The shape as stored in the file (may contain symbols), for `inspect`.
    pub declared: Vec<Dim>,
}

impl TensorSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of the tensor in bytes.
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype.size()
    }

    pub fn shape_string(&self) -> String {
        format!("{:?}", self.shape)
    }
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
    /// Threads for one inference (tract's multithread executor); 0 or 1: single-threaded, which
    /// is how workers run (throughput comes from one worker per core).
    pub threads: usize,
    /// Convert f32 weights and activations to f16 (fast on ARMv8.2+ with fp16 arithmetic; the
    /// model's float inputs and outputs become f16 too).
    pub half: bool,
    /// Directory of the optimized-model cache (`None`: no cache). See `model_cache`.
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
    plan: Arc<TypedSimplePlan>,
}

/// What parsing the ONNX file produced besides the graph (also what the cache stores).
pub struct Parsed {
    pub inputs: Vec<TensorSpec>,
    pub output_names: Vec<String>,
    pub onnx_version: i64,
    pub onnx_nodes: usize,
    pub op_histogram: BTreeMap<String, usize>,
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
        let bytes =
            std::fs::read(path).map_err(|source| ModelError::Read { path: path.into(), source })?;
        let sha256 = crate::sys::fsutil::hex(&Sha256::digest(&bytes));
        // Fast start: a cached decluttered graph skips parsing, type inference and decluttering.
        let cache_key = opts
            .cache_dir
            .as_ref()
            .map(|_| crate::model_cache::key(&sha256, &opts.input_shapes, opts.half));
        if let (Some(dir), Some(key)) = (&opts.cache_dir, &cache_key) {
            match crate::model_cache::load(dir, key) {
                Ok(Some((typed, meta))) => {
                    let inputs: Option<Vec<TensorSpec>> =
                        meta.inputs.iter().map(crate::model_cache::SpecMeta::to_spec).collect();
                    if let Some(inputs) = inputs {
                        let parsed = Parsed {
                            inputs,
                            output_names: meta.output_names,
                            onnx_version: meta.onnx_version,
                            onnx_nodes: meta.onnx_nodes,
                            op_histogram: meta.op_histogram,
                        };
                        let load_time = t0.elapsed();
                        return Self::finish(
                            path,
                            opts,
                            sha256,
                            typed,
                            parsed,
                            load_time,
                            Instant::now(),
                            true,
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
        let load_time = t0.elapsed();

        let t1 = Instant::now();
        let oerr =
            |e: TractError| ModelError::Optimize { path: path.into(), detail: format!("{e:#}") };
        let mut typed = model.into_typed().and_then(|m| m.into_decluttered()).map_err(oerr)?;
        if opts.half {
            use tract_onnx::tract_core::transform::ModelTransform;
            tract_onnx::tract_core::floats::FloatPrecisionTranslator::new(
                DatumType::F32,
                DatumType::F16,
            )
            .transform(&mut typed)
            .map_err(oerr)?;
        }
        let parsed = Parsed { inputs, output_names, onnx_version, onnx_nodes, op_histogram };
        if let (Some(dir), Some(key)) = (&opts.cache_dir, &cache_key) {
            let meta = crate::model_cache::Meta::of(&parsed);
            match crate::model_cache::store(dir, key, &typed, &meta) {
                Ok(()) => log::debug!("model {} cached in {}", path.display(), dir.display()),
                Err(e) => log::warn!(
                    "cannot cache the decluttered model in {} ({e}); the next start parses the ONNX file again",
                    dir.display()
                ),
            }
        }
        Self::finish(path, opts, sha256, typed, parsed, load_time, t1, false)
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
        t1: Instant,
        from_cache: bool,
    ) -> Result<Model, ModelError> {
        let Parsed { inputs, output_names, onnx_version, onnx_nodes, op_histogram } = parsed;
        let oerr =
            |e: TractError| ModelError::Optimize { path: path.into(), detail: format!("{e:#}") };
        let typed = typed.into_optimized().map_err(oerr)?;
        let inputs: Vec<TensorSpec> = if opts.half {
            // The translator turned float inputs into f16: report what the plan now takes.
            inputs
                .into_iter()
                .enumerate()
                .map(|(ix, mut spec)| {
                    if let Some(dt) =
                        typed.input_fact(ix).ok().and_then(|f| DType::from_tract(f.datum_type))
                    {
                        spec.dtype = dt;
                    }
                    spec
                })
                .collect()
        } else {
            inputs
        };
        let optimized_nodes = typed.nodes().len();
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
        let plan = if opts.threads > 1 {
            typed.into_runnable_with_options(&multithread_options(opts.threads)?).map_err(oerr)?
        } else {
            typed.into_runnable().map_err(oerr)?
        };
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
            plan,
        })
    }

    /// A fresh inference session (state plus input buffers); one per worker thread.
    pub fn session(&self) -> Result<Session, ModelError> {
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
        Ok(Session { state, inputs, outputs: TVec::new(), specs: self.inputs.clone() })
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

#[cfg(feature = "multithread")]
fn multithread_options(n: usize) -> Result<RunOptions, ModelError> {
    Ok(RunOptions {
        executor: Some(tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(n)),
        ..RunOptions::default()
    })
}

#[cfg(not(feature = "multithread"))]
fn multithread_options(n: usize) -> Result<RunOptions, ModelError> {
    Err(ModelError::Optimize {
        path: PathBuf::new(),
        detail: format!("{n} threads per inference needs a build with the `multithread` feature"),
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
        self.outputs =
            self.state.run(inputs).map_err(|e| ModelError::Run { detail: format!("{e:#}") })?;
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

    #[test]
    fn little_endian_decoding() {
        assert_eq!(decode_le(DType::F32, &1.5f32.to_le_bytes()), 1.5);
        assert_eq!(decode_le(DType::I64, &(-7i64).to_le_bytes()), -7.0);
        assert_eq!(decode_le(DType::U8, &[200]), 200.0);
        assert_eq!(decode_le(DType::F16, &f16::from_f32(0.5).to_bits().to_le_bytes()), 0.5);
    }
}
