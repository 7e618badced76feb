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
    cfg: String,
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
    Rig { dir, broker, daemon, model, key, device: device.into(), cfg }
}

/// Runs `edgeinfer-ota push` of `model` as release `release` (`version` is the same number).
fn push(r: &Rig, model: &Path, release: u64, key: &Path, extra: &[&str]) -> (i32, String) {
    let version = release.to_string();
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
            &version,
            "--release",
            &version,
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
        let manifest = signed_manifest(&r, &v2, 2);
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
            signed_manifest(&r, &v2, 2),
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
        push(&r, &v2, 2, &r.key, &[])
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
    assert!(log.contains("OTA: version 2 (release 2) received and verified"), "{log}");
}

#[test]
fn refused_deliveries_say_why_and_leave_the_model_alone() {
    let mut r = rig("ota-refuse");
    let v2 = fixtures().join("models/digits_v2/model.onnx");
    let original = std::fs::read(&r.model).expect("model");
    let (other, _) = keygen(r.dir.path(), "other");
    // Signed by a key the device does not trust (under the trusted key's id).
    let (code, text) = push(&r, &v2, 2, &other, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("bad signature"), "{text}");
    // Signed for another device, or expired.
    let (code, text) = push(&r, &v2, 2, &r.key, &["--target", "someone-else"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("signed for target"), "{text}");
    let (code, text) = push(&r, &v2, 2, &r.key, &["--expires-in", "0s"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("expired"), "{text}");
    // A file the swap refuses (another model's signature), delivered and verified first: it is
    // checked while still staged and never replaces the model file.
    let (code, text) = push(&r, &fixtures().join("models/sensor_cnn/model.onnx"), 3, &r.key, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("signature differs"), "{text}");
    assert_eq!(running_version(&r), "1");
    assert_eq!(std::fs::read(&r.model).expect("model"), original, "the model file is untouched");
    assert!(r.daemon.log().contains("OTA rejected"));
    // A restart after the refusal serves the previous model.
    restart(&mut r);
    assert_eq!(running_version(&r), "1");
    let fx = Fixture::load("digits").expect("fixture");
    let obs = MqttClient::connect(r.broker.port, "ota-obs").expect("observer");
    obs.subscribe("o/+/out").expect("subscribe");
    let dev = MqttClient::connect(r.broker.port, "ota-dev").expect("device");
    dev.publish("o/a/in", fx.json_frame(2, 2), QoS::AtLeastOnce, false).expect("frame");
    let res = obs.wait_json("o/a/out", Duration::from_secs(20), |_| true).expect("result");
    fx.check_result(2, &res).expect("the previous model's reference");
    // Release 3 was consumed by the refused delivery: sending it again is a replay.
    let (code, text) = push(&r, &v2, 3, &r.key, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not above the last accepted release 3"), "{text}");
}

/// Releases 1 and 2 installed, then a replay of release 1: refused (the release counter is
/// kept in the state directory, across restarts); a deliberate downgrade with `--force` works
/// once (the device's nonce is signed in) and its replay is refused.
#[test]
fn replayed_and_downgrading_manifests_are_refused_and_force_works_once() {
    let mut r = rig("ota-replay");
    let v1 = fixtures().join("models/digits/model.onnx");
    let v2 = fixtures().join("models/digits_v2/model.onnx");
    // Release 1 (the model already running: installed as unchanged), then release 2.
    let (code, text) = push(&r, &v1, 1, &r.key, &[]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = push(&r, &v2, 2, &r.key, &[]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(running_version(&r), "2");
    // Replays are refused before and after a restart, and leave no retained status behind.
    for _ in 0..2 {
        let (code, text) = push(&r, &v1, 1, &r.key, &[]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("not above the last accepted release 2"), "{text}");
        assert_eq!(running_version(&r), "2");
        restart(&mut r);
    }
    let st = retained_status(&r, "digits").expect("the last transfer's status");
    assert_eq!(st["state"], "installed", "a refused replay did not replace it: {st}");
    // A deliberate downgrade: --force fetches the device's nonce and signs it in. A bystander
    // on the bus records the manifests the tool publishes.
    let spy = MqttClient::connect(r.broker.port, "ota-spy").expect("spy");
    spy.subscribe("edgeinfer/ota-replay/ota/digits/manifest").expect("subscribe");
    let (code, text) = push(&r, &v1, 1, &r.key, &["--force"]);
    assert_eq!(code, 0, "{text}\n{}", r.daemon.log());
    assert!(text.contains("signing the device's nonce"), "{text}");
    assert_eq!(running_version(&r), "1");
    // Replaying the forced manifest verbatim: the nonce is spent.
    let replay = std::iter::from_fn(|| spy.recv(Duration::from_millis(500)))
        .filter(|m| m.json()["nonce"].as_str().is_some_and(|n| !n.is_empty()))
        .last()
        .expect("the forced manifest, with the nonce")
        .payload
        .to_vec();
    let watch = status_watch(&r);
    let dev = MqttClient::connect(r.broker.port, "ota-replayer").expect("client");
    dev.publish("edgeinfer/ota-replay/ota/digits/manifest", replay, QoS::AtLeastOnce, false)
        .expect("replay");
    let v = watch
        .wait_json("edgeinfer/ota-replay/ota/digits/status", Duration::from_secs(20), |v| {
            v["state"] == "rejected"
        })
        .expect("answer");
    assert!(v["reason"].as_str().unwrap_or("").contains("nonce"), "{v}");
}

/// Status spam and chunk poisoning: manifests for pipelines that do not exist leave no
/// retained message behind, and a forged chunk 0 sent ahead of the real one is refused by its
/// hash while the real one is accepted.
#[test]
fn strangers_cannot_spam_statuses_or_poison_chunks() {
    let r = rig("ota-spam");
    let v2 = fixtures().join("models/digits_v2/model.onnx");
    let bytes = std::fs::read(&v2).expect("v2");
    let dev = MqttClient::connect(r.broker.port, "ota-stranger").expect("client");
    let base = format!("edgeinfer/{}/ota", r.device);
    for i in 0..20 {
        dev.publish(&format!("{base}/ghost{i}/manifest"), b"{}".to_vec(), QoS::AtLeastOnce, false)
            .expect("spam");
        dev.publish(&format!("{base}/ghost{i}/chunk/0"), b"x".to_vec(), QoS::AtLeastOnce, false)
            .expect("spam");
    }
    // The real manifest, then a forged chunk 0 ahead of the real stream.
    let watch = status_watch(&r);
    dev.publish(
        &format!("{base}/digits/manifest"),
        signed_manifest(&r, &v2, 2),
        QoS::AtLeastOnce,
        false,
    )
    .expect("manifest");
    watch
        .wait_json(&format!("{base}/digits/status"), Duration::from_secs(20), |v| {
            v["state"] == "receiving"
        })
        .expect("receiving");
    let mut forged = bytes[..1024].to_vec();
    forged[100] ^= 0xff;
    dev.publish(&format!("{base}/digits/chunk/0"), forged, QoS::AtLeastOnce, false)
        .expect("forged");
    let v = watch
        .wait_json(&format!("{base}/digits/status"), Duration::from_secs(20), |v| {
            v["refused_chunks"] == 1
        })
        .expect("the forged chunk refused");
    assert!(v["reason"].as_str().unwrap_or("").contains("SHA-256"), "{v}");
    drop(dev);
    // The tool resumes the transfer: the real chunk 0 is accepted, the model installed.
    let (code, text) = push(&r, &v2, 2, &r.key, &[]);
    assert_eq!(code, 0, "{text}\n{}", r.daemon.log());
    assert_eq!(running_version(&r), "2");
    // No retained status for any of the ghosts.
    let c = MqttClient::connect(r.broker.port, "ota-retained").expect("client");
    c.subscribe(&format!("{base}/+/status")).expect("subscribe");
    let retained: Vec<String> = std::iter::from_fn(|| c.recv(Duration::from_millis(1500)))
        .filter(|m| m.retain)
        .map(|m| m.topic)
        .collect();
    assert_eq!(retained, vec![format!("{base}/digits/status")], "only the real pipeline's");
}

/// Stops the daemon (SIGTERM) and starts it again on the same config and state.
fn restart(r: &mut Rig) {
    r.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    r.daemon.wait_exit(Duration::from_secs(30)).expect("exit");
    r.daemon = Daemon::start(&r.cfg).expect("daemon");
    wait_online(r.broker.port, &r.device);
}

/// The retained status of `pipeline`, if any.
fn retained_status(r: &Rig, pipeline: &str) -> Option<serde_json::Value> {
    let c = MqttClient::connect(r.broker.port, "ota-retained-one").expect("client");
    c.subscribe(&format!("edgeinfer/{}/ota/{pipeline}/status", r.device)).expect("subscribe");
    c.recv(Duration::from_secs(2)).filter(|m| m.retain).map(|m| m.json())
}

/// The manifest the tool publishes for `model` at `release`, signed with the rig's key file.
fn signed_manifest(r: &Rig, model: &Path, release: u64) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let seed: [u8; 32] = b64
        .decode(std::fs::read_to_string(&r.key).expect("key").trim())
        .expect("b64")
        .try_into()
        .expect("32 bytes");
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
    let bytes = std::fs::read(model).expect("model");
    let mut m = edgeinfer::ota::Manifest::for_file(
        "digits",
        &release.to_string(),
        release,
        &r.device,
        edgeinfer::ota::unix_now() + 3600,
        &bytes,
        1024,
        "fleet",
    );
    m.sign(&sk);
    serde_json::to_vec(&m).expect("json")
}

/// A client subscribed to the rig's OTA status topic.
fn status_watch(r: &Rig) -> MqttClient {
    let c = MqttClient::connect(r.broker.port, "ota-status").expect("client");
    c.subscribe(&format!("edgeinfer/{}/ota/digits/status", r.device)).expect("subscribe");
    c
}
