//! Adaptive overload control: keep served frames within the latency objective when frames
//! arrive faster than the workers can serve them, and share what capacity there is fairly
//! between devices.
//!
//! Two parts:
//! - [`Shedder`], on the ingest path: counts arrivals per device and admits 1 in N frames of
//!   each device the controller marked as over its fair share, N = rate / share (fractional:
//!   N = 1.25 admits four frames of five, evenly spaced; frames not admitted are counted as
//!   dropped/`shed`). One map lookup per frame, under a lock only the ingest task and the
//!   controller take.
//! - [`Controller`], ticked every `overload.interval`: reads the arrival rate (per device), the
//!   service rate (frames per second of worker busy time), the latency objective and memory
//!   pressure, and decides
//!   1. the admission rate: when arrivals exceed `OVERRATE` x the service rate, or exceed
//!      `UTILIZATION` x service rate while the queue is building up (half way to its limit), a
//!      max-min fair share of `UTILIZATION` x service rate per device (water-filling: quiet
//!      devices keep everything, chatty ones are sampled 1-in-N down to the share), so one
//!      chatty sensor cannot starve the rest;
//!   2. the effective queue limit: by Little's law, a frame behind `k` others waits about
//!      `k / service_rate`, so at most `(objective - service P99) x service_rate` frames may wait
//!      (never more than the configured capacity);
//!   3. under memory pressure (cgroup `memory.current` near `memory.high`, or memory PSI), the
//!      queue limit is halved for as long as the pressure lasts.
//!
//! Micro-batching is not among the levers: the workers run one frame per inference (see the
//! README's performance notes for what batching buys and why it is not wired in yet).
//!
//! Every decision is published in health and metrics ([`OverloadStatus`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::devices::DeviceKey;

/// Fraction of the measured service rate the controller admits while shedding (headroom for
/// jitter in the rate estimates; the README's overload table was measured with this value).
pub const UTILIZATION: f64 = 0.95;
/// Arrivals above this multiple of the service rate start shedding even with a short queue
/// (the rate estimates are noisy: at exactly 1x saturation 1.0 flapped into shedding).
const OVERRATE: f64 = 1.05;
/// Devices tracked individually; beyond that, new devices share one bucket. Devices are keyed
/// by a hash of their name and keep at most [`NAME_BYTES`] of it for health: about 200 bytes
/// a device (under 1 MiB per pipeline) whatever the topics say.
pub const MAX_DEVICES: usize = 4096;
/// Name of the shared bucket for devices beyond [`MAX_DEVICES`] (NUL cannot be in a topic).
const OVERFLOW_KEY: &str = "\u{0}other";
/// Bytes of a device's name kept for the health report.
const NAME_BYTES: usize = 64;
/// Memory PSI `some avg10` (percent) above which the controller treats memory as under pressure.
const PSI_PRESSURE: f64 = 10.0;
/// `memory.current / memory.high` above which memory is under pressure.
const HIGH_WATERMARK: f64 = 0.9;
/// Time constant of the rate averages: long enough that a device sending 8 frames/s does not
/// look like 0 or 20 frames/s from one 100 ms interval to the next, short enough to follow a
/// burst within a couple of seconds.
const TAU: Duration = Duration::from_secs(1);

/// Weight of a new observation covering `dt` in an exponential average with time constant TAU.
fn alpha(dt: Duration) -> f64 {
    1.0 - (-dt.as_secs_f64() / TAU.as_secs_f64()).exp()
}

#[derive(Debug, Default)]
struct Device {
    /// The device's name (its first topic capture), cut to NAME_BYTES, for health.
    name: Box<str>,
    /// Arrivals since the controller last looked.
    arrivals: u64,
    /// Arrivals per second, smoothed.
    rate: f64,
    /// Fraction of this device's frames to admit (1.0: all): one in `1 / admit`, evenly spaced.
    admit: f64,
    /// Admission credit: each arrival adds `admit`, an admitted frame spends 1.
    credit: f64,
    /// Ticks without arrivals (idle devices are forgotten).
    idle_ticks: u32,
    admitted: u64,
    shed: u64,
}

#[derive(Default)]
struct ShedInner {
    devices: HashMap<DeviceKey, Device>,
}

/// Per-device admission on the ingest path.
#[derive(Default)]
pub struct Shedder {
    inner: Mutex<ShedInner>,
}

impl Shedder {
    fn lock(&self) -> std::sync::MutexGuard<'_, ShedInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an arrival from `device` and says whether to admit it.
    pub fn admit(&self, device: &str) -> bool {
        let mut g = self.lock();
        let n = g.devices.len();
        let key = DeviceKey::of(device);
        let d = match g.devices.get_mut(&key) {
            Some(d) => d,
            None => {
                let name = if n < MAX_DEVICES { device } else { OVERFLOW_KEY };
                g.devices.entry(DeviceKey::of(name)).or_insert_with(|| Device {
                    name: crate::topic::shorten(name, NAME_BYTES).into(),
                    admit: 1.0,
                    credit: 1.0,
                    ..Device::default()
                })
            }
        };
        d.arrivals += 1;
        // Deterministic sampling: with admit = 0.25 exactly every fourth frame passes, with
        // 0.8 four of every five; no randomness, so the shares are exact over any stretch.
        d.credit = (d.credit + d.admit).min(1.0 + d.admit);
        let admit = d.credit >= 1.0;
        if admit {
            d.credit -= 1.0;
            d.admitted += 1;
        } else {
            d.shed += 1;
        }
        admit
    }

    /// Devices currently tracked.
    pub fn devices(&self) -> usize {
        self.lock().devices.len()
    }

    /// (device, admitted, shed) for the `n` devices with the most frames shed.
    pub fn top_shed(&self, n: usize) -> Vec<(String, u64, u64)> {
        let g = self.lock();
        let mut v: Vec<(String, u64, u64)> = g
            .devices
            .iter()
            .filter(|(_, d)| d.shed > 0)
            .map(|(_, d)| (d.name.to_string(), d.admitted, d.shed))
            .collect();
        v.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// What the controller needs to know each tick.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inputs {
    pub elapsed: Duration,
    /// Frames a worker finished since the last tick, and the worker time they took.
    pub handled: u64,
    pub busy: Duration,
    pub workers: usize,
    pub queue_depth: usize,
    pub capacity: usize,
    /// The latency the controller steers to (the SLO's latency objective), if any.
    pub objective: Option<Duration>,
    /// Recent P99 of worker service time (inference + result), if known.
    pub service_p99: Option<Duration>,
    pub memory_pressure: bool,
}

/// The controller's latest decisions and the measurements behind them.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct OverloadStatus {
    pub enabled: bool,
    /// Frames per second arriving (valid and invalid, before shedding).
    pub arrival_rate: f64,
    /// Frames per second the workers can serve (from busy time).
    pub service_rate: f64,
    /// Fraction of arrivals admitted this interval (1.0: no shedding).
    pub admit_ratio: f64,
    /// Per-device fair share in frames per second while shedding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fair_share: Option<f64>,
    pub shedding_devices: usize,
    pub devices: usize,
    /// Effective queue limit (<= configured capacity).
    pub queue_limit: usize,
    /// Frames a worker may take into one inference (1 without batched plans).
    pub batch_limit: usize,
    pub memory_pressure: bool,
}

/// Smoothed service measurements and the decisions; one per pipeline.
#[derive(Debug, Default)]
pub struct Controller {
    /// Seconds of worker time per frame, smoothed.
    service_time: Option<f64>,
    status: OverloadStatus,
}

impl Controller {
    pub fn status(&self) -> &OverloadStatus {
        &self.status
    }

    /// Records the batch limit chosen with [`pick_batch`] (for the status).
    pub fn set_batch_limit(&mut self, n: usize) {
        self.status.batch_limit = n;
    }

    /// Mean worker time per frame, once measured.
    pub fn service_time(&self) -> Option<Duration> {
        self.service_time.map(Duration::from_secs_f64)
    }

    /// One control step: updates rates from `shedder`'s counts, sets each device's sampling, and
    /// returns the queue limit to apply.
    pub fn tick(&mut self, shedder: &Shedder, i: &Inputs) -> usize {
        let secs = i.elapsed.as_secs_f64().max(1e-3);
        let a = alpha(i.elapsed);
        if i.handled > 0 {
            let per = i.busy.as_secs_f64() / i.handled as f64;
            // Weighted by the frames seen, so a tick with one frame moves the average little.
            let w = a.max(1.0 - (1.0 - a).powf(i.handled as f64 / 4.0)).min(1.0);
            self.service_time = Some(match self.service_time {
                Some(s) => s * (1.0 - w) + per * w,
                None => per,
            });
        }
        let service_rate = self.service_time.map_or(0.0, |t| i.workers as f64 / t.max(1e-9));

        let mut g = shedder.lock();
        let mut total = 0.0;
        g.devices.retain(|_, d| {
            let r = d.arrivals as f64 / secs;
            d.rate = if d.rate == 0.0 { r } else { d.rate * (1.0 - a) + r * a };
            if d.arrivals == 0 {
                d.idle_ticks += 1;
            } else {
                d.idle_ticks = 0;
            }
            d.arrivals = 0;
            total += d.rate;
            // Forget devices silent for a while (about a minute at the default interval), so
            // a churn of device names cannot fill the map.
            d.idle_ticks < 240
        });

        // Budget: what the workers can take, less what it takes to drain a backlog that
        // exceeds the queue limit within about a second.
        let backlog = i.queue_depth.saturating_sub(self.status.queue_limit.max(1)) as f64;
        let budget =
            if service_rate > 0.0 { (service_rate * UTILIZATION - backlog).max(0.0) } else { 0.0 };
        // Shed when arrivals exceed what the workers can take, or when they exceed the budget
        // while the queue is already half way to its limit (building up). A queue that stays
        // short means the workers keep up, whatever the smoothed rates say: shedding then would
        // only cost goodput (measured: 8% of frames at 1x saturation with a plain 90% budget).
        let building = i.queue_depth * 2 >= self.status.queue_limit.max(1);
        let shedding =
            service_rate > 0.0 && (total > service_rate * OVERRATE || (building && total > budget));
        let share =
            if shedding { fair_share(g.devices.values().map(|d| d.rate), budget) } else { None };
        let mut shedding_devices = 0;
        for d in g.devices.values_mut() {
            d.admit = match share {
                Some(f) if d.rate > f => {
                    shedding_devices += 1;
                    // A zero share (no budget at all) still admits 1 in 1000, so the service
                    // rate stays measurable and every device is still heard.
                    (f / d.rate).clamp(0.001, 1.0)
                }
                _ => 1.0,
            };
        }
        let admitted: f64 = g.devices.values().map(|d| d.rate * d.admit).sum();
        let devices = g.devices.len();
        drop(g);

        let mut limit = i.capacity.max(1);
        if let (Some(obj), true) = (i.objective, service_rate > 0.0) {
            let wait = obj.saturating_sub(i.service_p99.unwrap_or_default());
            let little = (wait.as_secs_f64() * service_rate).floor() as usize;
            limit = limit.min(little.max(1));
        }
        if i.memory_pressure {
            limit = (limit / 2).max(1);
        }
        self.status = OverloadStatus {
            enabled: true,
            arrival_rate: total,
            service_rate,
            admit_ratio: if total > 0.0 { (admitted / total).min(1.0) } else { 1.0 },
            fair_share: share,
            shedding_devices,
            devices,
            queue_limit: limit,
            batch_limit: self.status.batch_limit.max(1),
            memory_pressure: i.memory_pressure,
        };
        limit
    }
}

/// The micro-batch size to allow: the largest of `sizes` whose run time still leaves room in
/// the objective. A frame may wait for the batch ahead of it and then run in its own, so a batch
/// must take at most half the objective. `run_time(b)` is the measured mean run time of a batch
/// of `b` (None before one ran); unmeasured sizes are estimated as `b` x the single-frame time
/// (batching is never slower per frame than that in practice, so the estimate is conservative).
/// Without an objective every size is allowed (throughput first).
pub fn pick_batch(
    sizes: &[usize],
    run_time: impl Fn(usize) -> Option<Duration>,
    single: Option<Duration>,
    objective: Option<Duration>,
) -> usize {
    let Some(objective) = objective else {
        return sizes.iter().copied().max().unwrap_or(1);
    };
    let budget = objective / 2;
    sizes
        .iter()
        .copied()
        .filter(|&b| {
            b <= 1
                || run_time(b).or_else(|| single.map(|t| t * b as u32)).is_some_and(|t| t <= budget)
        })
        .max()
        .unwrap_or(1)
}

/// Max-min fair share: the per-device cap `f` such that `sum(min(rate_i, f)) == budget`, or
/// `None` when every device fits (no cap needed).
pub fn fair_share(rates: impl Iterator<Item = f64>, budget: f64) -> Option<f64> {
    let mut r: Vec<f64> = rates.filter(|x| *x > 0.0).collect();
    if r.iter().sum::<f64>() <= budget {
        return None;
    }
    r.sort_by(|a, b| a.total_cmp(b));
    let mut left = budget.max(0.0);
    let n = r.len();
    for (k, x) in r.iter().enumerate() {
        let remaining = (n - k) as f64;
        // Devices from k on are capped at the same share; the quietest of them fits whole?
        if *x * remaining <= left {
            left -= x;
        } else {
            return Some(left / remaining);
        }
    }
    None
}

/// Whether a cgroup's memory stats show pressure worth shrinking queues for.
pub fn memory_pressure(stats: &crate::sys::cgroup::Stats) -> bool {
    let near_high = match (stats.memory_current, stats.memory_high.or(stats.memory_max)) {
        (Some(cur), Some(high)) if high > 0 => cur as f64 >= high as f64 * HIGH_WATERMARK,
        _ => false,
    };
    let psi = stats.memory_pressure.is_some_and(|p| p.some.avg10 >= PSI_PRESSURE);
    near_high || psi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_share_is_max_min() {
        // Everyone fits: no cap.
        assert_eq!(fair_share([10.0, 20.0].into_iter(), 40.0), None);
        // Budget 60 over 10, 20, 100: 10 and 20 fit, the chatty one gets the rest (30).
        let f = fair_share([10.0, 100.0, 20.0].into_iter(), 60.0).expect("cap");
        assert!((f - 30.0).abs() < 1e-9, "{f}");
        // Budget 30 over 10, 20, 100: 10 fits, the other two get 10 each.
        let f = fair_share([10.0, 100.0, 20.0].into_iter(), 30.0).expect("cap");
        assert!((f - 10.0).abs() < 1e-9, "{f}");
        // Equal devices share equally.
        let f = fair_share([50.0; 4].into_iter(), 100.0).expect("cap");
        assert!((f - 25.0).abs() < 1e-9);
    }

    /// Drives a shedder and controller: `rates` frames per second per device for `secs`
    /// seconds in 250 ms ticks, with workers serving `service_rate` frames per second.
    fn simulate(rates: &[u64], service_rate: f64, secs: u64) -> (Shedder, Controller, Vec<u64>) {
        let s = Shedder::default();
        let mut c = Controller::default();
        let tick = Duration::from_millis(250);
        let mut admitted_last = vec![0u64; rates.len()];
        for t in 0..secs * 4 {
            let mut admitted = vec![0u64; rates.len()];
            for (i, r) in rates.iter().enumerate() {
                for _ in 0..r / 4 {
                    if s.admit(&format!("dev{i}")) {
                        admitted[i] += 1;
                    }
                }
            }
            let handled: u64 = admitted.iter().sum::<u64>().min((service_rate / 4.0) as u64);
            c.tick(
                &s,
                &Inputs {
                    elapsed: tick,
                    handled,
                    busy: Duration::from_secs_f64(handled as f64 / service_rate),
                    workers: 1,
                    queue_depth: 0,
                    capacity: 64,
                    objective: Some(Duration::from_millis(100)),
                    service_p99: Some(Duration::from_secs_f64(1.5 / service_rate)),
                    memory_pressure: false,
                },
            );
            if t == secs * 4 - 1 {
                admitted_last = admitted;
            }
        }
        (s, c, admitted_last)
    }

    #[test]
    fn under_capacity_nothing_is_shed() {
        let (s, c, _) = simulate(&[40, 40], 200.0, 5);
        assert!(s.top_shed(10).is_empty());
        assert_eq!(c.status().admit_ratio, 1.0);
        assert_eq!(c.status().shedding_devices, 0);
        assert!((c.status().service_rate - 200.0).abs() < 1.0, "{:?}", c.status());
    }

    #[test]
    fn a_chatty_device_cannot_starve_quiet_ones() {
        // Capacity 100/s (95 admitted); three quiet devices at 20/s and one chatty at 400/s.
        let (s, c, admitted) = simulate(&[20, 20, 20, 400], 100.0, 10);
        let st = c.status();
        assert_eq!(st.shedding_devices, 1, "{st:?}");
        // Quiet devices keep every frame; the chatty one is cut to the remaining share.
        assert_eq!(&admitted[..3], &[5, 5, 5], "per 250 ms tick");
        let share = st.fair_share.expect("share");
        assert!((share - 35.0).abs() < 3.0, "{share}");
        assert!(admitted[3] <= 10, "chatty device admitted {} per tick", admitted[3]);
        let top = s.top_shed(1);
        assert_eq!(top[0].0, "dev3");
        // Total admitted stays within the budget.
        let per_sec: u64 = admitted.iter().sum::<u64>() * 4;
        assert!(per_sec <= 100, "{per_sec}/s admitted of 100/s capacity");
    }

    #[test]
    fn equal_devices_are_sampled_equally() {
        let (_, c, admitted) = simulate(&[100, 100, 100], 100.0, 10);
        assert_eq!(c.status().shedding_devices, 3);
        let (lo, hi) = (admitted.iter().min(), admitted.iter().max());
        assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{admitted:?}");
    }

    #[test]
    fn queue_limit_follows_littles_law_and_memory_pressure() {
        let s = Shedder::default();
        let mut c = Controller::default();
        let mut i = Inputs {
            elapsed: Duration::from_millis(250),
            handled: 10,
            busy: Duration::from_millis(250), // 25 ms per frame: 40/s per worker
            workers: 2,
            queue_depth: 0,
            capacity: 64,
            objective: Some(Duration::from_millis(300)),
            service_p99: Some(Duration::from_millis(50)),
            memory_pressure: false,
        };
        // (300 - 50) ms x 80/s = 20 frames.
        assert_eq!(c.tick(&s, &i), 20);
        i.memory_pressure = true;
        assert_eq!(c.tick(&s, &i), 10);
        i.memory_pressure = false;
        i.objective = None;
        assert_eq!(c.tick(&s, &i), 64, "no objective: configured capacity");
        i.objective = Some(Duration::from_millis(10));
        assert_eq!(c.tick(&s, &i), 1, "never below one");
    }

    #[test]
    fn batch_size_fits_the_objective() {
        let sizes = [1, 2, 4, 8];
        let ms = Duration::from_millis;
        // Measured: 8 frames take 30 ms; objective 100 ms -> budget 50 ms: 8 fits.
        let measured = |b: usize| {
            Some(ms(match b {
                2 => 8,
                4 => 15,
                8 => 30,
                _ => 5,
            }))
        };
        assert_eq!(pick_batch(&sizes, measured, Some(ms(5)), Some(ms(100))), 8);
        // Objective 40 ms -> budget 20 ms: 4 (15 ms) fits, 8 (30 ms) does not.
        assert_eq!(pick_batch(&sizes, measured, Some(ms(5)), Some(ms(40))), 4);
        // Nothing measured yet: b x 5 ms; budget 20 ms -> 4.
        assert_eq!(pick_batch(&sizes, |_| None, Some(ms(5)), Some(ms(40))), 4);
        // Nothing known at all: no batching.
        assert_eq!(pick_batch(&sizes, |_| None, None, Some(ms(40))), 1);
        // No objective: the largest plan.
        assert_eq!(pick_batch(&sizes, |_| None, None, None), 8);
        // A tight objective: one frame at a time.
        assert_eq!(pick_batch(&sizes, measured, Some(ms(5)), Some(ms(10))), 1);
    }

    #[test]
    fn device_map_is_bounded() {
        let s = Shedder::default();
        for i in 0..MAX_DEVICES + 100 {
            s.admit(&format!("d{i}"));
        }
        assert_eq!(s.devices(), MAX_DEVICES + 1, "the overflow bucket holds the rest");
    }

    #[test]
    fn pressure_from_cgroup_stats() {
        use crate::sys::cgroup::{Psi, PsiLine, Stats};
        let mut st = Stats {
            memory_current: Some(50),
            memory_high: Some(100),
            memory_max: None,
            memory_events: vec![],
            memory_pressure: None,
            cpu_pressure: None,
        };
        assert!(!memory_pressure(&st));
        st.memory_current = Some(95);
        assert!(memory_pressure(&st));
        st.memory_current = Some(10);
        st.memory_pressure =
            Some(Psi { some: PsiLine { avg10: 25.0, ..PsiLine::default() }, full: None });
        assert!(memory_pressure(&st));
    }
}
