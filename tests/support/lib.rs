//! Test harness for edgeinfer's integration tests: a real mosquitto broker on a free loopback
//! port per test, the real `edgeinfer` binary as a child process, a real MQTT client, and the
//! fixture models with their onnxruntime reference outputs.
//!
//! Nothing here fakes a broker or a model. Fault injection (killing the broker, signals) is done
//! to real processes and is named as such at the call site.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// Repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Polls `cond` until it holds or `timeout` passes (instead of sleeping a fixed time).
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `assert!` with polling: fails with the message if the condition does not hold in time.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr, $($msg:tt)+) => {
        assert!($crate::eventually($timeout, || $cond), $($msg)+)
    };
}

/// Ports of this process's live brokers. A test that restarts its broker leaves the port free
/// for a moment; `free_port` must not hand it to another test then, or the restarted broker
/// cannot bind and the first test's daemon talks to the second test's broker.
static BROKER_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free TCP port on 127.0.0.1 (mosquitto's `listener 0` would mean a unix socket), never one
/// of this process's brokers.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        if !BROKER_PORTS.lock().unwrap_or_else(|e| e.into_inner()).contains(&port) {
            return port;
        }
    }
}

fn find_mosquitto() -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join("mosquitto");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "mosquitto not found; install it (Debian: apt-get install mosquitto) or run tools/test.sh"
    )
}

/// A real mosquitto broker on a free loopback port, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra configuration appended after the plain listener (e.g. a TLS listener).
    extra: String,
    /// Sessions and queued messages saved to disk (survive `restart_graceful`).
    persistent: bool,
}

impl Mosquitto {
    pub fn start() -> Result<Self> {
        // A free port can be taken by someone else before mosquitto binds it: try another.
        let mut last = None;
        for _ in 0..5 {
            match Self::start_on(free_port()) {
                Ok(m) => return Ok(m),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no broker started")))
    }

    pub fn start_on(port: u16) -> Result<Self> {
        Self::start_with(port, "")
    }

    /// A broker with a plain listener on `port` (for the tests' own clients) and `extra`
    /// configuration after it, such as another listener with TLS settings.
    pub fn start_with(port: u16, extra: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut m =
            Mosquitto { port, dir, child: None, extra: extra.to_string(), persistent: false };
        BROKER_PORTS.lock().unwrap_or_else(|e| e.into_inner()).insert(port);
        m.spawn()?;
        Ok(m)
    }

    /// A broker that saves sessions and queued messages in its directory, as a production
    /// broker does: a graceful restart keeps every client's session.
    pub fn start_persistent() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut m = Mosquitto {
            port: free_port(),
            dir,
            child: None,
            extra: String::new(),
            persistent: true,
        };
        BROKER_PORTS.lock().unwrap_or_else(|e| e.into_inner()).insert(m.port);
        m.spawn()?;
        Ok(m)
    }

    /// The broker's scratch directory (for certificates and such it should read).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) -> Result<()> {
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistent {
            format!("persistence true\npersistence_location {}/\n", self.dir.path().display())
        } else {
            "persistence false\n".to_string()
        };
        let mut text = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\n{persistence}max_queued_messages 10000\n",
            self.port
        );
        if nix::unistd::geteuid().is_root() {
            // Otherwise mosquitto tries to drop to a `mosquitto` user that may not exist.
            text.push_str("user root\n");
        }
        text.push_str(&self.extra);
        fs::write(&conf, text)?;
        let log = fs::File::create(self.dir.path().join("mosquitto.log"))?;
        let child = Command::new(find_mosquitto()?)
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning mosquitto")?;
        self.child = Some(child);
        let port = self.port;
        // Our own broker, not another one that took the port first (another test, or another
        // test suite running on the same machine): it says it is running and is still alive.
        let mut exited = None;
        let up = eventually(Duration::from_secs(10), || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                exited = Some(status);
                return true;
            }
            self.log().contains(" running") && TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if let Some(status) = exited {
            self.child = None;
            bail!("mosquitto exited ({status}) instead of listening on {port}: {}", self.log());
        }
        if !up {
            bail!("mosquitto did not listen on {port}: {}", self.log());
        }
        Ok(())
    }

    /// Fault injection: kill the broker (SIGKILL), dropping every connection and session.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fault injection: kill and start again on the same port (sessions are lost:
    /// `persistence false`).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Fault injection: stop the broker with SIGTERM (it saves its database when persistent),
    /// then start it again on the same port.
    pub fn restart_graceful(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        self.spawn()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        BROKER_PORTS.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.port);
    }
}

/// Path of the `edgeinfer` binary under test: `EDGEINFER_BIN`, else next to this test binary
/// (`target/<profile>/edgeinfer`; build it first with `cargo build -p edgeinfer`).
pub fn edgeinfer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGEINFER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/integration-<hash> -> target/<profile>/edgeinfer
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("edgeinfer")).unwrap_or_default();
    assert!(
        bin.exists(),
        "{} not found; run `cargo build -p edgeinfer` first (tools/test.sh does)",
        bin.display()
    );
    bin
}

/// A command running the binary under test, through `EDGEINFER_RUNNER` when set (e.g.
/// `qemu-aarch64-static` for the static aarch64 build).
fn edgeinfer_command() -> Command {
    match std::env::var_os("EDGEINFER_RUNNER").filter(|r| !r.is_empty()) {
        Some(runner) => {
            let mut c = Command::new(runner);
            c.arg(edgeinfer_bin());
            c
        }
        None => Command::new(edgeinfer_bin()),
    }
}

/// Max |a-b| allowed relative to max(1, max|ref|): 1e-4, or `EDGEINFER_TOLERANCE` (other
/// architectures' kernels round differently).
pub fn tolerance() -> f64 {
    std::env::var("EDGEINFER_TOLERANCE").ok().and_then(|t| t.parse().ok()).unwrap_or(1e-4)
}

/// Runs an `edgeinfer` subcommand to completion.
pub fn edgeinfer(args: &[&str]) -> Output {
    edgeinfer_command()
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap_or_else(|e| panic!("cannot run edgeinfer: {e}"))
}

/// `edgeinfer validate --config CFG --models`: (exit code, stderr).
pub fn validate_models(cfg: &Path) -> (Option<i32>, String) {
    let out = edgeinfer(&["validate", "--config", cfg.to_str().expect("utf8 path"), "--models"]);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The daemon as a child process with its own config and log file. Killed on drop.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// Writes `config` (TOML) into a fresh directory and starts `edgeinfer run` on it.
    pub fn start(config: &str) -> Result<Self> {
        Self::start_with_env(config, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn start_with_env(config: &str, env: &[(&str, String)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("edgeinfer.toml");
        fs::write(&path, config)?;
        let log = fs::File::create(dir.path().join("daemon.log"))?;
        let mut cmd = edgeinfer_command();
        cmd.args(["run", "--config"])
            .arg(&path)
            .env("EDGEINFER_LOG", "debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("spawning edgeinfer")?;
        Ok(Daemon { dir, config: path, child: Some(child), status: None })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Waits until the daemon's log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        if eventually(timeout, || self.log().contains(needle)) {
            Ok(())
        } else {
            bail!("daemon log never contained {needle:?}:\n{}", self.log())
        }
    }

    /// Sends a real signal to the daemon process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Fault injection: SIGKILL, no chance to say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            self.status = c.wait().ok();
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().ok_or_else(|| anyhow!("not running"))?;
        loop {
            if let Some(s) = child.try_wait()? {
                self.status = Some(s);
                self.child = None;
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("daemon did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}\n--- end ---", self.log());
        }
    }
}

/// A received MQTT message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

impl Msg {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!("non-JSON payload on {}: {e}: {:?}", self.topic, self.payload)
        })
    }
}

/// A real MQTT client (rumqttc) for devices and observers in tests.
pub struct MqttClient {
    client: Client,
    rx: Receiver<Msg>,
    acks: Arc<Mutex<Acks>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Acks {
    suback: u64,
    puback: u64,
    connected: bool,
}

impl MqttClient {
    pub fn connect(port: u16, id: &str) -> Result<Self> {
        Self::connect_with(port, id, true)
    }

    /// A client with a persistent session (`clean_session = false`): across a broker restart
    /// it resends unacknowledged publishes and the broker keeps its subscriptions.
    pub fn connect_persistent(port: u16, id: &str) -> Result<Self> {
        Self::connect_with(port, id, false)
    }

    fn connect_with(port: u16, id: &str, clean: bool) -> Result<Self> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(clean);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(16 << 20, 16 << 20);
        o.set_inflight(1000);
        let (client, mut conn) = Client::new(o, 10_000);
        let (tx, rx) = mpsc::channel();
        let acks = Arc::new(Mutex::new(Acks::default()));
        let a2 = Arc::clone(&acks);
        let thread = std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            retain: p.retain,
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        a2.lock().map(|mut a| a.suback += 1).unwrap_or(())
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a2.lock().map(|mut a| a.puback += 1).unwrap_or(())
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        a2.lock().map(|mut a| a.connected = true).unwrap_or(())
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        let c = MqttClient { client, rx, acks, thread: Some(thread) };
        if !eventually(Duration::from_secs(10), || c.acks.lock().is_ok_and(|a| a.connected)) {
            bail!("test client {id} could not connect to 127.0.0.1:{port}");
        }
        Ok(c)
    }

    /// Subscribes and waits for the broker's SUBACK, so nothing published afterwards is missed.
    pub fn subscribe(&self, filter: &str) -> Result<()> {
        self.subscribe_qos(filter, QoS::AtLeastOnce)
    }

    /// `subscribe` with a chosen QoS.
    pub fn subscribe_qos(&self, filter: &str, qos: QoS) -> Result<()> {
        let before = self.acks.lock().map(|a| a.suback).unwrap_or(0);
        self.client.subscribe(filter, qos)?;
        if !eventually(Duration::from_secs(10), || {
            self.acks.lock().is_ok_and(|a| a.suback > before)
        }) {
            bail!("no SUBACK for {filter}");
        }
        Ok(())
    }

    pub fn publish(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
    ) -> Result<()> {
        self.client.publish(topic, qos, retain, payload)?;
        Ok(())
    }

    /// Number of PUBACKs received so far (QoS 1 publishes confirmed by the broker).
    pub fn pubacks(&self) -> u64 {
        self.acks.lock().map(|a| a.puback).unwrap_or(0)
    }

    /// Next message, or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Msg> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Collects messages until `done` says enough, or fails after `timeout`.
    pub fn collect_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Msg]) -> bool,
    ) -> Result<Vec<Msg>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !done(&out) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let topics: Vec<&str> = out.iter().map(|m| m.topic.as_str()).collect();
                bail!("timed out after {timeout:?} with {} message(s): {topics:?}", out.len());
            }
            if let Some(m) = self.recv(left.min(Duration::from_millis(200))) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Waits for the first message on `topic` whose JSON satisfies `pred`.
    pub fn wait_json(
        &self,
        topic: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no matching message on {topic} within {timeout:?}");
            }
            if let Some(m) = self.recv(left)
                && m.topic == topic
            {
                let v = m.json();
                if pred(&v) {
                    return Ok(v);
                }
            }
        }
    }
}

impl Drop for MqttClient {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            // The connection thread exits once DISCONNECT is written (or the broker is gone).
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Tensor metadata from a fixture's `meta.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Meta {
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
    pub samples: usize,
}

/// One fixture sample: input bytes by name and reference outputs (as f64) by name.
#[derive(Debug, Clone)]
pub struct Sample {
    pub inputs: BTreeMap<String, Vec<u8>>,
    pub outputs: BTreeMap<String, Vec<f64>>,
}

/// A fixture model case under `tests/fixtures/models/<name>`.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: String,
    pub dir: PathBuf,
    pub meta: Meta,
    pub samples: Vec<Sample>,
}

fn decode(dtype: &str, b: &[u8]) -> Vec<f64> {
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    match dtype {
        "f32" => chunks::<4>(b).map(|a| f32::from_le_bytes(a) as f64).collect(),
        "f64" => chunks::<8>(b).map(f64::from_le_bytes).collect(),
        "i64" => chunks::<8>(b).map(|a| i64::from_le_bytes(a) as f64).collect(),
        "i32" => chunks::<4>(b).map(|a| i32::from_le_bytes(a) as f64).collect(),
        "u8" => b.iter().map(|x| *x as f64).collect(),
        other => panic!("fixture dtype {other} not handled by the test harness"),
    }
}

impl Fixture {
    pub fn load(name: &str) -> Result<Self> {
        let dir = fixtures().join("models").join(name);
        let meta: Meta = serde_json::from_slice(&fs::read(dir.join("meta.json"))?)?;
        let mut samples = Vec::new();
        for i in 0..meta.samples {
            let sdir = dir.join(format!("samples/{i:03}"));
            let mut inputs = BTreeMap::new();
            for t in &meta.inputs {
                inputs
                    .insert(t.name.clone(), fs::read(sdir.join(format!("input.{}.bin", t.name)))?);
            }
            let mut outputs = BTreeMap::new();
            for t in &meta.outputs {
                let b = fs::read(sdir.join(format!("output.{}.bin", t.name)))?;
                outputs.insert(t.name.clone(), decode(&t.dtype, &b));
            }
            samples.push(Sample { inputs, outputs });
        }
        Ok(Fixture { name: name.into(), dir, meta, samples })
    }

    pub fn model_path(&self) -> PathBuf {
        self.dir.join("model.onnx")
    }

    /// A `[pipelines.NAME]` table serving this fixture on `input`, results on `output`, plus
    /// `extra` TOML lines (keys of the pipeline table, then any sub-tables).
    pub fn pipeline(&self, name: &str, input: &str, output: &str, extra: &str) -> String {
        // EDGEINFER_TEST_PRECISION (test-only knob): pins `precision` for every fixture pipeline,
        // so tools/test-aarch64.sh can run the same tests once in f32 and once as `auto` picks
        // (f16 under qemu -cpu max).
        let precision = match std::env::var("EDGEINFER_TEST_PRECISION") {
            Ok(p) if !p.is_empty() && !extra.contains("precision =") => {
                format!("precision = {p:?}\n")
            }
            _ => String::new(),
        };
        format!(
            "[pipelines.{name}]\nmodel = {:?}\ninput = {input:?}\noutput = {output:?}\n{precision}{extra}\n",
            self.model_path().display().to_string()
        )
    }

    /// A sample as a JSON frame: `data` for single-input models, named `inputs` otherwise.
    pub fn json_frame(&self, sample: usize, seq: u64) -> String {
        let s = &self.samples[sample];
        let value = |t: &TensorMeta| -> Value {
            let vals = decode(&t.dtype, &s.inputs[&t.name]);
            if t.dtype.starts_with('f') {
                Value::from(vals)
            } else {
                Value::from(vals.into_iter().map(|v| v as i64).collect::<Vec<_>>())
            }
        };
        let v = if self.meta.inputs.len() == 1 {
            serde_json::json!({"seq": seq, "ts": 1.0e12, "data": value(&self.meta.inputs[0])})
        } else {
            let named: serde_json::Map<String, Value> =
                self.meta.inputs.iter().map(|t| (t.name.clone(), value(t))).collect();
            serde_json::json!({"seq": seq, "inputs": named})
        };
        v.to_string()
    }

    /// Checks a result message's outputs against the reference: every output present with the
    /// right shape, and max |a-b| <= tolerance() * max(1, max|ref|).
    pub fn check_result(&self, sample: usize, result: &Value) -> Result<()> {
        let outs = result["outputs"].as_array().ok_or_else(|| anyhow!("no outputs in {result}"))?;
        for t in &self.meta.outputs {
            let o = outs
                .iter()
                .find(|o| o["name"] == t.name.as_str())
                .ok_or_else(|| anyhow!("output {} missing", t.name))?;
            let shape: Vec<usize> = serde_json::from_value(o["shape"].clone())?;
            if shape != t.shape {
                bail!("output {} shape {:?} != {:?}", t.name, shape, t.shape);
            }
            let got: Vec<f64> = o["data"]
                .as_array()
                .ok_or_else(|| anyhow!("no data"))?
                .iter()
                .map(|x| x.as_f64().unwrap_or(f64::NAN))
                .collect();
            let want = &self.samples[sample].outputs[&t.name];
            if got.len() != want.len() {
                bail!("output {} has {} values, want {}", t.name, got.len(), want.len());
            }
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
            let tol = tolerance() * scale;
            if worst.is_nan() || worst > tol {
                bail!(
                    "{} sample {sample} output {}: max abs diff {worst} > {tol}",
                    self.name,
                    t.name
                );
            }
        }
        Ok(())
    }
}

/// A broker, and a daemon configured with `pipelines` as `device`, already online.
pub fn start_daemon(device: &str, pipelines: &str) -> (Mosquitto, Daemon) {
    let broker = Mosquitto::start().expect("mosquitto");
    let daemon = Daemon::start(&config(broker.port, device, pipelines)).expect("daemon");
    wait_online(broker.port, device);
    (broker, daemon)
}

/// A minimal daemon config for one pipeline, for tests to extend.
pub fn config(port: u16, device: &str, pipelines: &str) -> String {
    format!(
        r#"
device_id = "{device}"
[broker]
host = "127.0.0.1"
port = {port}
client_id = "edgeinfer-test-{device}"
keepalive = "10s"
reconnect_min = "100ms"
reconnect_max = "500ms"
[health]
interval = "1s"
[metrics]
interval = "1s"
[shutdown]
grace = "20s"
[system]
# The tests run as whatever user CI has, often root.
allow_root = true
{pipelines}
"#
    )
}

/// Waits for a retained/periodic health message of `device` that satisfies `pred`, using a
/// throw-away client (so result collectors never see health messages).
pub fn wait_health(
    port: u16,
    device: &str,
    timeout: Duration,
    pred: impl FnMut(&Value) -> bool,
) -> Result<Value> {
    let c = MqttClient::connect(port, &format!("health-watch-{device}-{}", free_port()))?;
    let topic = format!("edgeinfer/{device}/health");
    c.subscribe(&topic)?;
    c.wait_json(&topic, timeout, pred)
}

/// Waits until `device` reports itself online.
pub fn wait_online(port: u16, device: &str) -> Value {
    wait_health(port, device, Duration::from_secs(60), |v| v["status"] == "online")
        .unwrap_or_else(|e| panic!("{device} never came online: {e}"))
}

/// A stand-in for systemd's notification socket: a unix datagram socket the test reads.
pub struct NotifySocket {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    sock: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    pub fn bind() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
        Ok(NotifySocket { _dir: dir, path, sock })
    }

    /// The next message, or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).ok()?;
        let mut buf = vec![0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one contains `needle` (returned last), or an error after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(m) = self.recv(deadline.saturating_duration_since(Instant::now())) {
                let done = m.contains(needle);
                seen.push(m);
                if done {
                    return Ok(seen);
                }
            }
        }
        bail!("no notification containing {needle:?} within {timeout:?}; got {seen:?}")
    }

    /// Everything that arrives during `d`.
    pub fn collect_for(&self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(m) = self.recv(deadline.saturating_duration_since(Instant::now())) {
                seen.push(m);
            }
        }
        seen
    }
}

/// Threads of a process: (tid, name, text of its status file).
pub fn threads(pid: i32) -> Vec<(i32, String, String)> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) {
        for e in entries.flatten() {
            let tid: i32 = e.file_name().to_string_lossy().parse().unwrap_or(0);
            let comm =
                fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string();
            let status = fs::read_to_string(e.path().join("status")).unwrap_or_default();
            out.push((tid, comm, status));
        }
    }
    out
}

/// One field of a `/proc/*/status` text, trimmed.
pub fn status_field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| l.strip_prefix(&format!("{key}:")).map(|v| v.trim().to_string()))
}

/// CPUs this test process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| (0..CpuSet::count()).filter(|c| set.is_set(*c).unwrap_or(false)).collect())
        .unwrap_or_default()
}

/// Fault injection: a TCP proxy between the daemon and a real broker that can cut, reset,
/// stall, slow down or refuse connections. Everything else is forwarded byte for byte.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ProxyMode {
    Pass,
    /// Connections stay open, nothing is forwarded.
    Stall,
    /// At most this many bytes per second in each direction.
    Slow(usize),
    /// New connections are closed at once (the broker looks down).
    Refuse,
}

struct ProxyShared {
    mode: Mutex<ProxyMode>,
    conns: Mutex<Vec<TcpStream>>,
    stop: std::sync::atomic::AtomicBool,
    accepted: std::sync::atomic::AtomicU64,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let shared = Arc::new(ProxyShared {
            mode: Mutex::new(ProxyMode::Pass),
            conns: Mutex::new(Vec::new()),
            stop: std::sync::atomic::AtomicBool::new(false),
            accepted: std::sync::atomic::AtomicU64::new(0),
        });
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering::Relaxed;
            while !sh.stop.load(Relaxed) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if sh.mode() == ProxyMode::Refuse {
                    drop(down);
                    continue;
                }
                let _ = down.set_nonblocking(false);
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                sh.accepted.fetch_add(1, Relaxed);
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                if let (Ok(d2), Ok(u2), Ok(dk), Ok(uk)) =
                    (down.try_clone(), up.try_clone(), down.try_clone(), up.try_clone())
                {
                    if let Ok(mut c) = sh.conns.lock() {
                        c.push(dk);
                        c.push(uk);
                    }
                    let (a, b) = (Arc::clone(&sh), Arc::clone(&sh));
                    std::thread::spawn(move || a.pump(down, u2));
                    std::thread::spawn(move || b.pump(up, d2));
                }
            }
        });
        Ok(Self { port, shared })
    }

    fn set(&self, m: ProxyMode) {
        if let Ok(mut g) = self.shared.mode.lock() {
            *g = m;
        }
    }

    /// Connections accepted and forwarded so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes every open connection (FIN to both ends).
    pub fn cut(&self) {
        self.close_all(false);
    }

    /// Resets every open connection (RST: SO_LINGER 0).
    pub fn reset(&self) {
        self.close_all(true);
    }

    fn close_all(&self, rst: bool) {
        let conns: Vec<TcpStream> =
            self.shared.conns.lock().map(|mut c| c.drain(..).collect()).unwrap_or_default();
        for c in conns {
            if rst {
                let linger = nix::libc::linger { l_onoff: 1, l_linger: 0 };
                let _ =
                    nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::Linger, &linger);
            }
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Stops forwarding for `d` (connections stay open: only keep-alive can tell).
    pub fn stall(&self, d: Duration) {
        self.set(ProxyMode::Stall);
        std::thread::sleep(d);
        self.set(ProxyMode::Pass);
    }

    /// Forwards at most `bytes_per_sec` per direction for `d`.
    pub fn slow(&self, bytes_per_sec: usize, d: Duration) {
        self.set(ProxyMode::Slow(bytes_per_sec));
        std::thread::sleep(d);
        self.set(ProxyMode::Pass);
    }

    /// Cuts every connection and refuses new ones for `d` (the broker looks down).
    pub fn outage(&self, d: Duration) {
        self.set(ProxyMode::Refuse);
        self.cut();
        std::thread::sleep(d);
        self.set(ProxyMode::Pass);
    }
}

impl ProxyShared {
    fn mode(&self) -> ProxyMode {
        self.mode.lock().map(|m| *m).unwrap_or(ProxyMode::Pass)
    }

    /// Copies `from` into `to` until either side closes, obeying the current mode.
    fn pump(&self, mut from: TcpStream, mut to: TcpStream) {
        use std::io::{Read, Write};
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let mode = self.mode();
            if mode == ProxyMode::Stall {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let max = match mode {
                ProxyMode::Slow(bps) => (bps / 20).clamp(1, buf.len()),
                _ => buf.len(),
            };
            let n = match from.read(&mut buf[..max]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Data read before a stall began is held back too.
            while self.mode() == ProxyMode::Stall {
                std::thread::sleep(Duration::from_millis(10));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if let ProxyMode::Slow(_) = mode {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}

/// The books of one pipeline in a health message: `received = served + rejected + dropped +
/// failed + queued + in flight`, every frame accounted for by reason. Returns the sum of
/// rejected frames by reason, for the caller's own checks.
pub fn books_balance(
    health: &Value,
    pipeline: &str,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let p = &health["pipelines"][pipeline];
    let c = &p["counters"];
    let num =
        |v: &Value, what: &str| v.as_u64().ok_or_else(|| anyhow!("{pipeline}: no {what} in {c}"));
    let mut sum = num(&c["served"], "served")?;
    let mut rejected = std::collections::BTreeMap::new();
    for k in ["rejected", "dropped", "failed"] {
        for (reason, n) in c[k].as_object().ok_or_else(|| anyhow!("{pipeline}: no {k}"))? {
            let n = num(n, reason)?;
            sum += n;
            if k == "rejected" && n > 0 {
                rejected.insert(reason.clone(), n);
            }
        }
    }
    sum +=
        p["queue"]["depth"].as_u64().unwrap_or(0) + p["queue"]["in_flight"].as_u64().unwrap_or(0);
    let received = num(&c["received"], "received")?;
    if received != sum {
        bail!(
            "{pipeline}: received {received} != served + rejected + dropped + failed + queued + in flight = {sum}: {c}"
        );
    }
    Ok(rejected)
}
