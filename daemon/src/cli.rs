//! Command-line interface: argument parsing and the subcommands (`run`, `validate`, `health`,
//! `config default`, `inspect`, `demo`). Each returns a process exit code from sysexits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::app::{self, AppError, StopHandle};
use crate::config::{Config, ConfigError, DEFAULT_CONFIG, DEFAULT_CONFIG_PATH, units};
use crate::model::{LoadOptions, Model};

pub use crate::exit::{EX_CONFIG, EX_FAILURE, EX_USAGE, report};

#[derive(Debug, Parser)]
#[command(
    name = "edgeinfer",
    version,
    about = "Edge inference daemon: MQTT frames in, ONNX inference with tract, results out"
)]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (or EDGEINFER_LOG).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Check a config file (and the files it names); exit 78 when invalid.
    Validate {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Also load every model and check it against its pipeline (slower).
        #[arg(long)]
        models: bool,
    },
    /// Check the running daemon's health through its retained health message; exit 0 only when
    /// it is online, every pipeline has its model loaded and warmed up, and no SLO is breached.
    Health {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Wait for fresh health messages and require the daemon to stay healthy for --window
        /// (the A/B update commit gate); without it, judge the current retained message once.
        #[arg(long)]
        wait: bool,
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "2m", value_parser = parse_duration_arg)]
        timeout: Duration,
        /// With --wait: how long the same daemon process must stay healthy.
        #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
        window: Duration,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
    /// Print a model's inputs, outputs, operators, load/optimize time and inference time.
    Inspect {
        model: PathBuf,
        /// Concrete shape for an input with symbolic dimensions, e.g. `accel=1,3,128`.
        #[arg(long = "input-shape", value_name = "NAME=D,D,..")]
        input_shapes: Vec<String>,
        /// Timed inference runs on zero inputs (0 to skip).
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Batch size on the leading axis (models whose batch axis is symbolic); per-frame time
        /// is reported as run time / batch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Threads per inference (tract's multithread executor; needs the `multithread` feature).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Run in f16 (weights and activations converted from f32; inputs and outputs stay f32).
        #[arg(long)]
        f16: bool,
        /// Build the plan with tract-cuda (a build with the `cuda` feature and an NVIDIA GPU).
        #[arg(long)]
        cuda: bool,
        /// Use (and fill) the optimized-model cache in this directory, as the daemon does with
        /// its state directory: a second run shows the cached load time.
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Per-node time of the optimized plan (tract's own per-node evaluation), grouped by
        /// operator type, with the most expensive nodes and their share of the total; medians
        /// over `--runs` runs on a deterministic sample input.
        #[arg(long)]
        profile: bool,
        /// With --profile: how many of the most expensive nodes to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Write the sample input and the plan's outputs for it into this directory
        /// (`input.<name>.bin`, `output.<name>.bin`: little-endian, C order), so another engine
        /// can be compared on the same input (tools/gpu-check.sh).
        #[arg(long, value_name = "DIR")]
        dump: Option<PathBuf>,
        /// Also time decoding this JPEG/PNG and pre-processing it into the model's image input
        /// (bilinear resize to its H x W, ImageNet normalization, NCHW or NHWC from the shape),
        /// `runs` times each, against the inference time.
        #[arg(long, value_name = "IMAGE")]
        bench_image: Option<PathBuf>,
    },
    /// Demo: in-process broker, the bundled digits model, simulated sensors, live results.
    #[cfg(feature = "demo")]
    Demo(crate::demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the annotated default configuration.
    Default,
}

/// Log level from the CLI, else `EDGEINFER_LOG`, else info.
pub fn log_level(cli: &Cli) -> Result<log::LevelFilter, String> {
    let raw = cli.log_level.clone().or_else(|| std::env::var("EDGEINFER_LOG").ok());
    match raw {
        None => Ok(log::LevelFilter::Info),
        Some(s) => {
            crate::logging::parse_level(&s).ok_or_else(|| format!("invalid log level `{s}`"))
        }
    }
}

/// Runs a parsed command line.
pub fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Validate { config, models } => validate(&config, models),
        Command::Health { config, wait, timeout, window } => {
            health(&config, crate::health_check::CheckOptions { wait, timeout, window })
        }
        Command::Config { what: ConfigCommand::Default } => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Inspect {
            model,
            input_shapes,
            runs,
            batch,
            threads,
            f16,
            cuda,
            cache,
            json,
            profile,
            top,
            dump,
            bench_image,
        } => inspect(
            &model,
            &input_shapes,
            runs,
            json,
            Levers { batch, threads, half: f16, cuda, cache, bench_image, dump },
            profile.then_some(top),
        ),
        #[cfg(feature = "demo")]
        Command::Demo(args) => crate::demo::run(&args),
    }
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        report(&e);
        if let ConfigError::Read { .. } = e {
            eprintln!(
                "hint: pass --config PATH, or run `edgeinfer config default` for a starting point"
            );
        }
        ExitCode::from(EX_CONFIG)
    })
}

fn run(path: &Path) -> ExitCode {
    log::info!(
        "edgeinfer {} ({}) starting, config {}",
        env!("CARGO_PKG_VERSION"),
        option_env!("EDGEINFER_GIT_HASH").unwrap_or("unknown commit"),
        path.display()
    );
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match app::run(config, StopHandle::default()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (AppError::Files { .. } | AppError::Root | AppError::Backend { .. })) => {
            report(&e);
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            report(&e);
            ExitCode::from(EX_FAILURE)
        }
    }
}

fn validate(path: &Path, models: bool) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let problems = config.check_files();
    if !problems.is_empty() {
        eprintln!(
            "error: config file {} is invalid ({} problem(s)):",
            path.display(),
            problems.len()
        );
        for p in &problems {
            eprintln!("  - {p}");
        }
        return ExitCode::from(EX_CONFIG);
    }
    if models && let Err(e) = app::check(&config) {
        report(&e);
        return ExitCode::from(EX_CONFIG);
    }
    println!(
        "{}: ok ({} pipeline(s){})",
        path.display(),
        config.pipelines.len(),
        if models { ", models loaded and warmed up" } else { "" }
    );
    ExitCode::SUCCESS
}

fn health(path: &Path, opts: crate::health_check::CheckOptions) -> ExitCode {
    if opts.wait && opts.window >= opts.timeout {
        eprintln!(
            "error: --window ({:?}) must be shorter than --timeout ({:?})",
            opts.window, opts.timeout
        );
        return ExitCode::from(EX_USAGE);
    }
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match crate::health_check::check(&config, opts) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e @ crate::health_check::CheckError::Mqtt(_)) => {
            report(&e);
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            report(&e);
            ExitCode::from(EX_FAILURE)
        }
    }
}

fn parse_shape_arg(s: &str) -> Result<(String, Vec<usize>), String> {
    let (name, dims) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected NAME=D,D,.."))?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>().ok().filter(|n| *n > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("`{s}`: dimensions must be positive integers"))?;
    Ok((name.to_string(), dims))
}

/// Performance levers `inspect` can measure.
#[derive(Debug, Clone)]
struct Levers {
    batch: usize,
    threads: usize,
    half: bool,
    cuda: bool,
    cache: Option<PathBuf>,
    bench_image: Option<PathBuf>,
    dump: Option<PathBuf>,
}

/// `inspect` on a model it cannot build a plan for without more shapes: prints the inputs and
/// outputs as the file declares them (JSON with `--json`) and the `--input-shape` arguments to
/// pass; exit 64 (usage), since the command line is what needs changing.
fn inspect_declared(path: &Path, json: bool) -> ExitCode {
    let declared = match crate::model::describe(path) {
        Ok(d) => d,
        Err(e) => {
            report(&e);
            return ExitCode::from(EX_FAILURE);
        }
    };
    let needed: Vec<String> = declared
        .inputs
        .iter()
        .filter(|t| t.unresolved())
        .map(crate::model::DeclaredTensor::shape_hint)
        .collect();
    let dims = |t: &crate::model::DeclaredTensor| {
        t.dims.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    let dtype = |t: &crate::model::DeclaredTensor| {
        t.dtype.map_or_else(|| format!("onnx type {}", t.elem_type), |d| d.name().to_string())
    };
    if json {
        let spec = |t: &crate::model::DeclaredTensor| serde_json::json!({"name": t.name, "dtype": dtype(t), "declared": dims(t)});
        let v = serde_json::json!({
            "path": path, "opset": declared.opset, "onnx_nodes": declared.nodes,
            "inputs": declared.inputs.iter().map(spec).collect::<Vec<_>>(),
            "outputs": declared.outputs.iter().map(spec).collect::<Vec<_>>(),
            "needs_input_shape": needed,
        });
        println!("{v}");
    } else {
        println!("model     {}", path.display());
        println!(
            "declared  {} ONNX nodes, opset {}",
            declared.nodes,
            declared.opset.map_or_else(|| "?".into(), |o| o.to_string())
        );
        println!("inputs (as declared):");
        for t in &declared.inputs {
            println!("  {:<20} {:<4} [{}]", t.name, dtype(t), dims(t).join(", "));
        }
        println!("outputs (as declared):");
        for t in &declared.outputs {
            println!("  {:<20} {:<4} [{}]", t.name, dtype(t), dims(t).join(", "));
        }
    }
    let args: Vec<String> = needed.iter().map(|n| format!("--input-shape {n}")).collect();
    eprintln!(
        "error: cannot build a plan for {}: input(s) {} have symbolic dimensions besides the \
         batch axis",
        path.display(),
        declared
            .inputs
            .iter()
            .filter(|t| t.unresolved())
            .map(|t| format!("`{}`", t.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "hint: pass {} (the capitalized names are the sizes to choose, e.g. 640 for a YOLO \
         input); the daemon takes the same shape from pipelines.<name>.input_shapes",
        args.join(" ")
    );
    ExitCode::from(EX_USAGE)
}

fn inspect(
    path: &Path,
    shapes: &[String],
    runs: usize,
    json: bool,
    levers: Levers,
    profile_top: Option<usize>,
) -> ExitCode {
    let mut input_shapes = BTreeMap::new();
    for s in shapes {
        match parse_shape_arg(s) {
            Ok((n, d)) => {
                input_shapes.insert(n, d);
            }
            Err(e) => {
                eprintln!("error: --input-shape {e}");
                return ExitCode::from(EX_USAGE);
            }
        }
    }
    let mut opts = LoadOptions {
        input_shapes,
        threads: levers.threads,
        half: levers.half,
        cuda: levers.cuda,
        cache_dir: levers.cache.clone(),
        ..LoadOptions::default()
    };
    if levers.batch > 1 {
        // Find the inputs' declared shapes first, then ask for the batch on the leading axis.
        let probe = match Model::load(path, &opts) {
            Ok(m) => m,
            Err(crate::model::ModelError::SymbolicInput { .. }) => {
                return inspect_declared(path, json);
            }
            Err(e) => {
                report(&e);
                return ExitCode::from(EX_FAILURE);
            }
        };
        for i in &probe.inputs {
            let mut shape = i.shape.clone();
            if let Some(first) = shape.first_mut() {
                *first = levers.batch;
            }
            opts.input_shapes.entry(i.name.clone()).or_insert(shape);
        }
    }
    let model = match Model::load(path, &opts) {
        Ok(m) => m,
        Err(crate::model::ModelError::SymbolicInput { .. }) => {
            return inspect_declared(path, json);
        }
        Err(e) => {
            report(&e);
            return ExitCode::from(EX_FAILURE);
        }
    };
    // The daemon's start-up warm-up (a fresh session, one run on zeros), timed as the last
    // stage of a cold start.
    let warm_up = match model.warm_up() {
        Ok(d) => d,
        Err(e) => {
            report(&e);
            return ExitCode::from(EX_FAILURE);
        }
    };
    if let Some(dir) = &levers.dump
        && let Err(e) = dump_sample(&model, dir)
    {
        eprintln!("error: --dump {}: {e}", dir.display());
        return ExitCode::from(EX_FAILURE);
    }
    // With --profile, the profiled runs are the timed runs (the node timers add tens of
    // nanoseconds per node), so the inference line and the profile describe the same runs.
    let profile = match profile_top {
        Some(_) if runs > 0 => match model.profile(runs) {
            Ok(p) => Some(p),
            Err(e) => {
                report(&e);
                return ExitCode::from(EX_FAILURE);
            }
        },
        _ => None,
    };
    let timings = match &profile {
        Some(p) => Ok(Some(Timings::of(&p.run_times, levers.batch.max(1)))),
        None => time_runs(&model, runs, levers.batch.max(1)),
    };
    let timings = match timings {
        Ok(t) => t,
        Err(e) => {
            report(&e);
            return ExitCode::from(EX_FAILURE);
        }
    };
    let image = match &levers.bench_image {
        None => None,
        Some(img) => match bench_image(&model, img, runs.max(1)) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: --bench-image {}: {e}", img.display());
                return ExitCode::from(EX_FAILURE);
            }
        },
    };
    if json {
        let spec = |t: &crate::model::TensorSpec| {
            serde_json::json!({
                "name": t.name, "dtype": t.dtype.name(), "shape": t.shape,
                "declared": t.declared.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        };
        let v = serde_json::json!({
            "path": model.path, "sha256": model.sha256, "version": model.version,
            "inputs": model.inputs.iter().map(spec).collect::<Vec<_>>(),
            "outputs": model.outputs.iter().map(spec).collect::<Vec<_>>(),
            "onnx_nodes": model.onnx_nodes, "optimized_nodes": model.optimized_nodes,
            "operators": model.op_histogram,
            "load_us": model.load_time.as_micros() as u64,
            "optimize_us": model.optimize_time.as_micros() as u64,
            "from_cache": model.from_cache,
            "stages": model.stages.to_json(),
            "warm_up_us": warm_up.as_micros() as u64,
            "levers": {"batch": levers.batch, "threads": levers.threads, "f16": levers.half, "backend": model.backend},
            "placement": model.placement.map(|(gpu, cpu)| serde_json::json!({"gpu_nodes": gpu, "cpu_nodes": cpu})),
            "arithmetic": model.arithmetic().to_json(),
            "quantized": quantization_note(&model),
            "inference": timings.as_ref().map(|t| serde_json::json!({
                "per_frame": true,
                "runs": t.runs, "mean_us": t.mean.as_micros() as u64, "p50_us": t.p50.as_micros() as u64,
                "p99_us": t.p99.as_micros() as u64, "min_us": t.min.as_micros() as u64,
            })),
            "image": image.as_ref().map(ImageTimings::json),
            "profile": profile.as_ref().map(|p| p.to_json(profile_top.unwrap_or(10))),
        });
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    println!("model     {}", model.path.display());
    println!("sha256    {}", model.sha256);
    println!("version   {}", model.version);
    println!("inputs:");
    for t in &model.inputs {
        let declared: Vec<String> = t.declared.iter().map(ToString::to_string).collect();
        println!(
            "  {:<20} {:<4} {:?}  (declared [{}])",
            t.name,
            t.dtype,
            t.shape,
            declared.join(", ")
        );
    }
    println!("outputs:");
    for t in &model.outputs {
        println!("  {:<20} {:<4} {:?}", t.name, t.dtype, t.shape);
    }
    let ops: Vec<String> = model.op_histogram.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    println!(
        "operators {} ONNX nodes -> {} optimized: {}",
        model.onnx_nodes,
        model.optimized_nodes,
        ops.join(", ")
    );
    println!(
        "load      {:?}{}",
        model.load_time,
        if model.from_cache { " (from the model cache)" } else { "" }
    );
    println!("optimize  {:?}", model.optimize_time);
    println!(
        "stages    {}, warm-up {warm_up:.1?} (cold start to a warm plan {:.1?})",
        model.stages.text(),
        model.stages.total() + warm_up
    );
    let a = model.arithmetic();
    println!(
        "products  {} matmul/conv nodes in integers, {} in f16, {} in f32",
        a.integer, a.f16, a.f32
    );
    if let Some(note) = quantization_note(&model) {
        println!("note      {note}");
    }
    if let Some((gpu, cpu)) = model.placement {
        println!("backend   {}: {gpu} plan nodes on the GPU, {cpu} on the CPU", model.backend);
    }
    if let Some(t) = timings {
        println!(
            "inference {} runs, batch {}, {} thread(s){}{}: per frame mean {:?}, p50 {:?}, p99 {:?}, min {:?}",
            t.runs,
            levers.batch,
            levers.threads,
            if levers.half { ", f16" } else { "" },
            if levers.cuda { ", cuda" } else { "" },
            t.mean,
            t.p50,
            t.p99,
            t.min
        );
    }
    if let Some(t) = image {
        println!("{}", t.text());
    }
    if let Some(p) = profile {
        print!("{}", p.text(profile_top.unwrap_or(10)));
    }
    ExitCode::SUCCESS
}

/// What `inspect` says about a quantized model's arithmetic (`None` for a float model).
fn quantization_note(model: &Model) -> Option<String> {
    crate::model::quantization_note(&model.op_histogram, model.arithmetic())
}

/// Runs the model once on the sample input and writes that input and the outputs as raw
/// tensors into `dir`.
fn dump_sample(model: &Model, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut s = model.session().map_err(|e| e.to_string())?;
    s.fill_sample();
    for (ix, spec) in model.inputs.iter().enumerate() {
        std::fs::write(
            dir.join(format!("input.{}.bin", spec.name.replace('/', "_"))),
            s.input_mut(ix),
        )
        .map_err(|e| e.to_string())?;
    }
    s.run().map_err(|e| e.to_string())?;
    for (spec, out) in model.outputs.iter().zip(s.outputs()) {
        std::fs::write(
            dir.join(format!("output.{}.bin", spec.name.replace('/', "_"))),
            out.bytes(),
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Per-frame cost of an image frame's CPU work before inference, against the inference.
struct ImageTimings {
    width: usize,
    height: usize,
    channels: usize,
    bytes: usize,
    runs: usize,
    decode: Duration,
    preprocess: Duration,
    inference: Duration,
}

impl ImageTimings {
    fn ratio(&self, d: Duration) -> f64 {
        d.as_secs_f64() / self.inference.as_secs_f64().max(1e-12)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "width": self.width, "height": self.height, "channels": self.channels,
            "bytes": self.bytes, "runs": self.runs,
            "decode_us": self.decode.as_micros() as u64,
            "preprocess_us": self.preprocess.as_micros() as u64,
            "inference_us": self.inference.as_micros() as u64,
            "decode_over_inference": self.ratio(self.decode),
            "preprocess_over_inference": self.ratio(self.preprocess),
            "total_over_inference": self.ratio(self.decode + self.preprocess),
        })
    }

    fn text(&self) -> String {
        format!(
            "image     {}x{}x{} ({} bytes), median of {} runs: decode {:?} ({:.3}x inference), \
             pre-process {:?} ({:.3}x), both {:.3}x of inference {:?}",
            self.width,
            self.height,
            self.channels,
            self.bytes,
            self.runs,
            self.decode,
            self.ratio(self.decode),
            self.preprocess,
            self.ratio(self.preprocess),
            self.ratio(self.decode + self.preprocess),
            self.inference
        )
    }
}

/// Times decoding `path` and pre-processing it into the model's input tensor, then inference on
/// that tensor: medians of `runs` runs each (the first of each untimed).
fn bench_image(model: &Model, path: &Path, runs: usize) -> Result<ImageTimings, String> {
    use crate::config::image::{Preprocess, Resize, ResizeMode, TensorLayout};
    use crate::pipeline::image::{decode_jpeg, decode_png};
    use crate::pipeline::preprocess::{Plan, PlanScratch};

    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    let spec = model.inputs.first().ok_or("the model has no input")?;
    let s = &spec.shape;
    let nhwc = s.len() == 4 && s[3] == 3 && s[1] != 3;
    let (h, w) = match (s.len(), nhwc) {
        (4, false) => (s[2], s[3]),
        (4, true) => (s[1], s[2]),
        _ => {
            return Err(format!(
                "input `{}` {:?} is not an image ([N, C, H, W] or [N, H, W, C])",
                spec.name, s
            ));
        }
    };
    let cfg = Preprocess {
        resize: Some(Resize { width: w, height: h, mode: ResizeMode::Bilinear }),
        scale: 1.0 / 255.0,
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
        layout: if nhwc { TensorLayout::Nhwc } else { TensorLayout::Nchw },
        ..Preprocess::default()
    };
    let plan = Plan::compile(&cfg, spec)?;
    let png = data.starts_with(b"\x89PNG");
    let budget = cfg.max_decoded;
    let mut pixels = Vec::new();
    let mut scratch = PlanScratch::default();
    let mut session = model.session().map_err(|e| e.to_string())?;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mut dec, mut pre, mut inf) = (Vec::new(), Vec::new(), Vec::new());
    let mut geometry = (0, 0, 0);
    for i in 0..=runs {
        let t = Instant::now();
        let view = if png {
            decode_png(&data, budget, &mut pixels)
        } else {
            decode_jpeg(&data, budget, &mut pixels)
        }
        .map_err(|r| r.detail)?;
        let t_dec = t.elapsed();
        geometry = (view.width, view.height, view.channels);
        let t = Instant::now();
        plan.run(&view, &mut scratch, session.input_mut(0)).map_err(|r| r.detail)?;
        let t_pre = t.elapsed();
        let t = Instant::now();
        session.run().map_err(|e| e.to_string())?;
        let t_inf = t.elapsed();
        if i > 0 {
            dec.push(t_dec);
            pre.push(t_pre);
            inf.push(t_inf);
        }
    }
    Ok(ImageTimings {
        width: geometry.0,
        height: geometry.1,
        channels: geometry.2,
        bytes: data.len(),
        runs,
        decode: median(dec),
        preprocess: median(pre),
        inference: median(inf),
    })
}

struct Timings {
    runs: usize,
    mean: Duration,
    p50: Duration,
    p99: Duration,
    min: Duration,
}

impl Timings {
    /// Statistics of whole-run times; with a batch, per frame (run time / batch). Exact order
    /// statistics (not histogram buckets): benchmark ratios are computed from them.
    fn of(run_times: &[Duration], batch: usize) -> Timings {
        let mut v: Vec<Duration> = run_times.iter().map(|t| *t / batch as u32).collect();
        v.sort_unstable();
        let n = v.len();
        let at = |q: f64| v.get(((q * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1).copied();
        Timings {
            runs: n,
            mean: v.iter().sum::<Duration>() / n.max(1) as u32,
            p50: if n == 0 { Duration::ZERO } else { v[(n - 1) / 2] },
            p99: at(0.99).unwrap_or_default(),
            min: v.first().copied().unwrap_or_default(),
        }
    }
}

/// Times `runs` inferences; with a batch, times are per frame (run time / batch).
fn time_runs(
    model: &Model,
    runs: usize,
    batch: usize,
) -> Result<Option<Timings>, crate::model::ModelError> {
    if runs == 0 {
        return Ok(None);
    }
    let mut s = model.session()?;
    s.run()?; // warm-up, not timed
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        s.run()?;
        times.push(t.elapsed());
    }
    Ok(Some(Timings::of(&times, batch)))
}

/// Parses a `--duration`-style argument.
pub fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    units::parse_duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_are_exact_order_statistics_per_frame() {
        let ms = |v: u64| Duration::from_millis(v);
        let t = Timings::of(&[ms(40), ms(10), ms(30), ms(20), ms(1000)], 2);
        assert_eq!((t.runs, t.min, t.p50, t.p99), (5, ms(5), ms(15), ms(500)));
        assert_eq!(t.mean, ms(110));
        let one = Timings::of(&[ms(7)], 1);
        assert_eq!((one.p50, one.p99, one.min, one.mean), (ms(7), ms(7), ms(7), ms(7)));
    }

    #[test]
    fn shape_args() {
        assert_eq!(parse_shape_arg("x=1,3,128"), Ok(("x".into(), vec![1, 3, 128])));
        assert!(parse_shape_arg("x").is_err());
        assert!(parse_shape_arg("x=1,0").is_err());
        assert!(parse_shape_arg("x=a").is_err());
    }

    #[test]
    fn cli_parses() {
        let c = Cli::try_parse_from(["edgeinfer", "validate", "--config", "/x.toml", "--models"])
            .expect("parse");
        assert!(matches!(c.command, Command::Validate { models: true, .. }));
        assert!(Cli::try_parse_from(["edgeinfer", "frobnicate"]).is_err());
        let c = Cli::try_parse_from(["edgeinfer", "health", "--wait", "--timeout", "90s"])
            .expect("parse");
        assert!(matches!(
            c.command,
            Command::Health { wait: true, timeout, window, .. }
                if timeout == Duration::from_secs(90) && window == Duration::from_secs(30)
        ));
        assert!(Cli::try_parse_from(["edgeinfer", "health", "--timeout", "5"]).is_err());
    }
}
