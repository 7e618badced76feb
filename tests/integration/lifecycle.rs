//! Lifecycle with real signals and processes: SIGTERM drains every queued frame, the retained
//! health message tracks online/offline, and the Last Will marks a killed daemon offline.

use std::collections::BTreeSet;
use std::time::Duration;

use edgeinfer_tests::{Fixture, MqttClient, start_daemon, wait_health, wait_online};
use nix::sys::signal::Signal;
use rumqttc::QoS;

/// Frames queued behind a slow model when SIGTERM arrives are all served before exit 0.
#[test]
fn sigterm_drains_queued_frames_without_loss() {
    let fx = Fixture::load("slow").expect("fixture");
    let pipeline = fx.pipeline(
        "slow",
        "s/+",
        "r/{1}",
        "format = \"raw\"\n[pipelines.slow.queue]\ncapacity = 200",
    );
    let (broker, mut daemon) = start_daemon("drain", &pipeline);
    let obs = MqttClient::connect(broker.port, "obs-drain").expect("observer");
    obs.subscribe("r/#").expect("subscribe");
    let dev = MqttClient::connect(broker.port, "dev-drain").expect("device");
    let n = 40;
    for i in 0..n {
        dev.publish(
            &format!("s/f{i}"),
            fx.samples[i % 2].inputs["x"].clone(),
            QoS::AtLeastOnce,
            false,
        )
        .expect("publish");
    }
    // As soon as the first result is out, the rest (each ~20 ms of compute) are still queued.
    let first = obs.recv(Duration::from_secs(30)).expect("first result");
    daemon.signal(Signal::SIGTERM);
    let mut msgs = vec![first];
    msgs.extend(
        obs.collect_until(Duration::from_secs(60), |m| m.len() + 1 >= n).expect("all results"),
    );
    let topics: BTreeSet<String> = msgs.iter().map(|m| m.topic.clone()).collect();
    assert_eq!(topics.len(), n, "every frame served exactly once");
    for m in &msgs {
        let i: usize = m.topic.trim_start_matches("r/f").parse().expect("index");
        fx.check_result(i % 2, &m.json()).expect("reference");
    }
    let status = daemon.wait_exit(Duration::from_secs(30)).expect("exit");
    assert!(status.success(), "exit status {status:?}\n{}", daemon.log());
    let log = daemon.log();
    let queued: usize = log
        .lines()
        .find_map(|l| l.split("serving ").nth(1)?.split(' ').next()?.parse().ok())
        .expect("drain log line");
    assert!(queued >= 5, "the test must catch frames queued at SIGTERM (had {queued})\n{log}");
    // The goodbye is retained: a new subscriber sees the daemon offline because of shutdown.
    let h = wait_health(broker.port, "drain", Duration::from_secs(10), |v| v["status"] != "online")
        .expect("health");
    assert_eq!(h["status"], "offline");
    assert_eq!(h["reason"], "shutdown");
}

/// The retained health message says online with per-pipeline state; after SIGKILL the broker
/// publishes the Last Will, which marks the daemon offline.
#[test]
fn health_is_retained_and_last_will_marks_a_killed_daemon_offline() {
    let fx = Fixture::load("digits").expect("fixture");
    let (broker, mut daemon) = start_daemon("lwt", &fx.pipeline("digits", "s/+", "r/{1}", ""));
    let h = wait_online(broker.port, "lwt");
    let p = &h["pipelines"]["digits"];
    assert_eq!(p["model"]["version"], "1");
    assert_eq!(p["model"]["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(p["queue"]["capacity"], 32);
    assert_eq!(p["queue"]["policy"], "drop_oldest");
    assert_eq!(h["pid"], daemon.pid());
    let dev = MqttClient::connect(broker.port, "dev-lwt").expect("device");
    dev.publish("s/a", fx.json_frame(0, 1), QoS::AtLeastOnce, false).expect("publish");
    let h = wait_health(broker.port, "lwt", Duration::from_secs(15), |v| {
        v["pipelines"]["digits"]["counters"]["served"] == 1
    })
    .expect("served counted in health");
    assert!(h["pipelines"]["digits"]["latency_us"]["inference"]["p99_us"].is_u64(), "{h}");

    // Fault injection: SIGKILL, no goodbye.
    daemon.kill9();
    let h = wait_health(broker.port, "lwt", Duration::from_secs(15), |v| v["status"] == "offline")
        .expect("last will");
    assert_eq!(h["reason"], "connection_lost");
}

/// SIGHUP does not kill the daemon (its default action would): it reloads the model files (here
/// unchanged); SIGINT behaves like SIGTERM: with an idle queue the daemon exits promptly and
/// cleanly.
#[test]
fn sighup_is_survived_and_sigint_stops_an_idle_daemon_cleanly() {
    let fx = Fixture::load("digits").expect("fixture");
    let (broker, mut daemon) = start_daemon("int", &fx.pipeline("digits", "s/+", "r/{1}", ""));
    daemon.signal(Signal::SIGHUP);
    daemon
        .wait_log("SIGHUP: reloading model files", Duration::from_secs(10))
        .expect("SIGHUP logged");
    daemon.wait_log("nothing to do", Duration::from_secs(10)).expect("unchanged model reported");
    assert!(daemon.is_running(), "SIGHUP must not stop the daemon");
    daemon.signal(Signal::SIGINT);
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exit");
    assert!(status.success(), "{status:?}");
    let h = wait_health(broker.port, "int", Duration::from_secs(10), |v| v["status"] == "offline")
        .expect("offline");
    assert_eq!(h["reason"], "shutdown");
}
