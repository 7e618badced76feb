//! Every fixture model served end to end; outputs match the onnxruntime references.

use std::time::Duration;

use edgeinfer_tests::{Fixture, MqttClient, start_daemon};
use rumqttc::QoS;

/// Serves every sample of `case` through the daemon in `format` and checks each result.
fn serve_fixture(case: &str, format: &str, extra: &str) {
    let fx = Fixture::load(case).expect("fixture");
    let extra = format!("format = \"{format}\"\n{extra}");
    let (broker, _daemon) = start_daemon(
        "models",
        &fx.pipeline(case, &format!("dev/+/{case}"), "out/{pipeline}/{1}", &extra),
    );
    let obs = MqttClient::connect(broker.port, &format!("obs-{case}-{format}")).expect("observer");
    obs.subscribe("out/#").expect("subscribe");
    let dev = MqttClient::connect(broker.port, &format!("dev-{case}-{format}")).expect("device");
    for (i, s) in fx.samples.iter().enumerate() {
        let payload = match format {
            "raw" => s.inputs.values().next().expect("one input").clone(),
            _ => fx.json_frame(i, i as u64).into_bytes(),
        };
        dev.publish(&format!("dev/d{i}/{case}"), payload, QoS::AtLeastOnce, false)
            .expect("publish");
    }
    let n = fx.samples.len();
    let msgs = obs.collect_until(Duration::from_secs(60), |m| m.len() >= n).expect("results");
    for m in &msgs {
        let v = m.json();
        let i: usize = m
            .topic
            .rsplit('/')
            .next()
            .and_then(|d| d.trim_start_matches('d').parse().ok())
            .expect("device index");
        assert_eq!(m.topic, format!("out/{case}/d{i}"));
        fx.check_result(i, &v).unwrap_or_else(|e| panic!("{case}/{format}: {e}"));
        assert_eq!(v["pipeline"], case);
        assert_eq!(v["model"]["sha256"].as_str().map(str::len), Some(64));
        if format == "json" {
            assert_eq!(v["seq"], i as u64, "seq is echoed");
        }
        for k in ["queue", "inference", "total"] {
            assert!(v["timing_us"][k].is_u64(), "timing_us.{k} in {v}");
        }
    }
}

#[test]
fn digits_json_matches_reference() {
    serve_fixture("digits", "json", "");
}

#[test]
fn digits_raw_matches_reference() {
    serve_fixture("digits", "raw", "");
}

#[test]
fn sensor_cnn_with_symbolic_batch_matches_reference() {
    serve_fixture("sensor_cnn", "raw", "");
}

#[test]
fn sensor_cnn_json_nested_matches_reference() {
    serve_fixture(
        "sensor_cnn",
        "json",
        "[pipelines.sensor_cnn.input_shapes]\naccel = [1, 3, 128]\n",
    );
}

#[test]
fn mobilenet_raw_matches_reference() {
    serve_fixture("mobilenet", "raw", "max_payload = \"1MiB\"\n");
}

#[test]
fn two_inputs_named_json_with_int64_matches_reference() {
    serve_fixture("two_inputs", "json", "");
}

#[test]
fn classification_adds_top_k_with_labels() {
    let fx = Fixture::load("digits").expect("fixture");
    let post = format!(
        "[pipelines.digits.postprocess]\nkind = \"classification\"\ntop_k = 3\nlabels = {:?}\ninclude_outputs = false",
        fx.dir.join("labels.txt").display().to_string()
    );
    let (broker, _daemon) = start_daemon("cls", &fx.pipeline("digits", "d/+", "r/{1}", &post));
    let obs = MqttClient::connect(broker.port, "obs-cls").expect("observer");
    obs.subscribe("r/#").expect("subscribe");
    let dev = MqttClient::connect(broker.port, "dev-cls").expect("device");
    for i in 0..fx.samples.len() {
        dev.publish(&format!("d/{i}"), fx.json_frame(i, i as u64), QoS::AtLeastOnce, false)
            .expect("publish");
    }
    let msgs = obs
        .collect_until(Duration::from_secs(30), |m| m.len() >= fx.samples.len())
        .expect("results");
    for m in msgs {
        let v = m.json();
        let i: usize = m.topic.trim_start_matches("r/").parse().expect("index");
        assert!(v.get("outputs").is_none(), "include_outputs = false");
        let top = v["top_k"].as_array().expect("top_k");
        assert_eq!(top.len(), 3);
        // Sample i of the digits fixture is a real image of digit i; check the ranking against
        // the reference probabilities too.
        let probs = &fx.samples[i].outputs["probabilities"];
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]));
        assert_eq!(top[0]["label"], i.to_string());
        for (k, item) in top.iter().enumerate() {
            assert_eq!(item["index"], order[k]);
            assert!(
                (item["score"].as_f64().expect("score") - probs[order[k]]).abs()
                    < edgeinfer_tests::tolerance()
            );
        }
    }
}

/// The model cache across restarts: the first start fills it, the second loads from it, and
/// both serve the onnxruntime reference outputs.
#[test]
fn a_restart_loads_the_model_from_the_cache_with_the_same_results() {
    let fx = Fixture::load("sensor_cnn").expect("fixture");
    let state = tempfile::tempdir().expect("state");
    let broker = edgeinfer_tests::Mosquitto::start().expect("mosquitto");
    let pipelines = format!("{}\n", fx.pipeline("cnn", "mc/+/in", "mc/{1}/out", ""));
    let cfg = edgeinfer_tests::config(broker.port, "cache", &pipelines).replace(
        "[system]\n",
        &format!(
            "[system]\nstate_dir = {:?}\nmodel_cache = true\n",
            state.path().display().to_string()
        ),
    );
    for (round, cached) in [(0, false), (1, true)] {
        let mut daemon = edgeinfer_tests::Daemon::start(&cfg).expect("daemon");
        let h = edgeinfer_tests::wait_online(broker.port, "cache");
        assert_eq!(h["pipelines"]["cnn"]["model"]["from_cache"], cached, "start {round}: {h}");
        let obs =
            MqttClient::connect(broker.port, &format!("cache-obs-{round}")).expect("observer");
        obs.subscribe("mc/+/out").expect("subscribe");
        let dev = MqttClient::connect(broker.port, &format!("cache-dev-{round}")).expect("device");
        for (i, _) in fx.samples.iter().enumerate() {
            dev.publish("mc/a/in", fx.json_frame(i, i as u64), rumqttc::QoS::AtLeastOnce, false)
                .expect("publish");
        }
        let msgs = obs
            .collect_until(Duration::from_secs(30), |m| m.len() >= fx.samples.len())
            .expect("results");
        for m in &msgs {
            let v = m.json();
            let i = v["seq"].as_u64().expect("seq") as usize;
            fx.check_result(i, &v).unwrap_or_else(|e| panic!("start {round}, sample {i}: {e}"));
        }
        daemon.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(daemon.wait_exit(Duration::from_secs(20)).expect("exit").success());
    }
    let entries = std::fs::read_dir(state.path().join("cache")).expect("cache dir").count();
    assert_eq!(entries, 2, "one entry: graph and metadata");
}
