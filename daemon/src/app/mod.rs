//! Lifecycle: the ordered start-up, the serving loop, and the one shutdown path.
//!
//! `app` wires everything else together; nothing depends on it. Start-up is one function
//! ([`start`]) with a step per comment and an error variant per step, so a failure names where it
//! happened. Serving and shutdown live in [`serve`]: one task owns the MQTT event loop, routes
//! frames to pipelines, publishes health and metrics, feeds the systemd watchdog, and drains on
//! SIGTERM/SIGINT.

mod control;
mod delivery;
pub mod engine;
mod exposition;
mod link;
pub mod metrics_http;
mod reload;
mod routing;
mod serve;
mod serving;
mod status;
pub mod system;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Config, Problem};
use crate::model::{LoadOptions, Model, ModelError};
use crate::mqtt::{self, MqttError, MqttPublisher};
use crate::pipeline::{Pipeline, WorkerHandle};
use crate::publish::Publisher;
use crate::spool::SpoolingPublisher;
use crate::sys::cgroup::{self, CgroupError};
use crate::sys::notify::Notifier;
use crate::sys::privs::PrivError;
use system::{Placement, SystemState};

/// What can stop the daemon from starting or running, by start-up step.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(
        "start-up step `check user` failed: refusing to run as root; hint: run it as an \
         unprivileged user (the unit's User=edgeinfer), or set system.allow_root = true"
    )]
    Root,
    #[error("start-up step `open files` failed:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Files { problems: Vec<Problem> },
    #[error("start-up step `open files` failed: cannot read labels {path} for pipeline {pipeline}")]
    Labels {
        pipeline: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("start-up step `load models` failed for pipeline {pipeline}")]
    Model {
        pipeline: String,
        #[source]
        source: ModelError,
    },
    #[error("start-up step `load models` failed for pipeline {pipeline}: {message}")]
    Mismatch { pipeline: String, message: String },
    #[error(
        "start-up step `load models` failed for pipeline {pipeline}: backend = \"cuda\", but {reason}; \
         hint: set backend = \"auto\" to fall back to the CPU, or \"cpu\""
    )]
    Backend { pipeline: String, reason: String },
    #[error("start-up step `warm up` failed for pipeline {pipeline}")]
    WarmUp {
        pipeline: String,
        #[source]
        source: ModelError,
    },
    #[error(
        "start-up step `cgroup placement and limits` failed; hint: check the unit's Delegate=yes \
         and that nothing else manages this cgroup, or set system.cgroup.mode = \"off\""
    )]
    Cgroup(#[source] CgroupError),
    #[error("start-up step `drop capabilities` failed")]
    Privileges(#[source] PrivError),
    #[error("start-up step `start runtime` failed")]
    Runtime(#[source] std::io::Error),
    #[error("start-up step `connect MQTT` failed")]
    Mqtt(#[from] MqttError),
    #[error("start-up step `start workers` failed for pipeline {pipeline}: {message}")]
    Workers { pipeline: String, message: String },
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("stopped by a second signal before queued frames were served")]
    Aborted,
}

/// Asks a running daemon to stop, like SIGTERM does (used by `edgeinfer demo` and tests that
/// run the daemon in-process). A second call stops without draining.
#[derive(Clone)]
pub struct StopHandle {
    tx: Arc<tokio::sync::watch::Sender<u32>>,
}

impl Default for StopHandle {
    fn default() -> Self {
        Self { tx: Arc::new(tokio::sync::watch::channel(0).0) }
    }
}

impl StopHandle {
    pub fn stop(&self) {
        self.tx.send_modify(|n| *n += 1);
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u32> {
        self.tx.subscribe()
    }
}

/// Connection-level counters (not tied to a pipeline), reported in health.
#[derive(Default)]
pub struct TransportStats {
    /// Successful connections after the first one.
    pub reconnects: AtomicU64,
    /// Connection attempts or connections that failed.
    pub connection_errors: AtomicU64,
    /// Packets larger than `broker.max_packet_size` (unreadable; the connection was reset).
    pub oversized_packets: AtomicU64,
    /// Messages that matched no pipeline's filter.
    pub unrouted: AtomicU64,
    /// Messages on topics longer than `broker.max_topic_length` (acknowledged, never routed).
    pub long_topics: AtomicU64,
    /// Times the daemon cleared its persistent session to get rid of a frame above
    /// `broker.max_packet_size` that the broker kept redelivering.
    pub session_resets: AtomicU64,
    /// Messages the MQTT client still held when the broker came back without our session
    /// (restarted without persistence, or the session expired), sent again as new messages.
    pub republished: AtomicU64,
}

/// Everything that runs: the validated config, the pipelines with their loaded models, and what
/// the system steps decided.
pub struct App {
    pub config: Config,
    pub pipelines: Vec<Arc<Pipeline>>,
    pub transport: TransportStats,
    pub system: SystemState,
    /// The result spool, once opened (`[spool]`, needs a state directory).
    pub spool: std::sync::OnceLock<Arc<crate::spool::Spool>>,
    placements: Vec<Vec<Placement>>,
    started: Instant,
    started_us: u64,
}

/// Opens `<state_dir>/spool` when the spool is enabled; `None` (with a warning) without a state
/// directory or when it cannot be created.
fn open_spool(config: &Config) -> Option<Arc<crate::spool::Spool>> {
    if !config.spool.enabled {
        return None;
    }
    let Some(dir) = config.system.state_dir() else {
        log::warn!(
            "no state directory (system.state_dir or $STATE_DIRECTORY): results produced while the \
             broker is unreachable wait in memory only and are lost on restart"
        );
        return None;
    };
    let dir = dir.join("spool");
    match crate::spool::Spool::open(&dir, config.spool.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            log::error!(
                "cannot open the result spool {} ({e}); results wait in memory only",
                dir.display()
            );
            None
        }
    }
}

/// Runs the daemon until a signal (or `stop`) ends it. Blocks the calling thread.
pub fn run(config: Config, stop: StopHandle) -> Result<(), AppError> {
    let app = start(config)?;
    app.serve(stop)
}

/// One pipeline's loaded, warmed-up model, its labels, and its batched plans (ascending batch
/// size).
type LoadedPipeline = (Model, Vec<String>, Vec<Model>);
/// Per pipeline, in config order.
type Loaded = Vec<LoadedPipeline>;

/// Opens every file and loads, optimizes and warms up every model. No side effects on the
/// system: `edgeinfer validate --models` runs this too.
fn load(config: &Config) -> Result<Loaded, AppError> {
    // Every model, labels file, credential and certificate must be readable now, so a typo
    // fails here rather than at the first frame or the first reconnect.
    let problems = config.check_files();
    if !problems.is_empty() {
        return Err(AppError::Files { problems });
    }
    let cache = config.system.cache_dir();
    let cache = cache.as_deref();
    // Pipelines load in parallel, one thread per model file (loading is CPU-bound: parsing,
    // decluttering, optimizing, warm-up; nothing else runs yet). Pipelines sharing a file load
    // one after the other in the same thread, so they never write the same cache entry at once.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, pc) in config.pipelines.iter().enumerate() {
        match groups.iter_mut().find(|g| config.pipelines[g[0]].model == pc.model) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    if groups.len() <= 1 {
        return config.pipelines.iter().map(|pc| load_pipeline(pc, cache)).collect();
    }
    let mut results: Vec<Option<Result<LoadedPipeline, AppError>>> =
        (0..config.pipelines.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(groups.len());
        for group in &groups {
            let work = move || -> Vec<(usize, Result<LoadedPipeline, AppError>)> {
                group.iter().map(|&i| (i, load_pipeline(&config.pipelines[i], cache))).collect()
            };
            let spawned = std::thread::Builder::new()
                .name(format!("ei-load-{}", group[0]))
                .spawn_scoped(scope, work);
            match spawned {
                Ok(h) => handles.push(h),
                // No thread to be had: load this group here instead.
                Err(_) => {
                    for (i, r) in work() {
                        results[i] = Some(r);
                    }
                }
            }
        }
        for h in handles {
            // A panic in a load thread would abort the process (panic = "abort" in release);
            // in a debug build it leaves the slots empty and is reported below.
            if let Ok(done) = h.join() {
                for (i, r) in done {
                    results[i] = Some(r);
                }
            }
        }
    });
    // Config order, so the first failing pipeline is the one reported.
    results
        .into_iter()
        .zip(&config.pipelines)
        .map(|(r, pc)| {
            r.unwrap_or_else(|| {
                Err(AppError::Mismatch {
                    pipeline: pc.name.clone(),
                    message: "its loading thread stopped without a result".into(),
                })
            })
        })
        .collect()
}

/// Loads, optimizes and warms up one pipeline's model, its labels and its batched plans (at
/// start-up, and for a hot swap candidate).
fn load_pipeline(
    pc: &crate::config::PipelineConfig,
    cache: Option<&std::path::Path>,
) -> Result<LoadedPipeline, AppError> {
    {
        let opts = LoadOptions {
            name: pc.name.clone(),
            version: pc.model_version.clone(),
            input_shapes: pc.input_shapes.clone(),
            cache_dir: cache.map(std::path::Path::to_path_buf),
            ..LoadOptions::default()
        };
        // Threads, precision and backend as the pipeline's engine keys ask (app::engine).
        let model = engine::load(pc, opts)?;
        let warm = model
            .warm_up()
            .map_err(|source| AppError::WarmUp { pipeline: pc.name.clone(), source })?;
        log::info!(
            pipeline = pc.name.as_str(), model = model.name.as_str(), model_version = model.version.as_str();
            "model {} sha256={} loaded in {:?}{}, optimized in {:?}, warm-up run {:?} ({}; {} {}, {} thread(s))",
            model.path.display(),
            &model.sha256[..12],
            model.load_time,
            if model.from_cache { " (from the model cache)" } else { "" },
            model.optimize_time,
            warm,
            model.stages.text(),
            model.backend,
            model.engine.precision.running,
            model.threads
        );
        let labels = match pc.postprocess.labels() {
            Some(path) => std::fs::read_to_string(path)
                .map(|t| crate::pipeline::output::read_labels(&t))
                .map_err(|source| AppError::Labels {
                    pipeline: pc.name.clone(),
                    path: path.to_path_buf(),
                    source,
                })?,
            None => Vec::new(),
        };
        let batched = batch_models(pc, &model, cache)?;
        Ok((model, labels, batched))
    }
}

/// Batch sizes a worker can run for `max_batch`: powers of two below it, and itself.
pub fn batch_sizes(max_batch: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..).map(|k| 1usize << k).take_while(|b| *b < max_batch).collect();
    if max_batch > 1 {
        v.push(max_batch);
    }
    v
}

/// Loads and warms up one plan per batch size for a pipeline with `max_batch > 1`. The model's
/// every input must have a symbolic leading axis (the file decides whether batching is
/// possible), not fixed by `input_shapes`, and every output must carry the batch axis too.
fn batch_models(
    pc: &crate::config::PipelineConfig,
    single: &Model,
    cache: Option<&std::path::Path>,
) -> Result<Vec<Model>, AppError> {
    let mismatch = |message: String| AppError::Mismatch { pipeline: pc.name.clone(), message };
    let sizes = batch_sizes(pc.max_batch);
    if sizes.is_empty() {
        return Ok(Vec::new());
    }
    for i in &single.inputs {
        let symbolic = matches!(i.declared.first(), Some(crate::model::Dim::Symbol(_)));
        if !symbolic || pc.input_shapes.contains_key(&i.name) {
            return Err(mismatch(format!(
                "max_batch = {} needs a symbolic leading (batch) axis on every input, but input `{}` has shape {}{};                  hint: export the model with a dynamic batch axis, or set max_batch = 1",
                pc.max_batch,
                i.name,
                i.shape_string(),
                if pc.input_shapes.contains_key(&i.name) { " fixed by input_shapes" } else { "" }
            )));
        }
    }
    let t = std::time::Instant::now();
    let mut out = Vec::with_capacity(sizes.len());
    for b in sizes {
        let input_shapes = single
            .inputs
            .iter()
            .map(|i| {
                let mut shape = i.shape.clone();
                if let Some(first) = shape.first_mut() {
                    *first = b;
                }
                (i.name.clone(), shape)
            })
            .collect();
        // The engine the single-frame plan ended up with (no second decision per batch size).
        let opts = LoadOptions {
            name: single.name.clone(),
            version: Some(single.version.clone()),
            input_shapes,
            cache_dir: cache.map(std::path::Path::to_path_buf),
            threads: single.threads,
            half: single.half,
            cuda: single.backend == "cuda",
        };
        let mut m = Model::load(&single.path, &opts)
            .map_err(|source| AppError::Model { pipeline: pc.name.clone(), source })?;
        m.engine = single.engine.clone();
        if let Some(o) = m.outputs.iter().find(|o| o.shape.first() != Some(&b)) {
            return Err(mismatch(format!(
                "max_batch = {}: output `{}` has shape {} at batch {b}, without the batch axis first;                  hint: set max_batch = 1 for this model",
                pc.max_batch,
                o.name,
                o.shape_string()
            )));
        }
        m.warm_up().map_err(|source| AppError::WarmUp { pipeline: pc.name.clone(), source })?;
        out.push(m);
    }
    log::info!(
        pipeline = pc.name.as_str();
        "batched plans for {:?} frames built and warmed up in {:?}",
        out.iter().map(|m| m.inputs.first().and_then(|i| i.shape.first()).copied().unwrap_or(0)).collect::<Vec<_>>(),
        t.elapsed()
    );
    Ok(out)
}

fn build_pipelines(config: &Config, loaded: Loaded) -> Result<Vec<Arc<Pipeline>>, AppError> {
    config
        .pipelines
        .iter()
        .zip(loaded)
        .map(|(pc, (model, labels, batched))| {
            Pipeline::new(
                pc.clone(),
                model,
                labels,
                &config.device_id,
                &config.errors,
                config.metrics.max_clock_skew,
            )
            .map(|p| Arc::new(p.with_batch_models(batched)))
            .map_err(|message| AppError::Mismatch { pipeline: pc.name.clone(), message })
        })
        .collect()
}

/// Everything `start` checks that has no side effects: files, models, warm-up, and whether
/// each model fits its pipeline (for `edgeinfer validate --models`).
pub fn check(config: &Config) -> Result<(), AppError> {
    build_pipelines(config, load(config)?).map(|_| ())
}

/// The ordered start-up. Each step either completes or fails with its own error variant; the
/// daemon only reports itself ready after all of them (and the first connection attempt).
pub fn start(mut config: Config) -> Result<App, AppError> {
    let started = Instant::now();
    // 1. Validate config: done by the caller (`Config::load`), which refuses invalid files.

    crate::logging::set_device(&config.device_id);
    #[cfg(feature = "fault-hooks")]
    log::warn!("test-only fault hooks are compiled in: never ship this build");

    // 2. Check user: an appliance daemon runs as its own user, not root.
    system::check_user(&config)?;

    // 3. Open files, then load, optimize and warm up every model (one inference on zeros).
    let loaded = load(&config)?;

    // 4. cgroup placement and limits: move into our delegated subtree and write limits, or
    //    log once why not. Queue capacities are then fitted to the memory budget.
    let mut sys = SystemState::default();
    system::cpu_sets(&config, &mut sys);
    system::cgroup(&config, &mut sys)?;
    // Bytes a queued frame holds: its input tensors plus topic strings and bookkeeping. Image
    // frames are queued as they came (decoded by the workers): a raw image's exact size, or
    // for jpeg/png at most max_payload.
    let frame_bytes: Vec<usize> = loaded
        .iter()
        .zip(&config.pipelines)
        .map(|((m, _, _), p)| {
            let tensor = m.inputs.iter().map(|i| i.byte_len()).sum::<usize>();
            let queued = match &p.image {
                None => tensor,
                Some(img) => match img.raw {
                    Some(r) => r.width * r.height * r.channels * r.dtype.size(),
                    None => usize::try_from(p.max_payload).unwrap_or(usize::MAX),
                },
            };
            queued + 512
        })
        .collect();
    system::fit_queues(&mut config, &frame_bytes, &sys);
    let pipelines = build_pipelines(&config, loaded)?;
    let placements = system::placements(&config, &sys);

    // 5. CPU affinity: this thread (and every thread it creates from now on) on the I/O CPUs;
    //    each worker moves itself to its inference CPU when it starts.
    system::pin_io(&sys);

    // 6. Drop capabilities and set no_new_privs, on the main thread before any other thread
    //    exists (capabilities are per thread and inherited).
    system::drop_privileges(&config, &mut sys)?;

    Ok(App {
        config,
        pipelines,
        transport: TransportStats::default(),
        system: sys,
        spool: std::sync::OnceLock::new(),
        placements,
        started,
        started_us: crate::pipeline::output::unix_us(SystemTime::now()),
    })
}

#[cfg(test)]
impl App {
    /// An App for handler tests: models loaded and pipelines built as `start` does, without
    /// the process-wide steps (user check, cgroup, CPU pinning, privileges).
    pub(super) fn for_tests(config: Config) -> Arc<App> {
        let loaded = load(&config).expect("models load");
        let pipelines = build_pipelines(&config, loaded).expect("pipelines");
        Arc::new(App {
            config,
            pipelines,
            transport: TransportStats::default(),
            system: SystemState::default(),
            spool: std::sync::OnceLock::new(),
            placements: Vec::new(),
            started: Instant::now(),
            started_us: 0,
        })
    }
}

impl App {
    /// Connects to the broker and serves until stopped. Returns after a clean shutdown.
    pub fn serve(self, stop: StopHandle) -> Result<(), AppError> {
        // Shared with the metrics endpoint's task, which renders from it on every scrape.
        let app = Arc::new(self);
        let notifier = Notifier::from_env().unwrap_or_else(|e| {
            log::warn!("NOTIFY_SOCKET is set but unusable ({e}); not notifying systemd");
            Notifier::disabled()
        });
        // 7. Runtime for I/O only (inference never runs on it).
        let rt = io_runtime(&app)?;

        // 8. Metrics endpoint (optional).
        let metrics_stop = start_metrics_endpoint(&app, &rt);

        // 9. MQTT client with the Last Will that marks us offline if the connection dies.
        let will = (
            app.config.health.topic.render(&app.config.device_id, ""),
            status::offline(&app, "connection_lost"),
        );
        let opts = mqtt::options(&app.config.broker, will)?;
        // Room for every queued frame's result plus health/metrics/error messages, so workers
        // rarely wait on the channel.
        let cap =
            app.pipelines.iter().map(|p| p.queue.capacity() + p.cfg.workers).sum::<usize>() + 64;
        let (client, mut eventloop) = mqtt::client(opts, cap.max(128));
        eventloop
            .network_options
            .set_connection_timeout(app.config.broker.connect_timeout.as_secs().max(1));
        // Results are small and latency is the product: without TCP_NODELAY, Nagle's algorithm
        // and the broker's delayed ACKs hold a result back for up to ~40 ms.
        eventloop.network_options.set_tcp_nodelay(true);
        let direct: Arc<dyn Publisher> =
            Arc::new(MqttPublisher::new(client.clone(), Duration::from_secs(5)));
        // Results produced while the broker is unreachable go to the on-disk spool.
        let (publisher, spool_thread) = spooling(&app, direct);

        // 10. Inference workers: each pins itself, sets its scheduling class, joins the
        //    inference cgroup leaf and builds its own session.
        let mut workers: Vec<WorkerHandle> = Vec::new();
        for (p, placement) in app.pipelines.iter().zip(&app.placements) {
            let w = p
                .start_workers(Arc::clone(&publisher), placement)
                .map_err(|message| AppError::Workers { pipeline: p.name().to_string(), message })?;
            workers.extend(w);
        }
        log::info!(
            "started in {:?}: {} pipeline(s), {} worker(s) on CPUs {} (I/O on {}); connecting to {}:{}",
            app.started.elapsed(),
            app.pipelines.len(),
            workers.len(),
            app.system.inference_cpus,
            app.system.io_cpus,
            app.config.broker.host,
            app.config.broker.port
        );

        // 11. Connect, subscribe, report ready, serve; drain and disconnect on the first signal.
        let result = rt
            .block_on(serve::serve(&app, client, eventloop, &workers, publisher, stop, &notifier));
        let _ = metrics_stop.send(true);
        if let (Some(spool), Some(t)) = (app.spool.get(), spool_thread) {
            spool.stop();
            let _ = t.join();
        }
        // Workers exit once their queue is closed and empty (serve waits for that); after an
        // expired grace period or a second signal one may still be mid-inference, and the
        // process exits without it.
        for w in workers {
            if w.thread.is_finished() {
                let _ = w.thread.join();
            } else {
                log::warn!("worker {} still busy at exit; abandoning it", w.name);
            }
        }
        rt.shutdown_timeout(Duration::from_millis(100));
        result
    }
}

/// The runtime for I/O only (inference never runs on it): one named thread, inheriting the I/O
/// affinity, moved into the `io` cgroup leaf with the main thread.
fn io_runtime(app: &App) -> Result<tokio::runtime::Runtime, AppError> {
    let io_leaf = app.system.layout.as_ref().map(|l| l.io.clone());
    if let Some(leaf) = &io_leaf
        && let Err(e) = cgroup::move_thread(leaf, crate::sys::gettid())
    {
        log::warn!("cannot move the main thread into {}: {e}", leaf.display());
    }
    let leaf = io_leaf;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("edgeinfer-io")
        .on_thread_start(move || {
            if let Some(leaf) = &leaf
                && let Err(e) = cgroup::move_thread(leaf, crate::sys::gettid())
            {
                log::warn!("cannot move an I/O thread into {}: {e}", leaf.display());
            }
        })
        .enable_all()
        .build()
        .map_err(AppError::Runtime)
}

/// The Prometheus endpoint on `metrics.listen`, if configured: text on GET /metrics. A port that
/// cannot be bound is logged and the daemon serves without it (inference matters more than a
/// scrape target). Sending `true` on the returned channel stops it.
fn start_metrics_endpoint(
    app: &Arc<App>,
    rt: &tokio::runtime::Runtime,
) -> tokio::sync::watch::Sender<bool> {
    let (metrics_stop, metrics_stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = app.config.metrics.listen {
        if let Some(warning) = metrics_http::check_bind_address(&addr) {
            log::warn!("{warning}");
        }
        match rt.block_on(tokio::net::TcpListener::bind(addr)) {
            Ok(listener) => {
                log::info!("Prometheus metrics on http://{addr}/metrics");
                let a = Arc::clone(app);
                let render: metrics_http::Render = Arc::new(move || exposition::prometheus(&a));
                rt.spawn(metrics_http::serve(listener, render, metrics_stop_rx));
            }
            Err(e) => log::error!(
                "cannot listen on metrics.listen = {addr}: {e}; serving without the metrics endpoint \
                 (hint: pick a free port, or remove the key)"
            ),
        }
    }
    metrics_stop
}

/// Puts the on-disk spool (`[spool]`) in front of the direct publisher, with its thread.
fn spooling(
    app: &App,
    direct: Arc<dyn Publisher>,
) -> (Arc<dyn Publisher>, Option<std::thread::JoinHandle<()>>) {
    match open_spool(&app.config) {
        Some(spool) => match spool.start(Arc::clone(&direct)) {
            Ok(t) => {
                let _ = app.spool.set(Arc::clone(&spool));
                (Arc::new(SpoolingPublisher::new(direct, spool)), Some(t))
            }
            Err(e) => {
                log::error!("cannot start the spool thread ({e}); results wait in memory only");
                (direct, None)
            }
        },
        None => (direct, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(case: &str) -> String {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models")
            .join(case)
            .join("model.onnx")
            .display()
            .to_string()
    }

    fn config(pipelines: &[(&str, &str)]) -> Config {
        let text: String = pipelines
            .iter()
            .map(|(name, case)| {
                format!("[pipelines.{name}]\nmodel = {:?}\ninput = \"{name}/+\"\n", fixture(case))
            })
            .collect();
        Config::parse_str(&text, "t.toml", None).expect("config")
    }

    #[test]
    fn pipelines_load_in_parallel_and_come_back_in_config_order() {
        let cfg = config(&[
            ("a", "sensor_cnn"),
            ("b", "digits"),
            ("c", "sensor_cnn"),
            ("d", "audio_cnn"),
        ]);
        let loaded = load(&cfg).expect("load");
        let inputs: Vec<&str> = loaded.iter().map(|(m, _, _)| m.inputs[0].name.as_str()).collect();
        assert_eq!(inputs, ["accel", "pixels", "accel", "audio"]);
        assert_eq!(
            loaded.iter().map(|(m, _, _)| m.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        // The first failing pipeline in config order is the one reported.
        let cfg = config(&[("ok", "digits"), ("bad", "unsupported_op"), ("also_ok", "audio_cnn")]);
        match load(&cfg) {
            Err(AppError::Model { pipeline, .. }) => assert_eq!(pipeline, "bad"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("an unsupported operator must fail the load"),
        }
    }

    /// Start-up with two camera-class pipelines, sequential against parallel loading, side by
    /// side in one run (medians of 5). Run in release:
    /// `cargo test --release -p edgeinfer --lib parallel_load_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn parallel_load_cost() {
        let cfg = config(&[("m", "mobilenet"), ("d", "detector_v8")]);
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let (mut seq, mut par) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            for pc in &cfg.pipelines {
                load_pipeline(pc, None).expect("load");
            }
            seq.push(t.elapsed());
            let t = Instant::now();
            load(&cfg).expect("load");
            par.push(t.elapsed());
        }
        let (s, p) = (median(seq), median(par));
        println!(
            "two pipelines (mobilenet + detector_v8), load + optimize + warm-up: sequential {s:?}, \
             parallel {p:?}, parallel / sequential = {:.2}",
            p.as_secs_f64() / s.as_secs_f64()
        );
    }
}
