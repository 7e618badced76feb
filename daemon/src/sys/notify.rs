//! systemd's notification protocol (`sd_notify`): `READY=1`, `STATUS=`, `WATCHDOG=1`,
//! `STOPPING=1`, `RELOADING=1`, over the datagram socket named by `$NOTIFY_SOCKET` (a path, or
//! an abstract socket when it starts with `@`). No libsystemd: it is one `sendto`.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to the service manager; does nothing when not started by one.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; disabled when unset or unusable (logged by the caller).
    pub fn from_env() -> io::Result<Notifier> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(Notifier { target: None }),
            Some(p) => Self::connect(&p.to_string_lossy()),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    pub fn connect(path: &str) -> io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(path)?,
        };
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier { target: Some((sock, addr)) })
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one message (newline-separated assignments).
    pub fn send(&self, state: &str) -> io::Result<()> {
        match &self.target {
            Some((sock, addr)) => sock.send_to_addr(state.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }

    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={}\nMAINPID={}", one_line(status), std::process::id()))
    }

    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}", one_line(status)))
    }

    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }

    pub fn stopping(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }

    /// `RELOADING=1` with the monotonic timestamp systemd >= 253 asks for.
    pub fn reloading(&self) -> io::Result<()> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}"))
    }
}

/// `STATUS=` is one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The watchdog period systemd expects pings within (`$WATCHDOG_USEC`), if it is meant for this
/// process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_period() -> Option<Duration> {
    watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
    )
}

fn watchdog_from(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let us: u64 = usec?.trim().parse().ok()?;
    (us > 0).then(|| Duration::from_micros(us))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_on_the_socket() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::connect(path.to_str().expect("utf8")).expect("connect");
        assert!(n.enabled());
        n.ready("2 pipelines\nok").expect("send");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).expect("recv");
        let msg = std::str::from_utf8(&buf[..len]).expect("utf8");
        assert!(msg.starts_with("READY=1\nSTATUS=2 pipelines ok\nMAINPID="), "{msg}");
        n.watchdog().expect("send");
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn abstract_sockets_work() {
        let name = format!("edgeinfer-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let server = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("addr"),
        )
        .expect("bind");
        Notifier::connect(&format!("@{name}")).expect("connect").stopping("bye").expect("send");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=bye");
    }

    #[test]
    fn watchdog_period_honours_pid() {
        let me = std::process::id().to_string();
        assert_eq!(watchdog_from(Some("3000000"), None), Some(Duration::from_secs(3)));
        assert_eq!(watchdog_from(Some("3000000"), Some(&me)), Some(Duration::from_secs(3)));
        assert_eq!(watchdog_from(Some("3000000"), Some("1")), None, "meant for another process");
        assert_eq!(watchdog_from(None, None), None);
        assert_eq!(watchdog_from(Some("0"), None), None);
    }
}
