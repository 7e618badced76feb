//! Model delivery over MQTT, end to end with the real `edgeinfer-ota` tool: keys generated at
//! test time, a transfer interrupted by a broker restart and resumed (only the missing chunks
//! are sent again), the swap to the delivered model, and refused deliveries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgeinfer_tests::{
    Daemon, Fixture, Mosquitto, MqttClient, config, fixtures, wait_health, wait_online,
};
use rumqttc::QoS;

fn ota_bin() -> PathBuf {
    let bin = edgeinfer_tests::edgeinfer_bin().with_file_name("edgeinfer-ota");
    assert!(
        bin.exists(),
        "{} not found; run `cargo build -p edgeinfer-ota` (tools/test.sh does)",
        bin.display()
    );
    bin
}

/// Generates a key; returns (key file, public key).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.key"));
    let out = Command::new(ota_bin())
        .args(["keygen", "--out"])
        .arg(&key)
        .args(["--id", name])
        .output()
        .expect("keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let public = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} = \"")).and_then(|r| r.strip_suffix('"')))
        .unwrap_or_else(|| panic!("no public key in {stdout}"))
        .to_string();
    (key, public)
}

struct Rig {
    dir: tempfile::TempDir,
    broker: Mosquitto,
    daemon: Daemon,
    model: PathBuf,
    key: PathBuf,
    device: String,
}

fn rig(device: &str) -> Rig {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("digits.onnx");
    std::fs::copy(fixtures().join("models/digits/model.onnx"), &model).expect("model");
    let (key, public) = keygen(dir.path(), "fleet");
    let broker = Mosquitto::start().expect("mosquitto");
    let pipeline = format!(
        "[pipelines.digits]\nmodel = {:?}\ninput = \"o/+/in\"\noutput = \"o/{{1}}/out\"\nwatch_model = false\nprobation = \"0s\"\n",
        model.display().to_string()
    );
    let cfg = config(broker.port, device, &pipeline).replace(
        "[system]\n",
        &format!("[system]\nstate_dir = {:?}\n", dir.path().join("state").display().to_string()),
    ) + &format!("\n[ota]\nenabled = true\n[ota.trusted_keys]\nfleet = \"{public}\"\n");
    let daemon = Daemon::start(&cfg).expect("daemon");
    wait_online(broker.port, device);
    Rig { dir, broker, daemon, model, key, device: device.into() }
}

fn push(r: &Rig, model: &Path, version: &str, key: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(ota_bin())
        .args([
            "push",
            "--broker",
            &format!("127.0.0.1:{}", r.broker.port),
            "--device",
            &r.device,
            "--pipeline",
            "digits",
        ])
        .arg("--model")
        .arg(model)
        .args([
            "--version",
            version,
            "--key-id",
            "fleet",
            "--chunk-size",
            "1024",
            "--timeout",
            "60",
        ])
        .arg("--key")
        .arg(key)
        .args(extra)
        .output()
        .expect("push");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn running_version(r: &Rig) -> String {
    let h =
        wait_health(r.broker.port, &r.device, Duration::from_secs(10), |_| true).expect("health");
    h["pipelines"]["digits"]["model"]["version"].as_str().unwrap_or("").to_string()
}

#[test]
fn a_delivery_interrupted_by_a_broker_restart_resumes_and_swaps_the_model_in() {
    let mut r = rig("ota-resume");
    let v2 = fixtures().join("models/digits_v2/model.onnx");
    let bytes = std::fs::read(&v2).expect("v2");
    let (code, text) = {
        // Half a transfer by hand, signed like the tool signs (the tool's manifest is
        // identical, so the daemon treats the tool's offer as a resume of this one).
        let manifest = signed_manifest(&r, &v2, "2");
        let dev = MqttClient::connect(r.broker.port, "ota-half").expect("client");
        let base = format!("edgeinfer/{}/ota/digits", r.device);
        dev.publish(&format!("{base}/manifest"), manifest, QoS::AtLeastOnce, false)
            .expect("manifest");
        let chunks = bytes.len().div_ceil(1024);
        for n in 0..chunks / 2 {
            let e = ((n + 1) * 1024).min(bytes.len());
            dev.publish(
                &format!("{base}/chunk/{n}"),
                bytes[n * 1024..e].to_vec(),
                QoS::AtLeastOnce,
                false,
            )
            .expect("chunk");
        }
        let half = (chunks / 2) as u64;
        // Offering the manifest again makes the device say how far it got.
        let watch = status_watch(&r);
        dev.publish(
            &format!("{base}/manifest"),
            signed_manifest(&r, &v2, "2"),
            QoS::AtLeastOnce,
            false,
        )
        .expect("manifest");
        let st = watch
            .wait_json(&format!("{base}/status"), Duration::from_secs(30), |v| {
                v["received"].as_u64() == Some(half)
            })
            .expect("status");
        assert_eq!(st["state"], "receiving", "{st}");
        drop(dev);
        // The broker restarts mid-transfer (fault injection: a real broker killed and started
        // again on the same port). The daemon reconnects; its staged chunks are kept.
        r.broker.restart().expect("broker restart");
        wait_online(r.broker.port, &r.device);
        push(&r, &v2, "2", &r.key, &[])
    };
    assert_eq!(code, 0, "{text}\n{}", r.daemon.log());
    assert!(text.contains("installed version 2"), "{text}");
    assert!(
        text.contains("resuming: the device has 10 of 20 chunks"),
        "only the missing half is sent: {text}"
    );
    assert_eq!(std::fs::read(&r.model).expect("model"), bytes, "the delivered file is in place");
    assert_eq!(running_version(&r), "2", "{}", r.daemon.log());
    // Results now come from v2, matching its onnxruntime reference.
    let fx = Fixture::load("digits_v2").expect("fixture");
    let obs = MqttClient::connect(r.broker.port, "ota-obs").expect("observer");
    obs.subscribe("o/+/out").expect("subscribe");
    let dev = MqttClient::connect(r.broker.port, "ota-dev").expect("device");
    dev.publish("o/a/in", fx.json_frame(3, 3), QoS::AtLeastOnce, false).expect("frame");
    let res = obs.wait_json("o/a/out", Duration::from_secs(20), |_| true).expect("result");
    assert_eq!(res["model"]["version"], "2");
    fx.check_result(3, &res).expect("v2 reference");
    let log = r.daemon.log();
    assert!(log.contains("OTA: version 2 received and verified"), "{log}");
}

#[test]
fn refused_deliveries_say_why_and_leave_the_model_alone() {
    let r = rig("ota-refuse");
    let v2 = fixtures().join("models/digits_v2/model.onnx");
    let (other, _) = keygen(r.dir.path(), "other");
    // Signed by a key the device does not trust (under the trusted key's id).
    let (code, text) = push(&r, &v2, "2", &other, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("bad signature"), "{text}");
    // A replay of the running version.
    let (code, text) = push(&r, &v2, "1", &r.key, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not newer"), "{text}");
    // A file the swap refuses (another model's signature), delivered and verified first.
    let (code, text) = push(&r, &fixtures().join("models/sensor_cnn/model.onnx"), "3", &r.key, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("signature differs"), "{text}");
    assert_eq!(running_version(&r), "1");
    assert!(r.daemon.log().contains("OTA rejected"));
}

/// The manifest the tool publishes for `model`, signed with the rig's key file.
fn signed_manifest(r: &Rig, model: &Path, version: &str) -> Vec<u8> {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let b64 = base64::engine::general_purpose::STANDARD;
    let seed: [u8; 32] = b64
        .decode(std::fs::read_to_string(&r.key).expect("key").trim())
        .expect("b64")
        .try_into()
        .expect("32 bytes");
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
    let bytes = std::fs::read(model).expect("model");
    use sha2::Digest;
    let mut m = edgeinfer::ota::Manifest {
        pipeline: "digits".into(),
        version: version.into(),
        size: bytes.len() as u64,
        sha256: sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect(),
        chunk_size: 1024,
        key_id: "fleet".into(),
        force: false,
        signature: String::new(),
    };
    m.signature = b64.encode(sk.sign(&m.signed_bytes()).to_bytes());
    serde_json::to_vec(&m).expect("json")
}

/// A client subscribed to the rig's OTA status topic.
fn status_watch(r: &Rig) -> MqttClient {
    let c = MqttClient::connect(r.broker.port, "ota-status").expect("client");
    c.subscribe(&format!("edgeinfer/{}/ota/digits/status", r.device)).expect("subscribe");
    c
}
