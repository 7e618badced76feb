//! Inference worker threads: dedicated OS threads (never tokio tasks), each optionally pinned to
//! one CPU from inside the thread, each owning its own tract state and output buffers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::output::{ResultMeta, ResultWriter};
use super::queue::Pop;
use super::{Frame, Pipeline, Publisher};
use crate::model::Session;
use crate::telemetry::FailReason;

/// How often an idle worker wakes up to show it is alive.
const IDLE_TICK: Duration = Duration::from_millis(250);

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
) -> Result<Vec<WorkerHandle>, String> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::with_capacity(p.cfg.workers);
    for i in 0..p.cfg.workers {
        let cpu = (!p.cfg.cpus.is_empty()).then(|| p.cfg.cpus[i % p.cfg.cpus.len()]);
        let progress = Arc::new(AtomicU64::new(0));
        let name = format!("ei-{}-{i}", p.name());
        let (pl, pb, pr, ready) =
            (Arc::clone(p), Arc::clone(&publisher), Arc::clone(&progress), ready_tx.clone());
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_current_thread(cpu, &pl.cfg.name);
                }
                let session = match pl.model.session() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready.send(Err(format!("worker {i}: {e}")));
                        return;
                    }
                };
                let writer = match ResultWriter::new(
                    pl.cfg.postprocess.clone(),
                    pl.labels.clone(),
                    &pl.model,
                ) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                drop(ready);
                run(&pl, session, writer, &*pb, &pr);
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

/// Pins the calling thread to `cpu`. Config validation already checked the CPU is allowed, so
/// a failure here (e.g. the cpuset changed since) is logged and the worker runs unpinned.
fn pin_current_thread(cpu: usize, pipeline: &str) {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    let res = set.set(cpu).and_then(|()| sched_setaffinity(Pid::from_raw(0), &set));
    if let Err(e) = res {
        log::warn!("pipeline={pipeline} cannot pin worker to cpu={cpu}: {e}; running unpinned");
    }
}

fn run(
    p: &Pipeline,
    mut session: Session,
    mut writer: ResultWriter,
    publisher: &dyn Publisher,
    progress: &AtomicU64,
) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        match p.queue.pop(IDLE_TICK) {
            Pop::Item(frame) => {
                serve(p, &mut session, &mut writer, &mut buf, frame, publisher);
                p.queue.done();
            }
            Pop::Timeout => {}
            Pop::Closed => break,
        }
        progress.fetch_add(1, Ordering::Relaxed);
    }
}

fn serve(
    p: &Pipeline,
    session: &mut Session,
    writer: &mut ResultWriter,
    buf: &mut Vec<u8>,
    mut frame: Frame,
    publisher: &dyn Publisher,
) {
    let picked = Instant::now();
    let queue_wait = picked.saturating_duration_since(frame.received);
    p.stats.queue_wait.record(queue_wait);
    // One copy: wire bytes (or the JSON decoder's buffer) -> the session's input tensor.
    for (i, bytes) in frame.inputs.iter().enumerate() {
        let dst = session.input_mut(i);
        if dst.len() != bytes.len() {
            // The decoder sized the buffer from the same spec; this is a bug, not bad input.
            p.stats.fail(FailReason::Inference);
            log::error!(
                "pipeline={} input {i} size mismatch {} != {}",
                p.name(),
                dst.len(),
                bytes.len()
            );
            return;
        }
        dst.copy_from_slice(bytes);
    }
    // Release the MQTT packet buffer before the (long) inference.
    frame.inputs.clear();
    let t = Instant::now();
    if let Err(e) = session.run() {
        p.stats.fail(FailReason::Inference);
        p.report_error(
            publisher,
            &frame.topic,
            FailReason::Inference.as_str(),
            &e.to_string(),
            frame.seq,
            true,
        );
        return;
    }
    let inference = t.elapsed();
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
    };
    if let Err(e) = writer.write(buf, &meta, &p.model, session) {
        p.stats.fail(FailReason::Publish);
        log::error!("pipeline={} cannot serialize result: {e}", p.name());
        return;
    }
    match publisher.publish(&frame.output_topic, buf.clone(), p.cfg.qos, false) {
        Ok(()) => {
            p.stats.served.fetch_add(1, Ordering::Relaxed);
            p.stats.total.record(total);
        }
        Err(e) => {
            p.stats.fail(FailReason::Publish);
            log::debug!("pipeline={} result for frame {} not published: {e}", p.name(), frame.id);
        }
    }
}
