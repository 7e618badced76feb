//! The `edgeinfer` binary under test: one-shot subcommands, the daemon as a child process,
//! its configuration, and waiting for its health message.

use std::fs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{Mosquitto, MqttClient, eventually, free_port};

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

/// A broker, and a daemon configured with `pipelines` as `device`, already online.
pub fn start_daemon(device: &str, pipelines: &str) -> (Mosquitto, Daemon) {
    start_daemon_with_broker(device, pipelines, "")
}

/// [`start_daemon`] with extra `[broker]` keys (`key = value` lines).
pub fn start_daemon_with_broker(device: &str, pipelines: &str, keys: &str) -> (Mosquitto, Daemon) {
    let broker = Mosquitto::start().expect("mosquitto");
    let cfg = config(broker.port, device, pipelines)
        .replace("[broker]\n", &format!("[broker]\n{keys}\n"));
    let daemon = Daemon::start(&cfg).expect("daemon");
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
