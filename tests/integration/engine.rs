//! The engine keys (issue 15) end to end: intra-op threads serve the same results, `auto`
//! precision and backend decisions are visible in health, `backend = "cuda"` without a usable
//! GPU refuses to start with exit 78, quantized models load or are refused as documented.

use std::time::Duration;

use edgeinfer_tests::{Daemon, Fixture, Mosquitto, MqttClient, config, edgeinfer, start_daemon};
use rumqttc::QoS;

/// Publishes every sample of `fx` as a raw frame and checks the results against the
/// references (the fixture's tolerance, `EDGEINFER_TOLERANCE`).
fn serve_and_check(port: u16, fx: &Fixture, case: &str, tag: &str) {
    let obs = MqttClient::connect(port, &format!("obs-{tag}")).expect("observer");
    obs.subscribe("out/#").expect("subscribe");
    let dev = MqttClient::connect(port, &format!("dev-{tag}")).expect("device");
    for (i, s) in fx.samples.iter().enumerate() {
        let payload = s.inputs.values().next().expect("one input").clone();
        dev.publish(&format!("dev/d{i}/{case}"), payload, QoS::AtLeastOnce, false)
            .expect("publish");
    }
    let n = fx.samples.len();
    let msgs = obs.collect_until(Duration::from_secs(120), |m| m.len() >= n).expect("results");
    for m in &msgs {
        let i: usize = m
            .topic
            .rsplit('/')
            .next()
            .and_then(|d| d.trim_start_matches('d').parse().ok())
            .expect("device index");
        fx.check_result(i, &m.json()).unwrap_or_else(|e| panic!("{tag}: {e}"));
    }
}

/// Two intra-op threads per inference (tract's multithreaded executor, one pool per worker on
/// the worker's own two CPUs) give the same results as one.
#[test]
fn two_threads_per_inference_serve_the_reference_outputs() {
    let cpus = edgeinfer::sys::cpus::allowed().to_vec();
    if cpus.len() < 2 {
        eprintln!("skipped: needs 2 allowed CPUs, this process has {cpus:?}");
        return;
    }
    let fx = Fixture::load("mobilenet").expect("fixture");
    let extra = format!(
        "format = \"raw\"\nmax_payload = \"1MiB\"\nthreads = 2\ncpus = [{}, {}]\nprecision = \"f32\"\n",
        cpus[0], cpus[1]
    );
    let (broker, daemon) =
        start_daemon("threads", &fx.pipeline("mobilenet", "dev/+/mobilenet", "out/{1}", &extra));
    let h = edgeinfer_tests::wait_online(broker.port, "threads");
    assert_eq!(h["pipelines"]["mobilenet"]["threads"], 2, "{h}");
    serve_and_check(broker.port, &fx, "mobilenet", "threads");
    // The pool's threads exist and carry our name.
    let task = std::path::Path::new("/proc").join(daemon.pid().to_string()).join("task");
    let names: Vec<String> = std::fs::read_dir(task)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|s| s.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    if std::env::var_os("EDGEINFER_RUNNER").is_none() {
        assert_eq!(names.iter().filter(|n| n.starts_with("ei-mm-")).count(), 2, "{names:?}");
    }
}

/// `precision = "auto"` and `backend = "auto"`: health says what was asked for, what runs and
/// why. On x86 (no FP16 arithmetic) auto runs f32; tools/test-aarch64.sh sets
/// EDGEINFER_EXPECT_PRECISION for the emulated aarch64 run. Without a usable GPU (no `cuda`
/// feature, or no device) backend auto runs on the CPU with the reason.
#[test]
fn auto_precision_and_backend_decisions_are_reported_in_health() {
    let fx = Fixture::load("sensor_cnn").expect("fixture");
    let extra = "format = \"raw\"\nprecision = \"auto\"\nbackend = \"auto\"\n";
    let (broker, daemon) =
        start_daemon("engine", &fx.pipeline("sensor_cnn", "dev/+/sensor_cnn", "out/{1}", extra));
    let h = edgeinfer_tests::wait_online(broker.port, "engine");
    let p = &h["pipelines"]["sensor_cnn"];
    assert_eq!(p["backend"]["wanted"], "auto", "{h}");
    assert_eq!(p["backend"]["running"], "cpu", "no GPU in the test environment: {h}");
    let reason = p["backend"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("cuda") || reason.contains("CUDA"), "reason names CUDA: {reason}");
    assert_eq!(p["precision"]["wanted"], "auto", "{h}");
    let running = p["precision"]["running"].as_str().unwrap_or_default().to_string();
    let expected = std::env::var("EDGEINFER_EXPECT_PRECISION").ok().or_else(|| {
        (cfg!(target_arch = "x86_64") && std::env::var_os("EDGEINFER_RUNNER").is_none())
            .then(|| "f32".to_string())
    });
    if let Some(want) = expected {
        assert_eq!(running, want, "{h}");
    }
    if running == "f32" {
        let why = p["precision"]["reason"].as_str().unwrap_or_default();
        assert!(why.contains("FP16") || why.contains("f16"), "f32 under auto says why: {h}");
    } else {
        assert!(p["precision"]["reason"].is_null(), "{h}");
    }
    assert!(daemon.log().contains("precision = \"auto\""), "decision logged once");
    assert_eq!(daemon.log().matches("precision = \"auto\"").count(), 1, "{}", daemon.log());
    serve_and_check(broker.port, &fx, "sensor_cnn", "engine");
}

/// `backend = "cuda"` where it cannot run: a build without the feature refuses the config
/// (validate, exit 78); a CUDA build on a machine without a GPU refuses to start (exit 78)
/// naming the missing piece. Either way nothing is served on the CPU behind the user's back.
#[test]
fn backend_cuda_without_a_usable_gpu_refuses_to_start_with_exit_78() {
    let fx = Fixture::load("digits").expect("fixture");
    let broker = Mosquitto::start().expect("mosquitto");
    let cfg = config(
        broker.port,
        "cuda",
        &fx.pipeline("digits", "dev/+/digits", "out/{1}", "backend = \"cuda\"\n"),
    );
    let mut daemon = Daemon::start(&cfg).expect("spawn");
    let status = daemon.wait_exit(Duration::from_secs(120)).expect("exits");
    assert_eq!(status.code(), Some(78), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("without the `cuda` feature")
            || log.contains("backend = \"cuda\", but")
                && log.contains("hint: set backend = \"auto\""),
        "{log}"
    );
    let out = edgeinfer(&["validate", "--config", daemon.config.to_str().expect("utf8")]);
    if log.contains("without the `cuda` feature") {
        assert_eq!(out.status.code(), Some(78), "the config names what this build lacks");
    } else {
        // A CUDA build: the config is valid; only start-up can tell there is no GPU.
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
