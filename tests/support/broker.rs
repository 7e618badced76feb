//! A real mosquitto broker per test on a free loopback port, and the port bookkeeping that
//! keeps tests from taking each other's ports.

use std::collections::BTreeSet;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::eventually;

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
