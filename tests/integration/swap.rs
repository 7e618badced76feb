//! Hot model swap, end to end: a new model file renamed over the running one under steady load
//! (no frame lost or failed, results switch version at one point), candidates that must be
//! refused (wrong signature, corrupt file, golden mismatch: each reported, the running model
//! keeps serving), and 20 swaps by command without a model set left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgeinfer_tests::{
    Daemon, Fixture, Mosquitto, MqttClient, config, eventually, fixtures, wait_health, wait_online,
};
use rumqttc::QoS;
use serde_json::Value;

/// A model directory the daemon serves from, with files installed the way an updater should:
/// golden pairs first, then the model written beside and renamed over the old one.
struct ModelDir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
    stem: String,
}

impl ModelDir {
    fn new(case: &str) -> ModelDir {
        ModelDir::named("digits", case)
    }

    fn named(stem: &str, case: &str) -> ModelDir {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join(format!("{stem}.onnx"));
        let d = ModelDir { _tmp: tmp, path, stem: stem.into() };
        d.install(case, Some(case));
        d
    }

    fn golden(&self) -> PathBuf {
        self.path.with_file_name(format!("{}.golden", self.stem))
    }

    /// Installs `case`'s model, with the golden pairs of `golden` (None: none shipped).
    fn install(&self, case: &str, golden: Option<&str>) {
        let _ = std::fs::remove_dir_all(self.golden());
        if let Some(g) = golden {
            let staging = self.path.with_file_name(format!("{}.golden.tmp", self.stem));
            let _ = std::fs::remove_dir_all(&staging);
            for i in 0..2 {
                let src = fixtures().join(format!("models/{g}/samples/{i:03}"));
                let dst = staging.join(format!("{i:03}"));
                std::fs::create_dir_all(&dst).expect("mkdir");
                for e in std::fs::read_dir(&src).expect("samples") {
                    let e = e.expect("entry");
                    std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
                }
            }
            std::fs::rename(&staging, self.golden()).expect("rename golden");
        }
        self.write_model(
            &std::fs::read(fixtures().join(format!("models/{case}/model.onnx"))).expect("model"),
        );
    }

    /// Writes `bytes` beside the model and renames it over (atomic replace).
    fn write_model(&self, bytes: &[u8]) {
        let tmp = self.path.with_extension("onnx.tmp");
        std::fs::write(&tmp, bytes).expect("write");
        std::fs::rename(&tmp, &self.path).expect("rename");
    }
}

fn pipeline(name: &str, model: &Path, extra: &str) -> String {
    format!(
        "[pipelines.{name}]\nmodel = {:?}\ninput = \"sw/+/in\"\noutput = \"sw/{{1}}/out\"\nworkers = 1\n{extra}\n\
         [pipelines.{name}.queue]\ncapacity = 1024\npolicy = \"block\"\nblock_timeout = \"10s\"\n",
        model.display().to_string()
    )
}

fn start(device: &str, model: &Path, extra: &str) -> (Mosquitto, Daemon) {
    start_named(device, "digits", model, extra)
}

fn start_named(device: &str, name: &str, model: &Path, extra: &str) -> (Mosquitto, Daemon) {
    let broker = Mosquitto::start().expect("mosquitto");
    let daemon =
        Daemon::start(&config(broker.port, device, &pipeline(name, model, extra))).expect("daemon");
    wait_online(broker.port, device);
    (broker, daemon)
}

/// Waits for the next `model_swap` event; returns it.
fn next_swap(events: &MqttClient, topic: &str, daemon: &Daemon) -> Value {
    events
        .wait_json(topic, Duration::from_secs(60), |v| v["event"] == "model_swap")
        .unwrap_or_else(|e| panic!("no swap event: {e}\n{}", daemon.log()))
}

#[test]
fn a_model_renamed_over_the_running_one_swaps_under_load_without_losing_a_frame() {
    let dir = ModelDir::new("digits");
    let device = "swap-load";
    let (broker, daemon) = start(device, &dir.path, "");
    let (v1, v2) = (Fixture::load("digits").expect("v1"), Fixture::load("digits_v2").expect("v2"));
    let obs = MqttClient::connect(broker.port, "swap-obs").expect("observer");
    obs.subscribe("sw/+/out").expect("subscribe");
    let events = MqttClient::connect(broker.port, "swap-events").expect("events");
    let events_topic = format!("edgeinfer/{device}/events");
    events.subscribe(&events_topic).expect("subscribe");
    let dev = MqttClient::connect(broker.port, "swap-dev").expect("device");

    // 1200 frames at ~300/s; the new model lands after ~1.5 s.
    const N: u64 = 1200;
    let t0 = Instant::now();
    let mut swapped_at = None;
    for seq in 0..N {
        let due = t0 + Duration::from_micros(seq * 3333);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        dev.publish("sw/a/in", v1.json_frame((seq % 8) as usize, seq), QoS::AtLeastOnce, false)
            .expect("publish");
        if seq == 450 {
            dir.install("digits_v2", Some("digits_v2"));
            swapped_at = Some(seq);
        }
    }
    assert!(swapped_at.is_some());
    let ev = next_swap(&events, &events_topic, &daemon);
    assert_eq!(ev["result"], "swapped", "{ev}");
    assert_eq!(ev["trigger"], "file", "{ev}");
    assert_eq!((ev["from_version"].as_str(), ev["to_version"].as_str()), (Some("1"), Some("2")));
    assert_eq!(ev["golden_checked"], 2, "{ev}");

    let msgs = obs
        .collect_until(Duration::from_secs(60), |m| m.len() as u64 >= N)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let mut by_seq = BTreeMap::new();
    for m in &msgs {
        let v = m.json();
        let seq = v["seq"].as_u64().expect("seq");
        assert!(by_seq.insert(seq, v).is_none(), "seq {seq} answered twice");
    }
    assert_eq!(by_seq.len() as u64, N, "every frame answered exactly once");
    // Versions by seq (one worker: served in arrival order): 1...1 then 2...2.
    let versions: Vec<&str> =
        by_seq.values().map(|v| v["model"]["version"].as_str().unwrap_or("?")).collect();
    let first_v2 = versions.iter().position(|v| *v == "2").expect("some results from v2");
    assert!(first_v2 > 0, "v1 served the first frames");
    assert!(versions[first_v2..].iter().all(|v| *v == "2"), "one switch point: {versions:?}");
    assert!(versions[..first_v2].iter().all(|v| *v == "1"));
    // Each result is the right model's output for its frame.
    for (seq, v) in &by_seq {
        let fx = if v["model"]["version"] == "2" { &v2 } else { &v1 };
        fx.check_result((*seq % 8) as usize, v).unwrap_or_else(|e| panic!("seq {seq}: {e}"));
    }
    let h = wait_health(broker.port, device, Duration::from_secs(10), |v| {
        v["pipelines"]["digits"]["counters"]["served"] == N
    })
    .expect("health");
    let p = &h["pipelines"]["digits"];
    assert_eq!(p["model"]["version"], "2");
    assert_eq!(p["model"]["source"], "file");
    assert_eq!(p["swaps"]["swapped"], 1, "{}", p["swaps"]);
    let c = &p["counters"];
    assert_eq!(c["failed"]["inference_error"], 0, "{c}");
    assert_eq!(c["failed"]["publish_error"], 0, "{c}");
    assert!(c["dropped"].as_object().expect("dropped").values().all(|v| v == 0), "{c}");
}

#[test]
fn bad_candidates_are_refused_and_the_running_model_keeps_serving() {
    let dir = ModelDir::new("digits");
    let device = "swap-bad";
    let (broker, mut daemon) = start(device, &dir.path, "watch_model = false\n");
    let v1 = Fixture::load("digits").expect("v1");
    let obs = MqttClient::connect(broker.port, "bad-obs").expect("observer");
    obs.subscribe("sw/+/out").expect("subscribe");
    let events = MqttClient::connect(broker.port, "bad-events").expect("events");
    let events_topic = format!("edgeinfer/{device}/events");
    events.subscribe(&events_topic).expect("subscribe");
    let dev = MqttClient::connect(broker.port, "bad-dev").expect("device");
    let cmd = format!("edgeinfer/{device}/cmd/reload");
    let mut seq = 0u64;
    let mut still_serving_v1 = |label: &str| {
        dev.publish("sw/a/in", v1.json_frame(0, seq), QoS::AtLeastOnce, false).expect("publish");
        let r = obs
            .wait_json("sw/a/out", Duration::from_secs(30), |v| v["seq"] == seq)
            .unwrap_or_else(|e| panic!("{label}: no result: {e}"));
        assert_eq!(r["model"]["version"], "1", "{label}");
        v1.check_result(0, &r).unwrap_or_else(|e| panic!("{label}: {e}"));
        seq += 1;
    };
    still_serving_v1("before");

    // 1. Another model's signature (the sensor CNN), by SIGHUP.
    dir.install("sensor_cnn", None);
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let ev = next_swap(&events, &events_topic, &daemon);
    assert_eq!((ev["result"].as_str(), ev["trigger"].as_str()), (Some("rejected"), Some("sighup")));
    assert!(ev["reason"].as_str().unwrap_or("").contains("signature differs"), "{ev}");
    still_serving_v1("after a wrong signature");

    // 2. A corrupt file, by command.
    dir.write_model(b"this is not an onnx model");
    dev.publish(&cmd, "{\"pipeline\": \"digits\"}", QoS::AtLeastOnce, false).expect("command");
    let ev = next_swap(&events, &events_topic, &daemon);
    assert_eq!(
        (ev["result"].as_str(), ev["trigger"].as_str()),
        (Some("rejected"), Some("command"))
    );
    assert!(ev["reason"].as_str().unwrap_or("").contains("load models"), "{ev}");
    still_serving_v1("after a corrupt file");

    // 3. The retrained model with the old model's golden outputs: a mismatch.
    dir.install("digits_v2", Some("digits"));
    dev.publish(&cmd, "", QoS::AtLeastOnce, false).expect("command");
    let ev = next_swap(&events, &events_topic, &daemon);
    assert_eq!(ev["result"], "rejected", "{ev}");
    assert!(ev["reason"].as_str().unwrap_or("").contains("golden pair 000"), "{ev}");
    still_serving_v1("after a golden mismatch");

    // 4. A model with an operator tract does not implement (Det): refused at load.
    dir.install("unsupported_op", None);
    dev.publish(&cmd, "", QoS::AtLeastOnce, false).expect("command");
    let ev = next_swap(&events, &events_topic, &daemon);
    assert_eq!(ev["result"], "rejected", "{ev}");
    assert!(ev["reason"].as_str().unwrap_or("").contains("Det"), "{ev}");
    still_serving_v1("after a missing operator");

    // 5. The same file again: nothing to do.
    dir.install("digits", Some("digits"));
    dev.publish(&cmd, "", QoS::AtLeastOnce, false).expect("command");
    let ev = next_swap(&events, &events_topic, &daemon);
    assert_eq!(ev["result"], "unchanged", "{ev}");

    // A command naming no pipeline is refused with a reason.
    dev.publish(&cmd, "{\"pipeline\": \"nope\"}", QoS::AtLeastOnce, false).expect("command");
    let ev = events
        .wait_json(&events_topic, Duration::from_secs(30), |v| v["event"] == "command_error")
        .expect("command_error event");
    assert!(ev["reason"].as_str().unwrap_or("").contains("no pipeline named"), "{ev}");

    let h = wait_health(broker.port, device, Duration::from_secs(10), |v| {
        v["pipelines"]["digits"]["swaps"]["rejected"] == 4
    })
    .expect("health");
    let s = &h["pipelines"]["digits"]["swaps"];
    assert_eq!((s["swapped"].as_u64(), s["unchanged"].as_u64()), (Some(0), Some(1)), "{s}");
    assert!(daemon.is_running());
    daemon.wait_log("model candidate rejected", Duration::from_secs(5)).expect("logged");
}

#[test]
fn twenty_swaps_leave_no_model_behind() {
    let dir = ModelDir::new("digits");
    let device = "swap-20";
    // No probation: each swap releases the previous model at once.
    let (broker, daemon) = start(device, &dir.path, "watch_model = false\nprobation = \"0s\"\n");
    let v1 = Fixture::load("digits").expect("v1");
    let events = MqttClient::connect(broker.port, "twenty-events").expect("events");
    let events_topic = format!("edgeinfer/{device}/events");
    events.subscribe(&events_topic).expect("subscribe");
    let dev = MqttClient::connect(broker.port, "twenty-dev").expect("device");
    let cmd = format!("edgeinfer/{device}/cmd/reload");
    let rss = |pred: &dyn Fn(&Value) -> bool| -> (u64, Value) {
        let h =
            wait_health(broker.port, device, Duration::from_secs(20), |v| pred(v)).expect("health");
        (h["rss_bytes"].as_u64().unwrap_or(0), h)
    };
    // Warm the allocator with some traffic first, so the baseline is steady-state.
    for seq in 0..200 {
        dev.publish("sw/a/in", v1.json_frame((seq % 8) as usize, seq), QoS::AtMostOnce, false)
            .expect("publish");
    }
    let (before, _) = rss(&|v| v["pipelines"]["digits"]["counters"]["served"] == 200);
    for i in 0..20 {
        let case = if i % 2 == 0 { "digits_v2" } else { "digits" };
        dir.install(case, Some(case));
        dev.publish(&cmd, "", QoS::AtLeastOnce, false).expect("command");
        let ev = next_swap(&events, &events_topic, &daemon);
        assert_eq!(ev["result"], "swapped", "swap {i}: {ev}");
        // Traffic between swaps, so workers move to every new set.
        dev.publish("sw/a/in", v1.json_frame(0, 1000 + i), QoS::AtMostOnce, false)
            .expect("publish");
    }
    // Workers let go of the last swapped-out set at their next frame or idle tick (250 ms).
    let ok = eventually(Duration::from_secs(10), || {
        wait_health(broker.port, device, Duration::from_secs(5), |v| v["model_sets_alive"] == 1)
            .is_ok()
    });
    assert!(ok, "a swapped-out model set stayed alive");
    let (after, h) = rss(&|v| v["pipelines"]["digits"]["swaps"]["swapped"] == 20);
    assert_eq!(h["pipelines"]["digits"]["model"]["version"], "1", "20 swaps: back to v1");
    assert!(after < before + (4 << 20), "RSS grew from {before} to {after} bytes over 20 swaps");
}

#[test]
fn a_latency_regression_rolls_back_within_probation_and_restores_the_file() {
    let dir = ModelDir::named("slow", "slow");
    let device = "swap-probation";
    let extra = "watch_model = false\nprobation = \"60s\"\nprobation_min_frames = 15\n\
                 probation_latency_ratio = 1.5\n";
    let (broker, daemon) = start_named(device, "slow", &dir.path, extra);
    let v1 = Fixture::load("slow").expect("v1");
    let original = std::fs::read(&dir.path).expect("read");
    let obs = MqttClient::connect(broker.port, "prob-obs").expect("observer");
    obs.subscribe("sw/+/out").expect("subscribe");
    let events = MqttClient::connect(broker.port, "prob-events").expect("events");
    let events_topic = format!("edgeinfer/{device}/events");
    events.subscribe(&events_topic).expect("subscribe");
    let dev = MqttClient::connect(broker.port, "prob-dev").expect("device");
    let cmd = format!("edgeinfer/{device}/cmd/reload");
    let seq = std::cell::Cell::new(0u64);
    let send = |n: u64| {
        for _ in 0..n {
            let s = seq.get();
            dev.publish("sw/a/in", v1.json_frame(0, s), QoS::AtLeastOnce, false).expect("publish");
            seq.set(s + 1);
            std::thread::sleep(Duration::from_millis(15));
        }
    };
    // The running model's record: its inference P99 is the baseline.
    send(40);
    obs.collect_until(Duration::from_secs(60), |m| m.len() >= 40).expect("v1 results");
    // slow_v2: the same signature, four times the layers, its own golden pairs: it passes every
    // check at load time and is swapped in; probation catches the latency.
    dir.install("slow_v2", Some("slow_v2"));
    dev.publish(&cmd, "", QoS::AtLeastOnce, false).expect("command");
    let ev = next_swap(&events, &events_topic, &daemon);
    assert_eq!(ev["result"], "swapped", "{ev}");
    send(40);
    let ev = events
        .wait_json(&events_topic, Duration::from_secs(60), |v| v["event"] == "model_probation")
        .unwrap_or_else(|e| panic!("no probation verdict: {e}\n{}", daemon.log()));
    assert_eq!(ev["result"], "rolled_back", "{ev}");
    let reason = ev["reason"].as_str().unwrap_or("");
    assert!(reason.contains("inference P99") && reason.contains("previous file restored"), "{ev}");
    // The previous file is back on disk, the candidate kept aside.
    assert_eq!(std::fs::read(&dir.path).expect("read"), original, "file restored");
    let aside = dir.path.with_file_name("slow.onnx.rejected");
    assert_eq!(
        std::fs::read(&aside).expect("rejected file kept"),
        std::fs::read(fixtures().join("models/slow_v2/model.onnx")).expect("v2")
    );
    // Results come from v1 again.
    let from = seq.get();
    send(3);
    let r = obs
        .wait_json("sw/a/out", Duration::from_secs(30), |v| v["seq"].as_u64() == Some(from + 2))
        .expect("result after the rollback");
    assert_eq!(r["model"]["sha256"].as_str(), ev["from_sha256"].as_str(), "{r}");
    let h = wait_health(broker.port, device, Duration::from_secs(10), |v| {
        v["pipelines"]["slow"]["swaps"]["rolled_back"] == 1
    })
    .expect("health");
    let p = &h["pipelines"]["slow"];
    assert_eq!(p["counters"]["failed"]["inference_error"], 0);
    daemon.wait_log("rolled back", Duration::from_secs(5)).expect("logged");
}

#[test]
fn a_candidate_that_holds_up_is_kept_after_probation() {
    let dir = ModelDir::new("digits");
    let device = "swap-kept";
    let extra = "watch_model = false\nprobation = \"2s\"\nprobation_min_frames = 5\n";
    let (broker, daemon) = start(device, &dir.path, extra);
    let v1 = Fixture::load("digits").expect("v1");
    let events = MqttClient::connect(broker.port, "kept-events").expect("events");
    let events_topic = format!("edgeinfer/{device}/events");
    events.subscribe(&events_topic).expect("subscribe");
    let dev = MqttClient::connect(broker.port, "kept-dev").expect("device");
    dir.install("digits_v2", Some("digits_v2"));
    dev.publish(&format!("edgeinfer/{device}/cmd/reload"), "", QoS::AtLeastOnce, false)
        .expect("cmd");
    assert_eq!(next_swap(&events, &events_topic, &daemon)["result"], "swapped");
    for seq in 0..20 {
        dev.publish("sw/a/in", v1.json_frame(0, seq), QoS::AtLeastOnce, false).expect("publish");
    }
    let ev = events
        .wait_json(&events_topic, Duration::from_secs(30), |v| v["event"] == "model_probation")
        .expect("probation verdict");
    assert_eq!(ev["result"], "kept", "{ev}");
    assert_eq!(ev["to_version"], "2");
    // The previous set is released once probation is over.
    let ok = eventually(Duration::from_secs(10), || {
        wait_health(broker.port, device, Duration::from_secs(5), |v| v["model_sets_alive"] == 1)
            .is_ok()
    });
    assert!(ok, "the previous model set is still alive after probation");
}
