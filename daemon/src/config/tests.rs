use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_str(text, "test.toml", Some(Path::new("/etc/edgeinfer")))
}

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("expected the config to be rejected:\n{text}"),
        Err(e) => {
            let v: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
            assert!(!v.is_empty(), "no problems listed for: {e}");
            v
        }
    }
}

const MINIMAL: &str = r#"
[pipelines.p]
model = "m.onnx"
input = "sensors/+/x"
"#;

#[test]
fn default_config_is_valid_and_matches_documented_defaults() {
    let cfg = parse(DEFAULT_CONFIG).expect("the shipped default config must validate");
    assert_eq!(cfg.broker.port, 1883);
    assert!(!cfg.broker.clean_session, "persistent session is the default");
    assert_eq!(cfg.pipelines.len(), 1);
    let p = &cfg.pipelines[0];
    assert_eq!(p.name, "digits");
    assert_eq!(p.queue.policy, DropPolicy::DropOldest);
    assert_eq!(p.format, PayloadFormat::Json);
    assert!(matches!(p.postprocess, PostProcess::Classification(ref c) if c.top_k == 3));
    assert_eq!(cfg.health.topic.as_str(), "edgeinfer/{device}/health");
}

#[test]
fn minimal_config_gets_embedded_defaults() {
    let cfg = parse(MINIMAL).expect("minimal config");
    assert_eq!(cfg.broker.host, "127.0.0.1");
    assert_eq!(cfg.broker.keepalive, Duration::from_secs(30));
    assert_eq!(cfg.broker.client_id, format!("edgeinfer-{}", cfg.device_id));
    let p = &cfg.pipelines[0];
    assert_eq!(p.model, PathBuf::from("/etc/edgeinfer/m.onnx"), "relative to the config dir");
    assert_eq!(p.output.as_str(), "edgeinfer/{device}/results/{pipeline}");
    assert_eq!(p.queue.capacity, 32);
    assert_eq!(p.workers, 1);
    assert_eq!(p.qos, Qos::AtLeastOnce);
    assert_eq!(p.max_payload, cfg.broker.max_packet_size);
    assert_eq!(cfg.metrics.interval, Some(Duration::from_secs(10)));
}

#[test]
fn every_problem_is_reported_at_once_with_key_and_value() {
    let msgs = problems(
        r#"
device_id = "a/b"
[broker]
port = 70000
keepalive = "soon"
hots = "x"
[metrics]
interval = 5
[pipelines.p]
model = "m.onnx"
input = "sensors/#/x"
output = "out/{2}"
format = "protobuf"
[pipelines.p.queue]
capacity = 0
policy = "drop_random"
"#,
    );
    let expect = [
        "device_id: must not contain '/'",
        "broker.port: must be between 1 and 65535 (got 70000)",
        "broker.keepalive: `soon` is not a duration",
        "broker.hots: unknown key; did you mean `host`?",
        "metrics.interval: expected a duration string",
        "pipelines.p.input: `#` is only allowed as the last level",
        "pipelines.p.format: expected one of: raw, json, jpeg, png, cbor, pcm_s16le (got \"protobuf\")",
        "pipelines.p.queue.capacity: must be between 1 and 1048576 (got 0)",
        "pipelines.p.queue.policy: expected one of: drop_oldest, drop_newest, block",
    ];
    for e in expect {
        assert!(msgs.iter().any(|m| m.contains(e)), "missing {e:?} in {msgs:#?}");
    }
}

#[test]
fn output_template_captures_are_checked_against_the_filter() {
    let msgs = problems(
        r#"
[pipelines.p]
model = "m.onnx"
input = "sensors/+/x"
output = "out/{1}/{2}"
"#,
    );
    assert!(
        msgs.iter().any(|m| m.contains("pipelines.p.output") && m.contains("1 wildcard")),
        "{msgs:?}"
    );
}

#[test]
fn missing_pipelines_and_required_keys() {
    assert!(problems("").iter().any(|m| m.starts_with("pipelines: at least one pipeline")));
    let msgs = problems("[pipelines.p]\nworkers = 2\n");
    assert!(msgs.iter().any(|m| m.starts_with("pipelines.p.model: missing")), "{msgs:?}");
    assert!(msgs.iter().any(|m| m.starts_with("pipelines.p.input: missing")), "{msgs:?}");
}

#[test]
fn syntax_errors_name_the_location() {
    let e = parse("[broker\nhost = 1").expect_err("syntax");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn credentials_are_consistent_and_never_printed() {
    let msgs =
        problems(&format!("[broker]\npassword = \"hunter2\"\npassword_file = \"/x\"\n{MINIMAL}"));
    assert!(
        msgs.iter()
            .any(|m| m.contains("give one of password, password_file and password_credential")),
        "{msgs:?}"
    );
    assert!(msgs.iter().any(|m| m.contains("needs a username")), "{msgs:?}");
    let cfg = parse(&format!("[broker]\nusername = \"u\"\npassword = \"hunter2\"\n{MINIMAL}"))
        .expect("ok");
    assert!(!format!("{cfg:?}").contains("hunter2"), "secret leaked into Debug output");
}

#[test]
fn tls_switches_the_default_port_and_needs_cert_with_key() {
    let cfg = parse(&format!("[broker.tls]\nca_file = \"ca.pem\"\n{MINIMAL}")).expect("ok");
    assert_eq!(cfg.broker.port, 8883);
    assert_eq!(
        cfg.broker.tls.as_ref().and_then(|t| t.ca_file.clone()),
        Some("/etc/edgeinfer/ca.pem".into())
    );
    let msgs = problems(&format!("[broker.tls]\ncert_file = \"c.pem\"\n{MINIMAL}"));
    assert!(msgs.iter().any(|m| m.contains("must be given together")), "{msgs:?}");
}

#[test]
fn cpus_outside_the_allowed_set_are_rejected_with_the_set() {
    let msgs = problems(&format!("{MINIMAL}cpus = [4095]\n"));
    assert!(msgs.iter().any(|m| m.contains("not in this process's allowed set [")), "{msgs:?}");
    let msgs = problems(&format!("{MINIMAL}cpus = [0, 0]\n"));
    assert!(msgs.iter().any(|m| m.contains("more than once")), "{msgs:?}");
}

#[test]
fn input_shapes_and_postprocess() {
    let cfg = parse(&format!(
        "{MINIMAL}[pipelines.p.input_shapes]\naccel = [1, 3, 128]\n[pipelines.p.postprocess]\nkind = \"classification\"\ntop_k = 2\nlabels = \"l.txt\"\n"
    ))
    .expect("ok");
    let p = &cfg.pipelines[0];
    assert_eq!(p.input_shapes.get("accel"), Some(&vec![1, 3, 128]));
    match &p.postprocess {
        PostProcess::Classification(c) => {
            assert_eq!(c.top_k, 2);
            assert_eq!(c.labels.as_deref(), Some(Path::new("/etc/edgeinfer/l.txt")));
        }
        other => panic!("unexpected {other:?}"),
    }
    let msgs =
        problems(&format!("{MINIMAL}[pipelines.p.input_shapes]\naccel = [1, -3]\nx = \"big\"\n"));
    assert_eq!(msgs.iter().filter(|m| m.contains("positive dimensions")).count(), 2, "{msgs:?}");
}

#[test]
fn max_payload_cannot_exceed_the_packet_limit() {
    let msgs = problems(&format!(
        "[broker]\nmax_packet_size = \"1MiB\"\n{MINIMAL}max_payload = \"2MiB\"\n"
    ));
    assert!(
        msgs.iter().any(|m| m.starts_with("pipelines.p.max_payload: must be between")),
        "{msgs:?}"
    );
}

#[test]
fn check_files_reports_unreadable_paths() {
    let cfg = parse(MINIMAL).expect("ok");
    let probs = cfg.check_files();
    assert_eq!(probs.len(), 1);
    assert_eq!(probs[0].key, "pipelines.p.model");
    assert!(probs[0].message.contains("cannot read file"), "{}", probs[0]);
}

/// The annotated default documents every key, commented out where optional. Uncommenting every
/// `# key = value` / `# [table]` line must give a file where (a) every key the reader knows
/// appears (nothing undocumented) and (b) nothing is an unknown key (nothing documented that
/// does not exist).
#[test]
fn default_config_documents_exactly_the_known_keys() {
    let uncommented: String = DEFAULT_CONFIG
        .lines()
        .map(|l| {
            let body = l.strip_prefix("# ").unwrap_or(l);
            let is_key = body.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
            let is_table = body.starts_with('[') && body.ends_with(']') && !body.contains(' ');
            if l.starts_with("# ") && (is_key || is_table) { body } else { l }
        })
        .collect::<Vec<_>>()
        .join("\n");
    reader::KNOWN_KEYS.with(|k| k.borrow_mut().clear());
    let problems = match parse(&uncommented) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems().to_vec(),
    };
    let unknown: Vec<&Problem> =
        problems.iter().filter(|p| p.message.starts_with("unknown key")).collect();
    assert!(unknown.is_empty(), "documented keys that do not exist: {unknown:#?}");
    // Expected complaints: password and password_file are alternatives, and the example CPU
    // list depends on the machine running the test.
    for p in &problems {
        assert!(
            p.key == "broker.password" || p.message.contains("allowed set"),
            "unexpected problem in the uncommented default: {p}"
        );
    }
    let table: Table = toml::from_str(&uncommented).expect("toml");
    let mut documented = std::collections::BTreeSet::new();
    fn walk(prefix: &str, t: &Table, out: &mut std::collections::BTreeSet<String>) {
        for (k, v) in t {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if let Value::Table(sub) = v {
                // Maps with user-chosen keys: their entries are not key names.
                if path.ends_with("input_shapes") {
                    out.insert(path.clone());
                    continue;
                }
                walk(&path, sub, out);
            }
            out.insert(path);
        }
    }
    walk("", &table, &mut documented);
    // Keys of a pipeline are documented once, on whichever example pipeline shows them (the
    // image keys live on the commented camera examples, not on the json `digits` pipeline).
    fn any_pipeline(k: &str) -> String {
        match k.strip_prefix("pipelines.").and_then(|r| r.split_once('.')) {
            Some((_, rest)) => format!("pipelines.*.{rest}"),
            None => k.to_string(),
        }
    }
    let documented: std::collections::BTreeSet<String> =
        documented.iter().map(|k| any_pipeline(k)).collect();
    let known: std::collections::BTreeSet<String> =
        reader::KNOWN_KEYS.with(|k| k.borrow().iter().map(|k| any_pipeline(k)).collect());
    let undocumented: Vec<&String> = known.iter().filter(|k| !documented.contains(*k)).collect();
    assert!(
        undocumented.is_empty(),
        "keys the code reads but config/edgeinfer.toml does not document: {undocumented:?}"
    );
}

#[test]
fn broker_password_from_a_systemd_credential() {
    let base = "[pipelines.p]\nmodel = \"m.onnx\"\ninput = \"a/+\"\n[broker]\nusername = \"u\"\n";
    let cfg = parse(&format!("{base}password_credential = \"broker-password\"\n")).expect("config");
    assert!(matches!(&cfg.broker.password, Some(Secret::Credential(n)) if n == "broker-password"));
    // Debug never shows a secret's value; a credential shows its name only.
    assert_eq!(format!("{:?}", Secret::Inline("hunter2".into())), "Secret::Inline(<redacted>)");
    for (extra, needle) in [
        ("password_credential = \"../etc/shadow\"\n", "without '/'"),
        ("password_credential = \"x\"\npassword = \"y\"\n", "give one of"),
    ] {
        let e = parse(&format!("{base}{extra}")).expect_err(extra);
        assert!(e.problems().iter().any(|p| p.message.contains(needle)), "{extra}: {e}");
    }
}

#[test]
fn qos_2_is_refused_with_the_reason_and_spool_keys_parse() {
    let p = problems(&format!("{MINIMAL}qos = 2\n"));
    assert!(
        p.iter().any(|m| m.contains("pipelines.p.qos") && m.contains("QoS 2 is not supported")),
        "{p:?}"
    );
    let p = problems(&format!("{MINIMAL}qos = 7\n"));
    assert!(p.iter().any(|m| m.contains("expected 0 or 1")), "{p:?}");
    let cfg = parse(&format!(
        "[spool]\nenabled = false\nmax_size = \"1MiB\"\ncommit_interval = \"50ms\"\n{MINIMAL}"
    ))
    .expect("spool config");
    assert!(!cfg.spool.enabled);
    assert_eq!(cfg.spool.max_size, 1 << 20);
    assert_eq!(cfg.spool.commit_interval, Duration::from_millis(50));
    let p = problems(&format!("[spool]\nmax_size = \"1KiB\"\n{MINIMAL}"));
    assert!(p.iter().any(|m| m.contains("spool.max_size")), "{p:?}");
}

#[test]
fn image_pipelines_parse_and_check_their_keys_against_each_other() {
    let cfg = parse(&format!(
        "{MINIMAL}format = \"jpeg\"\n[pipelines.p.preprocess]\n\
         resize = {{ width = 640, height = 640, mode = \"letterbox\", pad = 114 }}\n\
         color = \"bgr\"\nscale = 0.5\nmean = 0.25\nstd = [1, 2, 4]\nlayout = \"nhwc\"\n\
         max_decoded = \"1MiB\"\n"
    ))
    .expect("jpeg pipeline");
    let img = cfg.pipelines[0].image.as_ref().expect("image config");
    let pre = &img.preprocess;
    assert_eq!(
        pre.resize,
        Some(image::Resize {
            width: 640,
            height: 640,
            mode: image::ResizeMode::Letterbox { pad: 114.0 }
        })
    );
    assert_eq!(
        (pre.color, pre.scale, pre.layout),
        (image::ColorOrder::Bgr, 0.5, image::TensorLayout::Nhwc)
    );
    assert_eq!((pre.mean.clone(), pre.std.clone()), (vec![0.25], vec![1.0, 2.0, 4.0]));
    assert_eq!(pre.max_decoded, 1 << 20);
    // A plain png pipeline gets the default plan.
    let cfg = parse(&format!("{MINIMAL}format = \"png\"\n")).expect("png");
    assert_eq!(cfg.pipelines[0].image.as_ref().map(|i| i.preprocess.scale), Some(1.0));
    assert!(parse(MINIMAL).expect("json").pipelines[0].image.is_none());
    let raw = parse(&format!(
        "{MINIMAL}format = \"raw\"\n[pipelines.p.raw]\nwidth = 4\nheight = 2\nchannels = 3\n\
         dtype = \"i16\"\nlayout = \"chw\"\norder = \"bgr\"\n"
    ))
    .expect("raw image");
    let r = raw.pipelines[0].image.as_ref().and_then(|i| i.raw).expect("raw geometry");
    assert_eq!((r.width, r.height, r.channels, r.dtype), (4, 2, 3, image::SampleType::I16));

    for (extra, needle) in [
        (
            "format = \"json\"\n[pipelines.p.preprocess]\nscale = 1\n",
            "pipelines.p.preprocess: applies to image frames",
        ),
        ("format = \"raw\"\n[pipelines.p.preprocess]\nscale = 1\n", "pipelines.p.raw: missing"),
        (
            "format = \"jpeg\"\n[pipelines.p.raw]\nwidth = 1\nheight = 1\nchannels = 1\n",
            "pipelines.p.raw: describes raw frames",
        ),
        (
            "format = \"raw\"\n[pipelines.p.raw]\nwidth = 1\nheight = 1\nchannels = 4\n",
            "4 channels are not supported",
        ),
        ("format = \"raw\"\n[pipelines.p.raw]\nwidth = 1\n", "pipelines.p.raw.height: missing"),
        (
            "format = \"png\"\n[pipelines.p.preprocess]\nresize = { width = 8, height = 8 }\n\
             center_crop = { width = 9, height = 8 }\n",
            "a 9x8 crop does not fit in the 8x8 resized image",
        ),
        (
            "format = \"png\"\n[pipelines.p.preprocess]\nmean = [1, 2]\n",
            "expected one number or one per channel (3 for color = \"rgb\")",
        ),
        ("format = \"png\"\n[pipelines.p.preprocess]\nstd = 0\n", "none zero"),
        (
            "format = \"png\"\n[pipelines.p.preprocess]\nresize = { width = 8, height = 8, pad = 1 }\n",
            "pipelines.p.preprocess.resize.pad: unknown key",
        ),
        (
            "format = \"raw\"\n[pipelines.p.raw]\nwidth = 4096\nheight = 4096\nchannels = 3\n\
             [pipelines.p.preprocess]\nmax_decoded = \"1MiB\"\n",
            "exceeds preprocess.max_decoded",
        ),
    ] {
        let p = problems(&format!("{MINIMAL}{extra}"));
        assert!(p.iter().any(|m| m.contains(needle)), "{extra}: {p:?}");
    }
}

#[test]
fn detection_postprocess_parses_with_defaults_and_checks_ranges() {
    let cfg = parse(&format!("{MINIMAL}[pipelines.p.postprocess]\nkind = \"detection\"\n"))
        .expect("detection defaults");
    let PostProcess::Detection(d) = &cfg.pipelines[0].postprocess else {
        panic!("not detection: {:?}", cfg.pipelines[0].postprocess)
    };
    assert_eq!(d.layout, YoloLayout::V8);
    assert_eq!((d.score_threshold, d.iou_threshold), (0.25, 0.45));
    assert_eq!((d.max_detections, d.max_candidates), (100, 30_000));
    assert!(!d.class_agnostic && !d.include_outputs && d.labels.is_none());
    let cfg = parse(&format!(
        "{MINIMAL}[pipelines.p.postprocess]\nkind = \"detection\"\nlayout = \"yolov5\"\n\
         labels = \"/etc/edgeinfer/coco.txt\"\nclass_agnostic = true\nmax_detections = 5\n"
    ))
    .expect("detection");
    let PostProcess::Detection(d) = &cfg.pipelines[0].postprocess else { panic!("not detection") };
    assert_eq!(d.layout, YoloLayout::V5);
    assert_eq!(cfg.pipelines[0].postprocess.labels(), Some(Path::new("/etc/edgeinfer/coco.txt")));
    assert!(d.class_agnostic && d.max_detections == 5);
    let p = problems(&format!(
        "{MINIMAL}[pipelines.p.postprocess]\nkind = \"detection\"\nlayout = \"yolox\"\n\
         iou_threshold = 1.5\nmax_detections = 0\ntop_k = 3\n"
    ));
    for needle in [
        "postprocess.layout",
        "postprocess.iou_threshold",
        "postprocess.max_detections",
        "postprocess.top_k",
    ] {
        assert!(p.iter().any(|m| m.contains(needle)), "{needle}: {p:?}");
    }
}

#[test]
fn scalar_postprocess_and_events_check_their_keys_against_each_other() {
    let pp = |body: &str| format!("{MINIMAL}[pipelines.p.postprocess]\n{body}");
    let cfg = parse(&pp("kind = \"anomaly_score\"\nthreshold = 2.5\nclear = 0.7\n\
                         [pipelines.p.events]\npublish = \"while_active\"\nheartbeat = \"1m\"\n"))
    .expect("anomaly events");
    let pl = &cfg.pipelines[0];
    let PostProcess::AnomalyScore(v) = &pl.postprocess else { panic!("{:?}", pl.postprocess) };
    assert_eq!(v.band(), Some((2.5, 0.7)));
    assert!(!v.include_outputs, "anomaly_score leaves outputs out by default");
    assert_eq!(pl.events.publish, events::Publish::WhileActive);
    assert_eq!(pl.events.heartbeat, Some(Duration::from_secs(60)));
    let cfg = parse(&pp(
        "kind = \"regression\"\n[pipelines.p.events]\npublish = \"on_change\"\ndelta = 0.5\n",
    ))
    .expect("regression delta");
    assert!(
        matches!(&cfg.pipelines[0].postprocess, PostProcess::Regression(v) if v.band().is_none() && v.include_outputs)
    );
    for (body, needle) in [
        ("kind = \"anomaly_score\"\n", "postprocess.threshold: missing"),
        (
            "kind = \"regression\"\nthreshold = 1\nclear = 2\n",
            "postprocess.clear: must not be above threshold",
        ),
        ("kind = \"regression\"\nclear = 2\n", "postprocess.clear: needs a threshold"),
        (
            "kind = \"raw\"\n[pipelines.p.events]\npublish = \"on_change\"\n",
            "on_change needs a postprocess",
        ),
        (
            "kind = \"regression\"\n[pipelines.p.events]\npublish = \"on_change\"\n",
            "needs a threshold (state changes) or events.delta",
        ),
        (
            "kind = \"classification\"\n[pipelines.p.events]\npublish = \"while_active\"\n",
            "while_active needs a threshold state",
        ),
        (
            "kind = \"classification\"\n[pipelines.p.events]\nheartbeat = \"1m\"\n",
            "events.heartbeat: has no effect",
        ),
        (
            "kind = \"classification\"\n[pipelines.p.events]\npublish = \"sometimes\"\n",
            "events.publish: expected one of",
        ),
    ] {
        let p = problems(&pp(body));
        assert!(p.iter().any(|m| m.contains(needle)), "{body}: {needle} not in {p:?}");
    }
}
