//! Scalar post-processing (`regression`, `anomaly_score`) and event mode
//! (`[pipelines.<name>.events]`): which results are published, per device.
//!
//! Only reading and checking the keys against each other here; the per-device state machine is
//! `pipeline::events`.

use std::time::Duration;

use super::PostProcess;
use super::reader::{Problems, Section};

/// `kind = "regression"` or `kind = "anomaly_score"`: one value of one output, optionally
/// turned into an on/off state by a threshold with hysteresis.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueConfig {
    /// Which output holds the value (default: the first).
    pub output: Option<String>,
    /// Element of that output (flat index, default 0).
    pub index: usize,
    /// The state turns on when the value goes above this...
    pub threshold: Option<f64>,
    /// ...and off again only when it drops below this (default: `threshold`).
    pub clear: Option<f64>,
    /// Also publish the raw output tensors.
    pub include_outputs: bool,
}

impl ValueConfig {
    /// The (threshold, clear) pair, when there is a threshold.
    pub fn band(&self) -> Option<(f64, f64)> {
        self.threshold.map(|t| (t, self.clear.unwrap_or(t)))
    }
}

/// Which results of a device are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Every result (the default).
    Always,
    /// The first result of a device, then only when its state changes: the top-1 class
    /// (classification), the set of detected classes (detection), the threshold state or a move
    /// of more than `delta` (regression), the anomalous flag (anomaly_score).
    OnChange,
    /// Every result while the threshold state is on, plus the one that turns it off.
    WhileActive,
}

impl Publish {
    pub fn as_str(self) -> &'static str {
        match self {
            Publish::Always => "always",
            Publish::OnChange => "on_change",
            Publish::WhileActive => "while_active",
        }
    }
}

/// Default bound of per-device event state.
pub const DEFAULT_MAX_DEVICES: usize = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub struct EventsConfig {
    pub publish: Publish,
    /// With `on_change`/`while_active`: publish an unchanged result anyway when a device's last
    /// published result is older than this, so consumers can tell quiet from dead.
    pub heartbeat: Option<Duration>,
    /// Regression without a threshold, `on_change`: a change is a move of more than this from
    /// the last published value.
    pub delta: Option<f64>,
    /// Devices whose state is kept; beyond it the least recently seen is forgotten (its next
    /// result counts as its first).
    pub max_devices: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            publish: Publish::Always,
            heartbeat: None,
            delta: None,
            max_devices: DEFAULT_MAX_DEVICES,
        }
    }
}

/// Reads the keys of a `regression`/`anomaly_score` postprocess table.
pub fn value_config<'a>(pp: &mut Section<'a>, p: &mut Problems, anomaly: bool) -> ValueConfig {
    let cfg = ValueConfig {
        output: pp.string(p, "output").map(str::to_string),
        index: pp.int(p, "index", 0, i64::from(u32::MAX)).map_or(0, |i| i as usize),
        threshold: pp.float(p, "threshold", -f64::MAX, f64::MAX),
        clear: pp.float(p, "clear", -f64::MAX, f64::MAX),
        include_outputs: pp.bool(p, "include_outputs").unwrap_or(!anomaly),
    };
    match (cfg.threshold, cfg.clear) {
        (None, _) if anomaly => p.push(
            pp.key("threshold"),
            None,
            "missing: an anomaly_score pipeline needs the score above which a frame is anomalous",
        ),
        (None, Some(_)) => {
            p.push(pp.key("clear"), None, "needs a threshold (clear is its hysteresis)")
        }
        (Some(t), Some(c)) if c > t => p.push(
            pp.key("clear"),
            None,
            format!("must not be above threshold ({c} > {t}): the state turns off below clear"),
        ),
        _ => {}
    }
    cfg
}

/// Reads `[pipelines.<name>.events]` and checks it against the post-processing.
pub fn parse(s: &mut Section<'_>, p: &mut Problems, post: &PostProcess) -> EventsConfig {
    let Some(mut e) = s.table(p, "events") else { return EventsConfig::default() };
    let publish = e
        .choice(
            p,
            "publish",
            &[
                ("always", Publish::Always),
                ("on_change", Publish::OnChange),
                ("while_active", Publish::WhileActive),
            ],
        )
        .unwrap_or(Publish::Always);
    let cfg = EventsConfig {
        publish,
        heartbeat: e.duration(
            p,
            "heartbeat",
            Duration::from_millis(100),
            Duration::from_secs(86_400),
        ),
        delta: e.float(p, "delta", 0.0, f64::MAX),
        max_devices: e
            .int(p, "max_devices", 1, 1_000_000)
            .map_or(DEFAULT_MAX_DEVICES, |n| n as usize),
    };
    let banded = match post {
        PostProcess::Regression(v) | PostProcess::AnomalyScore(v) => v.band().is_some(),
        _ => false,
    };
    match (publish, post) {
        (Publish::OnChange, PostProcess::Raw) => p.push(
            e.key("publish"),
            None,
            "on_change needs a postprocess with a state to compare (classification, detection, \
             regression or anomaly_score); raw tensors have none",
        ),
        (Publish::OnChange, PostProcess::Regression(_)) if !banded && cfg.delta.is_none() => p
            .push(
                e.key("publish"),
                None,
                "on_change for a regression needs a threshold (state changes) or events.delta \
                 (value moves)",
            ),
        (Publish::WhileActive, _) if !banded => p.push(
            e.key("publish"),
            None,
            "while_active needs a threshold state: a regression or anomaly_score postprocess \
             with a threshold",
        ),
        _ => {}
    }
    if cfg.heartbeat.is_some() && publish == Publish::Always {
        p.push(e.key("heartbeat"), None, "has no effect with publish = \"always\"");
    }
    e.finish(p);
    cfg
}
