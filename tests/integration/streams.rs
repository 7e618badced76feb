//! Stream input end to end: pcm_s16le audio chunks and raw f32 IMU chunks assembled into
//! overlapping windows match onnxruntime on the same windows cut in Python
//! (tests/fixtures/streams), with the envelope's seq/ts carried to each window; cbor frames give
//! the json frames' results; corrupt cbor, bad envelopes, truncated pcm and chunks that
//! disagree with the window are rejected with their reason while good frames are served.
//!
//! Tolerance: the suite's model tolerance (max |a - ref| <= 1e-4 x max(1, max |ref|),
//! `EDGEINFER_TOLERANCE`). The assembled windows are exact (i16 / 32768 and f32 copies are exact
//! in f32), so what is left is tract vs onnxruntime. A window cut one hop off moves the audio
//! logits by 0.01-0.05 and the IMU logits by 0.1-0.3, far outside it.

use std::collections::BTreeMap;
use std::time::Duration;

use edgeinfer::model::DType;
use edgeinfer::pipeline::decode::cbor::{typed_array_tag, write as w};
use edgeinfer::pipeline::decode::envelope::{self, Meta};
use edgeinfer_tests::{Fixture, MqttClient, fixtures, start_daemon, tolerance, wait_health};
use rumqttc::QoS;
use serde_json::Value;

const T0: f64 = 1_764_270_000_000.0;

fn streams(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("streams").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn f32s(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()
}

fn logits(v: &Value) -> Vec<f64> {
    v["outputs"][0]["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no outputs in {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// max |got - want| within the suite tolerance; returns it.
fn close(got: &[f64], want: &[f64], what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    assert!(
        worst <= tolerance() * scale,
        "{what}: max |diff| {worst} (got {got:?}, want {want:?})"
    );
    worst
}

#[test]
fn pcm_and_imu_windows_match_onnxruntime_with_envelope_seq_and_ts() {
    let audio = Fixture::load("audio_cnn").expect("audio fixture");
    let imu = Fixture::load("sensor_cnn").expect("imu fixture");
    let pipelines = [
        audio.pipeline(
            "audio",
            "mics/+/pcm",
            "out/{pipeline}/{1}",
            "format = \"pcm_s16le\"\nenvelope = \"edgeinfer-v1\"\nmax_payload = \"64KiB\"\n\
             [pipelines.audio.window]\nsamples = 400\nhop = 200\nchannels = 2\n\
             sample_rate = 16000\nscale = 3.0517578125e-05\nreorder = 4\n",
        ),
        imu.pipeline(
            "imu",
            "imu/+/raw",
            "out/{pipeline}/{1}",
            "format = \"raw\"\nmax_payload = \"4KiB\"\n[pipelines.imu.window]\nsamples = 128\n\
             hop = 64\nchannels = 3\ndtype = \"f32\"\n",
        ),
    ]
    .concat();
    let (broker, _daemon) = start_daemon("streams", &pipelines);
    let obs = MqttClient::connect(broker.port, "obs-streams").expect("observer");
    obs.subscribe("out/#").expect("subscribe");
    obs.subscribe("edgeinfer/streams/errors/#").expect("subscribe errors");
    let dev = MqttClient::connect(broker.port, "dev-streams").expect("device");

    // Audio: 20 chunks of 160 stereo frames (10 ms), chunk 4 sent before chunk 3 (the reorder
    // buffer puts it back), with bad chunks from another device in between.
    let pcm = streams("audio.s16");
    let chunk_bytes = 160 * 2 * 2;
    let meta = |seq: u64| Meta {
        seq: Some(seq),
        ts: Some(T0 + seq as f64 * 10.0),
        deadline_ms: None,
        stream: Some((16_000, 2)),
    };
    let chunk = |seq: u64| {
        let at = seq as usize * chunk_bytes;
        envelope::encode(&meta(seq), &pcm[at..at + chunk_bytes])
    };
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (envelope::encode(&meta(0), &pcm[..chunk_bytes - 1]), "truncated"),
        (pcm[..chunk_bytes].to_vec(), "bad_envelope"),
        (chunk(0)[..30].to_vec(), "bad_envelope"),
        (
            envelope::encode(&Meta { stream: Some((16_000, 1)), ..meta(1) }, &pcm[..640]),
            "wrong_channels",
        ),
        (
            envelope::encode(&Meta { stream: Some((8_000, 2)), ..meta(2) }, &pcm[..640]),
            "wrong_sample_rate",
        ),
    ];
    let order: Vec<u64> = [0, 1, 2, 4, 3].into_iter().chain(5..20).collect();
    for (i, seq) in order.iter().enumerate() {
        dev.publish("mics/m1/pcm", chunk(*seq), QoS::AtLeastOnce, false).expect("publish");
        if let Some((b, _)) = bad.get(i) {
            dev.publish("mics/bad/pcm", b.clone(), QoS::AtLeastOnce, false).expect("publish bad");
        }
    }
    // IMU: 16 chunks of 32 frames of x, y, z f32, no envelope (taken in arrival order).
    let imu_stream = streams("imu.f32");
    for c in imu_stream.chunks(32 * 3 * 4) {
        dev.publish("imu/d1/raw", c.to_vec(), QoS::AtLeastOnce, false).expect("publish imu");
    }

    let want_audio = f32s(&streams("audio.outputs.f32"));
    let want_imu = f32s(&streams("imu.outputs.f32"));
    let (n_audio, n_imu) = (want_audio.len() / 4, want_imu.len() / 4);
    assert_eq!((n_audio, n_imu), (15, 7));
    let msgs = obs
        .collect_until(Duration::from_secs(60), |m| m.len() >= n_audio + n_imu + bad.len())
        .expect("every window's result and every error");
    let mut audio_results = Vec::new();
    let mut imu_results = Vec::new();
    let mut errors = Vec::new();
    for m in &msgs {
        let v = m.json();
        match m.topic.as_str() {
            "out/audio/m1" => audio_results.push(v),
            "out/imu/d1" => imu_results.push(v),
            t if t.starts_with("edgeinfer/streams/errors/") => errors.push(v),
            other => panic!("unexpected message on {other}: {v}"),
        }
    }
    // One worker, FIFO queue: results come in window order.
    let mut worst = 0f64;
    for (k, v) in audio_results.iter().enumerate() {
        worst = worst.max(close(
            &logits(v),
            &want_audio[k * 4..k * 4 + 4],
            &format!("audio window {k}"),
        ));
        // Window k starts at frame 200k: in chunk floor(200k / 160), at T0 + 200k / 16 ms.
        let start = 200 * k as u64;
        assert_eq!(v["seq"].as_u64(), Some(start / 160), "window {k}: {v}");
        let ts = v["ts"].as_f64().unwrap_or(f64::NAN);
        assert!((ts - (T0 + start as f64 / 16.0)).abs() < 1e-3, "window {k}: ts {ts}");
    }
    for (k, v) in imu_results.iter().enumerate() {
        worst =
            worst.max(close(&logits(v), &want_imu[k * 4..k * 4 + 4], &format!("imu window {k}")));
        assert!(v["seq"].is_null() && v["ts"].is_null(), "no envelope, no seq/ts: {v}");
    }
    eprintln!("windows: max |logit diff| {worst:.2e}");
    assert_eq!((audio_results.len(), imu_results.len()), (n_audio, n_imu));
    let mut got: Vec<&str> = errors.iter().map(|e| e["reason"].as_str().unwrap_or("")).collect();
    let mut want: Vec<&str> = bad.iter().map(|(_, r)| *r).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "one error per bad chunk: {errors:?}");
    for e in &errors {
        assert_eq!(e["topic"], "mics/bad/pcm", "{e}");
        assert!(!e["detail"].as_str().unwrap_or("").is_empty(), "{e}");
    }

    // Health: the assembly counters and the books (windows are the frames).
    let health = wait_health(broker.port, "streams", Duration::from_secs(10), |v| {
        v["pipelines"]["audio"]["counters"]["served"] == 15
            && v["pipelines"]["imu"]["counters"]["served"] == 7
    })
    .expect("health");
    let w = &health["pipelines"]["audio"]["window"];
    assert_eq!(
        (&w["chunks"], &w["windows"], &w["reordered"], &w["gaps"], &w["late"], &w["held"]),
        (
            &Value::from(20),
            &Value::from(15),
            &Value::from(1),
            &Value::from(0),
            &Value::from(0),
            &Value::from(0)
        ),
        "{w}"
    );
    assert_eq!(health["pipelines"]["imu"]["window"]["windows"], 7);
    let c = &health["pipelines"]["audio"]["counters"];
    let rejected: BTreeMap<String, u64> = c["rejected"]
        .as_object()
        .expect("rejected")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    let expected: BTreeMap<String, u64> =
        [("bad_envelope", 2), ("truncated", 1), ("wrong_channels", 1), ("wrong_sample_rate", 1)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(rejected, expected);
    assert_eq!(c["received"], 15 + 5, "windows + rejected chunks");
}

/// A digits sample's pixels as little-endian f32 bytes and as f64 values.
fn pixels(digits: &Fixture, i: usize) -> (Vec<u8>, Vec<f64>) {
    let b = digits.samples[i].inputs["pixels"].clone();
    let v = f32s(&b);
    (b, v)
}

/// {"seq": seq, "ts": ts, "data": <tensor>} with the tensor written three ways by sample.
fn cbor_digits(b: &[u8], vals: &[f64], seq: u64, form: usize) -> Vec<u8> {
    let mut o = Vec::new();
    w::map(&mut o, 3);
    w::text(&mut o, "seq");
    w::uint(&mut o, seq);
    w::text(&mut o, "ts");
    w::f64(&mut o, T0);
    w::text(&mut o, "data");
    match form {
        0 => {
            // Nested to the input's shape [1, 64], as single-precision floats.
            w::array(&mut o, 1);
            w::array(&mut o, vals.len());
            for v in vals {
                w::f32(&mut o, *v as f32);
            }
        }
        1 => w::bytes(&mut o, b),
        _ => {
            w::tag(&mut o, typed_array_tag(DType::F32).unwrap_or(85));
            w::bytes(&mut o, b);
        }
    }
    o
}

#[test]
fn cbor_frames_give_the_json_results_and_envelopes_carry_seq_and_ts() {
    let digits = Fixture::load("digits").expect("digits");
    let two = Fixture::load("two_inputs").expect("two_inputs");
    let pipelines = [
        digits.pipeline("dj", "in/+/dj", "out/{pipeline}/{1}", "format = \"json\"\n"),
        digits.pipeline("dc", "in/+/dc", "out/{pipeline}/{1}", "format = \"cbor\"\n"),
        two.pipeline("tc", "in/+/tc", "out/{pipeline}/{1}", "format = \"cbor\"\n"),
        digits.pipeline(
            "env",
            "in/+/env",
            "out/{pipeline}/{1}",
            "format = \"raw\"\nenvelope = \"edgeinfer-v1\"\n",
        ),
    ]
    .concat();
    let (broker, _daemon) = start_daemon("cbor", &pipelines);
    let obs = MqttClient::connect(broker.port, "obs-cbor").expect("observer");
    obs.subscribe("out/#").expect("subscribe");
    obs.subscribe("edgeinfer/cbor/errors/#").expect("subscribe errors");
    let dev = MqttClient::connect(broker.port, "dev-cbor").expect("device");
    let n = digits.samples.len();
    let mut bad: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    for i in 0..n {
        let (b, vals) = pixels(&digits, i);
        dev.publish(
            &format!("in/s{i}/dj"),
            digits.json_frame(i, i as u64),
            QoS::AtLeastOnce,
            false,
        )
        .expect("json");
        dev.publish(
            &format!("in/s{i}/dc"),
            cbor_digits(&b, &vals, i as u64, i % 3),
            QoS::AtLeastOnce,
            false,
        )
        .expect("cbor");
        let meta = Meta {
            seq: Some(100 + i as u64),
            ts: Some(T0 + i as f64),
            deadline_ms: None,
            stream: None,
        };
        dev.publish(&format!("in/s{i}/env"), envelope::encode(&meta, &b), QoS::AtLeastOnce, false)
            .expect("env");
    }
    // Two named inputs, x as nested doubles and k as an i64 typed array.
    for (i, s) in two.samples.iter().enumerate() {
        let x = f32s(&s.inputs["x"]);
        let mut o = Vec::new();
        w::map(&mut o, 2);
        w::text(&mut o, "seq");
        w::uint(&mut o, i as u64);
        w::text(&mut o, "inputs");
        w::map(&mut o, 2);
        w::text(&mut o, "x");
        w::array(&mut o, 1);
        w::array(&mut o, x.len());
        for v in &x {
            w::f64(&mut o, *v);
        }
        w::text(&mut o, "k");
        w::tag(&mut o, typed_array_tag(DType::I64).unwrap_or(79));
        w::bytes(&mut o, &s.inputs["k"]);
        dev.publish(&format!("in/s{i}/tc"), o, QoS::AtLeastOnce, false).expect("two");
    }
    // Broken frames, each with its reason, between the good ones.
    let (b0, v0) = pixels(&digits, 0);
    let good = cbor_digits(&b0, &v0, 0, 0);
    bad.push(("dc", good[..good.len() - 3].to_vec(), "malformed"));
    bad.push(("dc", b"{\"data\": [1, 2]}".to_vec(), "malformed"));
    let mut wrong_type = cbor_digits(&b0, &v0, 0, 2);
    let tag_at = wrong_type.len() - b0.len() - 5; // d8 55 (tag 85), 59 01 00 (256 bytes)
    wrong_type[tag_at + 1] = 86; // f64 typed array for an f32 input
    bad.push(("dc", wrong_type, "wrong_dtype"));
    bad.push(("dc", cbor_digits(&b0[..252], &v0[..63], 0, 0), "wrong_shape"));
    bad.push(("env", b0.clone(), "bad_envelope"));
    let mut v2 = envelope::encode(&Meta::default(), &b0);
    v2[4] = 2;
    bad.push(("env", v2, "bad_envelope"));
    for (i, (p, payload, _)) in bad.iter().enumerate() {
        dev.publish(&format!("in/bad{i}/{p}"), payload.clone(), QoS::AtLeastOnce, false)
            .expect("bad");
    }

    let total = 3 * n + two.samples.len() + bad.len();
    let msgs = obs.collect_until(Duration::from_secs(60), |m| m.len() >= total).expect("all");
    let mut by_topic: BTreeMap<String, Value> = BTreeMap::new();
    let mut reasons = Vec::new();
    for m in &msgs {
        let v = m.json();
        if m.topic.starts_with("edgeinfer/cbor/errors/") {
            reasons.push((
                v["topic"].as_str().unwrap_or("").to_string(),
                v["reason"].as_str().unwrap_or("").to_string(),
            ));
        } else {
            by_topic.insert(m.topic.clone(), v);
        }
    }
    for i in 0..n {
        let j = &by_topic[&format!("out/dj/s{i}")];
        let c = &by_topic[&format!("out/dc/s{i}")];
        let e = &by_topic[&format!("out/env/s{i}")];
        for v in [j, c, e] {
            digits.check_result(i, v).unwrap_or_else(|err| panic!("sample {i}: {err}: {v}"));
        }
        // Same tensor bytes in, same outputs out.
        assert_eq!(c["outputs"], j["outputs"], "sample {i}: cbor form {} vs json", i % 3);
        assert_eq!((c["seq"].as_u64(), c["ts"].as_f64()), (Some(i as u64), Some(T0)));
        assert_eq!(
            (e["seq"].as_u64(), e["ts"].as_f64()),
            (Some(100 + i as u64), Some(T0 + i as f64))
        );
    }
    for i in 0..two.samples.len() {
        two.check_result(i, &by_topic[&format!("out/tc/s{i}")]).expect("two inputs");
    }
    let mut want: Vec<(String, String)> = bad
        .iter()
        .enumerate()
        .map(|(i, (p, _, r))| (format!("in/bad{i}/{p}"), r.to_string()))
        .collect();
    want.sort();
    reasons.sort();
    assert_eq!(reasons, want, "one error per broken frame, with its reason");
}

#[test]
fn validate_models_says_how_the_window_disagrees_with_the_model() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("mic.toml");
    let model = fixtures().join("models/audio_cnn/model.onnx");
    let write = |window: &str| {
        std::fs::write(
            &cfg,
            format!(
                "[pipelines.mic]\nmodel = {:?}\ninput = \"mics/+\"\nformat = \"pcm_s16le\"\n\
                 max_payload = \"64KiB\"\n[pipelines.mic.window]\n{window}\n",
                model.display().to_string()
            ),
        )
        .expect("write");
    };
    let validate = || edgeinfer_tests::validate_models(&cfg);
    write("samples = 400\nhop = 200\nchannels = 2");
    let (code, stderr) = validate();
    assert_eq!(code, Some(0), "{stderr}");
    write("samples = 320\nchannels = 1\nlayout = \"channels_last\"");
    let (code, stderr) = validate();
    assert_eq!(code, Some(78), "{stderr}");
    for needle in [
        "pipeline mic",
        "pcm_s16le stream: window does not match the model: model input `audio` is f32 [1, 2, 400]",
        "channels: window.channels = 1, the input has 400 on axis 2 (channels_last)",
        "samples: window.samples = 320, the input has 2 on axis 1 (channels_last)",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in {stderr}");
    }
}
