//! Fault injection: a TCP proxy between the daemon and a real broker.

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

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
