//! Lifecycle: the ordered start-up, the serving loop, and the one shutdown path.
//!
//! `app` wires everything else together; nothing depends on it. Start-up is one function
//! ([`start`]) with a step per comment and an error variant per step, so a failure names where it
//! happened. Serving and shutdown live in [`serve`]: one task owns the MQTT event loop, routes
//! frames to pipelines, publishes health and metrics, and drains on SIGTERM/SIGINT.

mod serve;
mod status;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Config, PostProcess, Problem};
use crate::model::{LoadOptions, Model, ModelError};
use crate::mqtt::{self, MqttError, MqttPublisher};
use crate::pipeline::{Pipeline, Publisher, WorkerHandle};

/// What can stop the daemon from starting or running, by start-up step.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
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
    #[error("start-up step `warm up` failed for pipeline {pipeline}")]
    WarmUp {
        pipeline: String,
        #[source]
        source: ModelError,
    },
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
}

/// Everything that runs: the validated config and the pipelines with their loaded models.
pub struct App {
    pub config: Config,
    pub pipelines: Vec<Arc<Pipeline>>,
    pub transport: TransportStats,
    started: Instant,
    started_us: u64,
}

/// Runs the daemon until a signal (or `stop`) ends it. Blocks the calling thread.
pub fn run(config: Config, stop: StopHandle) -> Result<(), AppError> {
    let app = start(config)?;
    app.serve(stop)
}

/// The ordered start-up. Each step either completes or fails with its own error variant; the
/// daemon only reports itself online (and, under systemd, ready) after all of them.
pub fn start(config: Config) -> Result<App, AppError> {
    let started = Instant::now();
    // 1. Validate config: done by the caller (`Config::load`), which refuses invalid files.

    // 2. Open files: every model, labels file, credential and certificate must be readable now,
    //    so a typo fails here rather than at the first frame or the first reconnect.
    let problems = config.check_files();
    if !problems.is_empty() {
        return Err(AppError::Files { problems });
    }

    // 3. Load, optimize and warm up every model (one inference on zeros), off any hot path.
    let mut pipelines = Vec::with_capacity(config.pipelines.len());
    for pc in &config.pipelines {
        let opts = LoadOptions {
            name: pc.name.clone(),
            version: pc.model_version.clone(),
            input_shapes: pc.input_shapes.clone(),
        };
        let model = Model::load(&pc.model, &opts)
            .map_err(|source| AppError::Model { pipeline: pc.name.clone(), source })?;
        let warm = model
            .warm_up()
            .map_err(|source| AppError::WarmUp { pipeline: pc.name.clone(), source })?;
        log::info!(
            "pipeline={} model={} version={} sha256={} loaded in {:?}, optimized in {:?}, warm-up run {:?}",
            pc.name,
            model.path.display(),
            model.version,
            &model.sha256[..12],
            model.load_time,
            model.optimize_time,
            warm
        );
        let labels = match &pc.postprocess {
            PostProcess::Classification(c) => match &c.labels {
                Some(path) => std::fs::read_to_string(path)
                    .map(|t| crate::pipeline::output::read_labels(&t))
                    .map_err(|source| AppError::Labels {
                        pipeline: pc.name.clone(),
                        path: path.clone(),
                        source,
                    })?,
                None => Vec::new(),
            },
            PostProcess::Raw => Vec::new(),
        };
        let p = Pipeline::new(pc.clone(), model, labels, &config.device_id, &config.errors)
            .map_err(|message| AppError::Mismatch { pipeline: pc.name.clone(), message })?;
        pipelines.push(Arc::new(p));
    }

    // 4-6. cgroup placement, CPU affinity of the I/O threads and dropping capabilities belong
    //      here (see the system-integration issue); workers pin themselves when they start.

    Ok(App {
        config,
        pipelines,
        transport: TransportStats::default(),
        started,
        started_us: crate::pipeline::output::unix_us(SystemTime::now()),
    })
}

impl App {
    /// Connects to the broker and serves until stopped. Returns after a clean shutdown.
    pub fn serve(self, stop: StopHandle) -> Result<(), AppError> {
        // 7. Runtime for I/O only (inference never runs on it): one named worker thread.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("edgeinfer-io")
            .enable_all()
            .build()
            .map_err(AppError::Runtime)?;

        // 8. MQTT client with the Last Will that marks us offline if the connection dies.
        let will = (
            self.config.health.topic.render(&self.config.device_id, ""),
            status::offline(&self, "connection_lost"),
        );
        let opts = mqtt::options(&self.config.broker, will)?;
        // Room for every queued frame's result plus health/metrics/error messages, so workers
        // rarely wait on the channel.
        let cap =
            self.pipelines.iter().map(|p| p.cfg.queue.capacity + p.cfg.workers).sum::<usize>() + 64;
        let (client, mut eventloop) = mqtt::client(opts, cap.max(128));
        eventloop
            .network_options
            .set_connection_timeout(self.config.broker.connect_timeout.as_secs().max(1));
        let publisher: Arc<dyn Publisher> =
            Arc::new(MqttPublisher::new(client.clone(), Duration::from_secs(5)));

        // 9. Inference workers (each pins itself and builds its own session).
        let mut workers: Vec<WorkerHandle> = Vec::new();
        for p in &self.pipelines {
            let w = p
                .start_workers(Arc::clone(&publisher))
                .map_err(|message| AppError::Workers { pipeline: p.name().to_string(), message })?;
            workers.extend(w);
        }
        log::info!(
            "started in {:?}: {} pipeline(s), {} worker(s); connecting to {}:{}",
            self.started.elapsed(),
            self.pipelines.len(),
            workers.len(),
            self.config.broker.host,
            self.config.broker.port
        );

        // 10. Connect, subscribe, serve; drain and disconnect on the first signal.
        let result = rt.block_on(serve::serve(&self, client, eventloop, &workers, publisher, stop));
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
