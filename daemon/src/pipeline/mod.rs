//! The data path of one pipeline: decode -> bounded queue -> inference workers -> result.
//!
//! A [`Pipeline`] is built at start-up from its config and loaded model. The ingest task calls
//! [`Pipeline::ingest`] for every matching MQTT message (decode, validate, enqueue, count); worker
//! threads ([`worker`]) take frames, run the model and publish results through a [`Publisher`].
//! This module does not own the MQTT connection: publishing goes through the trait, so tests can
//! drive a pipeline without a broker.

pub mod decode;
pub mod dedup;
pub mod detect;
pub mod devices;
pub mod events;
pub mod image;
pub mod output;
pub mod overload;
pub mod preprocess;
pub mod queue;
#[cfg(test)]
pub(crate) mod recorder;
pub mod swap;
pub mod window;
mod worker;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use smallvec::SmallVec;

use crate::config::{ErrorsConfig, PipelineConfig, PostProcess, Qos};
use crate::model::Model;
pub use crate::publish::{PublishError, Publisher};
use crate::reject::Reject;
use crate::telemetry::slo::SloTracker;
use crate::telemetry::{DropReason, PipelineStats};
use crate::topic::Captures;
use decode::{Decoded, Decoder};
use output::{ErrorMsg, unix_us};
use overload::{Controller, Shedder};
use queue::{FrameQueue, Push};
pub use swap::ModelSet;
pub use worker::{Placement, Scratch, WorkerHandle};

/// A validated frame waiting for inference.
#[derive(Debug)]
pub struct Frame {
    /// Daemon-assigned, per pipeline, increasing.
    pub id: u64,
    pub topic: String,
    /// What the input filter's wildcards matched in `topic` (for the output topic template).
    pub captures: Captures,
    pub seq: Option<u64>,
    pub ts: Option<f64>,
    pub received: Instant,
    pub received_us: u64,
    /// How old the frame was on arrival by the device's clock (`ts` within the skew guard).
    pub device_age: Option<Duration>,
    /// When a result stops being useful (pipeline `deadline` or the frame's `deadline_ms`).
    pub deadline: Option<Instant>,
    /// One buffer per model input, in the model's dtype and layout.
    pub inputs: SmallVec<[Bytes; 2]>,
}

/// Per-pipeline rate limit for error messages (a flood of bad frames must not become a flood of
/// error messages). Fixed one-second windows; the excess is counted, not published.
struct ErrorLimiter {
    limit: u32,
    window: AtomicU64,
    count: AtomicU32,
}

impl ErrorLimiter {
    fn allow(&self) -> bool {
        let now = unix_us(SystemTime::now()) / 1_000_000;
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) < self.limit
    }
}

/// One model served on one input stream.
pub struct Pipeline {
    pub cfg: PipelineConfig,
    pub stats: PipelineStats,
    pub queue: FrameQueue<Frame>,
    decoder: Decoder,
    /// The model version workers run now; replaced whole by a hot swap (see [`swap`]).
    active: RwLock<Arc<ModelSet>>,
    /// Bumped by every swap; workers compare it between frames.
    generation: AtomicU64,
    /// Event mode: which results are published, per device (None: all, no threshold state).
    pub events: Option<events::EventGate>,
    /// Swap bookkeeping for health.
    pub swaps: Mutex<swap::SwapLog>,
    /// The candidate under probation after a swap, with the previous model kept loaded.
    pub probation: Mutex<Option<swap::Probation>>,
    /// Inference statistics when the running model went in: (histogram, failed inferences).
    /// The span since is the running model's record, the baseline of the next probation.
    pub install_mark: Mutex<(crate::telemetry::Snapshot, u64)>,
    device_id: String,
    error_topic: String,
    errors: ErrorLimiter,
    next_frame: AtomicU64,
    max_clock_skew: Duration,
    /// Per-device admission (used when `overload.adaptive`).
    pub shedder: Shedder,
    /// QoS 1 redeliveries seen recently, per device.
    pub dedup: dedup::Dedup,
    /// The overload controller's state; ticked by `app`.
    pub controller: Mutex<Controller>,
    /// SLO evaluation; ticked by `app` (`None`: no objectives configured).
    pub slo: Mutex<Option<SloTracker>>,
    /// Expected worker time per frame in nanoseconds (from the controller; 0: unknown), for
    /// deciding at dequeue whether a frame can still meet its deadline.
    pub expected_service_ns: AtomicU64,
    /// Frames a worker may take into one run now (the controller lowers it to meet the
    /// objective; `max_batch` otherwise).
    batch_limit: AtomicUsize,
    /// Sample streams: per-device window assembly (`None` for whole-input frames). Only the
    /// ingest task takes the lock.
    assembler: Option<Mutex<window::Assembler>>,
    /// Counters of the window assembly.
    pub window_stats: window::WindowStats,
}

impl Pipeline {
    /// Binds a loaded model to its pipeline config. Fails when the two disagree (e.g. raw
    /// format for a multi-input model, a score output that does not exist).
    pub fn new(
        cfg: PipelineConfig,
        model: Model,
        labels: Vec<String>,
        device_id: &str,
        errors: &ErrorsConfig,
        max_clock_skew: Duration,
    ) -> Result<Pipeline, String> {
        let decoder = match (&cfg.image, &cfg.window) {
            (Some(img), _) => Decoder::with_image(
                cfg.format,
                model.inputs.clone(),
                cfg.max_payload,
                cfg.nan,
                img,
            )?,
            (None, Some(w)) => {
                Decoder::with_window(cfg.format, model.inputs.clone(), cfg.max_payload, cfg.nan, w)?
            }
            (None, None) => {
                Decoder::new(cfg.format, model.inputs.clone(), cfg.max_payload, cfg.nan)?
            }
        }
        .with_envelope(cfg.envelope);
        let assembler =
            decoder.window().map(|plan| Mutex::new(window::Assembler::new(plan.clone())));
        check_postprocess(&cfg, &model, &labels)?;
        let stats = PipelineStats::default();
        if let Some(l) = &cfg.slo.latency {
            stats.slo_threshold_ns.store(l.objective.as_nanos() as u64, Ordering::Relaxed);
        }
        // The handle to the file lets a rollback restore it after a swap replaced it.
        let set = ModelSet::new(model, Vec::new(), labels, "start-up")
            .with_file(std::fs::File::open(&cfg.model).ok());
        Ok(Pipeline {
            queue: FrameQueue::new(cfg.queue.capacity, cfg.queue.policy),
            slo: Mutex::new(SloTracker::new(&cfg.slo)),
            shedder: Shedder::default(),
            dedup: dedup::Dedup::default(),
            controller: Mutex::new(Controller::default()),
            expected_service_ns: AtomicU64::new(0),
            batch_limit: AtomicUsize::new(1),
            active: RwLock::new(Arc::new(set)),
            generation: AtomicU64::new(0),
            events: events::EventGate::new(&cfg.events, &cfg.postprocess),
            swaps: Mutex::new(swap::SwapLog::default()),
            probation: Mutex::new(None),
            install_mark: Mutex::new((crate::telemetry::Snapshot::default(), 0)),
            max_clock_skew,
            error_topic: errors.topic.render(device_id, &cfg.name),
            errors: ErrorLimiter {
                limit: errors.rate_limit,
                window: AtomicU64::new(0),
                count: AtomicU32::new(0),
            },
            cfg,
            stats,
            decoder,
            device_id: device_id.to_string(),
            next_frame: AtomicU64::new(1),
            assembler,
            window_stats: window::WindowStats::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The model version workers run now.
    pub fn models(&self) -> Arc<ModelSet> {
        Arc::clone(&self.active.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Bumped by every swap.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Replaces the running model set; workers pick the new one up between frames (frames in
    /// flight finish on the old one, which is freed when the last worker lets go of it).
    /// The caller has checked the candidate ([`Pipeline::check_candidate`]).
    pub fn install(&self, set: ModelSet) -> Arc<ModelSet> {
        self.install_arc(Arc::new(set))
    }

    /// [`Pipeline::install`] for a set that is already shared (a rollback to the previous one).
    pub fn install_arc(&self, set: Arc<ModelSet>) -> Arc<ModelSet> {
        let mut g = self.active.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut *g, set);
        self.generation.fetch_add(1, Ordering::Release);
        drop(g);
        old
    }

    /// Whether `candidate` can replace the running model: the same input and output signature
    /// (names, dtypes, shapes: the decoder and every consumer of the results depend on them),
    /// and a post-processing that still fits.
    pub fn check_candidate(&self, candidate: &ModelSet) -> Result<(), String> {
        let cur = self.models();
        let sig = |m: &Model| {
            let f = |t: &crate::model::TensorSpec| {
                format!("{}:{}{}", t.name, t.dtype.name(), t.shape_string())
            };
            (
                m.inputs.iter().map(f).collect::<Vec<_>>(),
                m.outputs.iter().map(f).collect::<Vec<_>>(),
            )
        };
        let (a, b) = (sig(&cur.model), sig(&candidate.model));
        if a != b {
            return Err(format!(
                "signature differs from the running model: inputs {:?} -> {:?}, outputs {:?} -> {:?}",
                a.0, b.0, a.1, b.1
            ));
        }
        let sizes = |s: &ModelSet| s.batch_sizes().collect::<Vec<_>>();
        if sizes(&cur) != sizes(candidate) {
            return Err(format!(
                "batched plans differ: {:?} -> {:?}",
                sizes(&cur),
                sizes(candidate)
            ));
        }
        check_postprocess(&self.cfg, &candidate.model, &candidate.labels)
    }
}

/// Validates the post-processing against a model now rather than on the first frame, and warns
/// when the labels do not match the class count.
fn check_postprocess(cfg: &PipelineConfig, model: &Model, labels: &[String]) -> Result<(), String> {
    output::ResultWriter::new(cfg.postprocess.clone(), labels.to_vec(), model)?;
    {
        if let PostProcess::Classification(c) = &cfg.postprocess {
            let idx = c
                .output
                .as_ref()
                .and_then(|n| model.outputs.iter().position(|o| &o.name == n))
                .unwrap_or(0);
            let classes = model.outputs.get(idx).map_or(0, |o| o.len());
            if !labels.is_empty() && labels.len() != classes {
                log::warn!(
                    pipeline = cfg.name.as_str();
                    "labels file has {} lines but output `{}` has {} classes; unmatched classes get no label",
                    labels.len(),
                    model.outputs.get(idx).map_or("", |o| o.name.as_str()),
                    classes
                );
            }
        }
    }
    Ok(())
}

impl Pipeline {
    /// Adds the batched plans (ascending batch size) built for `max_batch`.
    pub fn with_batch_models(self, models: Vec<Model>) -> Self {
        let max = models.last().and_then(|m| m.inputs.first()).and_then(|i| i.shape.first());
        self.batch_limit.store(max.copied().unwrap_or(1).max(1), Ordering::Relaxed);
        {
            let mut g = self.active.write().unwrap_or_else(|e| e.into_inner());
            let cur = &**g;
            let file = cur.file.as_ref().and_then(|f| f.try_clone().ok());
            let set = ModelSet::new(cur.model.clone(), models, cur.labels.clone(), &cur.source)
                .with_file(file);
            *g = Arc::new(set);
        }
        self
    }

    /// Batch sizes with a plan, ascending (1 always).
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.models().batch_sizes().collect()
    }

    /// Frames a worker may take into one run now.
    pub fn batch_limit(&self) -> usize {
        self.batch_limit.load(Ordering::Relaxed)
    }

    /// Sets the batch limit (clamped to 1..=the largest plan).
    pub fn set_batch_limit(&self, n: usize) {
        let max = self.batch_sizes().into_iter().max().unwrap_or(1);
        self.batch_limit.store(n.clamp(1, max), Ordering::Relaxed);
    }

    /// Whether adaptive overload control steers this pipeline: switched on (the default) and
    /// given a latency objective to steer to. Without an objective the queue's capacity and
    /// policy alone bound the backlog (nothing is shed behind the configuration's back).
    pub fn adaptive(&self) -> bool {
        self.cfg.overload.adaptive && self.cfg.slo.latency.is_some()
    }

    /// Decodes a message that matched this pipeline's filter and offers it to the queue.
    /// Returns the frame when it must wait for room (the `block` policy): the caller awaits
    /// [`FrameQueue::push_wait`] and passes the outcome to [`Pipeline::account_push`].
    ///
    /// The topic and captures are moved into the frame (no copy on the hot path).
    pub fn ingest(
        &self,
        topic: String,
        captures: Captures,
        payload: Bytes,
        publisher: &dyn Publisher,
    ) -> Option<Frame> {
        let received = Instant::now();
        let received_us = unix_us(SystemTime::now());
        if let Some(asm) = &self.assembler {
            self.ingest_chunk(asm, topic, captures, payload, publisher, received, received_us);
            return None;
        }
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        // Shedding comes before decoding: under overload, decoding frames only to drop them
        // would spend the ingest task's CPU on exactly the work being refused.
        if self.adaptive() && !self.shedder.admit(device_key(&topic, &captures)) {
            self.stats.drop_frame(DropReason::Shed);
            return None;
        }
        let decoded = self.decode_new(&topic, payload, publisher)?;
        let frame = Frame {
            id: self.next_frame.fetch_add(1, Ordering::Relaxed),
            topic,
            captures,
            seq: decoded.seq,
            ts: decoded.ts,
            received,
            received_us,
            device_age: decoded.ts.and_then(|ts| self.device_age(ts, received_us)),
            deadline: decoded
                .deadline_ms
                .map(|ms| Duration::from_secs_f64(ms.min(1e9) / 1000.0))
                .or(self.cfg.deadline)
                .map(|d| received + d),
            inputs: decoded.inputs,
        };
        if self.cfg.queue.policy == crate::config::DropPolicy::Block {
            match self.queue.push(frame) {
                Push::Full(f) => return Some(f),
                other => self.account_push(other),
            }
        } else {
            let outcome = self.queue.push(frame);
            self.account_push(outcome);
        }
        None
    }

    /// Decodes a payload and drops QoS 1 redeliveries (same topic, seq and payload): a refused
    /// payload is counted and reported, a repeat counted as `duplicate`; both give `None`.
    fn decode_new(
        &self,
        topic: &str,
        payload: Bytes,
        publisher: &dyn Publisher,
    ) -> Option<Decoded> {
        let fp = self.cfg.dedup.then(|| dedup::fingerprint(&payload));
        let decoded = match self.decoder.decode(payload) {
            Ok(d) => d,
            Err(r) => {
                self.reject(topic, &r, publisher);
                return None;
            }
        };
        if let (Some(fp), Some(seq)) = (fp, decoded.seq)
            && self.dedup.is_duplicate(topic, seq, fp)
        {
            self.stats.drop_frame(DropReason::Duplicate);
            return None;
        }
        Some(decoded)
    }

    /// A chunk of a sample stream: decoded (envelope, whole frames), then assembled; every
    /// window it completes is a frame offered to the queue.
    ///
    /// Accounting: a stream pipeline's `received` counts the frames it made (windows) plus the
    /// chunks rejected or dropped as duplicates, so `received = served + rejected + dropped +
    /// failed + queued + in flight` still holds; the chunks themselves are counted in
    /// [`window::WindowStats`]. Adaptive shedding does not apply (dropping chunks would cut holes
    /// into streams: the queue limit bounds the backlog), and the `block` queue policy acts as
    /// `drop_newest` (one chunk may complete several windows; the ingest task cannot wait for
    /// each).
    #[allow(clippy::too_many_arguments)]
    fn ingest_chunk(
        &self,
        asm: &Mutex<window::Assembler>,
        topic: String,
        captures: Captures,
        payload: Bytes,
        publisher: &dyn Publisher,
        received: Instant,
        received_us: u64,
    ) {
        let Some(decoded) = self.decode_new(&topic, payload, publisher) else {
            // Counted as rejected or duplicate: it enters `received` like a frame would.
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(samples) = decoded.inputs.into_iter().next() else { return };
        let chunk = window::Chunk { seq: decoded.seq, ts: decoded.ts, samples };
        let mut asm = asm.lock().unwrap_or_else(|e| e.into_inner());
        asm.push(&topic, chunk, received, &self.window_stats, &mut |w: window::Window| {
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            let mut inputs = SmallVec::new();
            inputs.push(w.input);
            let frame = Frame {
                id: self.next_frame.fetch_add(1, Ordering::Relaxed),
                topic: topic.clone(),
                captures: captures.clone(),
                seq: w.seq,
                ts: w.ts,
                received,
                received_us,
                device_age: w.ts.and_then(|ts| self.device_age(ts, received_us)),
                deadline: self.cfg.deadline.map(|d| received + d),
                inputs,
            };
            let outcome = self.queue.push(frame);
            self.account_push(outcome);
        });
    }

    /// The frame's age at arrival by the device clock, when its timestamp is within the skew
    /// guard; otherwise counts a `clock_skew` and returns `None` (arrival time is used).
    fn device_age(&self, ts_ms: f64, received_us: u64) -> Option<Duration> {
        let diff_s = (received_us as f64 / 1000.0 - ts_ms) / 1000.0;
        if diff_s.is_finite() && diff_s.abs() <= self.max_clock_skew.as_secs_f64() {
            Some(Duration::from_secs_f64(diff_s.max(0.0)))
        } else {
            self.stats.clock_skew.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Counts what a push did (evictions and refusals are drops, never silent).
    pub fn account_push(&self, outcome: Push<Frame>) {
        match outcome {
            Push::Queued => {}
            Push::Evicted(_) | Push::Full(_) => self.stats.drop_frame(DropReason::QueueFull),
            Push::Closed(_) => self.stats.drop_frame(DropReason::Shutdown),
        }
    }

    /// A message that matched this pipeline's filter on a topic longer than
    /// `broker.max_topic_length`: counted as received and rejected (`topic_too_long`), never
    /// decoded, queued or remembered per device. The error message carries the topic cut short.
    pub fn reject_long_topic(&self, topic: &str, limit: usize, publisher: &dyn Publisher) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let r = Reject::new(
            crate::reject::RejectReason::TopicTooLong,
            format!("the topic is {} bytes, above broker.max_topic_length ({limit})", topic.len()),
        );
        self.reject(crate::topic::shorten(topic, 128), &r, publisher);
    }

    fn reject(&self, topic: &str, r: &Reject, publisher: &dyn Publisher) {
        self.stats.reject(r.reason);
        self.report_error(publisher, topic, r.reason.as_str(), &r.detail, r.seq, false);
    }

    /// Publishes an error message (rate-limited). `wait`: may block briefly (workers only).
    pub fn report_error(
        &self,
        publisher: &dyn Publisher,
        topic: &str,
        reason: &str,
        detail: &str,
        seq: Option<u64>,
        wait: bool,
    ) {
        if !self.errors.allow() {
            self.stats.errors_suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let msg = ErrorMsg {
            pipeline: &self.cfg.name,
            topic,
            reason,
            detail,
            seq,
            at_us: unix_us(SystemTime::now()),
        };
        let Ok(payload) = serde_json::to_vec(&msg) else { return };
        let res = if wait {
            publisher.publish(&self.error_topic, &payload, Qos::AtMostOnce, false)
        } else {
            publisher.try_publish(&self.error_topic, payload, Qos::AtMostOnce, false)
        };
        if res.is_err() {
            self.stats.errors_suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts one worker thread per placement; returns once every worker has its inference
    /// session ready (or the first error).
    pub fn start_workers(
        self: &Arc<Self>,
        publisher: Arc<dyn Publisher>,
        placements: &[Placement],
    ) -> Result<Vec<WorkerHandle>, String> {
        worker::start(self, publisher, placements)
    }
}

/// The device a frame comes from, for fair shedding: what the input filter's first wildcard
/// matched (`sensors/+/frames` -> the device id), else the whole topic.
pub fn device_key<'a>(topic: &'a str, captures: &Captures) -> &'a str {
    captures.first().and_then(|r| topic.get(r.clone())).unwrap_or(topic)
}

#[cfg(test)]
mod tests;
