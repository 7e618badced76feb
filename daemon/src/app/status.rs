//! The health (retained) and metrics messages. Formats are documented in `docs/messages.md`.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use super::App;
use crate::pipeline::Pipeline;
use crate::pipeline::output::unix_us;
use crate::sys::procfs;
use crate::telemetry::{LatencySummary, histogram_json};

/// Where the kernel's process and hardware views are mounted.
pub(super) const PROC_ROOT: &str = "/proc";
pub(super) const SYS_ROOT: &str = "/sys";

/// The SLO evaluation of a pipeline (`null` without objectives).
fn slo_json(p: &Pipeline) -> Value {
    let t = p.slo.lock().unwrap_or_else(|e| e.into_inner());
    t.as_ref().map_or(Value::Null, |t| serde_json::to_value(t.report()).unwrap_or(Value::Null))
}

/// The overload controller's decisions, and the devices shed most.
fn overload_json(p: &Pipeline) -> Value {
    if !p.adaptive() {
        let why = if p.cfg.overload.adaptive {
            "no latency objective (slo.latency) to steer to"
        } else {
            "switched off (overload.adaptive = false)"
        };
        return json!({"enabled": false, "reason": why});
    }
    let c = p.controller.lock().unwrap_or_else(|e| e.into_inner());
    let mut v = serde_json::to_value(c.status()).unwrap_or(Value::Null);
    drop(c);
    if let Value::Object(o) = &mut v {
        let top: Vec<Value> = p
            .shedder
            .top_shed(5)
            .into_iter()
            .map(|(device, admitted, shed)| json!({"device": device, "admitted": admitted, "shed": shed}))
            .collect();
        o.insert("top_shed".into(), Value::Array(top));
        o.insert("enabled".into(), json!(true));
    }
    v
}

/// Micro-batching: the limit now and batched runs by size (`null` without batched plans).
fn batching_json(p: &Pipeline) -> Value {
    let sizes = p.batch_sizes();
    if sizes.len() <= 1 {
        return Value::Null;
    }
    let runs: Map<String, Value> = sizes
        .into_iter()
        .filter(|b| *b > 1)
        .map(|b| (b.to_string(), json!(p.stats.batch_stats(b).0)))
        .collect();
    json!({"max_batch": p.cfg.max_batch, "limit": p.batch_limit(), "runs": runs})
}

/// The per-device tables (docs/messages.md, "Limits"): devices tracked and devices evicted to
/// make room, by table (`events` is `null` when event mode keeps no state).
fn device_tables_json(p: &Pipeline) -> Value {
    let (dedup, dedup_evicted) = p.dedup.table();
    json!({
        "dedup": {"devices": dedup, "evicted": dedup_evicted},
        "events": p.events.as_ref().map(|g| json!({
            "devices": g.devices(),
            "evicted": g.evicted.load(Ordering::Relaxed),
        })),
        "shedding": {"devices": p.shedder.devices()},
    })
}

/// Sample stream assembly counters (`null` for pipelines without a window).
fn window_json(p: &Pipeline) -> Value {
    if p.cfg.window.is_none() {
        return Value::Null;
    }
    p.window_stats.json()
}

/// This process's readings (CPU time, memory, threads, files): the one source of the messages'
/// `rss_bytes` and `process` and of the Prometheus process families.
pub(super) fn process_reading() -> Option<procfs::ProcessStats> {
    procfs::read_process(std::path::Path::new(PROC_ROOT)).ok()
}

fn process_json(p: Option<&procfs::ProcessStats>) -> Value {
    p.and_then(|s| serde_json::to_value(s).ok()).unwrap_or(Value::Null)
}

/// The booted A/B slot and image version (`sys::boot`): read once, they change only by rebooting.
fn boot_json() -> Value {
    static BOOT: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        serde_json::to_value(crate::sys::boot::read(&crate::sys::boot::BootSources::default()))
            .unwrap_or(Value::Null)
    })
    .clone()
}

fn host_json(app: &App) -> Value {
    let cpus = app.system.allowed_cpus.to_vec();
    serde_json::to_value(procfs::read_host(std::path::Path::new(SYS_ROOT), Some(&cpus)))
        .unwrap_or(Value::Null)
}

/// Whether the broker connection and the pipelines look healthy.
pub fn online(app: &App) -> Vec<u8> {
    let mut pipelines = Map::new();
    for p in &app.pipelines {
        let s = &p.stats;
        let set = p.models();
        let m = &set.model;
        let swaps = p.swaps.lock().map(|g| g.clone()).unwrap_or_default();
        pipelines.insert(
            p.name().to_string(),
            json!({
                "model": {
                    "name": m.name, "version": m.version, "sha256": m.sha256, "path": m.path,
                    "loaded_us": set.loaded_us, "source": set.source,
                    "load_ms": m.load_time.as_secs_f64() * 1e3,
                    "from_cache": m.from_cache,
                    "optimize_ms": m.optimize_time.as_secs_f64() * 1e3,
                },
                "swaps": swaps,
                // Issue 15: what runs the model (wanted / running / reason when they differ).
                "backend": m.engine.backend.to_json(),
                "precision": m.engine.precision.to_json(),
                "threads": m.threads,
                "input": p.cfg.input.as_str(),
                "workers": p.cfg.workers,
                "queue": {
                    "depth": p.queue.depth(),
                    "in_flight": p.queue.in_flight(),
                    "capacity": p.queue.capacity(),
                    "limit": p.queue.limit(),
                    "policy": p.queue.policy().as_str(),
                },
                "counters": s.counters_json(),
                "latency_us": Value::Object(
                    s.histograms()
                        .into_iter()
                        .map(|(k, h)| (k.to_string(), json!(LatencySummary::of(&h.snapshot()))))
                        .collect()
                ),
                "slo": slo_json(p),
                "overload": overload_json(p),
                "batching": batching_json(p),
                "window": window_json(p),
                "device_tables": device_tables_json(p),
            }),
        );
    }
    let process = process_reading();
    let v = json!({
        "status": "online",
        "device": app.config.device_id,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "started_us": app.started_us,
        "at_us": unix_us(SystemTime::now()),
        "uptime_s": app.started.elapsed().as_secs(),
        "boot": boot_json(),
        "rss_bytes": process.as_ref().map(|p| p.rss_bytes),
        "process": process_json(process.as_ref()),
        "host": host_json(app),
        "model_sets_alive": crate::pipeline::swap::live_model_sets(),
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
    let models: Vec<String> = app
        .pipelines
        .iter()
        .map(|p| {
            let set = p.models();
            format!("{}@{}", set.model.name, set.model.version)
        })
        .collect();
    let slo: Vec<String> = app
        .pipelines
        .iter()
        .filter_map(|p| {
            let t = p.slo.lock().unwrap_or_else(|e| e.into_inner());
            t.as_ref().map(|t| format!("{} {}", p.name(), t.state().as_str()))
        })
        .collect();
    let slo = if slo.is_empty() { String::new() } else { format!("; slo {}", slo.join(", ")) };
    format!(
        "{}; {} pipeline(s) [{}]; {served} served, {rate:.1}/s avg; p99 {p99}{slo}",
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
        "long_topics": t.long_topics.load(Ordering::Relaxed),
        "session_resets": t.session_resets.load(Ordering::Relaxed),
        "republished": t.republished.load(Ordering::Relaxed),
        "spool": app.spool.get().map(|s| {
            let st = &s.stats;
            json!({
                "active": s.is_spooling(),
                "records": st.records.load(Ordering::Relaxed),
                "bytes": st.bytes.load(Ordering::Relaxed),
                "spooled": st.spooled.load(Ordering::Relaxed),
                "flushed": st.flushed.load(Ordering::Relaxed),
                "evicted": st.evicted.load(Ordering::Relaxed),
                "recovered": st.recovered.load(Ordering::Relaxed),
                "errors": st.errors.load(Ordering::Relaxed),
                "skipped": st.skipped.load(Ordering::Relaxed),
            })
        }),
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
            o.insert("queue_limit".into(), json!(p.queue.limit()));
            o.insert("in_flight".into(), json!(p.queue.in_flight()));
            o.insert(
                "histograms".into(),
                Value::Object(
                    s.histograms()
                        .into_iter()
                        .map(|(k, h)| (k.to_string(), histogram_json(&h.snapshot())))
                        .collect(),
                ),
            );
            o.insert("slo".into(), slo_json(p));
            o.insert("overload".into(), overload_json(p));
            o.insert("batching".into(), batching_json(p));
            o.insert("window".into(), window_json(p));
        }
        pipelines.insert(p.name().to_string(), c);
    }
    let process = process_reading();
    let v = json!({
        "device": app.config.device_id,
        "at_us": unix_us(SystemTime::now()),
        "uptime_s": app.started.elapsed().as_secs(),
        "rss_bytes": process.as_ref().map(|p| p.rss_bytes),
        "process": process_json(process.as_ref()),
        "host": host_json(app),
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
