//! Queue policies under overload, end to end: a slow model (~25 ms per frame) and a burst of
//! frames into a 2-slot queue. Every frame is accounted for; the policy decides which survive.

use std::collections::BTreeSet;
use std::time::Duration;

use edgeinfer_tests::{Fixture, MqttClient, eventually, start_daemon, wait_health};
use rumqttc::QoS;

const BURST: u64 = 12;

/// Publishes a burst to a slow pipeline with `policy`; returns (served seqs, health counters).
fn burst(policy: &str) -> (BTreeSet<u64>, serde_json::Value) {
    let fx = Fixture::load("slow").expect("fixture");
    let queue = format!(
        "[pipelines.slow.queue]\ncapacity = 2\npolicy = \"{policy}\"\nblock_timeout = \"5s\""
    );
    let device = format!("q-{}", policy.replace('_', "-"));
    let (broker, _daemon) = start_daemon(&device, &fx.pipeline("slow", "s/+", "r/{1}", &queue));
    let obs = MqttClient::connect(broker.port, &format!("obs-{device}")).expect("observer");
    obs.subscribe("r/#").expect("subscribe");
    let dev = MqttClient::connect(broker.port, &format!("dev-{device}")).expect("device");
    for seq in 0..BURST {
        dev.publish("s/a", fx.json_frame(0, seq), QoS::AtLeastOnce, false).expect("publish");
    }
    // Wait until the books balance: every frame either served or dropped.
    let mut health = serde_json::Value::Null;
    let balanced = eventually(Duration::from_secs(60), || {
        let Ok(h) = wait_health(broker.port, &device, Duration::from_secs(5), |v| {
            let c = &v["pipelines"]["slow"]["counters"];
            c["received"] == BURST
                && c["served"].as_u64().unwrap_or(0)
                    + c["dropped"]["queue_full"].as_u64().unwrap_or(0)
                    == BURST
        }) else {
            return false;
        };
        health = h;
        true
    });
    assert!(balanced, "{policy}: received/served/dropped never balanced");
    let served = health["pipelines"]["slow"]["counters"]["served"].as_u64().expect("served");
    let msgs =
        obs.collect_until(Duration::from_secs(30), |m| m.len() as u64 >= served).expect("results");
    let seqs: BTreeSet<u64> = msgs.iter().map(|m| m.json()["seq"].as_u64().expect("seq")).collect();
    assert_eq!(seqs.len() as u64, served, "one result per served frame");
    (seqs, health["pipelines"]["slow"]["counters"].clone())
}

#[test]
fn block_policy_applies_back_pressure_and_loses_nothing() {
    let (seqs, c) = burst("block");
    assert_eq!(seqs, (0..BURST).collect(), "block: every frame served, in order of arrival");
    assert_eq!(c["dropped"]["queue_full"], 0);
}

#[test]
fn drop_oldest_keeps_the_freshest_frames_and_counts_the_rest() {
    let (seqs, c) = burst("drop_oldest");
    assert!(
        c["dropped"]["queue_full"].as_u64().expect("dropped") > 0,
        "the burst must overflow: {c}"
    );
    assert!(seqs.contains(&(BURST - 1)), "the newest frame survives drop_oldest: {seqs:?}");
}

#[test]
fn drop_newest_keeps_the_first_frames_and_counts_the_rest() {
    let (seqs, c) = burst("drop_newest");
    assert!(
        c["dropped"]["queue_full"].as_u64().expect("dropped") > 0,
        "the burst must overflow: {c}"
    );
    assert!(
        seqs.contains(&0) && seqs.contains(&1),
        "the first frames survive drop_newest: {seqs:?}"
    );
    assert!(!seqs.contains(&(BURST - 1)), "the last frame of the burst is refused: {seqs:?}");
}
