//! Fixed-bucket latency histogram: lock-free to record, mergeable across pipelines and devices.
//!
//! Buckets are geometric with four per doubling (ratio 2^(1/4), about 19% wide) from 1 µs to
//! about 134 s, plus an overflow bucket. Every process uses the same bounds, so bucket counts
//! published by different devices add up exactly; percentiles are estimated within a bucket by
//! linear interpolation and clamped to the observed maximum.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per doubling.
const PER_OCTAVE: usize = 4;
/// Doublings above 1 µs covered (2^27 µs ≈ 134 s).
const OCTAVES: usize = 27;
/// Finite buckets; one more holds everything above the last bound.
pub const BUCKETS: usize = PER_OCTAVE * OCTAVES + 1;

/// Upper bounds in nanoseconds, inclusive, of the finite buckets.
pub fn bounds_ns() -> &'static [u64; BUCKETS] {
    static B: OnceLock<[u64; BUCKETS]> = OnceLock::new();
    B.get_or_init(|| {
        let mut b = [0u64; BUCKETS];
        for (i, slot) in b.iter_mut().enumerate() {
            let us = 2f64.powf(i as f64 / PER_OCTAVE as f64);
            *slot = (us * 1000.0).round() as u64;
        }
        b
    })
}

/// A concurrent histogram of durations.
pub struct Histogram {
    counts: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let idx = bounds_ns().partition_point(|b| *b < ns);
        self.counts[idx].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            max_ns: self.max_ns.load(Ordering::Relaxed),
        }
    }
}

/// A point-in-time copy of a histogram; can be merged and queried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `BUCKETS + 1` counts; the last is the overflow bucket.
    pub counts: Vec<u64>,
    pub sum_ns: u64,
    pub max_ns: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self { counts: vec![0; BUCKETS + 1], sum_ns: 0, max_ns: 0 }
    }
}

impl Snapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another snapshot's observations to this one.
    pub fn merge(&mut self, other: &Snapshot) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Observations since `earlier` (for windowed rates); saturating on counter resets.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            max_ns: self.max_ns,
        }
    }

    /// Estimated `q`-quantile (0..=1), or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let bounds = bounds_ns();
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if seen + c >= rank {
                let lower = if i == 0 { 0 } else { bounds[i - 1] };
                let upper = bounds.get(i).copied().unwrap_or(self.max_ns).max(lower);
                let frac = (rank - seen) as f64 / c as f64;
                let est = lower as f64 + frac * (upper - lower) as f64;
                return Some(Duration::from_nanos((est as u64).min(self.max_ns)));
            }
            seen += c;
        }
        Some(Duration::from_nanos(self.max_ns))
    }

    pub fn mean(&self) -> Option<Duration> {
        let n = self.count();
        (n > 0).then(|| Duration::from_nanos(self.sum_ns / n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sorted-array oracle: the exact q-quantile by nearest rank.
    fn oracle(sorted: &[u64], q: f64) -> u64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
        sorted[rank - 1]
    }

    #[test]
    fn bounds_are_increasing_and_cover_the_range() {
        let b = bounds_ns();
        assert_eq!(b[0], 1000);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        assert!(b[BUCKETS - 1] >= 134_000_000_000);
    }

    #[test]
    fn quantiles_are_within_one_bucket_of_the_exact_value() {
        // Deterministic pseudo-random latencies spanning 5 µs .. 50 ms (log-uniform).
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let h = Histogram::default();
        let mut values = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            let ns = (5_000.0 * 10f64.powf(u * 4.0)) as u64;
            values.push(ns);
            h.record(Duration::from_nanos(ns));
        }
        values.sort_unstable();
        let snap = h.snapshot();
        assert_eq!(snap.count(), 20_000);
        for q in [0.5, 0.9, 0.99, 0.999] {
            let exact = oracle(&values, q) as f64;
            let est = snap.quantile(q).expect("non-empty").as_nanos() as f64;
            let ratio = est / exact;
            // One bucket is 2^(1/4) ≈ 1.19 wide.
            assert!((0.84..=1.19).contains(&ratio), "q={q}: est {est} vs exact {exact}");
        }
        assert_eq!(snap.quantile(1.0), Some(Duration::from_nanos(*values.last().expect("max"))));
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let (a, b, all) = (Histogram::default(), Histogram::default(), Histogram::default());
        for i in 1..500u64 {
            let d = Duration::from_micros(i * 37 % 9000 + 1);
            if i % 3 == 0 { &a } else { &b }.record(d);
            all.record(d);
        }
        let mut m = a.snapshot();
        m.merge(&b.snapshot());
        assert_eq!(m, all.snapshot());
        assert_eq!(m.since(&a.snapshot()), {
            let mut s = b.snapshot();
            s.max_ns = m.max_ns;
            s
        });
    }

    #[test]
    fn empty_and_extreme_values() {
        let h = Histogram::default();
        assert_eq!(h.snapshot().quantile(0.99), None);
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(1000));
        let s = h.snapshot();
        assert_eq!(s.counts[0], 1);
        assert_eq!(s.counts[BUCKETS], 1, "overflow bucket");
        assert_eq!(s.quantile(1.0), Some(Duration::from_secs(1000)));
    }
}
