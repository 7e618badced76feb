//! Event mode: per device (source topic), which results are published and the on/off state of
//! thresholded values.
//!
//! Every served frame is *observed* (its top-1 class, its set of detected classes, or its value)
//! and the gate decides:
//! - threshold state (regression/anomaly_score with a threshold): turns on when the value goes
//!   above `threshold`, off only when it drops below `clear` (hysteresis: a value hovering at
//!   the threshold does not flap). NaN leaves the state as it was.
//! - `publish = "always"`: every result; `"on_change"`: a device's first result, then a result
//!   whose observation differs from the last published one (for values without a threshold:
//!   moved by more than `delta`); `"while_active"`: the first result, every result while the
//!   state is on and the one that turns it off. With `heartbeat`, an unchanged result is
//!   published anyway when the device's last published one is that old.
//! - Workers serve frames concurrently, so a device's results can finish out of order: a result
//!   older (by frame number) than one already observed does not move the state; it is published
//!   only with `publish = "always"`.
//!
//! State is bounded by `max_devices` in a [`devices::Table`] (keyed by a hash of the topic: the
//! same few dozen bytes a device however long its topic; O(1) per result): a new device beyond
//! it forgets the least recently seen one (whose next result then counts as its first). Withheld results are counted
//! (`results_suppressed`) and each published event says how many of its device's results were
//! withheld since the previous one.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::config::PostProcess;
use crate::config::events::{EventsConfig, Publish};

use super::devices::{self, DeviceKey};

/// What event mode compares between a device's results.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// Nothing to compare (raw tensors).
    None,
    /// A discrete state: the top-1 class, or a digest of the set of detected classes.
    Key(u64),
    /// A regression value or anomaly score.
    Value(f64),
}

/// The gate's verdict on one result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub publish: bool,
    /// The threshold state after this result (thresholded values only).
    pub active: Option<bool>,
    /// Why it is published: `always`, `first`, `change`, `active`, `cleared`, `heartbeat`,
    /// `stale` (an out-of-order result under `always`).
    pub reason: &'static str,
    /// Results of this device withheld since its previous published one.
    pub suppressed: u64,
    /// The pipeline's publish mode.
    pub mode: Publish,
}

#[derive(Debug)]
struct DeviceState {
    last_frame: u64,
    active: bool,
    published_key: Option<u64>,
    published_value: Option<f64>,
    last_published: Instant,
    suppressed: u64,
}

/// One pipeline's event state, shared by its workers.
#[derive(Debug)]
pub struct EventGate {
    cfg: EventsConfig,
    band: Option<(f64, f64)>,
    devices: Mutex<devices::Table<DeviceState>>,
    /// Devices forgotten to stay within `max_devices`.
    pub evicted: AtomicU64,
}

impl EventGate {
    /// `None` when every result is published and nothing has a threshold state.
    pub fn new(cfg: &EventsConfig, post: &PostProcess) -> Option<EventGate> {
        let band = match post {
            PostProcess::Regression(v) | PostProcess::AnomalyScore(v) => v.band(),
            _ => None,
        };
        if cfg.publish == Publish::Always && band.is_none() {
            return None;
        }
        Some(EventGate {
            cfg: cfg.clone(),
            band,
            devices: Mutex::new(devices::Table::new(cfg.max_devices)),
            evicted: AtomicU64::new(0),
        })
    }

    /// Devices with state now.
    pub fn devices(&self) -> usize {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Observes frame `frame` (the pipeline's frame counter) of `device` and decides.
    pub fn decide(&self, device: &str, frame: u64, obs: Observation, now: Instant) -> Decision {
        let mut map = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let (st, first, evicted) = map.get_or_insert_with(DeviceKey::of(device), || DeviceState {
            last_frame: frame,
            active: false,
            published_key: None,
            published_value: None,
            last_published: now,
            suppressed: 0,
        });
        if evicted.is_some() {
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let band = self.band;
        if !first && frame < st.last_frame {
            let publish = self.cfg.publish == Publish::Always;
            let suppressed = if publish { 0 } else { st.suppressed + 1 };
            if !publish {
                st.suppressed += 1;
            }
            let active = band.map(|_| st.active);
            return Decision {
                publish,
                active,
                reason: "stale",
                suppressed,
                mode: self.cfg.publish,
            };
        }
        st.last_frame = frame;
        let was_active = st.active;
        if let (Some((on, off)), Observation::Value(v)) = (band, obs) {
            if !st.active && v > on {
                st.active = true;
            } else if st.active && v < off {
                st.active = false;
            }
        }
        let (mut publish, mut reason) = match self.cfg.publish {
            Publish::Always => (true, "always"),
            _ if first => (true, "first"),
            Publish::OnChange => {
                let changed = match obs {
                    Observation::Key(k) => st.published_key != Some(k),
                    Observation::Value(_) if band.is_some() => was_active != st.active,
                    Observation::Value(v) => match (st.published_value, self.cfg.delta) {
                        (Some(last), Some(d)) => (v - last).abs() > d,
                        (None, _) => !v.is_nan(),
                        (Some(_), None) => false,
                    },
                    Observation::None => false,
                };
                (changed, "change")
            }
            Publish::WhileActive => match (was_active, st.active) {
                (_, true) => (true, "active"),
                (true, false) => (true, "cleared"),
                (false, false) => (false, ""),
            },
        };
        if !publish
            && let Some(hb) = self.cfg.heartbeat
            && now.saturating_duration_since(st.last_published) >= hb
        {
            publish = true;
            reason = "heartbeat";
        }
        let suppressed = st.suppressed;
        if publish {
            st.last_published = now;
            st.suppressed = 0;
            match obs {
                Observation::Key(k) => st.published_key = Some(k),
                Observation::Value(v) if !v.is_nan() => st.published_value = Some(v),
                _ => {}
            }
        } else {
            st.suppressed += 1;
        }
        Decision {
            publish,
            active: band.map(|_| st.active),
            reason,
            suppressed,
            mode: self.cfg.publish,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ClassificationConfig;
    use crate::config::events::ValueConfig;

    fn anomaly(threshold: f64, clear: f64) -> PostProcess {
        PostProcess::AnomalyScore(ValueConfig {
            output: None,
            index: 0,
            threshold: Some(threshold),
            clear: Some(clear),
            include_outputs: false,
        })
    }

    fn events(publish: Publish) -> EventsConfig {
        EventsConfig { publish, ..EventsConfig::default() }
    }

    /// (published, active) for a run of values from one device.
    fn run(gate: &EventGate, values: &[f64]) -> Vec<(bool, Option<bool>, &'static str)> {
        let t0 = Instant::now();
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let d = gate.decide("dev", i as u64, Observation::Value(*v), t0);
                (d.publish, d.active, d.reason)
            })
            .collect()
    }

    #[test]
    fn threshold_state_has_hysteresis() {
        let gate = EventGate::new(&events(Publish::Always), &anomaly(0.5, 0.3)).expect("gate");
        let states: Vec<Option<bool>> =
            run(&gate, &[0.1, 0.6, 0.45, 0.31, 0.29, 0.49, 0.51, f64::NAN])
                .into_iter()
                .map(|r| r.1)
                .collect();
        let (on, off) = (Some(true), Some(false));
        assert_eq!(states, vec![off, on, on, on, off, off, on, on], "NaN keeps the state");
    }

    #[test]
    fn on_change_publishes_transitions_only() {
        let gate = EventGate::new(&events(Publish::OnChange), &anomaly(0.5, 0.3)).expect("gate");
        let got = run(&gate, &[0.1, 0.2, 0.9, 0.8, 0.4, 0.2, 0.1]);
        let published: Vec<(usize, &str)> =
            got.iter().enumerate().filter(|(_, r)| r.0).map(|(i, r)| (i, r.2)).collect();
        assert_eq!(published, vec![(0, "first"), (2, "change"), (5, "change")]);
        // The next published one says how many were withheld: 0.2 after 0.1 (1), then 0.8 and
        // 0.4 (2).
        let t0 = Instant::now();
        let d = gate.decide("dev", 100, Observation::Value(0.9), t0);
        assert!(d.publish && d.suppressed == 1, "{d:?}");
    }

    #[test]
    fn while_active_publishes_the_episode_and_its_end() {
        let gate = EventGate::new(&events(Publish::WhileActive), &anomaly(0.5, 0.3)).expect("gate");
        let got = run(&gate, &[0.1, 0.2, 0.9, 0.8, 0.4, 0.2, 0.1]);
        let published: Vec<(usize, &str)> =
            got.iter().enumerate().filter(|(_, r)| r.0).map(|(i, r)| (i, r.2)).collect();
        assert_eq!(
            published,
            vec![(0, "first"), (2, "active"), (3, "active"), (4, "active"), (5, "cleared")]
        );
    }

    #[test]
    fn classes_compare_by_key_and_devices_are_independent() {
        let post = PostProcess::Classification(ClassificationConfig {
            top_k: 1,
            labels: None,
            output: None,
            softmax: false,
            score_threshold: None,
            include_outputs: false,
        });
        assert!(EventGate::new(&events(Publish::Always), &post).is_none(), "nothing to gate");
        let gate = EventGate::new(&events(Publish::OnChange), &post).expect("gate");
        let t = Instant::now();
        let d = |dev: &str, f: u64, k: u64| gate.decide(dev, f, Observation::Key(k), t).publish;
        assert!(d("a", 0, 7) && !d("a", 1, 7) && d("b", 2, 7) && d("a", 3, 3) && !d("b", 4, 7));
        assert!(!d("a", 5, 3) && d("a", 6, 7));
    }

    #[test]
    fn stale_results_do_not_move_the_state() {
        let gate = EventGate::new(&events(Publish::OnChange), &anomaly(0.5, 0.3)).expect("gate");
        let t = Instant::now();
        assert!(gate.decide("d", 5, Observation::Value(0.1), t).publish);
        // Frame 4 finishes after frame 5: above the threshold, but older.
        let d = gate.decide("d", 4, Observation::Value(0.9), t);
        assert!(!d.publish && d.reason == "stale" && d.active == Some(false), "{d:?}");
        assert!(!gate.decide("d", 6, Observation::Value(0.2), t).publish);
    }

    #[test]
    fn heartbeat_and_delta() {
        let post = PostProcess::Regression(ValueConfig {
            output: None,
            index: 0,
            threshold: None,
            clear: None,
            include_outputs: true,
        });
        let cfg = EventsConfig {
            publish: Publish::OnChange,
            heartbeat: Some(Duration::from_secs(10)),
            delta: Some(0.5),
            max_devices: 10,
        };
        let gate = EventGate::new(&cfg, &post).expect("gate");
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let d = |f: u64, v: f64, s: u64| {
            let d = gate.decide("d", f, Observation::Value(v), at(s));
            d.publish.then_some(d.reason)
        };
        assert_eq!(d(0, 1.0, 0), Some("first"));
        assert_eq!(d(1, 1.4, 1), None, "moved 0.4 <= delta");
        assert_eq!(d(2, 1.6, 2), Some("change"), "moved 0.6 from the last published");
        assert_eq!(d(3, 1.6, 5), None);
        assert_eq!(d(4, 1.6, 12), Some("heartbeat"), "10 s since the last published");
        assert_eq!(d(5, 1.6, 13), None);
    }

    #[test]
    fn device_state_is_bounded() {
        let cfg = EventsConfig { max_devices: 3, ..events(Publish::OnChange) };
        let gate = EventGate::new(&cfg, &anomaly(0.5, 0.5)).expect("gate");
        let t0 = Instant::now();
        for i in 0..100u64 {
            gate.decide(
                &format!("dev{i}"),
                i,
                Observation::Value(0.1),
                t0 + Duration::from_millis(i),
            );
        }
        assert_eq!(gate.devices(), 3);
        assert_eq!(gate.evicted.load(Ordering::Relaxed), 97);
        // The most recent devices stay known; an evicted one starts over.
        let late = t0 + Duration::from_secs(1);
        assert!(!gate.decide("dev99", 100, Observation::Value(0.1), late).publish);
        assert_eq!(gate.decide("dev0", 101, Observation::Value(0.1), late).reason, "first");
    }
}
