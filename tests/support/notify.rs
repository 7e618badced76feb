//! A stand-in for systemd's notification socket.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

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
