//! TLS to the broker, end to end against mosquitto with certificates generated at test time
//! (rcgen): mutual TLS that works, and the failures users hit (CA mismatch, missing client
//! certificate, wrong host name, a private key others can read), each with a clear error, retries
//! and no crash.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgeinfer_tests::{Daemon, Fixture, Mosquitto, MqttClient, eventually, free_port, wait_health};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rumqttc::QoS;

struct Pki {
    dir: PathBuf,
}

/// A CA and the certificates it signs, written as PEM files into `dir`.
fn ca(dir: &Path, name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    let key = KeyPair::generate().expect("key");
    let cert = p.self_signed(&key).expect("ca");
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write");
    (cert, key)
}

fn leaf(dir: &Path, name: &str, sans: &[&str], ca: &(rcgen::Certificate, KeyPair)) {
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, &ca.0, &ca.1).expect("sign");
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write");
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

impl Pki {
    /// CA "ca" signing "server" (127.0.0.1, localhost) and "client"; CA "other" signing
    /// "stranger"; "ca" also signs "wrongname" for another host.
    fn new(dir: &Path) -> Pki {
        let main = ca(dir, "ca");
        leaf(dir, "server", &["127.0.0.1", "localhost"], &main);
        leaf(dir, "client", &["edge-device"], &main);
        leaf(dir, "wrongname", &["broker.example.com"], &main);
        let other = ca(dir, "other");
        leaf(dir, "stranger", &["edge-device"], &other);
        Pki { dir: dir.to_path_buf() }
    }
    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }

    /// The daemon's `[broker.tls]` keys for mutual TLS with the client certificate, trusting
    /// the CA in `ca` (a file name).
    fn mtls(&self, ca: &str) -> String {
        format!(
            "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}",
            self.path(ca),
            self.path("client.pem"),
            self.path("client.key")
        )
    }
}

/// A broker with a plain listener for the tests' clients and a TLS listener (`server_cert`)
/// that requires a client certificate from CA "ca".
fn broker(pki: &Pki, server_cert: &str) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.path("ca.pem"),
        pki.path(&format!("{server_cert}.pem")),
        pki.path(&format!("{server_cert}.key")),
    );
    (Mosquitto::start_with(free_port(), &extra).expect("mosquitto"), tls_port)
}

fn daemon_config(device: &str, tls_port: u16, tls: &str, fx: &Fixture) -> String {
    format!(
        r#"
device_id = "{device}"
[broker]
host = "127.0.0.1"
port = {tls_port}
client_id = "edgeinfer-tls-{device}"
reconnect_min = "100ms"
reconnect_max = "500ms"
[broker.tls]
{tls}
[health]
interval = "1s"
[system]
allow_root = true
{}
"#,
        fx.pipeline("digits", "t/+/in", "t/{1}/out", "")
    )
}

#[test]
fn mutual_tls_serves_frames() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    let (broker, tls_port) = broker(&pki, "server");
    let fx = Fixture::load("digits").expect("fixture");
    let tls = pki.mtls("ca.pem");
    let daemon = Daemon::start(&daemon_config("tls-ok", tls_port, &tls, &fx)).expect("daemon");
    wait_health(broker.port, "tls-ok", Duration::from_secs(30), |v| v["status"] == "online")
        .unwrap_or_else(|e| {
            panic!("never online over mTLS: {e}\n{}\n{}", daemon.log(), broker.log())
        });
    let obs = MqttClient::connect(broker.port, "tls-obs").expect("observer");
    obs.subscribe("t/+/out").expect("subscribe");
    let dev = MqttClient::connect(broker.port, "tls-dev").expect("device");
    dev.publish("t/a/in", fx.json_frame(2, 7), QoS::AtLeastOnce, false).expect("frame");
    let r = obs.wait_json("t/a/out", Duration::from_secs(20), |_| true).expect("result");
    fx.check_result(2, &r).expect("reference");
}

/// Starts a daemon that cannot complete the TLS connection; checks it stays up, retries, and
/// logs `needle`.
fn refused(device: &str, server_cert: &str, tls: impl Fn(&Pki) -> String, needle: &str) {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    let (broker, tls_port) = broker(&pki, server_cert);
    let fx = Fixture::load("digits").expect("fixture");
    let mut daemon =
        Daemon::start(&daemon_config(device, tls_port, &tls(&pki), &fx)).expect("daemon");
    daemon
        .wait_log(needle, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{device}: {e}\n{}", broker.log()));
    // Retries with backoff (the broker sees a second connection on its TLS port), no crash,
    // never online.
    let tls_connections = || broker.log().matches(&format!(" on port {tls_port}.")).count();
    assert!(
        eventually(Duration::from_secs(20), || tls_connections() >= 2),
        "{device}: no second attempt: {}",
        broker.log()
    );
    assert!(daemon.is_running(), "{device}: the daemon must keep retrying");
    assert!(
        daemon.log().contains("still unreachable") || daemon.log().matches(needle).count() >= 1
    );
    assert!(
        wait_health(broker.port, device, Duration::from_secs(2), |v| v["status"] == "online")
            .is_err(),
        "{device}: must not be online"
    );
}

#[test]
fn a_broker_certificate_from_another_ca_is_refused() {
    // The daemon trusts CA "other" only: the broker's certificate (from "ca") is unknown.
    refused("tls-ca", "server", |pki| pki.mtls("other.pem"), "UnknownIssuer");
}

#[test]
fn a_certificate_for_another_host_is_refused() {
    refused("tls-name", "wrongname", |pki| pki.mtls("ca.pem"), "certificate not valid for name");
}

#[test]
fn without_a_client_certificate_the_broker_refuses() {
    refused(
        "tls-nocert",
        "server",
        |pki| format!("ca_file = {:?}", pki.path("ca.pem")),
        "cannot connect to broker",
    );
}

#[test]
fn a_private_key_others_can_read_is_refused_with_a_hint() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(tmp.path());
    std::fs::set_permissions(pki.dir.join("client.key"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let (_broker, tls_port) = broker(&pki, "server");
    let fx = Fixture::load("digits").expect("fixture");
    let tls = pki.mtls("ca.pem");
    let mut daemon =
        Daemon::start(&daemon_config("tls-perm", tls_port, &tls, &fx)).expect("daemon");
    let status = daemon.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(!status.success());
    let log = daemon.log();
    assert!(log.contains("readable by group or others") && log.contains("chmod 600"), "{log}");
}

/// A broker that checks passwords (`mosquitto_passwd` file with user `edge`), plus the daemon
/// config reading the password from a systemd credential.
fn password_broker(dir: &Path) -> Mosquitto {
    let pw = dir.join("passwd");
    let bin = ["/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto_passwd (Debian package mosquitto)");
    let out = std::process::Command::new(bin)
        .args(["-b", "-c"])
        .arg(&pw)
        .args(["edge", "s3cret-pass"])
        .output()
        .expect("mosquitto_passwd");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Mosquitto::start_with(free_port(), &format!("password_file {}\n", pw.display()))
        .expect("mosquitto")
}

fn credential_daemon(broker: &Mosquitto, device: &str, creds: &Path) -> Daemon {
    let fx = Fixture::load("digits").expect("fixture");
    let cfg = edgeinfer_tests::config(
        broker.port,
        device,
        &fx.pipeline("digits", "c/+/in", "c/{1}/out", ""),
    )
    .replace(
        "[broker]\n",
        "[broker]\nusername = \"edge\"\npassword_credential = \"broker-password\"\n",
    );
    Daemon::start_with_env(&cfg, &[("CREDENTIALS_DIRECTORY", creds.display().to_string())])
        .expect("daemon")
}

#[test]
fn a_password_from_a_systemd_credential_authenticates_and_a_wrong_one_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let broker = password_broker(tmp.path());
    let creds = tmp.path().join("creds");
    std::fs::create_dir(&creds).expect("mkdir");
    let secret = creds.join("broker-password");
    std::fs::write(&secret, "s3cret-pass\n").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    let daemon = credential_daemon(&broker, "cred-ok", &creds);
    wait_health(broker.port, "cred-ok", Duration::from_secs(30), |v| v["status"] == "online")
        .unwrap_or_else(|e| panic!("never online with the credential: {e}\n{}", daemon.log()));
    assert!(!daemon.log().contains("s3cret-pass"), "the password never appears in the log");
    drop(daemon);

    // A wrong password: refused by the broker, retried, never online, never logged.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(&secret, "wrong-pass\n").expect("write");
    let mut daemon = credential_daemon(&broker, "cred-bad", &creds);
    daemon.wait_log("cannot connect to broker", Duration::from_secs(20)).expect("refusal logged");
    // Refused again at the next attempt: it keeps retrying.
    let refusals = || broker.log().matches("disconnected, not authorised").count();
    assert!(
        eventually(Duration::from_secs(20), || refusals() >= 2),
        "no second attempt: {}",
        broker.log()
    );
    assert!(daemon.is_running(), "keeps retrying");
    assert!(!daemon.log().contains("wrong-pass"));
    assert!(
        wait_health(broker.port, "cred-bad", Duration::from_secs(2), |v| v["status"] == "online")
            .is_err()
    );
}

#[test]
fn a_password_file_others_can_read_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let broker = password_broker(tmp.path());
    let pw = tmp.path().join("broker-password");
    std::fs::write(&pw, "s3cret-pass\n").expect("write");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let fx = Fixture::load("digits").expect("fixture");
    let cfg = edgeinfer_tests::config(
        broker.port,
        "pw-perm",
        &fx.pipeline("digits", "c/+/in", "c/{1}/out", ""),
    )
    .replace(
        "[broker]\n",
        &format!("[broker]\nusername = \"edge\"\npassword_file = {:?}\n", pw.display().to_string()),
    );
    let mut daemon = Daemon::start(&cfg).expect("daemon");
    assert!(!daemon.wait_exit(Duration::from_secs(20)).expect("exits").success());
    let log = daemon.log();
    assert!(log.contains("password file") && log.contains("chmod 600"), "{log}");
}
