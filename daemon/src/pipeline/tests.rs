//! Pipeline tests on the real `digits` fixture model with a recording publisher (a test double
//! for the MQTT client; the broker paths are covered by the integration tests).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::recorder::Recorder;
use super::*;
use crate::config::Config;
use crate::model::LoadOptions;
use crate::reject::RejectReason;
use crate::topic::TopicFilter;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(rel)
}

fn pipeline(extra: &str) -> Arc<Pipeline> {
    let text = format!(
        r#"
device_id = "edge-1"
[pipelines.digits]
model = "{}"
input = "sensors/+/digits"
output = "out/{{device}}/{{pipeline}}/{{1}}"
{extra}
"#,
        fixture("digits/model.onnx").display()
    );
    let cfg = Config::parse_str(&text, "test", None).expect("config");
    let pc = cfg.pipelines[0].clone();
    let model =
        Model::load(&pc.model, &LoadOptions { name: pc.name.clone(), ..Default::default() })
            .expect("model");
    let labels = output::read_labels(
        &std::fs::read_to_string(fixture("digits/labels.txt")).expect("labels"),
    );
    Arc::new(
        Pipeline::new(pc, model, labels, &cfg.device_id, &cfg.errors, cfg.metrics.max_clock_skew)
            .expect("pipeline"),
    )
}

fn sample(i: usize) -> (Vec<f32>, Vec<f32>) {
    let read = |f: &str| -> Vec<f32> {
        std::fs::read(fixture(&format!("digits/samples/{i:03}/{f}")))
            .expect("sample")
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    (read("input.pixels.bin"), read("output.probabilities.bin"))
}

/// Closes the queue and joins the workers once they have served what is in it.
fn stop(p: &Pipeline, workers: Vec<WorkerHandle>) {
    p.queue.close();
    for w in workers {
        w.thread.join().expect("worker");
    }
}

fn wait_idle(p: &Pipeline) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !p.queue.is_idle() {
        assert!(std::time::Instant::now() < deadline, "pipeline did not go idle");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn json_frames_are_served_with_reference_outputs_and_labels() {
    let p = pipeline(
        "[pipelines.digits.postprocess]\nkind = \"classification\"\ntop_k = 2\nlabels = \"x\"\n",
    );
    let rec = Arc::new(Recorder::default());
    let workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    let filter = TopicFilter::parse("sensors/+/digits").expect("filter");
    for i in 0..8 {
        let (input, _) = sample(i);
        let topic = format!("sensors/dev{i}/digits");
        let caps = filter.matches(&topic).expect("match");
        let payload = serde_json::json!({"seq": 100 + i, "ts": 5.5, "data": input}).to_string();
        assert!(p.ingest(topic, caps, Bytes::from(payload), &*rec).is_none());
        wait_idle(&p);
    }
    let msgs = rec.take();
    assert_eq!(msgs.len(), 8);
    for (i, (topic, v)) in msgs.iter().enumerate() {
        assert_eq!(topic, &format!("out/edge-1/digits/dev{i}"));
        assert_eq!(v["seq"], 100 + i);
        assert_eq!(v["ts"], 5.5);
        assert_eq!(v["model"]["name"], "digits");
        assert_eq!(v["model"]["version"], "1", "from the ONNX model_version");
        let got = first_output(v);
        let (_, want) = sample(i);
        let scale = want.iter().fold(1f32, |m, x| m.max(x.abs())) as f64;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - *w as f64).abs() <= 1e-4 * scale, "sample {i}: {g} vs {w}");
        }
        // Sample i is a real image of digit i.
        assert_eq!(v["top_k"][0]["label"], i.to_string(), "sample {i}: {}", v["top_k"]);
        assert_eq!(v["top_k"].as_array().map(Vec::len), Some(2));
    }
    assert_eq!(p.stats.served.load(Ordering::Relaxed), 8);
    assert_eq!(p.stats.queue_wait.snapshot().count(), 8);
    stop(&p, workers);
}

#[test]
fn raw_frames_and_rejections_are_counted_and_reported() {
    let p = pipeline("format = \"raw\"\n");
    let rec = Arc::new(Recorder::default());
    let workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    let caps =
        TopicFilter::parse("sensors/+/digits").expect("f").matches("sensors/a/digits").expect("m");
    let (input, want) = sample(3);
    let raw: Vec<u8> = input.iter().flat_map(|f| f.to_le_bytes()).collect();
    p.ingest("sensors/a/digits".into(), caps.clone(), Bytes::from(raw.clone()), &*rec);
    p.ingest("sensors/a/digits".into(), caps.clone(), Bytes::from(raw[..255].to_vec()), &*rec);
    p.ingest("sensors/a/digits".into(), caps.clone(), Bytes::new(), &*rec);
    let mut nan = raw.clone();
    nan[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    p.ingest("sensors/a/digits".into(), caps.clone(), Bytes::from(nan), &*rec);
    wait_idle(&p);
    let msgs = rec.take();
    let errors: Vec<&serde_json::Value> = msgs
        .iter()
        .filter(|(t, _)| t == "edgeinfer/edge-1/errors/digits")
        .map(|(_, v)| v)
        .collect();
    let reasons: Vec<&str> = errors.iter().map(|v| v["reason"].as_str().expect("reason")).collect();
    assert_eq!(reasons, ["wrong_size", "empty", "non_finite"]);
    assert!(errors[0]["detail"].as_str().expect("detail").contains("expected 256 bytes"));
    let results: Vec<&serde_json::Value> =
        msgs.iter().filter(|(t, _)| t.starts_with("out/")).map(|(_, v)| v).collect();
    assert_eq!(results.len(), 1);
    let got = results[0]["outputs"][0]["data"][3].as_f64().expect("p3");
    assert!((got - want[3] as f64).abs() < 1e-4);
    assert_eq!(p.stats.received.load(Ordering::Relaxed), 4);
    assert_eq!(p.stats.rejected(RejectReason::WrongSize), 1);
    assert_eq!(p.stats.rejected(RejectReason::Empty), 1);
    assert_eq!(p.stats.rejected(RejectReason::NonFinite), 1);
    assert_eq!(p.stats.served.load(Ordering::Relaxed), 1);
    stop(&p, workers);
}

#[test]
fn error_messages_are_rate_limited_and_the_excess_counted() {
    let base = pipeline("");
    let errors = crate::config::ErrorsConfig {
        topic: crate::topic::TopicTemplate::parse("e/{pipeline}", 0).expect("t"),
        rate_limit: 3,
    };
    let p = Pipeline::new(
        base.cfg.clone(),
        base.models().model.clone(),
        Vec::new(),
        "d",
        &errors,
        Duration::from_secs(2),
    )
    .expect("pipeline");
    let rec = Recorder::default();
    let caps = crate::topic::Captures::new();
    for _ in 0..10 {
        p.ingest("t".into(), caps.clone(), Bytes::from_static(b"{"), &rec);
    }
    let published = rec.take().len() as u64;
    let suppressed = p.stats.errors_suppressed.load(Ordering::Relaxed);
    assert_eq!(p.stats.rejected(RejectReason::Malformed), 10);
    // Normally 3 published and 7 suppressed; a one-second window boundary may fall between.
    assert!((3..=6).contains(&published), "{published}");
    assert_eq!(published + suppressed, 10);
}

#[test]
fn full_queue_drops_are_counted_by_policy() {
    // No workers: the queue fills up.
    let p = pipeline("[pipelines.digits.queue]\ncapacity = 2\npolicy = \"drop_oldest\"\n");
    let rec = Recorder::default();
    let caps =
        TopicFilter::parse("sensors/+/digits").expect("f").matches("sensors/a/digits").expect("m");
    let (input, _) = sample(0);
    for seq in 0..5 {
        let payload = serde_json::json!({"seq": seq, "data": input}).to_string();
        p.ingest("sensors/a/digits".into(), caps.clone(), Bytes::from(payload), &rec);
    }
    assert_eq!(p.stats.dropped(DropReason::QueueFull), 3);
    assert_eq!(p.queue.depth(), 2);
    // drop_oldest keeps the freshest frames.
    let seqs: Vec<Option<u64>> = p.queue.drain_remaining().into_iter().map(|f| f.seq).collect();
    assert_eq!(seqs, vec![Some(3), Some(4)]);

    let p = pipeline("[pipelines.digits.queue]\ncapacity = 2\npolicy = \"drop_newest\"\n");
    for seq in 0..5 {
        let payload = serde_json::json!({"seq": seq, "data": input}).to_string();
        p.ingest("sensors/a/digits".into(), caps.clone(), Bytes::from(payload), &rec);
    }
    let seqs: Vec<Option<u64>> = p.queue.drain_remaining().into_iter().map(|f| f.seq).collect();
    assert_eq!(seqs, vec![Some(0), Some(1)]);
    assert_eq!(p.stats.dropped(DropReason::QueueFull), 3);
    assert!(rec.take().is_empty(), "drops are counted, not reported as errors");
}

#[test]
fn session_input_buffers_are_reused_across_runs() {
    let p = pipeline("");
    let mut s = p.models().model.session().expect("session");
    let before = s.input_mut(0).as_ptr();
    for _ in 0..3 {
        s.run().expect("run");
        assert_eq!(s.input_mut(0).as_ptr(), before, "tract must hand the input buffer back");
    }
}

/// Offers the digits sample as a JSON frame from `device`, with extra JSON fields.
fn offer(p: &Pipeline, rec: &Recorder, device: &str, extra: serde_json::Value) {
    let filter = TopicFilter::parse("sensors/+/digits").expect("filter");
    let topic = format!("sensors/{device}/digits");
    let caps = filter.matches(&topic).expect("match");
    let (input, _) = sample(0);
    let mut v = serde_json::json!({"data": input});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    assert!(p.ingest(topic, caps, Bytes::from(v.to_string()), rec).is_none());
}

#[test]
fn frames_older_than_max_age_are_dropped_as_expired() {
    let p = pipeline("max_age = \"50ms\"\n");
    let rec = Arc::new(Recorder::default());
    for _ in 0..3 {
        offer(&p, &rec, "a", serde_json::json!({}));
    }
    // Nobody serves the queue for longer than max_age.
    std::thread::sleep(Duration::from_millis(80));
    let _workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    wait_idle(&p);
    assert_eq!(p.stats.dropped(DropReason::Expired), 3);
    // A fresh frame is served.
    offer(&p, &rec, "a", serde_json::json!({}));
    wait_idle(&p);
    assert_eq!(p.stats.served.load(Ordering::Relaxed), 1);
    // A device timestamp that says the frame was already 40 ms old on arrival counts too.
    let now_ms = unix_us(SystemTime::now()) as f64 / 1000.0;
    std::thread::sleep(Duration::from_millis(5));
    offer(&p, &rec, "a", serde_json::json!({"ts": now_ms - 60.0}));
    wait_idle(&p);
    assert_eq!(p.stats.dropped(DropReason::Expired), 4);
    assert_eq!(p.stats.received.load(Ordering::Relaxed), 5);
}

#[test]
fn a_frame_that_cannot_meet_its_deadline_is_dropped() {
    let p = pipeline("deadline = \"10s\"\n");
    let rec = Arc::new(Recorder::default());
    // The frame's own deadline_ms overrides the pipeline's: 0 ms cannot be met.
    offer(&p, &rec, "a", serde_json::json!({"deadline_ms": 0}));
    offer(&p, &rec, "a", serde_json::json!({"deadline_ms": 5000}));
    offer(&p, &rec, "a", serde_json::json!({}));
    let _workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    wait_idle(&p);
    assert_eq!(p.stats.dropped(DropReason::DeadlineMissed), 1);
    assert_eq!(p.stats.served.load(Ordering::Relaxed), 2);
}

#[test]
fn device_timestamps_feed_end_to_end_latency_unless_skewed() {
    let p = pipeline("");
    let rec = Arc::new(Recorder::default());
    let _workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    let now_ms = unix_us(SystemTime::now()) as f64 / 1000.0;
    offer(&p, &rec, "a", serde_json::json!({"ts": now_ms - 100.0}));
    // An hour in the future: a wrong clock, not a frame from the future.
    offer(&p, &rec, "b", serde_json::json!({"ts": now_ms + 3_600_000.0}));
    wait_idle(&p);
    assert_eq!(p.stats.served.load(Ordering::Relaxed), 2);
    assert_eq!(p.stats.clock_skew.load(Ordering::Relaxed), 1);
    let e2e = p.stats.end_to_end.snapshot();
    assert_eq!(e2e.count(), 1, "only the trusted timestamp");
    let d = e2e.quantile(0.5).expect("one");
    assert!(d >= Duration::from_millis(95), "includes the 100 ms before arrival: {d:?}");
    assert_eq!(p.stats.total.snapshot().count(), 2);
    assert_eq!(p.stats.service.snapshot().count(), 2);
}

/// The sensor CNN (symbolic batch axis) with batched plans for 2 and 4 frames, raw format.
fn batched_pipeline() -> Arc<Pipeline> {
    let model_path = fixture("sensor_cnn/model.onnx");
    let text = format!(
        "device_id = \"b\"\n[pipelines.cnn]\nmodel = {:?}\ninput = \"s/+\"\noutput = \"r/{{1}}\"\n\
         format = \"raw\"\nmax_batch = 4\n",
        model_path.display().to_string()
    );
    let cfg = Config::parse_str(&text, "test", None).expect("config");
    let pc = cfg.pipelines[0].clone();
    let load = |b: usize| {
        let mut input_shapes = std::collections::BTreeMap::new();
        if b > 1 {
            input_shapes.insert("accel".to_string(), vec![b, 3, 128]);
        }
        Model::load(
            &pc.model,
            &LoadOptions { name: pc.name.clone(), input_shapes, ..Default::default() },
        )
        .expect("model")
    };
    let p = Pipeline::new(
        pc.clone(),
        load(1),
        Vec::new(),
        &cfg.device_id,
        &cfg.errors,
        cfg.metrics.max_clock_skew,
    )
    .expect("pipeline")
    .with_batch_models(vec![load(2), load(4)]);
    Arc::new(p)
}

fn cnn_sample(i: usize, what: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("sensor_cnn/samples/{i:03}/{what}"))).expect("sample")
}

#[test]
fn batched_runs_give_each_frame_its_own_reference_output() {
    let p = batched_pipeline();
    assert_eq!(p.batch_sizes(), vec![1, 2, 4]);
    assert_eq!(p.batch_limit(), 4);
    let rec = Arc::new(Recorder::default());
    let filter = TopicFilter::parse("s/+").expect("filter");
    // Seven frames queued before any worker runs: one batch of 4, one of 2, one single.
    for i in 0..7 {
        let topic = format!("s/d{i}");
        let caps = filter.matches(&topic).expect("match");
        let payload = Bytes::from(cnn_sample(i, "input.accel.bin"));
        assert!(p.ingest(topic, caps, payload, &*rec).is_none());
    }
    let _workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    wait_idle(&p);
    assert_eq!(p.stats.batch_stats(4).0, 1, "one batch of 4");
    assert_eq!(p.stats.batch_stats(2).0, 1, "one batch of 2");
    assert_eq!(p.stats.served.load(Ordering::Relaxed), 7);
    let msgs = rec.take();
    assert_eq!(msgs.len(), 7);
    for (topic, v) in msgs {
        let i: usize = topic.trim_start_matches("r/d").parse().expect("device index");
        let want: Vec<f32> = cnn_sample(i, "output.logits.bin")
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let out = &v["outputs"][0];
        assert_eq!(out["shape"], serde_json::json!([1, 4]), "a row of the batch, not the batch");
        let got: Vec<f64> =
            out["data"].as_array().expect("data").iter().map(|x| x.as_f64().expect("f")).collect();
        assert_eq!(got.len(), 4);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - *w as f64).abs() <= 1e-4 * (w.abs() as f64).max(1.0),
                "{i}: {got:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn batch_limit_one_runs_frames_singly() {
    let p = batched_pipeline();
    p.set_batch_limit(1);
    let rec = Arc::new(Recorder::default());
    let filter = TopicFilter::parse("s/+").expect("filter");
    for i in 0..4 {
        let topic = format!("s/d{i}");
        let caps = filter.matches(&topic).expect("match");
        assert!(
            p.ingest(topic, caps, Bytes::from(cnn_sample(i, "input.accel.bin")), &*rec).is_none()
        );
    }
    let _workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    wait_idle(&p);
    assert_eq!(p.stats.batch_stats(4).0 + p.stats.batch_stats(2).0, 0);
    assert_eq!(rec.take().len(), 4);
    p.set_batch_limit(100);
    assert_eq!(p.batch_limit(), 4, "clamped to the largest plan");
}

/// The first output tensor's data of a result message.
fn first_output(v: &serde_json::Value) -> Vec<f64> {
    v["outputs"][0]["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_f64().expect("f"))
        .collect()
}

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

fn image_fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images").join(name))
        .expect("image fixture")
}

/// An image pipeline on the mobilenet fixture with `format` and `preprocess` lines.
fn image_pipeline(format: &str, preprocess: &str) -> Result<Pipeline, String> {
    let text = format!(
        "[pipelines.cam]\nmodel = \"{}\"\ninput = \"cams/+/img\"\nformat = \"{format}\"\n\
         [pipelines.cam.preprocess]\n{preprocess}\n",
        fixture("mobilenet/model.onnx").display()
    );
    let cfg = Config::parse_str(&text, "test", None).expect("config");
    let pc = cfg.pipelines[0].clone();
    let model = Model::load(&pc.model, &LoadOptions::default()).expect("model");
    Pipeline::new(pc, model, Vec::new(), &cfg.device_id, &cfg.errors, cfg.metrics.max_clock_skew)
}

#[test]
fn image_plan_mismatch_is_refused_when_the_pipeline_is_built() {
    let e =
        image_pipeline("jpeg", "resize = { width = 200, height = 200 }").err().expect("mismatch");
    assert!(
        e.contains("jpeg frames: preprocess does not match the model: model input `image` is f32 \
             [1, 3, 224, 224]; size: resize produces 200x200 (width x height), the input takes 224x224"),
        "{e}"
    );
    let e = image_pipeline("png", "color = \"gray\"").err().expect("channels");
    assert!(e.contains("color = \"gray\" writes 1, the input has 3"), "{e}");
}

#[test]
fn image_frames_are_decoded_by_workers_and_bad_ones_rejected_there() {
    let p = Arc::new(
        image_pipeline(
            "jpeg",
            "resize = { width = 256, height = 256 }\ncenter_crop = { width = 224, height = 224 }\n\
             scale = 0.00392156862745098\nmean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]",
        )
        .expect("pipeline"),
    );
    let rec = Arc::new(Recorder::default());
    let filter = TopicFilter::parse("cams/+/img").expect("filter");
    let send = |payload: Vec<u8>| {
        let topic = "cams/c1/img".to_string();
        let caps = filter.matches(&topic).expect("match");
        assert!(p.ingest(topic, caps, Bytes::from(payload), &*rec).is_none());
    };
    // Refused at ingest (not a JPEG at all): never queued.
    send(image_fixture("scene.png"));
    assert_eq!(p.stats.rejected(RejectReason::CorruptImage), 1);
    assert!(p.queue.is_idle());
    let workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    for name in ["scene.jpg", "truncated.jpg", "bomb.jpg", "scene.jpg"] {
        send(image_fixture(name));
        wait_idle(&p);
    }
    let msgs = rec.take();
    let reasons: Vec<&str> = msgs.iter().filter_map(|(_, v)| v["reason"].as_str()).collect();
    assert_eq!(reasons, ["corrupt_image", "corrupt_image", "image_too_large"]);
    let results: Vec<&serde_json::Value> =
        msgs.iter().filter(|(_, v)| v.get("outputs").is_some()).map(|(_, v)| v).collect();
    assert_eq!(results.len(), 2, "good frames keep flowing around bad ones");
    let want: Vec<f32> = image_fixture("scene_jpg.classify.output.bin")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for r in results {
        let got = first_output(r);
        let want: Vec<f64> = want.iter().map(|x| f64::from(*x)).collect();
        let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        // JPEG decoders differ by a few grey levels (see pipeline::image tests), which moves
        // mobilenet's logits by up to ~0.12 here: bounded at 10% of the largest logit, and the
        // logits must still correlate almost perfectly with the reference.
        assert!(worst <= 0.1 * scale, "max |logit diff| {worst} > {}", 0.1 * scale);
        let corr = correlation(&got, &want);
        assert!(corr > 0.99, "correlation {corr}");
    }
    assert_eq!(p.stats.rejected(RejectReason::CorruptImage), 2);
    assert_eq!(p.stats.rejected(RejectReason::ImageTooLarge), 1);
    stop(&p, workers);
}

/// A frame whose image fails in the worker, taken in a batch with good ones, costs only its own
/// row: the others are served with their reference outputs. (The sensor CNN's [1, 3, 128]
/// input read as a 128x3 gray f32 image, identity plan: results equal the tensor path's.)
#[test]
fn an_image_rejected_inside_a_batch_only_skips_its_row() {
    let model_path = fixture("sensor_cnn/model.onnx");
    let text = format!(
        "device_id = \"b\"\n[pipelines.cnn]\nmodel = {:?}\ninput = \"s/+\"\noutput = \"r/{{1}}\"\n\
         format = \"raw\"\nmax_batch = 4\n[pipelines.cnn.raw]\nwidth = 128\nheight = 3\n\
         channels = 1\ndtype = \"f32\"\n[pipelines.cnn.preprocess]\ncolor = \"gray\"\n",
        model_path.display().to_string()
    );
    let cfg = Config::parse_str(&text, "test", None).expect("config");
    let pc = cfg.pipelines[0].clone();
    let load = |b: usize| {
        let input_shapes = [("accel".to_string(), vec![b, 3, 128])].into_iter().collect();
        Model::load(&pc.model, &LoadOptions { input_shapes, ..Default::default() }).expect("model")
    };
    let p = Arc::new(
        Pipeline::new(pc.clone(), load(1), Vec::new(), "b", &cfg.errors, Duration::ZERO)
            .expect("pipeline")
            .with_batch_models(vec![load(2), load(4)]),
    );
    let rec = Arc::new(Recorder::default());
    let filter = TopicFilter::parse("s/+").expect("filter");
    for i in 0..4 {
        let topic = format!("s/d{i}");
        let caps = filter.matches(&topic).expect("match");
        let payload = if i == 2 {
            // Past the ingest check (as if it had changed): the worker's decode refuses it.
            let f = Frame {
                id: 99,
                topic: topic.clone(),
                captures: caps,
                seq: Some(7),
                ts: None,
                received: std::time::Instant::now(),
                received_us: 0,
                device_age: None,
                deadline: None,
                inputs: std::iter::once(Bytes::from_static(&[0u8; 12])).collect(),
            };
            p.stats.received.fetch_add(1, Ordering::Relaxed);
            p.account_push(p.queue.push(f));
            continue;
        } else {
            Bytes::from(cnn_sample(i, "input.accel.bin"))
        };
        assert!(p.ingest(topic, caps, payload, &*rec).is_none());
    }
    let _workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    wait_idle(&p);
    assert_eq!(p.stats.batch_stats(4).0, 1, "the four frames ran as one batch");
    assert_eq!(p.stats.rejected(RejectReason::WrongSize), 1);
    assert_eq!(p.stats.served.load(Ordering::Relaxed), 3);
    let msgs = rec.take();
    assert_eq!(msgs.len(), 4, "three results and one error");
    for (topic, v) in msgs {
        if v.get("reason").is_some() {
            assert_eq!((v["reason"].as_str(), v["seq"].as_u64()), (Some("wrong_size"), Some(7)));
            continue;
        }
        let i: usize = topic.trim_start_matches("r/d").parse().expect("device index");
        assert_ne!(i, 2);
        let want: Vec<f64> = cnn_sample(i, "output.logits.bin")
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        let got = first_output(&v);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{i}: {got:?} vs {want:?}");
        }
    }
}

/// A swap that happens while a worker waits for frames serves the next frame already: a client
/// that saw the new version reported gets results from it (the worker used to check for a swap
/// only before waiting, so the first frame after a swap could come from the old model).
#[test]
fn the_first_frame_after_a_swap_is_served_by_the_new_model() {
    let p = pipeline("");
    let rec = Arc::new(Recorder::default());
    let workers = p.start_workers(rec.clone(), &[Placement::default()]).expect("workers");
    let filter = TopicFilter::parse("sensors/+/digits").expect("filter");
    let frame = |i: usize| {
        let (input, _) = sample(i);
        let topic = format!("sensors/d{i}/digits");
        let caps = filter.matches(&topic).expect("match");
        let payload = serde_json::json!({"data": input}).to_string();
        assert!(p.ingest(topic, caps, Bytes::from(payload), &*rec).is_none());
        wait_idle(&p);
    };
    frame(0);
    assert_eq!(rec.take()[0].1["model"]["version"], "1");
    // The worker is now waiting in the queue (it waits up to a quarter second per turn).
    std::thread::sleep(Duration::from_millis(30));
    let v2 = Model::load(
        &fixture("digits_v2/model.onnx"),
        &LoadOptions { name: "digits".into(), ..Default::default() },
    )
    .expect("v2");
    let set = ModelSet::new(v2, Vec::new(), p.models().labels.clone(), "test");
    p.check_candidate(&set).expect("same signature");
    p.install(set);
    frame(1);
    let got = rec.take();
    assert_eq!(got[0].1["model"]["version"], "2", "{:?}", got[0].1["model"]);
    stop(&p, workers);
}
