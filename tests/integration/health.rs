//! `edgeinfer health --wait`, the A/B update commit gate, against the real daemon and broker: it
//! exits 0 only for a daemon that is online with its models loaded and no SLO breached for the
//! whole window, and non-zero with the reason when the daemon is absent, was killed, could not
//! load its model, breaches its SLO, or the broker is down. Health carries the `boot` facts.

use std::fs;
use std::process::Output;
use std::time::{Duration, Instant};

use edgeinfer_tests::{
    Daemon, Fixture, Mosquitto, MqttClient, config, edgeinfer, free_port, start_daemon,
    wait_health, wait_online,
};
use rumqttc::QoS;

fn gate(config: &std::path::Path, args: &[&str]) -> Output {
    let path = config.to_str().expect("utf-8 path");
    let mut all = vec!["health", "--config", path];
    all.extend_from_slice(args);
    edgeinfer(&all)
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A config file for a device that the test does not start a daemon for.
fn config_file(
    dir: &tempfile::TempDir,
    port: u16,
    device: &str,
    pipelines: &str,
) -> std::path::PathBuf {
    let path = dir.path().join("edgeinfer.toml");
    fs::write(&path, config(port, device, pipelines)).expect("write config");
    path
}

#[test]
fn health_wait_passes_for_a_healthy_daemon_after_the_window() {
    let fx = Fixture::load("digits").expect("fixture");
    let (_broker, daemon) = start_daemon("gate-ok", &fx.pipeline("digits", "s/+", "r/{1}", ""));
    let t = Instant::now();
    let o = gate(&daemon.config, &["--wait", "--timeout", "30s", "--window", "2s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(t.elapsed() >= Duration::from_secs(2), "the window must be waited out");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("gate-ok is healthy") && out.contains("1 pipeline(s)"), "{out}");
    // Without --wait the retained message is judged at once.
    let o = gate(&daemon.config, &["--timeout", "10s"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn health_reports_the_boot_slot_and_image_version() {
    let fx = Fixture::load("digits").expect("fixture");
    let (broker, _daemon) = start_daemon("gate-boot", &fx.pipeline("digits", "s/+", "r/{1}", ""));
    let h = wait_online(broker.port, "gate-boot");
    // The test host is no A/B system: the keys are there, the slot is whatever the host says
    // (normally null). Parsing from fakes is covered by the unit tests in sys::boot.
    let boot = h["boot"].as_object().unwrap_or_else(|| panic!("no boot object: {h}"));
    for key in
        ["slot", "slot_source", "image_id", "image_version", "os_id", "version_id", "build_id"]
    {
        assert!(boot.contains_key(key), "boot.{key} missing: {h}");
    }
}

#[test]
fn health_wait_fails_when_no_daemon_runs() {
    let broker = Mosquitto::start().expect("mosquitto");
    let dir = tempfile::tempdir().expect("tempdir");
    let fx = Fixture::load("digits").expect("fixture");
    let cfg =
        config_file(&dir, broker.port, "gate-absent", &fx.pipeline("digits", "s/+", "r/{1}", ""));
    let o = gate(&cfg, &["--wait", "--timeout", "3s", "--window", "0s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not healthy after") && err.contains("no health message"), "{err}");
}

#[test]
fn health_wait_fails_when_the_broker_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fx = Fixture::load("digits").expect("fixture");
    let cfg =
        config_file(&dir, free_port(), "gate-nobroker", &fx.pipeline("digits", "s/+", "r/{1}", ""));
    let o = gate(&cfg, &["--wait", "--timeout", "2s", "--window", "0s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unreachable"), "{}", text(&o));
}

/// The stale retained "online" of a killed daemon is replaced by its Last Will; neither passes.
#[test]
fn health_wait_fails_for_a_killed_daemon() {
    let fx = Fixture::load("digits").expect("fixture");
    let (broker, mut daemon) =
        start_daemon("gate-killed", &fx.pipeline("digits", "s/+", "r/{1}", ""));
    daemon.kill9();
    wait_health(broker.port, "gate-killed", Duration::from_secs(30), |v| v["status"] == "offline")
        .expect("last will");
    let o = gate(&daemon.config, &["--timeout", "5s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("offline (connection_lost)"),
        "{}",
        text(&o)
    );
    let o = gate(&daemon.config, &["--wait", "--timeout", "3s", "--window", "0s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("last retained health message"),
        "{}",
        text(&o)
    );
}

/// A model that does not load: the daemon refuses to start, never comes online, the gate fails.
#[test]
fn health_wait_fails_when_the_model_does_not_load() {
    let broker = Mosquitto::start().expect("mosquitto");
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.onnx");
    fs::write(&broken, b"this is not an ONNX model").expect("write");
    let pipeline = format!(
        "[pipelines.broken]\nmodel = \"{}\"\ninput = \"s/+\"\noutput = \"r/{{1}}\"\n",
        broken.display()
    );
    let mut daemon = Daemon::start(&config(broker.port, "gate-model", &pipeline)).expect("daemon");
    let status = daemon.wait_exit(Duration::from_secs(30)).expect("daemon exits");
    assert!(!status.success(), "{}", daemon.log());
    let o = gate(&daemon.config, &["--wait", "--timeout", "3s", "--window", "0s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

/// A daemon that is up but too slow for its objectives (frames waiting behind a ~20 ms model miss
/// a 1 ms objective and are dropped as late) is not healthy.
#[test]
fn health_wait_fails_while_the_slo_is_breached() {
    let fx = Fixture::load("slow").expect("fixture");
    let extra = "format = \"raw\"\n[pipelines.slow.slo]\nlatency = \"1ms\"\nlatency_quantile = 0.9\n\
                 latency_window = \"120s\"\nserved = 0.999\nserved_window = \"120s\"\nmin_frames = 5\n";
    let (broker, daemon) = start_daemon("gate-slo", &fx.pipeline("slow", "s/+", "r/{1}", extra));
    let dev = MqttClient::connect(broker.port, "dev-gate-slo").expect("device");
    for i in 0..20 {
        dev.publish(&format!("s/f{i}"), fx.samples[0].inputs["x"].clone(), QoS::AtLeastOnce, false)
            .expect("publish");
    }
    wait_health(broker.port, "gate-slo", Duration::from_secs(60), |v| {
        v["pipelines"]["slow"]["slo"]["state"] == "breached"
    })
    .expect("slo breached");
    let o = gate(&daemon.config, &["--wait", "--timeout", "4s", "--window", "0s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("SLO breached ("), "{}", text(&o));
}

#[test]
fn health_rejects_a_window_longer_than_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config_file(&dir, free_port(), "gate-usage", "");
    let o = gate(&cfg, &["--wait", "--timeout", "5s", "--window", "10s"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
}
