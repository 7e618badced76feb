//! Counters, latency histograms and the health and metrics messages built from them.
//!
//! Owns the accounting vocabulary (why a frame was rejected, dropped or failed) and per-pipeline
//! statistics that the hot path updates with relaxed atomics (no locks, no allocation). It does
//! not publish anything: `app` decides when a snapshot goes out and where.
//!
//! Accounting invariant, per pipeline, at any quiescent point:
//! `received = served + rejected + dropped + failed + queued + in_flight`.

pub mod histogram;
pub mod prometheus;
pub mod slo;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

pub use histogram::{Histogram, Snapshot};

use crate::reject::RejectReason;

/// Why an accepted, valid frame was not served (the daemon's choice, not the payload's fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The queue was full at its effective limit (evicted under drop_oldest, refused under
    /// drop_newest/block, or trimmed when the overload controller shrank the limit).
    QueueFull,
    /// Older than `max_age` when a worker picked it up.
    Expired,
    /// Could not be served before its deadline (the pipeline's `deadline`, the frame's
    /// `deadline_ms`, or the latency objective under adaptive overload control).
    DeadlineMissed,
    /// Not admitted by the overload controller's per-device sampling.
    Shed,
    /// A QoS 1 redelivery of a frame already taken (same device, seq and payload).
    Duplicate,
    /// Still queued when the shutdown grace period ran out.
    Shutdown,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::DeadlineMissed,
        DropReason::Shed,
        DropReason::Duplicate,
        DropReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::DeadlineMissed => "deadline_missed",
            DropReason::Shed => "shed",
            DropReason::Duplicate => "duplicate",
            DropReason::Shutdown => "shutdown",
        }
    }
}

/// Why a dequeued frame produced no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// tract returned an error.
    Inference,
    /// The result could not be handed to the MQTT client in time.
    Publish,
}

impl FailReason {
    pub const ALL: [FailReason; 2] = [FailReason::Inference, FailReason::Publish];

    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Inference => "inference_error",
            FailReason::Publish => "publish_error",
        }
    }
}

/// Live statistics of one pipeline, shared by the ingest task and the workers.
#[derive(Default)]
pub struct PipelineStats {
    pub received: AtomicU64,
    pub served: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    dropped: [AtomicU64; DropReason::ALL.len()],
    failed: [AtomicU64; FailReason::ALL.len()],
    /// Error messages not published because of the rate limit.
    pub errors_suppressed: AtomicU64,
    /// Served frames whose result event mode withheld (counted in `served` too).
    pub results_suppressed: AtomicU64,
    /// Time from arrival to a worker picking the frame up.
    pub queue_wait: Histogram,
    /// tract run time.
    pub inference: Histogram,
    /// Arrival to result handed to the MQTT client.
    pub total: Histogram,
    /// Device timestamp to result handed to the MQTT client (frames with a trusted `ts`).
    pub end_to_end: Histogram,
    /// Worker time per dequeued frame (copy in, inference, result, publish hand-off).
    pub service: Histogram,
    /// Frames whose device timestamp was further than `max_clock_skew` from our clock.
    pub clock_skew: AtomicU64,
    /// Served frames slower (arrival -> result) than `slo_threshold_ns`.
    pub slow: AtomicU64,
    /// The SLO latency objective in nanoseconds (0: none).
    pub slo_threshold_ns: AtomicU64,
    batches: BatchCounters,
}

/// Batch sizes tracked (0..=64, matching `config::MAX_BATCH`).
pub const BATCH_SLOTS: usize = 65;

/// Batched runs by batch size (index = frames in the run; unbatched runs are not counted), and
/// their total run time (the controller's cost per size).
struct BatchCounters {
    runs: [AtomicU64; BATCH_SLOTS],
    ns: [AtomicU64; BATCH_SLOTS],
}

impl Default for BatchCounters {
    fn default() -> Self {
        BatchCounters {
            runs: std::array::from_fn(|_| AtomicU64::new(0)),
            ns: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn idx<T: PartialEq>(all: &[T], r: &T) -> usize {
    all.iter().position(|x| x == r).unwrap_or(0)
}

impl PipelineStats {
    pub fn reject(&self, r: RejectReason) {
        self.rejected[idx(&RejectReason::ALL, &r)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn drop_frame(&self, r: DropReason) {
        self.dropped[idx(&DropReason::ALL, &r)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn fail(&self, r: FailReason) {
        self.failed[idx(&FailReason::ALL, &r)].fetch_add(1, Ordering::Relaxed);
    }
    pub fn rejected(&self, r: RejectReason) -> u64 {
        self.rejected[idx(&RejectReason::ALL, &r)].load(Ordering::Relaxed)
    }
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.dropped[idx(&DropReason::ALL, &r)].load(Ordering::Relaxed)
    }
    pub fn failed(&self, r: FailReason) -> u64 {
        self.failed[idx(&FailReason::ALL, &r)].load(Ordering::Relaxed)
    }
    pub fn rejected_total(&self) -> u64 {
        RejectReason::ALL.iter().map(|r| self.rejected(*r)).sum()
    }
    pub fn dropped_total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.dropped(*r)).sum()
    }
    pub fn failed_total(&self) -> u64 {
        FailReason::ALL.iter().map(|r| self.failed(*r)).sum()
    }

    /// Records a served frame's arrival -> result latency (and whether it missed the objective).
    pub fn record_served(&self, total: Duration) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.total.record(total);
        let threshold = self.slo_threshold_ns.load(Ordering::Relaxed);
        if threshold > 0 && total.as_nanos() > u128::from(threshold) {
            self.slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The latency histograms by name, in the order every report lists them.
    pub fn histograms(&self) -> [(&'static str, &Histogram); 5] {
        [
            ("queue_wait", &self.queue_wait),
            ("inference", &self.inference),
            ("service", &self.service),
            ("total", &self.total),
            ("end_to_end", &self.end_to_end),
        ]
    }

    /// Counts a batched run of `size` frames that took `run`.
    pub fn record_batch(&self, size: usize, run: Duration) {
        if let (Some(c), Some(t)) = (self.batches.runs.get(size), self.batches.ns.get(size)) {
            c.fetch_add(1, Ordering::Relaxed);
            t.fetch_add(run.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// (runs, total run time) of batched runs of `size` frames.
    pub fn batch_stats(&self, size: usize) -> (u64, Duration) {
        let runs = self.batches.runs.get(size).map_or(0, |c| c.load(Ordering::Relaxed));
        let ns = self.batches.ns.get(size).map_or(0, |c| c.load(Ordering::Relaxed));
        (runs, Duration::from_nanos(ns))
    }

    /// Cumulative counts for the SLO tracker.
    pub fn slo_counts(&self) -> slo::Counts {
        let dropped: u64 = DropReason::ALL
            .iter()
            // A duplicate was served once already; frames dropped at shutdown are redelivered.
            .filter(|r| !matches!(r, DropReason::Shutdown | DropReason::Duplicate))
            .map(|r| self.dropped(*r))
            .sum();
        slo::Counts {
            served: self.served.load(Ordering::Relaxed),
            slow: self.slow.load(Ordering::Relaxed),
            lost: dropped + self.failed_total(),
        }
    }

    /// Counters as a JSON object (used by health and metrics).
    pub fn counters_json(&self) -> Value {
        let by = |pairs: Vec<(&'static str, u64)>| -> Value {
            Value::Object(
                pairs.into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<_, _>>(),
            )
        };
        json!({
            "received": self.received.load(Ordering::Relaxed),
            "served": self.served.load(Ordering::Relaxed),
            "rejected": by(RejectReason::ALL.iter().map(|r| (r.as_str(), self.rejected(*r))).collect()),
            "dropped": by(DropReason::ALL.iter().map(|r| (r.as_str(), self.dropped(*r))).collect()),
            "failed": by(FailReason::ALL.iter().map(|r| (r.as_str(), self.failed(*r))).collect()),
            "errors_suppressed": self.errors_suppressed.load(Ordering::Relaxed),
            "results_suppressed": self.results_suppressed.load(Ordering::Relaxed),
            "clock_skew": self.clock_skew.load(Ordering::Relaxed),
        })
    }
}

/// Latency summary used in health messages and logs.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
}

impl LatencySummary {
    pub fn of(s: &Snapshot) -> Self {
        let us = |d: Option<Duration>| d.map(|d| d.as_micros() as u64);
        let n = s.count();
        LatencySummary {
            count: n,
            p50_us: us(s.quantile(0.5)),
            p99_us: us(s.quantile(0.99)),
            max_us: (n > 0).then_some(s.max_ns / 1000),
        }
    }
}

/// Histogram snapshot as compact JSON: sparse `[bucket_index, count]` pairs plus sum and max, so a
/// fleet collector can merge devices exactly (bounds are fixed; see [`histogram::bounds_ns`]).
pub fn histogram_json(s: &Snapshot) -> Value {
    let buckets: Vec<Value> =
        s.counts.iter().enumerate().filter(|(_, c)| **c > 0).map(|(i, c)| json!([i, c])).collect();
    json!({ "count": s.count(), "sum_ns": s.sum_ns, "max_ns": s.max_ns, "buckets": buckets })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_by_reason() {
        let s = PipelineStats::default();
        s.reject(RejectReason::WrongSize);
        s.reject(RejectReason::WrongSize);
        s.reject(RejectReason::Empty);
        s.drop_frame(DropReason::QueueFull);
        s.fail(FailReason::Publish);
        assert_eq!(s.rejected(RejectReason::WrongSize), 2);
        assert_eq!(s.rejected_total(), 3);
        assert_eq!(s.dropped_total(), 1);
        assert_eq!(s.failed_total(), 1);
        let j = s.counters_json();
        assert_eq!(j["rejected"]["wrong_size"], 2);
        assert_eq!(j["rejected"]["non_finite"], 0);
        assert_eq!(j["dropped"]["queue_full"], 1);
        assert_eq!(j["failed"]["publish_error"], 1);
    }
}
