//! Service-level objectives: compliance and multi-window burn rate per pipeline.
//!
//! Two objectives can be configured per pipeline (`[pipelines.<name>.slo]`):
//! - **latency**: the `quantile` (e.g. 0.99) of arrival -> result-published time stays within
//!   `latency` over `latency_window`. A served frame slower than the objective is a "bad" event;
//!   the error budget is `1 - quantile`.
//! - **served**: the fraction of valid frames that are served (not dropped by the daemon, not
//!   failed) stays at or above `served` over `served_window`. Rejected payloads are the sender's
//!   fault and do not count; frames dropped at shutdown do not either.
//!
//! Burn rate is the bad fraction divided by the error budget: 1.0 spends the budget exactly over
//! the window. Each objective is evaluated over its window (long) and over a twelfth of it
//! (short, the 1 h / 5 min pairing of the SRE workbook):
//! - `breached`: long-window burn rate >= 1 (the objective is violated over its window);
//! - `at_risk`: not breached, but the short-window burn rate >= 1 (recent traffic is spending
//!   budget faster than the window allows: it breaches if that continues);
//! - `ok` otherwise, including when a window holds fewer than `min_frames` events.
//!
//! The tracker keeps cumulative samples in a ring (60 per window), so a window's numbers are a
//! difference of two samples: no per-frame work beyond the counters the hot path already keeps.
//! It owns no clock and no I/O; `app` ticks it and logs transitions.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Snapshot;
use crate::config::{LatencySlo, ServedSlo, SloConfig};

/// Samples kept per window.
const SAMPLES_PER_WINDOW: u32 = 60;
/// Short window = window / SHORT_DIVISOR.
const SHORT_DIVISOR: u32 = 12;

/// Compliance state, ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SloState {
    Ok,
    AtRisk,
    Breached,
}

impl SloState {
    pub fn as_str(self) -> &'static str {
        match self {
            SloState::Ok => "ok",
            SloState::AtRisk => "at_risk",
            SloState::Breached => "breached",
        }
    }
}

/// Cumulative counts read from a pipeline's statistics at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Frames served (result handed to the MQTT client).
    pub served: u64,
    /// Served frames slower than the latency objective.
    pub slow: u64,
    /// Valid frames the daemon did not serve: dropped (except at shutdown) or failed.
    pub lost: u64,
}

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    good: u64,
    total: u64,
    /// Latency histogram (latency objective only), for reporting the window's quantile.
    hist: Option<Snapshot>,
}

/// What one window of one objective shows.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct WindowReport {
    /// Seconds the window actually covers (less than configured right after start).
    pub seconds: f64,
    pub events: u64,
    pub bad: u64,
    /// good / events (1.0 when there are no events).
    pub compliance: f64,
    pub burn_rate: f64,
}

/// One objective's evaluation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ObjectiveReport {
    pub state: SloState,
    /// The objective as configured: the target fraction (quantile or served ratio).
    pub target: f64,
    pub window_s: f64,
    /// Latency objective only: the threshold in seconds, and the measured quantile over the
    /// long window (seconds; `None` without data).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_s: Option<f64>,
    pub long: WindowReport,
    pub short: WindowReport,
}

/// Both objectives of a pipeline and the overall state (the worst of them).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SloReport {
    pub state: SloState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<ObjectiveReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served: Option<ObjectiveReport>,
}

struct Objective {
    target: f64,
    window: Duration,
    threshold: Option<Duration>,
    ring: VecDeque<Sample>,
    report: Option<ObjectiveReport>,
}

impl Objective {
    fn new(target: f64, window: Duration, threshold: Option<Duration>) -> Self {
        Objective {
            target,
            window,
            threshold,
            ring: VecDeque::with_capacity(SAMPLES_PER_WINDOW as usize + 2),
            report: None,
        }
    }

    fn spacing(&self) -> Duration {
        self.window / SAMPLES_PER_WINDOW
    }

    /// Adds the current cumulative sample (keeping one per `spacing`, plus the newest) and
    /// evaluates both windows.
    fn update(&mut self, now: Sample, min_frames: u64) -> &ObjectiveReport {
        // Samples stay at least `spacing` apart, except the newest, which is replaced while it
        // is closer than that to the one before it: the ring holds about 60 samples per window
        // however often it is ticked.
        let n = self.ring.len();
        if n >= 2
            && let (Some(prev), Some(last)) = (self.ring.get(n - 2), self.ring.get(n - 1))
            && last.at.saturating_duration_since(prev.at) < self.spacing()
        {
            self.ring.pop_back();
        }
        self.ring.push_back(now.clone());
        while self.ring.len() > 2
            && self
                .ring
                .get(1)
                .is_some_and(|s| now.at.saturating_duration_since(s.at) >= self.window)
        {
            self.ring.pop_front();
        }
        let long = self.window_report(&now, self.window);
        let short = self.window_report(&now, self.window / SHORT_DIVISOR);
        let state = if long.events >= min_frames && long.burn_rate >= 1.0 {
            SloState::Breached
        } else if short.events >= min_frames && short.burn_rate >= 1.0 {
            SloState::AtRisk
        } else {
            SloState::Ok
        };
        let measured_s = self.threshold.and_then(|_| {
            let base = self.base(&now, self.window)?;
            let (cur, old) = (now.hist.as_ref()?, base.hist.as_ref()?);
            cur.since(old).quantile(self.target).map(|d| d.as_secs_f64())
        });
        self.report.insert(ObjectiveReport {
            state,
            target: self.target,
            window_s: self.window.as_secs_f64(),
            threshold_s: self.threshold.map(|d| d.as_secs_f64()),
            measured_s,
            long,
            short,
        })
    }

    /// The oldest sample within `window` of `now` (the start of the window).
    fn base(&self, now: &Sample, window: Duration) -> Option<&Sample> {
        self.ring
            .iter()
            .find(|s| now.at.saturating_duration_since(s.at) <= window)
            .or(self.ring.back())
    }

    fn window_report(&self, now: &Sample, window: Duration) -> WindowReport {
        let Some(base) = self.base(now, window) else {
            return WindowReport {
                seconds: 0.0,
                events: 0,
                bad: 0,
                compliance: 1.0,
                burn_rate: 0.0,
            };
        };
        let events = now.total.saturating_sub(base.total);
        let good = now.good.saturating_sub(base.good).min(events);
        let bad = events - good;
        let compliance = if events == 0 { 1.0 } else { good as f64 / events as f64 };
        let budget = (1.0 - self.target).max(1e-9);
        WindowReport {
            seconds: now.at.saturating_duration_since(base.at).as_secs_f64(),
            events,
            bad,
            compliance,
            burn_rate: (1.0 - compliance) / budget,
        }
    }
}

/// Tracks one pipeline's objectives over time.
pub struct SloTracker {
    latency: Option<Objective>,
    served: Option<Objective>,
    min_frames: u64,
    state: SloState,
}

impl SloTracker {
    /// `None` when the config has no objective.
    pub fn new(cfg: &SloConfig) -> Option<SloTracker> {
        if cfg.latency.is_none() && cfg.served.is_none() {
            return None;
        }
        Some(SloTracker {
            latency: cfg.latency.as_ref().map(|LatencySlo { objective, quantile, window }| {
                Objective::new(*quantile, *window, Some(*objective))
            }),
            served: cfg
                .served
                .as_ref()
                .map(|ServedSlo { ratio, window }| Objective::new(*ratio, *window, None)),
            min_frames: cfg.min_frames,
            state: SloState::Ok,
        })
    }

    /// How often [`SloTracker::tick`] should run: a sample spacing of the shortest window.
    pub fn tick_every(&self) -> Duration {
        [&self.latency, &self.served]
            .into_iter()
            .flatten()
            .map(Objective::spacing)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(100), Duration::from_secs(60))
    }

    /// Records the current cumulative counts (and latency histogram) and re-evaluates. Returns
    /// the previous state when the overall state changed.
    pub fn tick(&mut self, at: Instant, c: Counts, hist: &Snapshot) -> Option<SloState> {
        let mut state = SloState::Ok;
        if let Some(o) = self.latency.as_mut() {
            let s = Sample {
                at,
                good: c.served.saturating_sub(c.slow),
                total: c.served,
                hist: Some(hist.clone()),
            };
            state = state.max(o.update(s, self.min_frames).state);
        }
        if let Some(o) = self.served.as_mut() {
            let s = Sample { at, good: c.served, total: c.served + c.lost, hist: None };
            state = state.max(o.update(s, self.min_frames).state);
        }
        let prev = std::mem::replace(&mut self.state, state);
        (prev != state).then_some(prev)
    }

    pub fn state(&self) -> SloState {
        self.state
    }

    /// The latest evaluation.
    pub fn report(&self) -> SloReport {
        SloReport {
            state: self.state,
            latency: self.latency.as_ref().and_then(|o| o.report.clone()),
            served: self.served.as_ref().and_then(|o| o.report.clone()),
        }
    }

    /// One line for logs and `STATUS=`: state and the numbers behind it.
    pub fn describe(&self) -> String {
        let r = self.report();
        let mut parts = vec![r.state.as_str().to_string()];
        if let Some(l) = &r.latency {
            parts.push(format!(
                "p{} {} (objective {:.1}ms, burn {:.2} long / {:.2} short)",
                quantile_label(l.target),
                l.measured_s.map_or("-".into(), |s| format!("{:.1}ms", s * 1000.0)),
                l.threshold_s.unwrap_or(0.0) * 1000.0,
                l.long.burn_rate,
                l.short.burn_rate
            ));
        }
        if let Some(s) = &r.served {
            parts.push(format!(
                "served {:.3}% (objective {:.3}%, burn {:.2} long / {:.2} short)",
                s.long.compliance * 100.0,
                s.target * 100.0,
                s.long.burn_rate,
                s.short.burn_rate
            ));
        }
        parts.join(", ")
    }
}

/// 0.99 -> "99", 0.999 -> "99.9".
fn quantile_label(q: f64) -> String {
    let s = format!("{:.3}", q * 100.0);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Histogram;

    fn cfg(latency_ms: Option<u64>, served: Option<f64>) -> SloConfig {
        SloConfig {
            latency: latency_ms.map(|ms| LatencySlo {
                objective: Duration::from_millis(ms),
                quantile: 0.99,
                window: Duration::from_secs(60),
            }),
            served: served.map(|ratio| ServedSlo { ratio, window: Duration::from_secs(120) }),
            min_frames: 10,
        }
    }

    /// Drives a tracker one tick per simulated second.
    struct Sim {
        t: SloTracker,
        at: Instant,
        c: Counts,
        h: Histogram,
    }

    impl Sim {
        fn new(cfg: &SloConfig) -> Sim {
            Sim {
                t: SloTracker::new(cfg).expect("objectives"),
                at: Instant::now(),
                c: Counts::default(),
                h: Histogram::default(),
            }
        }
        /// `secs` seconds of `served` frames per second (the first `slow` of them slow) and
        /// `lost` lost frames per second; returns the state after the last second.
        fn run(&mut self, secs: u64, served: u64, slow: u64, lost: u64) -> SloState {
            for _ in 0..secs {
                self.at += Duration::from_secs(1);
                self.c.served += served;
                self.c.slow += slow;
                self.c.lost += lost;
                for i in 0..served {
                    let ms = if i < slow { 200 } else { 5 };
                    self.h.record(Duration::from_millis(ms));
                }
                self.t.tick(self.at, self.c, &self.h.snapshot());
            }
            self.t.state()
        }
    }

    #[test]
    fn no_objectives_no_tracker() {
        assert!(SloTracker::new(&cfg(None, None)).is_none());
    }

    #[test]
    fn healthy_traffic_is_ok() {
        let mut s = Sim::new(&cfg(Some(50), Some(0.999)));
        assert_eq!(s.run(300, 100, 0, 0), SloState::Ok);
        let r = s.t.report();
        let l = r.latency.expect("latency");
        assert_eq!(l.long.events, 6000, "60 s window at 100/s");
        assert!((l.long.seconds - 60.0).abs() <= 1.0, "{}", l.long.seconds);
        assert_eq!(l.short.events, 500, "5 s short window");
        assert!(l.measured_s.expect("p99") < 0.05);
        assert_eq!(r.served.expect("served").long.compliance, 1.0);
    }

    #[test]
    fn a_burst_of_slow_frames_is_at_risk_before_it_is_breached() {
        let mut s = Sim::new(&cfg(Some(50), None));
        s.run(120, 100, 0, 0);
        // 3% slow: the 5 s window burns 3x at once; the 60 s window needs 20 s to reach 1.0.
        let mut states = Vec::new();
        for _ in 0..40 {
            states.push(s.run(1, 100, 3, 0));
        }
        // One slow second in the 5 s window is 0.6% slow (burn 0.6); two are 1.2%.
        assert_eq!(states[0], SloState::Ok);
        assert_eq!(states[1], SloState::AtRisk);
        let first_breach = states.iter().position(|s| *s == SloState::Breached).expect("breach");
        assert!((18..=21).contains(&first_breach), "breached after {} s", first_breach + 1);
        assert!(states[1..first_breach].iter().all(|s| *s == SloState::AtRisk));
        let l = s.t.report().latency.expect("latency");
        assert!(l.measured_s.expect("p99") > 0.05, "{l:?}");
        assert!((l.short.burn_rate - 3.0).abs() < 0.01, "{l:?}");
        // Recovery: the short window clears first (at_risk -> breached persists until the long
        // window forgets), then everything is ok again.
        assert_eq!(s.run(10, 100, 0, 0), SloState::Breached);
        assert_eq!(s.run(60, 100, 0, 0), SloState::Ok);
    }

    #[test]
    fn served_objective_counts_losses_against_the_budget() {
        let mut s = Sim::new(&cfg(None, Some(0.99)));
        // 0.5% lost: half the budget, ok.
        assert_eq!(s.run(200, 199, 0, 1), SloState::Ok);
        let r = s.t.report().served.expect("served");
        assert!((r.long.burn_rate - 0.5).abs() < 0.01, "{r:?}");
        // 5% lost from now on: at_risk within two seconds (the 10 s window is then at 1.4%),
        // breached once the 120 s window is over 1%.
        assert_eq!(s.run(2, 190, 0, 10), SloState::AtRisk);
        assert_eq!(s.run(40, 190, 0, 10), SloState::Breached);
    }

    #[test]
    fn too_few_frames_is_not_a_verdict() {
        let mut s = Sim::new(&cfg(Some(50), None));
        // Every frame is slow, but 5 frames in the window is below min_frames = 10.
        assert_eq!(s.run(5, 1, 1, 0), SloState::Ok);
        assert_eq!(s.run(10, 1, 1, 0), SloState::Breached);
    }

    #[test]
    fn transitions_are_reported_once() {
        let c = cfg(None, Some(0.99));
        let mut t = SloTracker::new(&c).expect("tracker");
        let h = Snapshot::default();
        let at = Instant::now();
        let mut counts = Counts { served: 1000, slow: 0, lost: 0 };
        assert_eq!(t.tick(at, counts, &h), None);
        counts.lost += 500;
        assert_eq!(t.tick(at + Duration::from_secs(1), counts, &h), Some(SloState::Ok));
        assert_eq!(t.state(), SloState::Breached);
        assert_eq!(t.tick(at + Duration::from_secs(2), counts, &h), None);
    }

    #[test]
    fn ring_stays_bounded() {
        let mut s = Sim::new(&cfg(Some(50), Some(0.99)));
        // Ticks ten times faster than the sample spacing for many windows.
        for _ in 0..5000 {
            s.at += Duration::from_millis(100);
            s.c.served += 10;
            s.t.tick(s.at, s.c, &s.h.snapshot());
        }
        for o in [&s.t.latency, &s.t.served].into_iter().flatten() {
            assert!(o.ring.len() <= SAMPLES_PER_WINDOW as usize + 3, "{}", o.ring.len());
        }
    }

    #[test]
    fn quantile_labels() {
        assert_eq!(quantile_label(0.99), "99");
        assert_eq!(quantile_label(0.999), "99.9");
        assert_eq!(quantile_label(0.5), "50");
    }
}
