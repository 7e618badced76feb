//! The health (retained) and metrics messages. Formats are documented in `docs/messages.md`.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use super::App;
use crate::pipeline::output::unix_us;
use crate::telemetry::{LatencySummary, histogram_json, rss_bytes};

/// Whether the broker connection and the pipelines look healthy.
pub fn online(app: &App) -> Vec<u8> {
    let mut pipelines = Map::new();
    for p in &app.pipelines {
        let s = &p.stats;
        let m = &p.model;
        pipelines.insert(
            p.name().to_string(),
            json!({
                "model": {"name": m.name, "version": m.version, "sha256": m.sha256, "path": m.path},
                "input": p.cfg.input.as_str(),
                "workers": p.cfg.workers,
                "queue": {
                    "depth": p.queue.depth(),
                    "in_flight": p.queue.in_flight(),
                    "capacity": p.queue.capacity(),
                    "policy": p.queue.policy().as_str(),
                },
                "counters": s.counters_json(),
                "latency_us": {
                    "queue_wait": LatencySummary::of(&s.queue_wait.snapshot()),
                    "inference": LatencySummary::of(&s.inference.snapshot()),
                    "total": LatencySummary::of(&s.total.snapshot()),
                },
            }),
        );
    }
    let v = json!({
        "status": "online",
        "device": app.config.device_id,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "started_us": app.started_us,
        "at_us": unix_us(SystemTime::now()),
        "uptime_s": app.started.elapsed().as_secs(),
        "rss_bytes": rss_bytes(),
        "transport": transport(app),
        "system": app.system.to_json(),
        "pipelines": Value::Object(pipelines),
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The one-line `STATUS=` for systemd: what is served, how fast, how well.
pub fn status_line(app: &App, connected: bool) -> String {
    let served: u64 = app.pipelines.iter().map(|p| p.stats.served.load(Ordering::Relaxed)).sum();
    let rate = served as f64 / app.started.elapsed().as_secs_f64().max(1e-3);
    let mut total = crate::telemetry::Snapshot::default();
    for p in &app.pipelines {
        total.merge(&p.stats.total.snapshot());
    }
    let p99 = total
        .quantile(0.99)
        .map_or("-".to_string(), |d| format!("{:.1}ms", d.as_secs_f64() * 1000.0));
    let models: Vec<String> =
        app.pipelines.iter().map(|p| format!("{}@{}", p.model.name, p.model.version)).collect();
    format!(
        "{}; {} pipeline(s) [{}]; {served} served, {rate:.1}/s avg; p99 {p99}",
        if connected { "online" } else { "waiting for broker" },
        app.pipelines.len(),
        models.join(", ")
    )
}

fn transport(app: &App) -> Value {
    let t = &app.transport;
    json!({
        "reconnects": t.reconnects.load(Ordering::Relaxed),
        "connection_errors": t.connection_errors.load(Ordering::Relaxed),
        "oversized_packets": t.oversized_packets.load(Ordering::Relaxed),
        "unrouted": t.unrouted.load(Ordering::Relaxed),
    })
}

/// The offline message: the Last Will (`connection_lost`) or the goodbye on shutdown.
pub fn offline(app: &App, reason: &str) -> Vec<u8> {
    let v = json!({
        "status": "offline",
        "reason": reason,
        "device": app.config.device_id,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "started_us": app.started_us,
        "at_us": unix_us(SystemTime::now()),
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Periodic metrics: counters and full histogram buckets, mergeable across devices.
pub fn metrics(app: &App) -> Vec<u8> {
    let mut pipelines = Map::new();
    for p in &app.pipelines {
        let s = &p.stats;
        let mut c = s.counters_json();
        if let Value::Object(o) = &mut c {
            o.insert("queue_depth".into(), json!(p.queue.depth()));
            o.insert("in_flight".into(), json!(p.queue.in_flight()));
            o.insert(
                "histograms".into(),
                json!({
                    "queue_wait": histogram_json(&s.queue_wait.snapshot()),
                    "inference": histogram_json(&s.inference.snapshot()),
                    "total": histogram_json(&s.total.snapshot()),
                }),
            );
        }
        pipelines.insert(p.name().to_string(), c);
    }
    let v = json!({
        "device": app.config.device_id,
        "at_us": unix_us(SystemTime::now()),
        "uptime_s": app.started.elapsed().as_secs(),
        "rss_bytes": rss_bytes(),
        "histogram": {"schema": "log2/4", "first_bound_ns": 1000, "buckets_per_doubling": 4},
        "transport": transport(app),
        "cgroup": app.system.cgroup_dir.as_deref().map(crate::sys::cgroup::read_stats),
        "pipelines": Value::Object(pipelines),
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// One log line summarizing every pipeline (served, rejected, dropped, P99).
pub fn summary_line(app: &App) -> String {
    let parts: Vec<String> = app
        .pipelines
        .iter()
        .map(|p| {
            let s = &p.stats;
            let p99 = s.total.snapshot().quantile(0.99).map_or("-".into(), |d| format!("{d:?}"));
            format!(
                "{}: received={} served={} rejected={} dropped={} failed={} p99={}",
                p.name(),
                s.received.load(Ordering::Relaxed),
                s.served.load(Ordering::Relaxed),
                s.rejected_total(),
                s.dropped_total(),
                s.failed_total(),
                p99
            )
        })
        .collect();
    parts.join("; ")
}
