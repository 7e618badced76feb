//! Telemetry exposition, end to end: the Prometheus endpoint scraped over HTTP and parsed back
//! by a real parser (and by `promtool check metrics` when it is installed), agreeing with the
//! health message; the periodic MQTT metrics message carrying mergeable histograms and SLOs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeinfer_tests::{Fixture, MqttClient, free_port, start_daemon, wait_health};
use prometheus_parse::{Sample, Scrape, Value as PValue};
use rumqttc::QoS;
use serde_json::Value;

const FRAMES: u64 = 20;
const MALFORMED: u64 = 3;

fn scrape(port: u16) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    (head.to_string(), body.to_string())
}

fn find<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

fn counter(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(scrape, name, labels).map(|s| &s.value) {
        Some(PValue::Counter(v)) | Some(PValue::Gauge(v)) | Some(PValue::Untyped(v)) => *v,
        other => panic!("{name}{labels:?}: {other:?}"),
    }
}

#[test]
fn prometheus_endpoint_agrees_with_health_and_parses() {
    let fx = Fixture::load("digits").expect("fixture");
    let http = free_port();
    let extra = "[pipelines.digits.slo]\nlatency = \"2s\"\nserved = 0.9\nmin_frames = 5\n";
    let device = "metrics-1";
    let (broker, daemon) = start_daemon_with_metrics(
        device,
        &fx.pipeline("digits", "m/+/in", "m/{1}/out", extra),
        http,
    );
    let dev = MqttClient::connect(broker.port, "metrics-dev").expect("device");
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as f64;
    for seq in 0..FRAMES {
        let mut v: Value = serde_json::from_str(&fx.json_frame(0, seq)).expect("frame");
        v["ts"] = Value::from(now_ms);
        dev.publish("m/a/in", v.to_string(), QoS::AtLeastOnce, false).expect("publish");
    }
    for _ in 0..MALFORMED {
        dev.publish("m/a/in", "{not json", QoS::AtLeastOnce, false).expect("publish");
    }
    let health = wait_health(broker.port, device, Duration::from_secs(60), |v| {
        let c = &v["pipelines"]["digits"]["counters"];
        c["served"] == FRAMES && c["rejected"]["malformed"] == MALFORMED
    })
    .unwrap_or_else(|e| panic!("health never showed the frames: {e}\n{}", daemon.log()));

    let (head, body) = scrape(http);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let parsed =
        Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses as Prometheus text");
    let p = [("pipeline", "digits")];
    assert_eq!(counter(&parsed, "edgeinfer_frames_served_total", &p), FRAMES as f64);
    assert_eq!(
        counter(&parsed, "edgeinfer_frames_received_total", &p),
        (FRAMES + MALFORMED) as f64
    );
    assert_eq!(
        counter(
            &parsed,
            "edgeinfer_frames_rejected_total",
            &[("pipeline", "digits"), ("reason", "malformed")]
        ),
        MALFORMED as f64
    );
    assert_eq!(
        counter(
            &parsed,
            "edgeinfer_frames_dropped_total",
            &[("pipeline", "digits"), ("reason", "shed")]
        ),
        0.0
    );
    // Histograms: cumulative buckets, +Inf equal to the count, count equal to served.
    for (name, want) in [
        ("edgeinfer_latency_seconds", FRAMES),
        ("edgeinfer_inference_seconds", FRAMES),
        ("edgeinfer_service_seconds", FRAMES),
        ("edgeinfer_end_to_end_seconds", FRAMES),
    ] {
        let s = find(&parsed, name, &p).unwrap_or_else(|| panic!("{name} missing"));
        let PValue::Histogram(buckets) = &s.value else { panic!("{name}: {:?}", s.value) };
        assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count), "{name} not cumulative");
        let inf = buckets.iter().find(|b| b.less_than.is_infinite()).expect("+Inf bucket");
        assert_eq!(inf.count, want as f64, "{name}");
    }
    assert!(body.contains("edgeinfer_latency_seconds_sum{pipeline=\"digits\"}"), "sum line");
    assert!(body.contains("edgeinfer_latency_seconds_count{pipeline=\"digits\"} 20"), "count line");
    // SLO gauges agree with health.
    let slo_state = counter(
        &parsed,
        "edgeinfer_slo_state",
        &[("pipeline", "digits"), ("objective", "latency")],
    );
    assert_eq!(slo_state, 0.0, "ok = 0; health: {}", health["pipelines"]["digits"]["slo"]);
    assert_eq!(health["pipelines"]["digits"]["slo"]["state"], "ok");
    // Process metrics.
    assert!(counter(&parsed, "edgeinfer_process_threads", &[]) >= 2.0);
    assert!(counter(&parsed, "edgeinfer_process_resident_memory_bytes", &[]) > 1e6);
    // Clock ticks are 10 ms: a daemon this idle may not have used one yet.
    assert!(counter(&parsed, "edgeinfer_process_cpu_seconds_total", &[("mode", "user")]) >= 0.0);
    // Every family is prefixed and documented with HELP and TYPE.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("edgeinfer_"), "unprefixed sample: {line}");
    }
    for name in ["edgeinfer_frames_served_total", "edgeinfer_latency_seconds"] {
        assert!(body.contains(&format!("# HELP {name} ")), "{name} HELP");
        assert!(body.contains(&format!("# TYPE {name} ")), "{name} TYPE");
    }

    // promtool, when installed, is the reference linter for the exposition format.
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write");
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("promtool not installed: checked with prometheus-parse only");
    }
}

#[test]
fn mqtt_metrics_message_carries_mergeable_histograms_and_slo() {
    let fx = Fixture::load("digits").expect("fixture");
    let extra = "[pipelines.digits.slo]\nlatency = \"2s\"\nmin_frames = 5\n";
    let device = "metrics-2";
    let (broker, _daemon) =
        start_daemon(device, &fx.pipeline("digits", "m2/+/in", "m2/{1}/out", extra));
    let watch = MqttClient::connect(broker.port, "metrics-watch").expect("watch");
    let topic = format!("edgeinfer/{device}/metrics");
    watch.subscribe(&topic).expect("subscribe");
    let dev = MqttClient::connect(broker.port, "metrics-dev2").expect("device");
    for seq in 0..10 {
        dev.publish("m2/a/in", fx.json_frame(0, seq), QoS::AtLeastOnce, false).expect("publish");
    }
    let m = watch
        .wait_json(&topic, Duration::from_secs(30), |v| v["pipelines"]["digits"]["served"] == 10)
        .expect("metrics message with the frames");
    let p = &m["pipelines"]["digits"];
    let h = &p["histograms"]["total"];
    assert_eq!(h["count"], 10);
    let bucket_sum: u64 = h["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| b[1].as_u64().expect("count"))
        .sum();
    assert_eq!(bucket_sum, 10, "sparse [index, count] pairs add up to the count");
    assert_eq!(p["histograms"]["service"]["count"], 10);
    // json_frame's ts (2001) is far outside the skew guard: counted, not trusted.
    assert_eq!(p["histograms"]["end_to_end"]["count"], 0);
    assert_eq!(p["clock_skew"], 10);
    assert!(p["slo"]["latency"].is_object(), "{}", p["slo"]);
    assert_eq!(m["histogram"]["buckets_per_doubling"], 4);
    assert!(m["process"]["threads"].as_u64().unwrap_or(0) >= 2, "{}", m["process"]);
}

/// Like `start_daemon`, with `metrics.listen` on `http_port`.
fn start_daemon_with_metrics(
    device: &str,
    pipelines: &str,
    http_port: u16,
) -> (edgeinfer_tests::Mosquitto, edgeinfer_tests::Daemon) {
    let broker = edgeinfer_tests::Mosquitto::start().expect("mosquitto");
    let cfg = edgeinfer_tests::config(broker.port, device, pipelines)
        .replace("[metrics]\n", &format!("[metrics]\nlisten = \"127.0.0.1:{http_port}\"\n"));
    let daemon = edgeinfer_tests::Daemon::start(&cfg).expect("daemon");
    edgeinfer_tests::wait_online(broker.port, device);
    (broker, daemon)
}
