//! Bad input loses nothing else: every malformed frame is rejected with its reason on the error
//! topic and counted in health, while good frames interleaved with them are all served.

use std::collections::BTreeMap;
use std::time::Duration;

use edgeinfer_tests::{
    Fixture, MqttClient, books_balance, start_daemon, start_daemon_with_broker, wait_health,
};
use rumqttc::QoS;

#[test]
fn malformed_frames_are_reported_and_counted_while_good_frames_flow() {
    let digits = Fixture::load("digits").expect("fixture");
    let two = Fixture::load("two_inputs").expect("fixture");
    let pipelines = [
        digits.pipeline("raw", "raw/+", "r/raw/{1}", "format = \"raw\"\nmax_payload = \"2KiB\""),
        two.pipeline("json", "json/+", "r/json/{1}", "format = \"json\"\nmax_payload = \"2KiB\""),
    ]
    .concat();
    let (broker, _daemon) = start_daemon("bad", &pipelines);
    let obs = MqttClient::connect(broker.port, "obs-bad").expect("observer");
    obs.subscribe("r/#").expect("subscribe results");
    obs.subscribe("edgeinfer/bad/errors/#").expect("subscribe errors");
    let dev = MqttClient::connect(broker.port, "dev-bad").expect("device");

    let good_raw = digits.samples[0].inputs["pixels"].clone();
    let mut nan = good_raw.clone();
    nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let x = "[1,2,3,4,5,6,7,8]";
    // (topic, payload, expected reason)
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("raw/a", Vec::new(), "empty"),
        ("raw/a", good_raw[..255].to_vec(), "wrong_size"),
        ("raw/a", [good_raw.clone(), vec![0; 4]].concat(), "wrong_size"),
        ("raw/a", vec![0u8; 4096], "oversized"),
        ("raw/a", nan, "non_finite"),
        ("json/a", b"{not json".to_vec(), "malformed"),
        ("json/a", br#"{"seq":3,"data":[1,2]}"#.to_vec(), "malformed"),
        ("json/a", format!(r#"{{"seq":4,"inputs":{{"x":{x}}}}}"#).into_bytes(), "malformed"),
        (
            "json/a",
            format!(r#"{{"seq":5,"inputs":{{"x":{x},"k":[1],"z":[0]}}}}"#).into_bytes(),
            "malformed",
        ),
        ("json/a", br#"{"seq":6,"inputs":{"x":[1,2,3],"k":[1]}}"#.to_vec(), "wrong_shape"),
        (
            "json/a",
            br#"{"seq":7,"inputs":{"x":[[1,2,3,4],[5,6,7,8]],"k":[1]}}"#.to_vec(),
            "wrong_shape",
        ),
        (
            "json/a",
            format!(r#"{{"seq":8,"inputs":{{"x":{x},"k":[1.5]}}}}"#).into_bytes(),
            "wrong_dtype",
        ),
        (
            "json/a",
            format!(r#"{{"seq":9,"inputs":{{"x":{x},"k":["one"]}}}}"#).into_bytes(),
            "wrong_dtype",
        ),
        (
            "json/a",
            br#"{"seq":10,"inputs":{"x":[1e39,2,3,4,5,6,7,8],"k":[1]}}"#.to_vec(),
            "non_finite",
        ),
        ("json/a", vec![b' '; 3000], "oversized"),
    ];
    let mut good_sent = 0;
    for (i, (topic, payload, _)) in bad.iter().enumerate() {
        dev.publish(topic, payload.clone(), QoS::AtLeastOnce, false).expect("publish bad");
        // A good frame after every bad one, on both pipelines.
        dev.publish(&format!("raw/g{i}"), good_raw.clone(), QoS::AtLeastOnce, false)
            .expect("publish good");
        dev.publish(
            &format!("json/g{i}"),
            two.json_frame(0, 1000 + i as u64),
            QoS::AtLeastOnce,
            false,
        )
        .expect("publish good");
        good_sent += 2;
    }
    let total = bad.len() + good_sent;
    let msgs = obs
        .collect_until(Duration::from_secs(60), |m| m.len() >= total)
        .expect("all results and errors");
    let mut reasons: Vec<String> = Vec::new();
    let mut results = 0;
    for m in &msgs {
        let v = m.json();
        if m.topic.starts_with("edgeinfer/bad/errors/") {
            let pipeline = m.topic.rsplit('/').next().expect("pipeline");
            assert_eq!(v["pipeline"], pipeline);
            assert_eq!(v["topic"].as_str().map(|t| t.ends_with("/a")), Some(true));
            assert!(!v["detail"].as_str().unwrap_or("").is_empty(), "detail in {v}");
            reasons.push(v["reason"].as_str().expect("reason").to_string());
        } else {
            results += 1;
            if m.topic.starts_with("r/raw/") {
                digits.check_result(0, &v).expect("raw result");
            } else {
                two.check_result(0, &v).expect("json result");
            }
        }
    }
    let mut want: Vec<String> = bad.iter().map(|(_, _, r)| r.to_string()).collect();
    want.sort();
    reasons.sort();
    assert_eq!(reasons, want, "one error message per bad frame, with its reason");
    assert_eq!(results, good_sent, "every good frame served");

    // Health counts the same, by pipeline and reason, and the books balance.
    let health = wait_health(broker.port, "bad", Duration::from_secs(10), |v| {
        v["pipelines"]["raw"]["counters"]["served"] == 15
            && v["pipelines"]["json"]["counters"]["served"] == 15
    })
    .expect("health with final counts");
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    for p in ["raw", "json"] {
        // received = served + rejected + dropped + failed + queued + in flight, by reason.
        for (reason, n) in books_balance(&health, p).unwrap_or_else(|e| panic!("{e}")) {
            *counted.entry(reason).or_default() += n;
        }
    }
    for (_, _, r) in &bad {
        assert!(counted.get(*r).copied().unwrap_or(0) > 0, "{r} counted");
    }
    assert_eq!(counted.values().sum::<u64>(), bad.len() as u64);
}

/// Fault injection: a QoS 0 frame larger than `broker.max_packet_size` cannot be read by the MQTT
/// client at all; the connection is reset, counted and logged with a hint, and the daemon
/// reconnects and keeps serving.
#[test]
fn packets_above_the_client_limit_reset_the_connection_and_serving_resumes() {
    let fx = Fixture::load("digits").expect("fixture");
    let pipelines = fx.pipeline("p", "s/+", "r/{1}", "max_payload = \"16KiB\"");
    let (broker, daemon) =
        start_daemon_with_broker("huge", &pipelines, "max_packet_size = \"64KiB\"");
    let obs = MqttClient::connect(broker.port, "obs-huge").expect("observer");
    obs.subscribe("r/#").expect("subscribe");
    let dev = MqttClient::connect(broker.port, "dev-huge").expect("device");
    dev.publish("s/big", vec![b'x'; 200 * 1024], QoS::AtMostOnce, false).expect("publish");
    daemon
        .wait_log("above broker.max_packet_size", Duration::from_secs(20))
        .expect("logged with a hint");
    let h = wait_health(broker.port, "huge", Duration::from_secs(30), |v| {
        v["status"] == "online"
            && v["transport"]["oversized_packets"] == 1
            && v["transport"]["reconnects"] == 1
    })
    .expect("counted and reconnected");
    assert_eq!(h["pipelines"]["p"]["counters"]["received"], 0, "no pipeline saw it");
    let mut got = None;
    for seq in 0..20 {
        dev.publish("s/ok", fx.json_frame(4, seq), QoS::AtLeastOnce, false).expect("publish");
        if let Some(m) = obs.recv(Duration::from_millis(500)) {
            got = Some(m);
            break;
        }
    }
    fx.check_result(4, &got.expect("serving resumed").json()).expect("reference");
}
