//! Overload, end to end: a slow model (~25 ms per frame, so ~40 frames/s on one worker) offered
//! about three times what it can serve, by two quiet devices and one chatty one, with a latency
//! objective. With adaptive control on, served frames stay within the objective, the chatty
//! device is shed and the quiet ones are not; with it off, the queue fills and the SLO is
//! reported breached. Either way every frame is accounted for by reason.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgeinfer_tests::{Fixture, MqttClient, eventually, start_daemon, wait_health};
use rumqttc::QoS;
use serde_json::Value;

/// Frames per second per device: two quiet sensors and a chatty one (~3x capacity in total;
/// the quiet ones together stay well under capacity even on a slow, shared CI machine).
const RATES: [(&str, u64); 3] = [("quiet1", 4), ("quiet2", 4), ("chatty", 100)];
const RUN: Duration = Duration::from_secs(10);
const OBJECTIVE_MS: u64 = 500;

struct Outcome {
    /// Final health of the pipeline.
    pipeline: Value,
    /// Results received per device.
    results: BTreeMap<String, u64>,
    /// Frames published per device.
    sent: BTreeMap<String, u64>,
    /// Worst SLO state seen in health during the run.
    worst_slo: String,
    rss_mid: u64,
    rss_end: u64,
    /// The daemon's log (stderr).
    log: String,
}

fn overload(adaptive: bool) -> Outcome {
    let fx = Fixture::load("slow").expect("fixture");
    let extra = format!(
        "[pipelines.slow.queue]\ncapacity = 64\npolicy = \"drop_oldest\"\n\
         [pipelines.slow.slo]\nlatency = \"{OBJECTIVE_MS}ms\"\nlatency_quantile = 0.99\n\
         latency_window = \"60s\"\nmin_frames = 20\n\
         [pipelines.slow.overload]\nadaptive = {adaptive}\ninterval = \"100ms\"\n"
    );
    let device = format!("ov-{}", if adaptive { "on" } else { "off" });
    let (broker, daemon) = start_daemon(&device, &fx.pipeline("slow", "s/+", "r/{1}", &extra));
    let obs = MqttClient::connect(broker.port, &format!("obs-{device}")).expect("observer");
    obs.subscribe("r/#").expect("subscribe");
    let watch = MqttClient::connect(broker.port, &format!("watch-{device}")).expect("watch");
    let health_topic = format!("edgeinfer/{device}/health");
    watch.subscribe(&health_topic).expect("subscribe");

    let start = Instant::now();
    let senders: Vec<_> = RATES
        .iter()
        .map(|&(name, rate)| {
            let c = MqttClient::connect(broker.port, &format!("{device}-{name}")).expect("device");
            // One frame, renumbered per publish (distinct seqs: the same seq and payload twice
            // would be a QoS 1 redelivery, dropped as a duplicate).
            let frame = fx.json_frame(0, 0);
            assert!(frame.contains("\"seq\":0"), "{frame}");
            std::thread::spawn(move || {
                let period = Duration::from_secs_f64(1.0 / rate as f64);
                let mut n = 0u64;
                while start.elapsed() < RUN {
                    let due = start + period * n as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let numbered = frame.replacen("\"seq\":0", &format!("\"seq\":{n}"), 1);
                    c.publish(&format!("s/{name}"), numbered, QoS::AtMostOnce, false)
                        .expect("publish");
                    n += 1;
                }
                // Let the client flush its queue before it is dropped.
                std::thread::sleep(Duration::from_millis(500));
                (name.to_string(), n)
            })
        })
        .collect();

    // Watch health during the run: the worst SLO state, and RSS half-way and at the end.
    let mut worst_slo = "ok".to_string();
    let mut rss_mid = 0;
    let rank = |s: &str| ["ok", "at_risk", "breached"].iter().position(|x| *x == s).unwrap_or(0);
    while start.elapsed() < RUN {
        if let Some(m) = watch.recv(Duration::from_millis(200))
            && m.topic == health_topic
        {
            let h = m.json();
            if let Some(s) = h["pipelines"]["slow"]["slo"]["state"].as_str()
                && rank(s) > rank(&worst_slo)
            {
                worst_slo = s.to_string();
            }
            if start.elapsed() >= RUN / 2 && rss_mid == 0 {
                rss_mid = h["rss_bytes"].as_u64().unwrap_or(0);
            }
        }
    }
    let sent: BTreeMap<String, u64> =
        senders.into_iter().map(|t| t.join().expect("sender")).collect();
    let total_sent: u64 = sent.values().sum();

    // Quiesce: everything received, nothing queued or in flight, and the books balance.
    let mut last = Value::Null;
    let balanced = eventually(Duration::from_secs(90), || {
        let Ok(h) = wait_health(broker.port, &device, Duration::from_secs(5), |v| {
            let p = &v["pipelines"]["slow"];
            p["counters"]["received"] == total_sent
                && p["queue"]["depth"] == 0
                && p["queue"]["in_flight"] == 0
        }) else {
            return false;
        };
        last = h;
        true
    });
    assert!(balanced, "adaptive={adaptive}: never quiesced; log:\n{}", daemon.log());
    let pipeline = last["pipelines"]["slow"].clone();
    let c = &pipeline["counters"];
    let sum = |v: &Value| v.as_object().map_or(0, |o| o.values().filter_map(Value::as_u64).sum());
    let served = c["served"].as_u64().unwrap_or(0);
    assert_eq!(
        c["received"].as_u64().unwrap_or(0),
        served + sum(&c["rejected"]) + sum(&c["dropped"]) + sum(&c["failed"]),
        "adaptive={adaptive}: received = served + rejected + dropped + failed: {c}"
    );
    let msgs =
        obs.collect_until(Duration::from_secs(30), |m| m.len() as u64 >= served).expect("results");
    let mut results = BTreeMap::new();
    for m in &msgs {
        let dev = m.topic.trim_start_matches("r/").to_string();
        *results.entry(dev).or_insert(0) += 1;
    }
    Outcome {
        log: daemon.log(),
        rss_end: last["rss_bytes"].as_u64().unwrap_or(0),
        pipeline,
        results,
        sent,
        worst_slo,
        rss_mid,
    }
}

fn ratio(o: &Outcome, dev: &str) -> f64 {
    *o.results.get(dev).unwrap_or(&0) as f64 / *o.sent.get(dev).unwrap_or(&1) as f64
}

fn assert_memory_bounded(o: &Outcome) {
    assert!(o.rss_mid > 0 && o.rss_end > 0, "RSS reported: {} / {}", o.rss_mid, o.rss_end);
    assert!(
        o.rss_end < o.rss_mid + (16 << 20),
        "RSS grew from {} to {} bytes under sustained overload",
        o.rss_mid,
        o.rss_end
    );
}

#[test]
fn adaptive_control_keeps_served_frames_within_the_objective_and_sheds_fairly() {
    let o = overload(true);
    let p = &o.pipeline;
    let c = &p["counters"];
    // Exact: the SLO counts every served frame slower than the objective, so compliance >=
    // 0.99 is "the exact P99 is within the objective". The histogram's P99 is an estimate
    // within one bucket (2^(1/4) wide).
    let compliance = p["slo"]["latency"]["long"]["compliance"].as_f64().expect("compliance");
    assert!(compliance >= 0.99, "served frames within {OBJECTIVE_MS} ms: {compliance}: {p}");
    let p99_us = p["latency_us"]["total"]["p99_us"].as_u64().expect("p99");
    assert!(
        p99_us as f64 <= OBJECTIVE_MS as f64 * 1000.0 * 1.19,
        "served P99 {p99_us} µs exceeds the {OBJECTIVE_MS} ms objective: {p}"
    );
    assert_ne!(p["slo"]["latency"]["state"], "breached", "{}", p["slo"]);
    assert!(c["dropped"]["shed"].as_u64().unwrap_or(0) > 0, "overload must shed: {c}");
    // Fairness: the quiet devices keep (nearly) all their frames; the chatty one is cut.
    for q in ["quiet1", "quiet2"] {
        assert!(
            ratio(&o, q) >= 0.8,
            "{q} served {:.2} of its frames: {:?}; {p}",
            ratio(&o, q),
            o.results
        );
    }
    assert!(
        ratio(&o, "chatty") <= 0.5,
        "chatty served {:.2}: {:?}",
        ratio(&o, "chatty"),
        o.results
    );
    let ov = &p["overload"];
    assert_eq!(ov["enabled"], true);
    assert!(ov["queue_limit"].as_u64().unwrap_or(0) < 64, "Little's law limit: {ov}");
    assert_eq!(ov["top_shed"][0]["device"], "chatty", "{ov}");
    assert_memory_bounded(&o);
}

#[test]
fn without_adaptive_control_the_queue_fills_and_the_slo_is_breached() {
    let o = overload(false);
    let p = &o.pipeline;
    let c = &p["counters"];
    assert_eq!(o.worst_slo, "breached", "{}", p["slo"]);
    assert_eq!(p["slo"]["latency"]["state"], "breached", "{}", p["slo"]);
    let p99_us = p["latency_us"]["total"]["p99_us"].as_u64().expect("p99");
    assert!(p99_us > OBJECTIVE_MS * 1000, "a full 64-frame queue waits > 1 s: {p99_us} µs");
    assert_eq!(c["dropped"]["shed"], 0, "{c}");
    assert!(c["dropped"]["queue_full"].as_u64().unwrap_or(0) > 0, "{c}");
    assert_eq!(p["overload"]["enabled"], false);
    // Each SLO transition is a WARN with the numbers.
    assert!(
        o.log
            .lines()
            .any(|l| l.contains("WARN") && l.contains("SLO ") && l.contains("-> breached")),
        "no WARN for the breach in the log:\n{}",
        o.log
    );
    assert_memory_bounded(&o);
}

/// Micro-batching end to end: a burst into the sensor CNN (symbolic batch axis) with
/// `max_batch = 8` runs in batches, and every frame's result still matches its onnxruntime
/// reference.
#[test]
fn micro_batches_serve_every_frame_with_its_reference_output() {
    let fx = Fixture::load("sensor_cnn").expect("fixture");
    let device = "batching";
    let extra = "max_batch = 8\n[pipelines.cnn.queue]\ncapacity = 256\n";
    let (broker, daemon) = start_daemon(device, &fx.pipeline("cnn", "b/+", "br/{1}", extra));
    let obs = MqttClient::connect(broker.port, "obs-batching").expect("observer");
    obs.subscribe("br/#").expect("subscribe");
    let dev = MqttClient::connect(broker.port, "dev-batching").expect("device");
    const N: u64 = 200;
    for seq in 0..N {
        let sample = (seq % fx.samples.len() as u64) as usize;
        dev.publish("b/a", fx.json_frame(sample, seq), QoS::AtLeastOnce, false).expect("publish");
    }
    let msgs = obs
        .collect_until(Duration::from_secs(60), |m| m.len() as u64 >= N)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    for m in &msgs {
        let v = m.json();
        let seq = v["seq"].as_u64().expect("seq");
        let sample = (seq % fx.samples.len() as u64) as usize;
        fx.check_result(sample, &v).unwrap_or_else(|e| panic!("seq {seq}: {e}"));
        assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 4]));
    }
    let h = wait_health(broker.port, device, Duration::from_secs(10), |v| {
        v["pipelines"]["cnn"]["counters"]["served"] == N
    })
    .expect("health");
    let b = &h["pipelines"]["cnn"]["batching"];
    assert_eq!(b["max_batch"], 8, "{b}");
    let batched: u64 =
        b["runs"].as_object().expect("runs").values().filter_map(Value::as_u64).sum();
    assert!(batched > 0, "a 200-frame burst must produce batched runs: {b}");
}
