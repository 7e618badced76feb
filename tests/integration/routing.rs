//! Topic routing: many devices on wildcard filters, output topics built from captures, one
//! stream feeding two pipelines, and reconnection with re-subscription.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use edgeinfer_tests::{
    Daemon, Fixture, Mosquitto, MqttClient, config, free_port, start_daemon, wait_online,
};
use rumqttc::QoS;

#[test]
fn many_devices_on_wildcards_get_results_on_their_own_topics() {
    let fx = Fixture::load("digits").expect("fixture");
    let pipeline = fx.pipeline(
        "imu",
        "site/+/dev/+/frames/#",
        "edgeinfer/{device}/{pipeline}/{1}/{2}/{3}",
        "workers = 2\n[pipelines.imu.queue]\ncapacity = 256",
    );
    let (broker, _daemon) = start_daemon("router", &pipeline);
    let obs = MqttClient::connect(broker.port, "obs-routing").expect("observer");
    obs.subscribe("edgeinfer/router/imu/#").expect("subscribe");

    let devices = 12;
    let per_device = 5;
    let dev = MqttClient::connect(broker.port, "dev-routing").expect("device");
    let mut expected: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for d in 0..devices {
        let site = if d % 2 == 0 { "north" } else { "south" };
        for seq in 0..per_device {
            let topic = format!("site/{site}/dev/unit{d}/frames/left/arm");
            dev.publish(&topic, fx.json_frame(d % fx.samples.len(), seq), QoS::AtLeastOnce, false)
                .expect("publish");
            expected
                .entry(format!("edgeinfer/router/imu/{site}/unit{d}/left/arm"))
                .or_default()
                .insert(seq);
        }
    }
    // A topic that does not match the filter gets nothing (and is not counted).
    dev.publish("site/north/dev/x", fx.json_frame(0, 99), QoS::AtLeastOnce, false)
        .expect("publish");
    let total = devices * per_device as usize;
    let msgs = obs.collect_until(Duration::from_secs(60), |m| m.len() >= total).expect("results");
    let mut got: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for m in &msgs {
        let v = m.json();
        let seq = v["seq"].as_u64().expect("seq");
        assert!(
            got.entry(m.topic.clone()).or_default().insert(seq),
            "duplicate result {} seq {seq}",
            m.topic
        );
        assert_eq!(v["topic"].as_str().map(|t| t.ends_with("/frames/left/arm")), Some(true));
    }
    assert_eq!(got, expected);
    assert!(obs.recv(Duration::from_millis(300)).is_none(), "no extra results");
}

#[test]
fn one_stream_feeds_two_pipelines() {
    let fx = Fixture::load("digits").expect("fixture");
    let pipelines = [
        fx.pipeline("a", "s/+", "r/{pipeline}/{1}", ""),
        fx.pipeline("b", "s/#", "r/{pipeline}/{1}", "qos = 0"),
    ]
    .concat();
    let (broker, _daemon) = start_daemon("fan", &pipelines);
    let obs = MqttClient::connect(broker.port, "obs-fan").expect("observer");
    obs.subscribe("r/#").expect("subscribe");
    let dev = MqttClient::connect(broker.port, "dev-fan").expect("device");
    dev.publish("s/x", fx.json_frame(1, 7), QoS::AtLeastOnce, false).expect("publish");
    let msgs = obs.collect_until(Duration::from_secs(30), |m| m.len() >= 2).expect("results");
    let topics: BTreeSet<String> = msgs.iter().map(|m| m.topic.clone()).collect();
    assert_eq!(topics, BTreeSet::from(["r/a/x".to_string(), "r/b/x".to_string()]));
    for m in &msgs {
        fx.check_result(1, &m.json()).expect("reference");
    }
}

/// Fault injection: the broker is down when the daemon starts, then appears; later it is killed
/// and restarted (losing the session), and the daemon must re-subscribe by itself.
#[test]
fn connects_late_and_resubscribes_after_broker_restart() {
    let fx = Fixture::load("digits").expect("fixture");
    let port = free_port();
    let pipelines = fx.pipeline("p", "s/+", "r/{1}", "");
    let mut daemon = Daemon::start(&config(port, "late", &pipelines)).expect("daemon");
    daemon
        .wait_log("cannot connect to broker", Duration::from_secs(30))
        .expect("reports the broker as down");
    assert!(daemon.is_running(), "a missing broker is not fatal");

    let mut broker = Mosquitto::start_on(port).expect("mosquitto");
    let roundtrip = |tag: &str, seq: u64| {
        let obs = MqttClient::connect(port, &format!("obs-{tag}")).expect("observer");
        obs.subscribe("r/#").expect("subscribe");
        wait_online(port, "late");
        let dev = MqttClient::connect(port, &format!("dev-{tag}")).expect("device");
        // The daemon may still be subscribing right after its health appears: retry a few times.
        let mut got = None;
        for attempt in 0..20u64 {
            dev.publish("s/a", fx.json_frame(2, seq + attempt), QoS::AtLeastOnce, false)
                .expect("publish");
            if let Some(m) = obs.recv(Duration::from_millis(500)) {
                got = Some(m);
                break;
            }
        }
        let m = got.expect("a result after (re)connect");
        assert_eq!(m.topic, "r/a");
        fx.check_result(2, &m.json()).expect("reference");
    };
    roundtrip("first", 0);
    broker.restart().expect("restart broker");
    roundtrip("second", 100);
    daemon.wait_log("lost connection to broker", Duration::from_secs(5)).expect("logged the loss");
}

/// A QoS 1 redelivery (the same topic, seq and payload again) is counted as a duplicate, not
/// served twice; the same seq with new data (a device that restarted its counter) is served.
#[test]
fn a_redelivered_frame_is_counted_once() {
    let fx = Fixture::load("digits").expect("fixture");
    let (broker, daemon) = start_daemon("dups", &fx.pipeline("digits", "dup/+", "dupr/{1}", ""));
    let obs = MqttClient::connect(broker.port, "dup-obs").expect("observer");
    obs.subscribe("dupr/#").expect("subscribe");
    let dev = MqttClient::connect(broker.port, "dup-dev").expect("device");
    let frame = fx.json_frame(0, 5);
    dev.publish("dup/a", frame.clone(), QoS::AtLeastOnce, false).expect("publish");
    dev.publish("dup/a", frame.clone(), QoS::AtLeastOnce, false).expect("redelivery");
    // Another device may use the same seq; so may this one with other data.
    dev.publish("dup/b", frame, QoS::AtLeastOnce, false).expect("publish");
    dev.publish("dup/a", fx.json_frame(1, 5), QoS::AtLeastOnce, false).expect("publish");
    let h = edgeinfer_tests::wait_health(broker.port, "dups", Duration::from_secs(20), |v| {
        v["pipelines"]["digits"]["counters"]["received"] == 4
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let c = &h["pipelines"]["digits"]["counters"];
    assert_eq!(c["dropped"]["duplicate"], 1, "{c}");
    assert_eq!(c["served"], 3, "{c}");
    let msgs = obs.collect_until(Duration::from_secs(20), |m| m.len() >= 3).expect("results");
    assert!(obs.recv(Duration::from_millis(500)).is_none(), "no fourth result");
    assert_eq!(msgs.len(), 3);
}
