//! The health (retained) and metrics messages. Formats are documented in `docs/messages.md`.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use super::App;
use crate::pipeline::Pipeline;
use crate::pipeline::output::unix_us;
use crate::sys::procfs;
use crate::telemetry::{LatencySummary, histogram_json, rss_bytes};

/// Where the kernel's process and hardware views are mounted.
const PROC_ROOT: &str = "/proc";
const SYS_ROOT: &str = "/sys";

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

/// Process and host readings (CPU time, threads, clock frequencies, temperatures).
fn process_json() -> Value {
    procfs::read_process(std::path::Path::new(PROC_ROOT))
        .ok()
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
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
    let v = json!({
        "status": "online",
        "device": app.config.device_id,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "started_us": app.started_us,
        "at_us": unix_us(SystemTime::now()),
        "uptime_s": app.started.elapsed().as_secs(),
        "boot": boot_json(),
        "rss_bytes": rss_bytes(),
        "process": process_json(),
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
    let v = json!({
        "device": app.config.device_id,
        "at_us": unix_us(SystemTime::now()),
        "uptime_s": app.started.elapsed().as_secs(),
        "rss_bytes": rss_bytes(),
        "process": process_json(),
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

/// The Prometheus text exposition of everything above: one family per metric, every pipeline
/// as a `pipeline` label. Names, units and labels are documented in `docs/metrics.md`.
pub fn prometheus(app: &App) -> String {
    use crate::reject::RejectReason;
    use crate::telemetry::prometheus::{Exposition, Kind};
    use crate::telemetry::{DropReason, FailReason};

    let mut e = Exposition::new();
    let ps = &app.pipelines;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;

    e.family("edgeinfer_build_info", Kind::Gauge, "Version of the running daemon.");
    e.sample(
        "edgeinfer_build_info",
        &[("version", env!("CARGO_PKG_VERSION")), ("device", &app.config.device_id)],
        1.0,
    );
    e.family(
        "edgeinfer_model_info",
        Kind::Gauge,
        "Model served by each pipeline (name, version, SHA-256).",
    );
    for p in ps {
        let set = p.models();
        let m = &set.model;
        e.sample(
            "edgeinfer_model_info",
            &[
                ("pipeline", p.name()),
                ("model", &m.name),
                ("version", &m.version),
                ("sha256", &m.sha256),
            ],
            1.0,
        );
    }

    // Frame accounting: received = served + rejected + dropped + failed + queued + in flight.
    type PerPipeline = fn(&Pipeline) -> f64;
    let counters: [(&str, &str, PerPipeline); 6] = [
        (
            "edgeinfer_frames_received_total",
            "Frames that matched the pipeline's input filter.",
            |p| p.stats.received.load(Ordering::Relaxed) as f64,
        ),
        (
            "edgeinfer_frames_served_total",
            "Frames served: result handed to the MQTT client, or withheld by event mode.",
            |p| p.stats.served.load(Ordering::Relaxed) as f64,
        ),
        (
            "edgeinfer_error_messages_suppressed_total",
            "Error messages not published because of errors.rate_limit.",
            |p| p.stats.errors_suppressed.load(Ordering::Relaxed) as f64,
        ),
        (
            "edgeinfer_results_suppressed_total",
            "Served frames whose result event mode withheld (unchanged, or not active).",
            |p| p.stats.results_suppressed.load(Ordering::Relaxed) as f64,
        ),
        (
            "edgeinfer_event_devices_evicted_total",
            "Devices whose event state was forgotten to stay within events.max_devices.",
            |p| p.events.as_ref().map_or(0.0, |g| g.evicted.load(Ordering::Relaxed) as f64),
        ),
        (
            "edgeinfer_clock_skew_frames_total",
            "Frames whose device timestamp was further than metrics.max_clock_skew from the daemon's clock.",
            |p| p.stats.clock_skew.load(Ordering::Relaxed) as f64,
        ),
    ];
    for (name, help, f) in counters {
        e.family(name, Kind::Counter, help);
        for p in ps {
            e.sample(name, &[("pipeline", p.name())], f(p));
        }
    }
    e.family(
        "edgeinfer_frames_rejected_total",
        Kind::Counter,
        "Frames refused because the payload was at fault (at ingest, or when a worker decodes an image), by reason.",
    );
    for p in ps {
        for r in RejectReason::ALL {
            e.sample(
                "edgeinfer_frames_rejected_total",
                &[("pipeline", p.name()), ("reason", r.as_str())],
                p.stats.rejected(r) as f64,
            );
        }
    }
    e.family(
        "edgeinfer_frames_dropped_total",
        Kind::Counter,
        "Valid frames the daemon chose not to serve, by reason.",
    );
    for p in ps {
        for r in DropReason::ALL {
            e.sample(
                "edgeinfer_frames_dropped_total",
                &[("pipeline", p.name()), ("reason", r.as_str())],
                p.stats.dropped(r) as f64,
            );
        }
    }
    e.family(
        "edgeinfer_frames_failed_total",
        Kind::Counter,
        "Dequeued frames that produced no result, by reason.",
    );
    for p in ps {
        for r in FailReason::ALL {
            e.sample(
                "edgeinfer_frames_failed_total",
                &[("pipeline", p.name()), ("reason", r.as_str())],
                p.stats.failed(r) as f64,
            );
        }
    }

    let gauges: [(&str, &str, PerPipeline); 4] = [
        ("edgeinfer_queue_depth", "Frames waiting for a worker.", |p| p.queue.depth() as f64),
        ("edgeinfer_queue_in_flight", "Frames a worker is serving.", |p| {
            p.queue.in_flight() as f64
        }),
        ("edgeinfer_queue_capacity", "Configured queue capacity (after fitting to memory).", |p| {
            p.queue.capacity() as f64
        }),
        (
            "edgeinfer_queue_limit",
            "Effective queue capacity now (lowered by adaptive overload control).",
            |p| p.queue.limit() as f64,
        ),
    ];
    for (name, help, f) in gauges {
        e.family(name, Kind::Gauge, help);
        for p in ps {
            e.sample(name, &[("pipeline", p.name())], f(p));
        }
    }

    // The histograms in `PipelineStats::histograms` order.
    let hists: [(&str, &str); 5] = [
        ("edgeinfer_queue_wait_seconds", "Arrival to a worker picking the frame up."),
        ("edgeinfer_inference_seconds", "Model run time."),
        (
            "edgeinfer_service_seconds",
            "Worker time per frame: input copy, inference, result, hand-off.",
        ),
        (
            "edgeinfer_latency_seconds",
            "Arrival to result handed to the MQTT client (what slo.latency measures).",
        ),
        (
            "edgeinfer_end_to_end_seconds",
            "Device timestamp to result handed to the MQTT client (frames with a trusted ts).",
        ),
    ];
    for (i, (name, help)) in hists.into_iter().enumerate() {
        e.family(name, Kind::Histogram, help);
        for p in ps {
            e.histogram(name, &[("pipeline", p.name())], &p.stats.histograms()[i].1.snapshot());
        }
    }

    // Micro-batching.
    e.family("edgeinfer_batch_limit", Kind::Gauge, "Frames a worker may take into one inference.");
    for p in ps {
        e.sample("edgeinfer_batch_limit", &[("pipeline", p.name())], p.batch_limit() as f64);
    }
    e.family(
        "edgeinfer_batch_runs_total",
        Kind::Counter,
        "Batched inferences by batch size (single-frame runs are not counted here).",
    );
    for p in ps {
        for b in p.batch_sizes().into_iter().filter(|b| *b > 1) {
            e.sample(
                "edgeinfer_batch_runs_total",
                &[("pipeline", p.name()), ("size", &b.to_string())],
                p.stats.batch_stats(b).0 as f64,
            );
        }
    }

    // Sample stream assembly (pipelines with a window).
    let streams: Vec<&Pipeline> =
        ps.iter().map(|p| &**p).filter(|p| p.cfg.window.is_some()).collect();
    if !streams.is_empty() {
        // Labelled families: the counters named in `keys`, one sample per (pipeline, key).
        let labelled: [(&str, &str, &[&str]); 2] = [
            (
                "edgeinfer_window_chunks_total",
                "Stream chunks by what the window assembly did with them (see docs/messages.md, Sample streams).",
                &["chunks", "assembled", "reordered", "late", "discarded"],
            ),
            (
                "edgeinfer_window_events_total",
                "Window assembly events: windows completed, gaps, resets, devices evicted (idle) or displaced (table full).",
                &["windows", "gaps", "resets", "evicted", "displaced"],
            ),
        ];
        for (name, help, keys) in labelled {
            e.family(name, Kind::Counter, help);
            for p in &streams {
                for (k, v) in p.window_stats.counters() {
                    if keys.contains(&k) {
                        e.sample(name, &[("pipeline", p.name()), ("event", k)], v as f64);
                    }
                }
            }
        }
        let per: [(&str, &str, Kind, &str); 3] = [
            (
                "edgeinfer_window_zero_filled_samples_total",
                "zero_filled",
                Kind::Counter,
                "Samples per channel written as zeros for gaps (gap = \"zero_fill\").",
            ),
            (
                "edgeinfer_window_devices",
                "devices",
                Kind::Gauge,
                "Devices with window assembly state.",
            ),
            (
                "edgeinfer_window_held_chunks",
                "held",
                Kind::Gauge,
                "Chunks waiting in reorder buffers.",
            ),
        ];
        for (name, key, kind, help) in per {
            e.family(name, kind, help);
            for p in &streams {
                let v = p
                    .window_stats
                    .counters()
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map_or(0, |(_, v)| *v);
                e.sample(name, &[("pipeline", p.name())], v as f64);
            }
        }
    }

    // Per-device tables: devices tracked and evicted to make room.
    e.family(
        "edgeinfer_device_table_devices",
        Kind::Gauge,
        "Devices with state in a per-device table (dedup, events, shedding).",
    );
    for p in ps {
        let (n, _) = p.dedup.table();
        e.sample(
            "edgeinfer_device_table_devices",
            &[("pipeline", p.name()), ("table", "dedup")],
            n as f64,
        );
        if let Some(g) = &p.events {
            let labels = [("pipeline", p.name()), ("table", "events")];
            e.sample("edgeinfer_device_table_devices", &labels, g.devices() as f64);
        }
        let labels = [("pipeline", p.name()), ("table", "shedding")];
        e.sample("edgeinfer_device_table_devices", &labels, p.shedder.devices() as f64);
    }
    e.family(
        "edgeinfer_device_table_evictions_total",
        Kind::Counter,
        "Devices forgotten (least recently used) to make room for a new one in a full table.",
    );
    for p in ps {
        let (_, ev) = p.dedup.table();
        e.sample(
            "edgeinfer_device_table_evictions_total",
            &[("pipeline", p.name()), ("table", "dedup")],
            ev as f64,
        );
        if let Some(g) = &p.events {
            let labels = [("pipeline", p.name()), ("table", "events")];
            e.sample(
                "edgeinfer_device_table_evictions_total",
                &labels,
                g.evicted.load(Ordering::Relaxed) as f64,
            );
        }
    }

    // SLOs: state as a number (0 ok, 1 at_risk, 2 breached), compliance and burn rate per window.
    let reports: Vec<(&str, crate::telemetry::slo::SloReport)> = ps
        .iter()
        .filter_map(|p| {
            let t = p.slo.lock().unwrap_or_else(|e| e.into_inner());
            t.as_ref().map(|t| (p.name(), t.report()))
        })
        .collect();
    let objectives = |r: &crate::telemetry::slo::SloReport| {
        [("latency", r.latency.clone()), ("served", r.served.clone())]
            .into_iter()
            .filter_map(|(k, o)| o.map(|o| (k, o)))
            .collect::<Vec<_>>()
    };
    e.family(
        "edgeinfer_slo_state",
        Kind::Gauge,
        "SLO state per objective: 0 ok, 1 at_risk, 2 breached.",
    );
    for (name, r) in &reports {
        for (k, o) in objectives(r) {
            e.sample(
                "edgeinfer_slo_state",
                &[("pipeline", name), ("objective", k)],
                o.state as u8 as f64,
            );
        }
    }
    e.family("edgeinfer_slo_target_ratio", Kind::Gauge, "Objective: the quantile or served ratio.");
    for (name, r) in &reports {
        for (k, o) in objectives(r) {
            e.sample(
                "edgeinfer_slo_target_ratio",
                &[("pipeline", name), ("objective", k)],
                o.target,
            );
        }
    }
    type PerWindow = fn(&crate::telemetry::slo::WindowReport) -> f64;
    let per_window: [(&str, &str, PerWindow); 2] = [
        ("edgeinfer_slo_compliance_ratio", "Good events / events per window.", |w| w.compliance),
        (
            "edgeinfer_slo_burn_rate",
            "Bad fraction / error budget per window (1 spends the budget exactly).",
            |w| w.burn_rate,
        ),
    ];
    for (family, help, value) in per_window {
        e.family(family, Kind::Gauge, help);
        for (name, r) in &reports {
            for (k, o) in objectives(r) {
                for (w, rep) in [("long", &o.long), ("short", &o.short)] {
                    e.sample(
                        family,
                        &[("pipeline", name), ("objective", k), ("window", w)],
                        value(rep),
                    );
                }
            }
        }
    }

    // Overload controller decisions (adaptive pipelines only).
    let statuses: Vec<(&str, crate::pipeline::overload::OverloadStatus)> = ps
        .iter()
        .filter(|p| p.adaptive())
        .map(|p| {
            let c = p.controller.lock().unwrap_or_else(|e| e.into_inner());
            (p.name(), c.status().clone())
        })
        .collect();
    type Ov = fn(&crate::pipeline::overload::OverloadStatus) -> f64;
    let ov: [(&str, &str, Ov); 5] = [
        ("edgeinfer_overload_arrival_rate", "Frames per second arriving (smoothed).", |s| {
            s.arrival_rate
        }),
        (
            "edgeinfer_overload_service_rate",
            "Frames per second the workers can serve (from busy time).",
            |s| s.service_rate,
        ),
        ("edgeinfer_overload_admit_ratio", "Fraction of arriving frames admitted.", |s| {
            s.admit_ratio
        }),
        ("edgeinfer_overload_shedding_devices", "Devices currently sampled 1-in-N.", |s| {
            s.shedding_devices as f64
        }),
        ("edgeinfer_overload_memory_pressure", "1 while memory pressure halves the queue.", |s| {
            f64::from(u8::from(s.memory_pressure))
        }),
    ];
    for (name, help, f) in ov {
        e.family(name, Kind::Gauge, help);
        for (p, s) in &statuses {
            e.sample(name, &[("pipeline", p)], f(s));
        }
    }

    // Process.
    if let Ok(pr) = procfs::read_process(std::path::Path::new(PROC_ROOT)) {
        e.family("edgeinfer_process_cpu_seconds_total", Kind::Counter, "CPU time by mode.");
        e.sample("edgeinfer_process_cpu_seconds_total", &[("mode", "user")], pr.cpu_user_seconds);
        e.sample(
            "edgeinfer_process_cpu_seconds_total",
            &[("mode", "system")],
            pr.cpu_system_seconds,
        );
        e.family("edgeinfer_process_resident_memory_bytes", Kind::Gauge, "Resident set size.");
        e.sample("edgeinfer_process_resident_memory_bytes", &[], pr.rss_bytes as f64);
        if let Some(h) = pr.vm_hwm_bytes {
            e.family("edgeinfer_process_resident_memory_max_bytes", Kind::Gauge, "Peak RSS.");
            e.sample("edgeinfer_process_resident_memory_max_bytes", &[], h as f64);
        }
        e.family("edgeinfer_process_threads", Kind::Gauge, "Threads in the process.");
        e.sample("edgeinfer_process_threads", &[], pr.threads as f64);
        if let Some(f) = pr.open_fds {
            e.family("edgeinfer_process_open_fds", Kind::Gauge, "Open file descriptors.");
            e.sample("edgeinfer_process_open_fds", &[], f as f64);
        }
    }
    e.family("edgeinfer_process_start_time_seconds", Kind::Gauge, "Start time, Unix seconds.");
    e.sample("edgeinfer_process_start_time_seconds", &[], app.started_us as f64 / 1e6);

    // Host: clocks and temperatures (absent in VMs without cpufreq/thermal drivers).
    let cpus = app.system.allowed_cpus.to_vec();
    let host = procfs::read_host(std::path::Path::new(SYS_ROOT), Some(&cpus));
    if !host.cpufreq.is_empty() {
        e.family("edgeinfer_cpu_frequency_hertz", Kind::Gauge, "Current CPU clock.");
        for c in &host.cpufreq {
            if let Some(hz) = c.cur_hz {
                e.sample(
                    "edgeinfer_cpu_frequency_hertz",
                    &[("cpu", &c.cpu.to_string())],
                    hz as f64,
                );
            }
        }
        e.family(
            "edgeinfer_cpu_frequency_max_hertz",
            Kind::Gauge,
            "Highest clock the policy allows now (below the hardware maximum when capped).",
        );
        for c in &host.cpufreq {
            if let Some(hz) = c.max_hz {
                e.sample(
                    "edgeinfer_cpu_frequency_max_hertz",
                    &[("cpu", &c.cpu.to_string())],
                    hz as f64,
                );
            }
        }
        e.family("edgeinfer_cpu_governor_info", Kind::Gauge, "The cpufreq governor of each CPU.");
        for c in &host.cpufreq {
            if let Some(g) = &c.governor {
                e.sample(
                    "edgeinfer_cpu_governor_info",
                    &[("cpu", &c.cpu.to_string()), ("governor", g)],
                    1.0,
                );
            }
        }
    }
    if !host.thermal.is_empty() {
        e.family("edgeinfer_thermal_zone_celsius", Kind::Gauge, "Thermal zone temperature.");
        for z in &host.thermal {
            e.sample(
                "edgeinfer_thermal_zone_celsius",
                &[("zone", &z.zone.to_string()), ("type", &z.kind)],
                z.celsius,
            );
        }
    }

    // cgroup v2: memory and pressure stall information of the daemon's cgroup.
    if let Some(dir) = app.system.cgroup_dir.as_deref() {
        let st = crate::sys::cgroup::read_stats(dir);
        for (name, help, v) in [
            ("edgeinfer_cgroup_memory_current_bytes", "cgroup memory.current.", st.memory_current),
            ("edgeinfer_cgroup_memory_high_bytes", "cgroup memory.high.", st.memory_high),
            ("edgeinfer_cgroup_memory_max_bytes", "cgroup memory.max.", st.memory_max),
        ] {
            if let Some(v) = v {
                e.family(name, Kind::Gauge, help);
                e.sample(name, &[], v as f64);
            }
        }
        if !st.memory_events.is_empty() {
            e.family("edgeinfer_cgroup_memory_events_total", Kind::Counter, "memory.events.");
            for (k, v) in &st.memory_events {
                e.sample("edgeinfer_cgroup_memory_events_total", &[("event", k)], *v as f64);
            }
        }
        e.family(
            "edgeinfer_cgroup_pressure_stall_seconds_total",
            Kind::Counter,
            "Pressure stall time (PSI) of the daemon's cgroup, by resource and kind.",
        );
        for (res, psi) in [("memory", st.memory_pressure), ("cpu", st.cpu_pressure)] {
            if let Some(psi) = psi {
                e.sample(
                    "edgeinfer_cgroup_pressure_stall_seconds_total",
                    &[("resource", res), ("kind", "some")],
                    psi.some.total as f64 / 1e6,
                );
                if let Some(full) = psi.full {
                    e.sample(
                        "edgeinfer_cgroup_pressure_stall_seconds_total",
                        &[("resource", res), ("kind", "full")],
                        full.total as f64 / 1e6,
                    );
                }
            }
        }
    }

    // MQTT transport.
    let t = &app.transport;
    for (name, help, v) in [
        ("edgeinfer_mqtt_reconnects_total", "Connections after the first.", load(&t.reconnects)),
        (
            "edgeinfer_mqtt_connection_errors_total",
            "Failed connection attempts or lost connections.",
            load(&t.connection_errors),
        ),
        (
            "edgeinfer_mqtt_oversized_packets_total",
            "Packets above broker.max_packet_size (connection reset).",
            load(&t.oversized_packets),
        ),
        (
            "edgeinfer_mqtt_unrouted_messages_total",
            "Messages that matched no pipeline.",
            load(&t.unrouted),
        ),
        (
            "edgeinfer_mqtt_long_topics_total",
            "Messages on topics above broker.max_topic_length (acknowledged, not routed).",
            load(&t.long_topics),
        ),
        (
            "edgeinfer_mqtt_session_resets_total",
            "Persistent sessions cleared to drop a redelivered packet above broker.max_packet_size.",
            load(&t.session_resets),
        ),
        (
            "edgeinfer_mqtt_republished_total",
            "Unacknowledged messages sent again because the broker had lost our session.",
            load(&t.republished),
        ),
    ] {
        e.family(name, Kind::Counter, help);
        e.sample(name, &[], v);
    }

    // Result spool.
    if let Some(s) = app.spool.get() {
        let st = &s.stats;
        for (name, kind, help, v) in [
            (
                "edgeinfer_spool_records",
                Kind::Gauge,
                "Results held in the spool.",
                load(&st.records),
            ),
            ("edgeinfer_spool_bytes", Kind::Gauge, "Bytes held in the spool.", load(&st.bytes)),
            (
                "edgeinfer_spool_active",
                Kind::Gauge,
                "1 while results go to the spool (broker unreachable or flush pending).",
                u64::from(s.is_spooling()) as f64,
            ),
            (
                "edgeinfer_spool_spooled_total",
                Kind::Counter,
                "Results written to the spool.",
                load(&st.spooled),
            ),
            (
                "edgeinfer_spool_flushed_total",
                Kind::Counter,
                "Spooled results handed to the MQTT client.",
                load(&st.flushed),
            ),
            (
                "edgeinfer_spool_evicted_total",
                Kind::Counter,
                "Spooled results deleted unpublished (over spool.max_size, or unreadable).",
                load(&st.evicted),
            ),
            (
                "edgeinfer_spool_recovered_total",
                Kind::Counter,
                "Spooled results found at start-up.",
                load(&st.recovered),
            ),
            ("edgeinfer_spool_errors_total", Kind::Counter, "Spool I/O errors.", load(&st.errors)),
            (
                "edgeinfer_spool_skipped_total",
                Kind::Counter,
                "Results the spool cannot store (topic above 65535 bytes), left out.",
                load(&st.skipped),
            ),
        ] {
            e.family(name, kind, help);
            e.sample(name, &[], v);
        }
    }
    e.into_string()
}
