//! Event mode end to end: an anomaly-score model with a threshold and hysteresis, and a
//! classifier, publishing only on change / while active; withheld results are counted, and
//! every published one carries its state and how many were withheld before it.

use std::collections::BTreeMap;
use std::time::Duration;

use edgeinfer_tests::{Fixture, MqttClient, start_daemon, wait_health};
use rumqttc::QoS;
use serde_json::Value;

/// Scores of the anomaly fixture's samples rise strictly (meta.json `scores`): threshold 2.5
/// lies between samples 3 and 4, clear 0.7 between samples 1 and 2.
const SEQUENCE: [usize; 8] = [0, 1, 4, 5, 3, 2, 1, 0];

#[test]
fn anomaly_and_classification_events_publish_changes_only() {
    let anomaly = Fixture::load("anomaly").expect("anomaly fixture");
    let digits = Fixture::load("digits").expect("digits fixture");
    let post = "[pipelines.NAME.postprocess]\nkind = \"anomaly_score\"\noutput = \"score\"\n\
                threshold = 2.5\nclear = 0.7\n";
    let mut pipelines = String::new();
    for (name, publish) in [("change", "on_change"), ("active", "while_active"), ("all", "always")]
    {
        pipelines += &anomaly.pipeline(
            name,
            &format!("s/+/{name}"),
            "out/{pipeline}/{1}",
            &format!(
                "workers = 1\n{}[pipelines.{name}.events]\npublish = \"{publish}\"\n",
                post.replace("NAME", name)
            ),
        );
    }
    // A regression on the same output, published when it moves by more than 1.0.
    pipelines += &anomaly.pipeline(
        "reg",
        "s/+/reg",
        "out/{pipeline}/{1}",
        "workers = 1\n[pipelines.reg.postprocess]\nkind = \"regression\"\noutput = \"score\"\n\
         [pipelines.reg.events]\npublish = \"on_change\"\ndelta = 1.0\n",
    );
    pipelines += &digits.pipeline(
        "digits",
        "s/+/digits",
        "out/{pipeline}/{1}",
        "workers = 1\n[pipelines.digits.postprocess]\nkind = \"classification\"\ntop_k = 1\n\
         include_outputs = false\n[pipelines.digits.events]\npublish = \"on_change\"\n",
    );
    // Probabilities never reach 2.0: top_k is always empty, one unchanging state.
    pipelines += &digits.pipeline(
        "digits_thr",
        "s/+/digits",
        "out/{pipeline}/{1}",
        "workers = 1\n[pipelines.digits_thr.postprocess]\nkind = \"classification\"\n\
         score_threshold = 2.0\ninclude_outputs = false\n[pipelines.digits_thr.events]\n\
         publish = \"on_change\"\n",
    );
    let (broker, daemon) = start_daemon("events", &pipelines);
    let obs = MqttClient::connect(broker.port, "obs-events").expect("observer");
    obs.subscribe("out/#").expect("subscribe");
    let dev = MqttClient::connect(broker.port, "dev-events").expect("device");

    // Digits: two samples the model classifies differently, sent a, a, a, b, b, a.
    let top1 = |i: usize| {
        let o = &digits.samples[i].outputs.values().next().expect("output")[..];
        o.iter().enumerate().fold(0, |b, (j, v)| if *v > o[b] { j } else { b })
    };
    let b = (1..digits.samples.len()).find(|&i| top1(i) != top1(0)).expect("two classes");
    let digit_seq = [0, 0, 0, b, b, 0];
    for (seq, name) in SEQUENCE
        .iter()
        .enumerate()
        .flat_map(|(i, s)| ["change", "active", "all", "reg"].map(move |n| ((i, *s), n)))
    {
        let (i, sample) = seq;
        dev.publish(
            &format!("s/d1/{name}"),
            anomaly.json_frame(sample, i as u64),
            QoS::AtLeastOnce,
            false,
        )
        .expect("publish");
    }
    for (i, s) in digit_seq.iter().enumerate() {
        dev.publish("s/d1/digits", digits.json_frame(*s, i as u64), QoS::AtLeastOnce, false)
            .expect("publish");
    }
    // Published: change 3, active 6, all 8, reg 6, digits 3, digits_thr 1.
    let want_total = 3 + 6 + 8 + 6 + 3 + 1;
    let msgs = obs
        .collect_until(Duration::from_secs(60), |m| m.len() >= want_total)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let mut by: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for m in &msgs {
        by.entry(m.topic.clone()).or_default().push(m.json());
    }
    let scores: Vec<f64> = anomaly.samples.iter().map(|s| s.outputs["score"][0]).collect();
    // (seq, anomalous, reason, suppressed before it) per pipeline.
    let summary = |topic: &str| -> Vec<(u64, bool, String, u64)> {
        by.get(topic)
            .unwrap_or_else(|| panic!("nothing on {topic}: {by:?}"))
            .iter()
            .map(|v| {
                let seq = v["seq"].as_u64().expect("seq");
                let score = v["anomaly_score"].as_f64().expect("anomaly_score");
                let want = scores[SEQUENCE[seq as usize]];
                assert!((score - want).abs() <= 1e-4 * want.max(1.0), "{v}: score vs {want}");
                assert!(
                    v.get("outputs").is_none(),
                    "anomaly_score leaves outputs out by default: {v}"
                );
                (
                    seq,
                    v["anomalous"].as_bool().expect("anomalous"),
                    v["event"]["reason"].as_str().unwrap_or("-").to_string(),
                    v["event"]["suppressed"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let s = |x: &str| x.to_string();
    assert_eq!(
        summary("out/change/d1"),
        vec![(0, false, s("first"), 0), (2, true, s("change"), 1), (6, false, s("change"), 3)]
    );
    assert_eq!(
        summary("out/active/d1"),
        vec![
            (0, false, s("first"), 0),
            (2, true, s("active"), 1),
            (3, true, s("active"), 0),
            (4, true, s("active"), 0),
            (5, true, s("active"), 0),
            (6, false, s("cleared"), 0),
        ]
    );
    let all = summary("out/all/d1");
    assert_eq!(
        all.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![false, false, true, true, true, true, false, false],
        "hysteresis: on above 2.5, off only below 0.7"
    );
    assert!(all.iter().all(|r| r.2 == "-"), "no event object with publish = always: {all:?}");
    // Regression, delta 1.0 from the last published value: 0.04 (first), 0.39 (+0.35: no),
    // 3.53, 6.27, 2.13, 1.09 (each more than 1.0 from the previous published), 0.39 (-0.70 from
    // 1.09: no), 0.04 (-1.05: yes).
    let reg = &by["out/reg/d1"];
    let seqs: Vec<u64> = reg.iter().map(|v| v["seq"].as_u64().expect("seq")).collect();
    assert_eq!(seqs, vec![0, 2, 3, 4, 5, 7], "{reg:?}");
    for v in reg {
        let want = scores[SEQUENCE[v["seq"].as_u64().expect("seq") as usize]];
        assert!((v["value"].as_f64().expect("value") - want).abs() <= 1e-4 * want.max(1.0), "{v}");
        assert!(v.get("above_threshold").is_none() && v.get("anomalous").is_none(), "{v}");
        assert_eq!(
            v["outputs"][1]["name"], "score",
            "regression publishes outputs by default: {v}"
        );
    }
    let d: Vec<u64> = by["out/digits/d1"].iter().map(|v| v["seq"].as_u64().expect("seq")).collect();
    assert_eq!(d, vec![0, 3, 5], "digits: first, then each change of the top-1 class");

    let thr = &by["out/digits_thr/d1"];
    assert_eq!(thr.len(), 1, "{thr:?}");
    assert_eq!(thr[0]["top_k"], serde_json::json!([]), "nothing scores 2.0: {}", thr[0]);
    let h = wait_health(broker.port, "events", Duration::from_secs(15), |v| {
        v["pipelines"]["change"]["counters"]["served"] == 8
            && v["pipelines"]["digits"]["counters"]["served"] == 6
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    for (p, withheld) in
        [("change", 5), ("active", 2), ("all", 0), ("reg", 2), ("digits", 3), ("digits_thr", 5)]
    {
        let c = &h["pipelines"][p]["counters"];
        assert_eq!(c["results_suppressed"], withheld, "{p}: {c}");
    }
    // Nothing else arrived (a withheld result is never published late).
    std::thread::sleep(Duration::from_millis(300));
    assert!(obs.recv(Duration::from_millis(200)).is_none());
}
