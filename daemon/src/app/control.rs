//! The periodic control step: feeds each pipeline's overload controller and SLO tracker from its
//! statistics, applies the controller's queue limit, and logs SLO state changes.
//!
//! Runs on the serving task (a few hundred microseconds every `overload.interval`); the hot path
//! only reads what it decides (`expected_service_ns`, the queue limit, the shedder's sampling).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::App;
use crate::pipeline::overload::{self, Inputs};
use crate::pipeline::swap::SwapReport;
use crate::sys::cgroup;
use crate::telemetry::{DropReason, Snapshot};

/// What the previous step saw, per pipeline.
pub(super) struct ControlState {
    at: Instant,
    /// Service histogram at the previous step (for busy time per step).
    service: Vec<Snapshot>,
    /// Service histogram at the start of the P99 window.
    service_base: Vec<Snapshot>,
    /// Latest service-time P99 per pipeline (kept while too few frames arrive to re-measure).
    service_p99: Vec<Option<Duration>>,
}

impl ControlState {
    pub(super) fn new(app: &App) -> Self {
        ControlState {
            at: Instant::now(),
            service: app.pipelines.iter().map(|p| p.stats.service.snapshot()).collect(),
            service_base: app.pipelines.iter().map(|p| p.stats.service.snapshot()).collect(),
            service_p99: vec![None; app.pipelines.len()],
        }
    }
}

/// How often the control step runs: the shortest `overload.interval` among adaptive pipelines,
/// else often enough for the SLO trackers' sample spacing.
pub(super) fn period(app: &App) -> Duration {
    let overload =
        app.pipelines.iter().filter(|p| p.adaptive()).map(|p| p.cfg.overload.interval).min();
    let slo = app
        .pipelines
        .iter()
        .filter_map(|p| p.slo.lock().ok().and_then(|t| t.as_ref().map(|t| t.tick_every())))
        .min();
    overload.into_iter().chain(slo).min().unwrap_or(Duration::from_secs(1))
}

/// One control step over every pipeline. Returns true when an SLO state changed (the caller
/// refreshes `STATUS=`), and the probations that ended (rolled back or kept), for the caller
/// to publish.
pub(super) fn step(app: &App, st: &mut ControlState) -> (bool, Vec<(usize, SwapReport)>) {
    let mut ended = Vec::new();
    for (i, p) in app.pipelines.iter().enumerate() {
        if let Some(r) = super::reload::check_probation(p) {
            ended.push((i, r));
        }
    }
    let now = Instant::now();
    let elapsed = now.saturating_duration_since(st.at);
    st.at = now;
    // One cgroup read for all pipelines: they share the daemon's memory.
    let memory_pressure = app.system.cgroup_dir.as_deref().is_some_and(|dir| {
        app.pipelines.iter().any(|p| p.adaptive())
            && overload::memory_pressure(&cgroup::read_stats(dir))
    });
    let mut changed = false;
    for (i, p) in app.pipelines.iter().enumerate() {
        // Service P99 over the frames since a baseline that moves forward every ~200 frames:
        // recent, yet enough frames for a P99 even at a few frames per second.
        let service = p.stats.service.snapshot();
        let recent = service.since(&st.service_base[i]);
        if recent.count() >= 20 {
            st.service_p99[i] = recent.quantile(0.99);
        }
        if recent.count() >= 200 {
            st.service_base[i] = service.clone();
        }
        let delta = service.since(&st.service[i]);
        st.service[i] = service;
        if p.adaptive() {
            let inputs = Inputs {
                elapsed,
                handled: delta.count(),
                busy: Duration::from_nanos(delta.sum_ns),
                workers: p.cfg.workers,
                queue_depth: p.queue.depth(),
                capacity: p.queue.capacity(),
                objective: p.cfg.slo.latency.as_ref().map(|l| l.objective),
                service_p99: st.service_p99[i],
                memory_pressure,
            };
            let mut c = p.controller.lock().unwrap_or_else(|e| e.into_inner());
            let limit = c.tick(&p.shedder, &inputs);
            let sizes = p.batch_sizes();
            if sizes.len() > 1 {
                let run_time = |b: usize| {
                    let (runs, total) = p.stats.batch_stats(b);
                    (runs > 0).then(|| total / runs as u32)
                };
                let objective = inputs
                    .objective
                    .map(|o| o.saturating_sub(inputs.service_p99.unwrap_or_default()));
                let b = overload::pick_batch(&sizes, run_time, c.service_time(), objective);
                p.set_batch_limit(b);
                c.set_batch_limit(p.batch_limit());
            }
            // The deadline check at dequeue budgets for a slow run, not an average one: a
            // frame admitted with only the mean left would miss whenever the run is slow.
            // Before a P99 exists, twice the mean stands in for it.
            if let Some(t) = st.service_p99[i].or(c.service_time().map(|t| t * 2)) {
                p.expected_service_ns.store(t.as_nanos() as u64, Ordering::Relaxed);
            }
            drop(c);
            for _ in p.queue.set_limit(limit) {
                p.stats.drop_frame(DropReason::QueueFull);
            }
        }
        let mut slo = p.slo.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = slo.as_mut()
            && let Some(prev) = t.tick(now, p.stats.slo_counts(), &p.stats.total.snapshot())
        {
            changed = true;
            log::warn!(
                pipeline = p.name();
                "SLO {} -> {}: {}",
                prev.as_str(),
                t.state().as_str(),
                t.describe()
            );
        }
    }
    (changed, ended)
}
