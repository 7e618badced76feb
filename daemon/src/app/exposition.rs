//! The Prometheus text exposition of the daemon (`GET /metrics`): one family per metric, every
//! pipeline as a `pipeline` label, one function per area. Names, units and labels are
//! documented in `docs/metrics.md`; the wire format is `telemetry::prometheus`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::App;
use super::status::SYS_ROOT;
use crate::pipeline::Pipeline;
use crate::reject::RejectReason;
use crate::sys::procfs;
use crate::telemetry::prometheus::{Exposition, Kind};
use crate::telemetry::{DropReason, FailReason};

/// A per-pipeline reading for a table of families.
type PerPipeline = fn(&Pipeline) -> f64;

fn load(a: &AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

/// Renders every family, in the documented order.
pub fn prometheus(app: &App) -> String {
    let mut e = Exposition::new();
    let ps = &app.pipelines;

    info(&mut e, app);
    frames(&mut e, ps);
    latency(&mut e, ps);
    streams(&mut e, ps);
    device_tables(&mut e, ps);
    slo(&mut e, ps);
    overload(&mut e, ps);
    process(&mut e, app);
    host(&mut e, app);
    cgroup(&mut e, app);
    transport(&mut e, app);
    spool(&mut e, app);
    e.into_string()
}

/// Build and model identity.
fn info(e: &mut Exposition, app: &App) {
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
    for p in &app.pipelines {
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
}

/// Frame accounting: received = served + rejected + dropped + failed + queued + in flight.
fn frames(e: &mut Exposition, ps: &[Arc<Pipeline>]) {
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
    by_reason(
        e,
        ps,
        "edgeinfer_frames_rejected_total",
        "Frames refused because the payload was at fault (at ingest, or when a worker decodes an image), by reason.",
        &RejectReason::ALL.map(|r| (r.as_str(), r)),
        |p, r| p.stats.rejected(r),
    );
    by_reason(
        e,
        ps,
        "edgeinfer_frames_dropped_total",
        "Valid frames the daemon chose not to serve, by reason.",
        &DropReason::ALL.map(|r| (r.as_str(), r)),
        |p, r| p.stats.dropped(r),
    );
    by_reason(
        e,
        ps,
        "edgeinfer_frames_failed_total",
        "Dequeued frames that produced no result, by reason.",
        &FailReason::ALL.map(|r| (r.as_str(), r)),
        |p, r| p.stats.failed(r),
    );

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
}

/// A counter family with one series per pipeline and reason.
fn by_reason<R: Copy>(
    e: &mut Exposition,
    ps: &[Arc<Pipeline>],
    name: &str,
    help: &str,
    reasons: &[(&str, R)],
    count: impl Fn(&Pipeline, R) -> u64,
) {
    e.family(name, Kind::Counter, help);
    for p in ps {
        for &(label, r) in reasons {
            e.sample(name, &[("pipeline", p.name()), ("reason", label)], count(p, r) as f64);
        }
    }
}

/// Latency histograms and micro-batching.
fn latency(e: &mut Exposition, ps: &[Arc<Pipeline>]) {
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
}

/// Sample stream assembly (pipelines with a window).
fn streams(e: &mut Exposition, ps: &[Arc<Pipeline>]) {
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
}

/// Per-device tables: devices tracked and evicted to make room.
fn device_tables(e: &mut Exposition, ps: &[Arc<Pipeline>]) {
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
}

/// SLOs: state, objective, compliance and burn rate per window.
fn slo(e: &mut Exposition, ps: &[Arc<Pipeline>]) {
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
}

/// Overload controller decisions (adaptive pipelines only).
fn overload(e: &mut Exposition, ps: &[Arc<Pipeline>]) {
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
}

/// The process: CPU time, memory (the same reading as the health message), threads, files.
fn process(e: &mut Exposition, app: &App) {
    if let Some(pr) = super::status::process_reading() {
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
}

/// Host: clocks and temperatures (absent in VMs without cpufreq/thermal drivers).
fn host(e: &mut Exposition, app: &App) {
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
}

/// cgroup v2: memory and pressure stall information of the daemon's cgroup.
fn cgroup(e: &mut Exposition, app: &App) {
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
}

/// MQTT transport.
fn transport(e: &mut Exposition, app: &App) {
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
}

/// Result spool.
fn spool(e: &mut Exposition, app: &App) {
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
}
