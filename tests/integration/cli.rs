//! The command line: `validate` on a corpus of invalid configs, `config default`, `inspect`
//! on every fixture (including the unsupported-operator error), and the demo itself.

use std::fs;
use std::path::PathBuf;

use edgeinfer_tests::{edgeinfer, fixtures, repo_root};

/// Each file in `tests/fixtures/configs/invalid/` declares, in `# expect:` comment lines, the
/// messages `validate` must print; every one of them must appear and the exit code must be 78.
#[test]
fn validate_reports_every_problem_in_the_invalid_corpus() {
    let dir = fixtures().join("configs/invalid");
    let mut files: Vec<PathBuf> =
        fs::read_dir(&dir).expect("corpus").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(files.len() >= 8, "corpus too small: {files:?}");
    for f in files {
        let text = fs::read_to_string(&f).expect("read");
        let expects: Vec<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expects.is_empty(), "{} has no `# expect:` lines", f.display());
        let out = edgeinfer(&["validate", "--config", f.to_str().expect("utf8")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{}: exit {:?}\n{stderr}", f.display(), out.status);
        for e in expects {
            assert!(stderr.contains(e), "{}: missing {e:?} in:\n{stderr}", f.display());
        }
    }
}

#[test]
fn validate_accepts_valid_configs_and_loads_models_on_request() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("ok.toml");
    let model = fixtures().join("models/two_inputs/model.onnx");
    fs::write(
        &cfg,
        format!("[pipelines.p]\nmodel = {:?}\ninput = \"a/+\"\n", model.display().to_string()),
    )
    .expect("write");
    let out = edgeinfer(&["validate", "--config", cfg.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // With --models the model is loaded and checked against the pipeline: two inputs cannot be
    // carried by the raw format.
    fs::write(
        &cfg,
        format!(
            "[pipelines.p]\nmodel = {:?}\ninput = \"a/+\"\nformat = \"raw\"\n",
            model.display().to_string()
        ),
    )
    .expect("write");
    let out = edgeinfer(&["validate", "--config", cfg.to_str().expect("utf8")]);
    assert!(out.status.success(), "without --models only the config is checked");
    let out = edgeinfer(&["validate", "--config", cfg.to_str().expect("utf8"), "--models"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("format \"raw\" carries exactly one input tensor"), "{stderr}");
    // max_batch needs a symbolic batch axis: two_inputs has fixed shapes.
    fs::write(
        &cfg,
        format!(
            "[pipelines.p]\nmodel = {:?}\ninput = \"a/+\"\nmax_batch = 4\n",
            model.display().to_string()
        ),
    )
    .expect("write");
    let out = edgeinfer(&["validate", "--config", cfg.to_str().expect("utf8"), "--models"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("max_batch = 4 needs a symbolic leading (batch) axis"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    // A missing config file is a config error with a hint.
    let out = edgeinfer(&["validate", "--config", "/nonexistent/edgeinfer.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hint:"));
}

#[test]
fn config_default_prints_the_shipped_file() {
    let out = edgeinfer(&["config", "default"]);
    assert!(out.status.success());
    let shipped = fs::read_to_string(repo_root().join("config/edgeinfer.toml"))
        .expect("config/edgeinfer.toml");
    assert_eq!(String::from_utf8_lossy(&out.stdout), shipped);
}

#[test]
fn inspect_describes_every_fixture_and_names_unsupported_operators() {
    for (case, input, shape) in [
        ("digits", "pixels", vec![1, 64]),
        ("sensor_cnn", "accel", vec![1, 3, 128]),
        ("mobilenet", "image", vec![1, 3, 224, 224]),
        ("two_inputs", "x", vec![1, 8]),
    ] {
        let model = fixtures().join(format!("models/{case}/model.onnx"));
        let out = edgeinfer(&["inspect", model.to_str().expect("utf8"), "--runs", "3", "--json"]);
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["inputs"][0]["name"], input);
        assert_eq!(v["inputs"][0]["shape"], serde_json::json!(shape));
        assert!(v["load_us"].as_u64().is_some() && v["optimize_us"].as_u64().is_some());
        assert_eq!(v["inference"]["runs"], 3);
        assert!(v["operators"].as_object().is_some_and(|o| !o.is_empty()));
    }
    let cnn = fixtures().join("models/sensor_cnn/model.onnx");
    let out = edgeinfer(&["inspect", cnn.to_str().expect("utf8"), "--runs", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["inputs"][0]["declared"], serde_json::json!(["batch", "3", "128"]));
    let out = edgeinfer(&[
        "inspect",
        cnn.to_str().expect("utf8"),
        "--input-shape",
        "accel=4,3,128",
        "--runs",
        "0",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([4, 4]));

    let bad = fixtures().join("models/unsupported_op/model.onnx");
    let out = edgeinfer(&["inspect", bad.to_str().expect("utf8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("operator `Det` (node `the_unsupported_node`)"), "{stderr}");

    let dir = tempfile::tempdir().expect("tmp");
    let corrupt = dir.path().join("corrupt.onnx");
    fs::write(&corrupt, b"\x08\x07garbage that is not a protobuf model").expect("write");
    let out = edgeinfer(&["inspect", corrupt.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a valid ONNX file"));
}

/// `inspect --profile`: tract's per-node timing of the optimized plan, by operator type and
/// top nodes, with shares that add up; the same runs give the inference line.
#[test]
fn inspect_profile_breaks_the_plan_time_down_by_operator_and_node() {
    let model = fixtures().join("models/mobilenet/model.onnx");
    let m = model.to_str().expect("utf8");
    let out = edgeinfer(&["inspect", m, "--runs", "3", "--profile", "--top", "5", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let p = &v["profile"];
    assert_eq!(p["runs"], 3);
    assert_eq!(v["inference"]["runs"], 3, "the profiled runs are the timed runs");
    let by_op = p["by_op"].as_array().expect("by_op");
    let nodes = p["nodes"].as_array().expect("nodes");
    assert!(by_op.len() >= 3 && nodes.len() >= 20, "{p}");
    let count: u64 = by_op.iter().filter_map(|o| o["nodes"].as_u64()).sum();
    assert_eq!(count as usize, nodes.len(), "every timed node in one operator group");
    assert!(nodes.len() <= v["optimized_nodes"].as_u64().unwrap_or(0) as usize);
    let share: f64 = by_op.iter().filter_map(|o| o["share"].as_f64()).sum();
    assert!((share - 1.0).abs() < 1e-6, "shares add up to 1: {share}");
    let times: Vec<f64> = by_op.iter().filter_map(|o| o["us"].as_f64()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "most expensive first: {times:?}");
    let top = p["top"].as_array().expect("top");
    assert_eq!(top.len(), 5);
    assert!(
        p["median_run_us"].as_f64().unwrap_or(0.0)
            >= p["node_total_us"].as_f64().unwrap_or(f64::MAX) * 0.5
    );

    let out = edgeinfer(&["inspect", m, "--runs", "2", "--profile"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in ["profile   2 runs", "by operator type", "top 10 nodes", "%"] {
        assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
    }
}

/// A model whose input is `[batch, 3, height, width]` (a YOLO export with dynamic=True):
/// inspect still describes it as declared and says which --input-shape to pass (exit 64);
/// with the shape it builds, times and profiles the plan.
#[test]
fn inspect_describes_symbolic_inputs_and_names_the_input_shape_to_pass() {
    let model = fixtures().join("models/dynamic_hw/model.onnx");
    let m = model.to_str().expect("utf8");
    let out = edgeinfer(&["inspect", m]);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(64), "{stdout}\n{stderr}");
    assert!(stdout.contains("images") && stdout.contains("[batch, 3, height, width]"), "{stdout}");
    assert!(stdout.contains("logits") && stdout.contains("[batch, 4]"), "{stdout}");
    assert!(stderr.contains("--input-shape images=1,3,HEIGHT,WIDTH"), "{stderr}");
    assert!(
        !stderr.contains("pipelines.<name>.input_shapes.images = [..] in the config"),
        "{stderr}"
    );

    let out = edgeinfer(&["inspect", m, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["needs_input_shape"], serde_json::json!(["images=1,3,HEIGHT,WIDTH"]));
    assert_eq!(v["inputs"][0]["declared"], serde_json::json!(["batch", "3", "height", "width"]));

    let out = edgeinfer(&[
        "inspect",
        m,
        "--input-shape",
        "images=1,3,32,32",
        "--runs",
        "2",
        "--profile",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 4]));
    assert!(v["profile"]["by_op"].as_array().is_some_and(|a| !a.is_empty()));
}

/// The README's first command: the demo prints live results and exits cleanly.
#[test]
fn demo_prints_live_results_and_exits_cleanly() {
    let out = edgeinfer(&["demo", "--duration", "3s", "--devices", "3", "--rate", "20"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("-> digit "), "no live results:\n{stdout}");
    assert!(stdout.contains("results/s"), "no throughput:\n{stdout}");
    assert!(stdout.contains("daemon stopped cleanly"), "{stdout}");
    let summary = stdout.lines().find(|l| l.contains("frames published")).expect("summary line");
    // "demo: P frames published, N results (...), accuracy A% ..."
    let nums: Vec<f64> = summary
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|s| s.parse().ok())
        .collect();
    let (published, results, accuracy) = (nums[0], nums[1], nums[3]);
    assert!(published >= 30.0, "{summary}");
    assert_eq!(published, results, "every demo frame answered: {summary}");
    assert!(accuracy > 90.0, "the bundled model really classifies digits: {summary}");
}
