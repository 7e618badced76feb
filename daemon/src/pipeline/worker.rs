//! Inference worker threads: dedicated OS threads (never tokio tasks), each optionally pinned to
//! its CPUs from inside the thread (one, or `threads` of them for intra-op parallelism), each
//! owning its own tract state, output buffers and, with `threads > 1`, its own thread pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::image::ImageScratch;
use super::output::{ResultMeta, ResultWriter};
use super::preprocess::SourceMap;
use super::queue::Pop;
use super::{Frame, Pipeline, Publisher};
use crate::model::Session;
use crate::sys::cgroup;
use crate::sys::cpus::{self, CpuList, WorkerSched};
use crate::telemetry::{DropReason, FailReason};

/// How often an idle worker wakes up to show it is alive.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// Where one worker thread runs.
#[derive(Debug, Clone)]
pub struct Placement {
    /// CPUs it pins itself to (empty: not pinned): one, or `threads` for a worker whose
    /// inference uses several threads (its pool's threads inherit the set).
    pub cpus: Vec<usize>,
    pub sched: WorkerSched,
    /// Threaded cgroup leaf it moves itself into.
    pub cgroup_leaf: Option<PathBuf>,
}

impl Default for Placement {
    fn default() -> Self {
        Placement { cpus: Vec::new(), sched: WorkerSched::Other { nice: 0 }, cgroup_leaf: None }
    }
}

/// A running worker: its thread and a progress counter (frames handled + idle ticks), which the
/// liveness check reads to tell a busy or idle worker from a wedged one.
pub struct WorkerHandle {
    pub name: String,
    pub thread: JoinHandle<()>,
    pub progress: Arc<AtomicU64>,
}

pub(super) fn start(
    p: &Arc<Pipeline>,
    publisher: Arc<dyn Publisher>,
    placements: &[Placement],
) -> Result<Vec<WorkerHandle>, String> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::with_capacity(placements.len());
    for (i, placement) in placements.iter().enumerate() {
        let progress = Arc::new(AtomicU64::new(0));
        let name = format!("ei-{}-{i}", p.name());
        let (pl, pb, pr, ready) =
            (Arc::clone(p), Arc::clone(&publisher), Arc::clone(&progress), ready_tx.clone());
        let placement = placement.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                place_current_thread(&placement, pl.name());
                // The pool after the placement: its threads inherit this thread's CPUs and
                // cgroup leaf.
                let threads = match crate::model::Threads::new(pl.cfg.engine.threads) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = ready.send(Err(format!("worker {i}: {e}")));
                        return;
                    }
                };
                let state = match WorkerModel::build(&pl, &threads) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready.send(Err(format!("worker {i}: {e}")));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                drop(ready);
                run(&pl, state, &threads, &*pb, &pr);
            })
            .map_err(|e| format!("cannot spawn worker thread: {e}"))?;
        handles.push(WorkerHandle { name, thread, progress });
    }
    drop(ready_tx);
    for _ in 0..handles.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a worker thread exited during start-up".into()),
        }
    }
    Ok(handles)
}

/// Applies a placement to the calling thread: CPU, scheduling class, cgroup leaf. Each is done
/// from the thread itself (affinity, scheduling and cgroup membership are per thread). Config
/// validation already checked the CPU; a failure here (the cpuset changed since, no
/// CAP_SYS_NICE for a real-time class) is logged and the worker runs without it.
fn place_current_thread(placement: &Placement, pipeline: &str) {
    // The cgroup first: the thread starts in its creator's leaf (the I/O one), whose cpuset
    // would refuse the inference CPU.
    if let Some(leaf) = &placement.cgroup_leaf
        && let Err(e) = cgroup::move_thread(leaf, crate::sys::gettid())
    {
        log::warn!(pipeline = pipeline; "cannot move worker into {}: {e}", leaf.display());
    }
    if !placement.cpus.is_empty()
        && let Err(e) = cpus::pin_current_thread(&CpuList::from_slice(&placement.cpus))
    {
        log::warn!(
            pipeline = pipeline;
            "cannot pin worker to CPU(s) {:?}: {e}; running unpinned",
            placement.cpus
        );
    }
    if let Err(e) = cpus::set_current_thread_sched(placement.sched) {
        log::warn!(
            pipeline = pipeline;
            "cannot set worker scheduling {:?}: {e}; hint: it needs CAP_SYS_NICE \
             (system.keep_capabilities = [\"CAP_SYS_NICE\"] and AmbientCapabilities= in the unit); \
             running with the default class",
            placement.sched
        );
    }
}

/// What a worker runs: sessions and the result writer for one model set, and the generation
/// it belongs to.
struct WorkerModel {
    generation: u64,
    single: Session,
    batched: Vec<Session>,
    writer: ResultWriter,
    /// The set the sessions were built from: a swapped-out set is freed once every worker has
    /// moved on (fields drop in order, so after the sessions).
    _set: Arc<super::ModelSet>,
}

impl WorkerModel {
    fn build(p: &Pipeline, threads: &crate::model::Threads) -> Result<WorkerModel, String> {
        // Generation first: a swap racing with this build is seen again at the next frame.
        let generation = p.generation();
        let set = p.models();
        let single = set.model.session_on(threads).map_err(|e| e.to_string())?;
        let batched = set
            .batched
            .iter()
            .map(|m| m.session_on(threads).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let writer = ResultWriter::new(p.cfg.postprocess.clone(), set.labels.clone(), &set.model)?;
        Ok(WorkerModel { generation, single, batched, writer, _set: set })
    }

    /// Switches to the pipeline's current model set if a swap happened. Between frames only,
    /// so a frame is always served start to finish by one model.
    fn refresh(&mut self, p: &Pipeline, threads: &crate::model::Threads) {
        if p.generation() == self.generation {
            return;
        }
        match WorkerModel::build(p, threads) {
            Ok(next) => *self = next,
            Err(e) => {
                // The candidate ran its warm-up and golden checks already; a session that cannot
                // be built now is a resource problem. Keep serving with the old one.
                log::error!(pipeline = p.name(); "cannot switch worker to the new model: {e}; still serving the previous one");
                self.generation = p.generation();
            }
        }
    }
}

fn run(
    p: &Pipeline,
    mut m: WorkerModel,
    threads: &crate::model::Threads,
    publisher: &dyn Publisher,
    progress: &AtomicU64,
) {
    let mut scratch = Scratch {
        payload: Vec::with_capacity(4096),
        topic: String::with_capacity(128),
        image: ImageScratch::default(),
        sources: vec![None; p.cfg.max_batch.max(1)],
    };
    let mut frames: Vec<Frame> = Vec::with_capacity(p.cfg.max_batch.max(1));
    loop {
        m.refresh(p, threads);
        match p.queue.pop(IDLE_TICK) {
            Pop::Item(frame) => {
                // Again: a swap reported while this worker waited in `pop` must serve this frame
                // already (a client that saw the new version in health gets its results).
                m.refresh(p, threads);
                let limit = p.batch_limit();
                if limit > 1 {
                    // Whatever else is already queued, up to the batch limit: batching never
                    // waits for frames that have not arrived.
                    frames.push(frame);
                    p.queue.pop_more(&mut frames, limit - 1);
                    let n = frames.len();
                    p.serve_frames(
                        &mut m.single,
                        &mut m.batched,
                        &mut m.writer,
                        &mut scratch,
                        &mut frames,
                        publisher,
                    );
                    for _ in 0..n {
                        p.queue.done();
                    }
                } else {
                    p.serve_frame(&mut m.single, &mut m.writer, &mut scratch, frame, publisher);
                    p.queue.done();
                }
            }
            Pop::Timeout => {}
            Pop::Closed => break,
        }
        progress.fetch_add(1, Ordering::Relaxed);
    }
}

impl Pipeline {
    /// Why a frame picked up at `now` is no longer worth serving, if it is not: older than
    /// `max_age`, or unable to finish before its deadline given the expected service time.
    /// Under adaptive overload control the latency objective is a deadline too: a result later
    /// than the objective would only spend the SLO's budget.
    fn stale(&self, frame: &Frame, now: Instant) -> Option<DropReason> {
        let waited = now.saturating_duration_since(frame.received);
        if let Some(max_age) = self.cfg.max_age
            && waited + frame.device_age.unwrap_or_default() > max_age
        {
            return Some(DropReason::Expired);
        }
        let objective = self
            .cfg
            .slo
            .latency
            .as_ref()
            .filter(|_| self.adaptive())
            .map(|l| frame.received + l.objective);
        let deadline = match (frame.deadline, objective) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        let expected = Duration::from_nanos(self.expected_service_ns.load(Ordering::Relaxed));
        (now + expected > deadline).then_some(DropReason::DeadlineMissed)
    }
}

/// Per-worker reusable buffers: the serialized result and its output topic, and for image
/// pipelines the decoded pixels and sampling tables.
#[derive(Default)]
pub struct Scratch {
    pub payload: Vec<u8>,
    pub topic: String,
    pub image: ImageScratch,
    /// Per batch row: where an image frame's input pixels came from.
    sources: Vec<Option<SourceMap>>,
}

impl Scratch {
    fn set_source(&mut self, row: usize, map: Option<SourceMap>) {
        if self.sources.len() <= row {
            self.sources.resize(row + 1, None);
        }
        self.sources[row] = map;
    }
}

/// What [`Pipeline::copy_inputs`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filled {
    Yes,
    /// The payload was refused (counted and reported).
    Rejected,
    /// A bug (counted as an inference failure).
    Failed,
}

impl Pipeline {
    /// Serves one dequeued frame on `session`: copy the input into the session's tensor, run,
    /// serialize the result into `scratch`, hand it to the publisher, count. Public so tests and
    /// benchmarks can drive the hot path without threads.
    pub fn serve_frame(
        &self,
        session: &mut Session,
        writer: &mut ResultWriter,
        scratch: &mut Scratch,
        frame: Frame,
        publisher: &dyn Publisher,
    ) {
        #[cfg(feature = "fault-hooks")]
        crate::fault::maybe_wedge(frame.seq);
        let picked = Instant::now();
        let queue_wait = picked.saturating_duration_since(frame.received);
        self.stats.queue_wait.record(queue_wait);
        if let Some(reason) = self.stale(&frame, picked) {
            self.stats.drop_frame(reason);
            return;
        }
        self.serve_one(session, writer, scratch, frame, queue_wait, publisher);
    }

    /// Copy in, run, publish one frame already picked (and checked) on an unbatched session.
    fn serve_one(
        &self,
        session: &mut Session,
        writer: &mut ResultWriter,
        scratch: &mut Scratch,
        mut frame: Frame,
        queue_wait: Duration,
        publisher: &dyn Publisher,
    ) {
        let started = Instant::now();
        if self.copy_inputs(session, scratch, &mut frame, 0, publisher) != Filled::Yes {
            return;
        }
        let Some(inference) = self.run_session(session, std::slice::from_ref(&frame), publisher)
        else {
            return;
        };
        self.publish_result(session, writer, scratch, &frame, 0, queue_wait, inference, publisher);
        self.stats.service.record(started.elapsed());
    }

    /// Serves frames taken together from the queue (up to the batch limit): stale ones are
    /// dropped first, the rest run in the largest batched plans they fill completely (so no
    /// row is padding), the remainder one by one.
    pub fn serve_frames(
        &self,
        single: &mut Session,
        batched: &mut [Session],
        writer: &mut ResultWriter,
        scratch: &mut Scratch,
        frames: &mut Vec<Frame>,
        publisher: &dyn Publisher,
    ) {
        let picked = Instant::now();
        frames.retain(|f| {
            self.stats.queue_wait.record(picked.saturating_duration_since(f.received));
            match self.stale(f, picked) {
                Some(reason) => {
                    self.stats.drop_frame(reason);
                    false
                }
                None => true,
            }
        });
        while !frames.is_empty() {
            let n = frames.len();
            match batched.iter_mut().rev().find(|s| s.rows() <= n) {
                Some(session) => {
                    let rows = session.rows();
                    self.serve_batch(session, writer, scratch, &mut frames[..rows], publisher);
                    frames.drain(..rows);
                }
                None => {
                    let frame = frames.remove(0);
                    let queue_wait = picked.saturating_duration_since(frame.received);
                    self.serve_one(single, writer, scratch, frame, queue_wait, publisher);
                }
            }
        }
    }

    /// One batched run: every frame's inputs into its row, one inference, one result per row.
    fn serve_batch(
        &self,
        session: &mut Session,
        writer: &mut ResultWriter,
        scratch: &mut Scratch,
        frames: &mut [Frame],
        publisher: &dyn Publisher,
    ) {
        let started = Instant::now();
        // Rows whose image did not decode: the row runs (its content is whatever it held) but
        // no result is published for it; the frame was counted as rejected.
        let mut rejected = 0u64;
        for (row, frame) in frames.iter_mut().enumerate() {
            match self.copy_inputs(session, scratch, frame, row, publisher) {
                Filled::Yes => {}
                Filled::Rejected => rejected |= 1 << row,
                Filled::Failed => return,
            }
        }
        let Some(inference) = self.run_session(session, frames, publisher) else { return };
        self.stats.record_batch(frames.len(), inference);
        for (row, frame) in frames.iter().enumerate() {
            if rejected & (1 << row) != 0 {
                continue;
            }
            let queue_wait = started.saturating_duration_since(frame.received);
            self.publish_result(
                session, writer, scratch, frame, row, queue_wait, inference, publisher,
            );
        }
        // Worker time per frame: the batch's share, so service rates stay frames per second.
        let share = started.elapsed() / frames.len().max(1) as u32;
        for _ in 0..frames.len() {
            self.stats.service.record(share);
        }
    }

    /// Copies a frame's inputs into row `row` of the session's input tensors (one copy: wire
    /// bytes or the JSON decoder's buffer -> the tensor), or for image frames decodes and
    /// pre-processes straight into it; then releases the frame's buffers.
    fn copy_inputs(
        &self,
        session: &mut Session,
        scratch: &mut Scratch,
        frame: &mut Frame,
        row: usize,
        publisher: &dyn Publisher,
    ) -> Filled {
        if let Some(img) = self.decoder.image() {
            let res = match frame.inputs.first() {
                Some(payload) => {
                    img.write(payload, &mut scratch.image, session.input_row_mut(0, row))
                }
                None => Err(crate::reject::Reject::new(
                    crate::reject::RejectReason::Empty,
                    "image frame without a payload",
                )),
            };
            frame.inputs.clear();
            return match res {
                Ok(map) => {
                    scratch.set_source(row, Some(map));
                    Filled::Yes
                }
                Err(r) => {
                    // The payload's fault, found by the worker: counted and reported like an
                    // ingest reject (the frame leaves `in_flight` for `rejected`).
                    self.stats.reject(r.reason);
                    self.report_error(
                        publisher,
                        &frame.topic,
                        r.reason.as_str(),
                        &r.detail,
                        frame.seq,
                        true,
                    );
                    Filled::Rejected
                }
            };
        }
        for (i, bytes) in frame.inputs.iter().enumerate() {
            let dst = session.input_row_mut(i, row);
            if dst.len() != bytes.len() {
                // The decoder sized the buffer from the same spec; this is a bug, not bad input.
                self.stats.fail(FailReason::Inference);
                log::error!(pipeline = self.name(); "input {i} size mismatch {} != {}", dst.len(), bytes.len());
                return Filled::Failed;
            }
            dst.copy_from_slice(bytes);
        }
        // Release the MQTT packet buffer before the (long) inference.
        frame.inputs.clear();
        scratch.set_source(row, None);
        Filled::Yes
    }

    /// Runs the session; on failure counts and reports every frame in it.
    fn run_session(
        &self,
        session: &mut Session,
        frames: &[Frame],
        publisher: &dyn Publisher,
    ) -> Option<Duration> {
        let t = Instant::now();
        if let Err(e) = session.run() {
            let detail = e.to_string();
            for f in frames {
                self.stats.fail(FailReason::Inference);
                self.report_error(
                    publisher,
                    &f.topic,
                    FailReason::Inference.as_str(),
                    &detail,
                    f.seq,
                    true,
                );
            }
            return None;
        }
        Some(t.elapsed())
    }

    /// Serializes row `row` of the last run as `frame`'s result, publishes it, counts.
    #[allow(clippy::too_many_arguments)]
    fn publish_result(
        &self,
        session: &Session,
        writer: &mut ResultWriter,
        scratch: &mut Scratch,
        frame: &Frame,
        row: usize,
        queue_wait: Duration,
        inference: Duration,
        publisher: &dyn Publisher,
    ) {
        let p = self;
        p.stats.inference.record(inference);
        let total = frame.received.elapsed();
        let meta = ResultMeta {
            pipeline: p.name(),
            topic: &frame.topic,
            frame: frame.id,
            seq: frame.seq,
            ts: frame.ts,
            received_us: frame.received_us,
            queue_us: queue_wait.as_micros() as u64,
            inference_us: inference.as_micros() as u64,
            total_us: total.as_micros() as u64,
            source: scratch.sources.get(row).copied().flatten(),
        };
        let decision = match writer.prepare(&meta, session, row) {
            Ok(obs) => {
                p.events.as_ref().map(|g| g.decide(&frame.topic, frame.id, obs, Instant::now()))
            }
            Err(e) => {
                p.stats.fail(FailReason::Publish);
                log::error!(pipeline = p.name(); "cannot post-process result: {e}");
                return;
            }
        };
        if decision.is_some_and(|d| !d.publish) {
            // Served, result withheld by event mode: counted, not published.
            p.stats.results_suppressed.fetch_add(1, Ordering::Relaxed);
            p.stats.record_served(total);
            return;
        }
        if let Err(e) = writer.write(&mut scratch.payload, &meta, session, row, decision.as_ref()) {
            p.stats.fail(FailReason::Publish);
            log::error!(pipeline = p.name(); "cannot serialize result: {e}");
            return;
        }
        p.cfg.output.render_into(
            &mut scratch.topic,
            &p.device_id,
            p.name(),
            &frame.topic,
            &frame.captures,
        );
        if scratch.topic.len() > crate::topic::MQTT_TOPIC_LIMIT {
            // MQTT cannot encode it (a u16 length): refused here, before the client or the
            // spool sees it. Input topics are capped by broker.max_topic_length; a template
            // repeating a capture could still multiply one past the limit.
            p.stats.fail(FailReason::Publish);
            let detail = format!(
                "the output topic renders to {} bytes, above MQTT's limit of {}",
                scratch.topic.len(),
                crate::topic::MQTT_TOPIC_LIMIT
            );
            p.report_error(
                publisher,
                &frame.topic,
                FailReason::Publish.as_str(),
                &detail,
                frame.seq,
                true,
            );
            return;
        }
        // Handing the message to the MQTT client copies topic and payload into its own request
        // (rumqttc owns what it sends); everything before this point reuses buffers.
        match publisher.publish(&scratch.topic, &scratch.payload, p.cfg.qos, false) {
            Ok(()) => {
                p.stats.record_served(total);
                if let Some(age) = frame.device_age {
                    p.stats.end_to_end.record(age + total);
                }
            }
            Err(e) => {
                p.stats.fail(FailReason::Publish);
                log::debug!(pipeline = p.name(); "result for frame {} not published: {e}", frame.id);
            }
        }
    }
}
