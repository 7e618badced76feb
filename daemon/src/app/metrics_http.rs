//! The Prometheus scrape endpoint: a minimal HTTP/1.1 server that answers `GET /metrics` with the
//! text exposition.
//!
//! Owns the socket side only: accepting every connection at once, holding at most a limit of them
//! (a new one displaces the oldest that has not sent a request yet, so idle connections can never
//! keep a scraper waiting), reading one request head under a size limit, a first-byte deadline
//! and a head deadline, routing, answering, closing. What the metrics say is the `render`
//! callback's business (built with `telemetry::prometheus`); which address to bind is the
//! caller's (see [`check_bind_address`]).
//!
//! Not hyper: a scrape is one small GET on a fresh connection, and a general HTTP stack would be
//! among the daemon's largest dependencies for it. So: one request per connection
//! (`Connection: close`), no keep-alive, no request bodies, no TLS and no authentication; bind
//! loopback (the default) or put a proxy in front. Nothing a client sends can make it panic or
//! hold more than [`Limits`] allows; client mistakes are logged at debug, since a port scanner
//! or a misconfigured scraper is not something the device's operator can act on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinError, JoinSet};
use tokio::time::{Instant, sleep, timeout_at};

/// Produces the exposition text for one scrape. Called on the runtime, once per `/metrics`
/// request (including `HEAD`, for the `Content-Length`), so it must be quick and not block.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// `Content-Type` of the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How much one client may hold: connections, bytes of request head, time to send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once. Every connection is accepted at once; beyond this many, the
    /// oldest one that has not sent its complete request head is closed to make room (one that
    /// sent nothing at all goes first), so idle or slow clients cannot queue a scraper behind
    /// them.
    pub max_connections: usize,
    /// Largest request head (request line, headers and the blank line) accepted, in bytes.
    pub max_head_bytes: usize,
    /// Time from accepting a connection to its first byte (a scraper sends its request at
    /// once; a connection that stays silent is a port scan or an attack).
    pub first_byte_timeout: Duration,
    /// Time from accepting a connection to having its complete request head; also the time
    /// allowed for writing the response.
    pub read_timeout: Duration,
}

impl Default for Limits {
    /// 32 connections, 8 KiB heads, 1 s to the first byte, 5 s to the whole head: plenty for
    /// Prometheus (one connection per scrape, a head of a few hundred bytes sent at once).
    /// Measured with 200 idle connections held open against the endpoint: a scrape is still
    /// answered at once (tests/integration/hostile.rs).
    fn default() -> Self {
        Self {
            max_connections: 32,
            max_head_bytes: 8 * 1024,
            first_byte_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(5),
        }
    }
}

/// Where a connection stands (for choosing whom to close when the limit is reached).
const SILENT: u8 = 0;
const READING: u8 = 1;
const ANSWERING: u8 = 2;

/// A connection being served.
struct Conn {
    id: tokio::task::Id,
    state: Arc<AtomicU8>,
    abort: AbortHandle,
}

/// Serves scrapes on `listener` with the default [`Limits`] until `shutdown` becomes `true` (or
/// its sender is dropped). See [`serve_with`].
pub async fn serve(listener: TcpListener, render: Render, shutdown: watch::Receiver<bool>) {
    serve_with(listener, render, shutdown, Limits::default()).await;
}

/// Serves scrapes on `listener` until `shutdown` becomes `true` or its sender is dropped (nobody
/// could stop the server any more, so it stops with the daemon's shutdown path). On return the
/// listener is closed and every connection task has ended (ones still in progress are
/// aborted: a scrape has no state worth finishing).
///
/// Routes: `GET`/`HEAD /metrics` -> 200 with [`CONTENT_TYPE`]; `GET`/`HEAD /` -> 200, a pointer
/// to `/metrics`; any other path -> 404; another method on a known path -> 405; a malformed
/// request -> 400; a head over [`Limits::max_head_bytes`] -> 431. Every response closes the
/// connection. Never fails: accept errors (e.g. out of file descriptors) are logged and retried.
pub async fn serve_with(
    listener: TcpListener,
    render: Render,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
) {
    let mut connections = JoinSet::new();
    // Accepted in order, so the front is the oldest.
    let mut live: std::collections::VecDeque<Conn> = std::collections::VecDeque::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            Some(done) = connections.join_next_with_id(), if !connections.is_empty() => {
                let id = match &done {
                    Ok((id, ())) => *id,
                    Err(e) => e.id(),
                };
                live.retain(|c| c.id != id);
                reap(done.map(|_| ()));
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if live.len() >= limits.max_connections.max(1) && !make_room(&mut live) {
                        // Every connection is being answered (a moment each): this one waits
                        // for none of them, it is closed and the client retries.
                        log::debug!("metrics endpoint: {peer} closed, every slot is answering");
                        continue;
                    }
                    let render = Arc::clone(&render);
                    let state = Arc::new(AtomicU8::new(SILENT));
                    let st = Arc::clone(&state);
                    let abort = connections.spawn(async move {
                        handle(stream, peer, render.as_ref(), limits, &st).await;
                    });
                    live.push_back(Conn { id: abort.id(), state, abort });
                }
                // The peer gave up between connecting and our accept: nothing to do.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) => log::debug!("metrics endpoint: accept failed: {e}"),
                // Out of file descriptors or memory: the listener stays usable, so pause and
                // retry rather than end the endpoint; the pause keeps a lasting error from
                // spinning the loop and flooding the log.
                Err(e) => {
                    log::warn!("metrics endpoint: accept failed: {e}; retrying in 1 s");
                    tokio::select! {
                        () = stopped(&mut shutdown) => break,
                        () = sleep(Duration::from_secs(1)) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Closes the oldest connection that has sent nothing, else the oldest still sending its head;
/// false when every connection is being answered.
fn make_room(live: &mut std::collections::VecDeque<Conn>) -> bool {
    let pick = |want: u8| live.iter().position(|c| c.state.load(Ordering::Acquire) == want);
    let Some(i) = pick(SILENT).or_else(|| pick(READING)) else { return false };
    if let Some(c) = live.remove(i) {
        c.abort.abort();
    }
    true
}

/// Resolves once the value is `true` or the sender is gone.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // Err means the sender was dropped: treated as a stop (see `serve_with`).
    let _ = rx.wait_for(|stop| *stop).await;
}

fn reap(done: Result<(), JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        // A bug, not a client's doing; the server goes on with the other connections.
        log::warn!("metrics endpoint: a connection task panicked: {e}");
    }
}

/// Returns a warning for the operator when `addr` is not a loopback address: the endpoint has no
/// authentication, so anything that can reach the address can read the daemon's metrics (which
/// name its pipelines, models and topics). The caller logs it at WARN; binding anyway is
/// allowed, since a firewall or a private network may make it fine.
pub fn check_bind_address(addr: &SocketAddr) -> Option<String> {
    // `to_canonical` so an IPv4-mapped loopback (`[::ffff:127.0.0.1]`) counts as loopback.
    let ip = addr.ip().to_canonical();
    if ip.is_loopback() {
        return None;
    }
    let reach = if ip.is_unspecified() { "on every interface" } else { "beyond this host" };
    Some(format!(
        "metrics endpoint listens on {addr}, reachable {reach}: anyone who can connect can read \
         the daemon's metrics (there is no authentication); hint: bind 127.0.0.1 or [::1] and \
         scrape through a local agent or proxy, or restrict the port with a firewall"
    ))
}

/// Why a request got no 200.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("request head larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("no complete request head within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a complete request head")]
    Closed,
    #[error("cannot read the request: {0}")]
    Io(std::io::Error),
}

/// The parts of a request line that matter here.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    /// Path without the query string.
    path: &'a str,
}

/// A response about to be written.
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    /// Extra header lines, each ending in `\r\n`.
    extra: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        let body = body.to_owned();
        Self { status, reason, content_type: "text/plain; charset=utf-8", extra: "", body }
    }
}

async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    render: &(dyn Fn() -> String + Send + Sync),
    limits: Limits,
    state: &AtomicU8,
) {
    // Without it, Nagle's algorithm can hold the response's last segment until the client's
    // delayed ACK (up to ~40 ms). Failing to set it only costs latency.
    let _ = stream.set_nodelay(true);
    let head = read_head(&mut stream, limits, state).await;
    state.store(ANSWERING, Ordering::Release);
    let (response, head_only) = match head
        .and_then(|h| parse_request(&h).map(|r| route(&r, render)))
    {
        Ok(answer) => answer,
        Err(e) => {
            log::debug!("metrics endpoint: request from {peer} rejected: {e}");
            match e {
                RequestError::TooLarge { .. } => (
                    Response::text(431, "Request Header Fields Too Large", "request too large\n"),
                    false,
                ),
                RequestError::Malformed(_) => {
                    (Response::text(400, "Bad Request", "bad request\n"), false)
                }
                // Nobody is waiting for an answer, or the client is too slow to deserve one.
                RequestError::Timeout(_) | RequestError::Closed | RequestError::Io(_) => return,
            }
        }
    };
    let deadline = Instant::now() + limits.read_timeout;
    match timeout_at(deadline, respond(&mut stream, response, head_only)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("metrics endpoint: cannot write the response to {peer}: {e}"),
        Err(_) => log::debug!(
            "metrics endpoint: response to {peer} not written within {:?}",
            limits.read_timeout
        ),
    }
}

/// Reads until the blank line that ends the head; returns the head including it. The first byte
/// must come within `first_byte_timeout`, the whole head within `read_timeout`. Bytes after it
/// (a body, a pipelined request) are left unread: every connection ends after one response.
async fn read_head(
    stream: &mut TcpStream,
    limits: Limits,
    state: &AtomicU8,
) -> Result<Vec<u8>, RequestError> {
    let start = Instant::now();
    let deadline = start + limits.read_timeout;
    let first_by = (start + limits.first_byte_timeout).min(deadline);
    let limit = limits.max_head_bytes;
    let mut head = Vec::with_capacity(limit.min(1024));
    let mut chunk = [0u8; 1024];
    loop {
        // Never read past the limit, so an accepted head is at most `limit` bytes.
        let room = chunk.len().min(limit.saturating_sub(head.len()));
        if room == 0 {
            return Err(RequestError::TooLarge { limit });
        }
        let (until, waited) = if head.is_empty() {
            (first_by, limits.first_byte_timeout.min(limits.read_timeout))
        } else {
            (deadline, limits.read_timeout)
        };
        let n = match timeout_at(until, stream.read(&mut chunk[..room])).await {
            Ok(read) => read.map_err(RequestError::Io)?,
            Err(_) => return Err(RequestError::Timeout(waited)),
        };
        if n == 0 {
            return Err(RequestError::Closed);
        }
        state.store(READING, Ordering::Release);
        let scanned = head.len();
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head, scanned) {
            head.truncate(end);
            return Ok(head);
        }
    }
}

/// Index just past the blank line ending the head (`\r\n\r\n`, or a bare `\n\n` from a lax client),
/// looking only at terminators that end at or after `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| {
        let ends = buf[i] == b'\n'
            && (i.checked_sub(1).is_some_and(|j| buf[j] == b'\n')
                || i.checked_sub(3).is_some_and(|j| &buf[j..i] == b"\r\n\r"));
        ends.then_some(i + 1)
    })
}

/// Checks the request line (`METHOD SP target SP HTTP/1.x`) and that every header line is
/// `name: value`; headers themselves are not needed.
fn parse_request(head: &[u8]) -> Result<Request<'_>, RequestError> {
    use RequestError::Malformed;

    let mut lines = head.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().ok_or(Malformed("empty request"))?;
    let line = std::str::from_utf8(line).map_err(|_| Malformed("request line is not text"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed("request line is not `METHOD target HTTP/1.x`"));
    };
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if method.is_empty() || !method.chars().all(tchar) {
        return Err(Malformed("bad method"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(Malformed("not HTTP/1.x"));
    }
    // Origin form (`/metrics?x`), or absolute form (`http://host/metrics`) as sent to proxies.
    let path = match target.split_once("://") {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
        {
            rest.find('/').map_or("/", |i| &rest[i..])
        }
        _ if target.starts_with('/') => target,
        _ => return Err(Malformed("bad request target")),
    };
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(Malformed("bad request target"));
    }
    for header in lines.filter(|l| !l.is_empty()) {
        let name_len = header.iter().position(|b| *b == b':');
        let valid = name_len.is_some_and(|n| {
            n > 0 && header[..n].iter().all(|b| b.is_ascii_graphic() && *b != b':')
        });
        if !valid {
            return Err(Malformed("bad header line"));
        }
    }
    Ok(Request { method, path })
}

/// The response for a well-formed request, and whether it is for `HEAD` (no body).
fn route(req: &Request<'_>, render: &(dyn Fn() -> String + Send + Sync)) -> (Response, bool) {
    let head_only = req.method == "HEAD";
    let known = matches!(req.path, "/metrics" | "/");
    if !known {
        return (
            Response::text(404, "Not Found", "not found; metrics are at /metrics\n"),
            head_only,
        );
    }
    if !matches!(req.method, "GET" | "HEAD") {
        let mut r = Response::text(405, "Method Not Allowed", "method not allowed\n");
        r.extra = "Allow: GET, HEAD\r\n";
        return (r, head_only);
    }
    let response = if req.path == "/metrics" {
        Response {
            status: 200,
            reason: "OK",
            content_type: CONTENT_TYPE,
            extra: "",
            body: render(),
        }
    } else {
        Response::text(200, "OK", "edgeinfer: Prometheus metrics are at /metrics\n")
    };
    (response, head_only)
}

/// Writes the response in one buffer, then closes: FIN first, then a short drain of whatever
/// the client still sends (a body, the rest of an oversized head). Closing a socket with unread
/// input makes Linux send a RST at once and discard any of the response still queued, and some
/// client stacks drop received-but-unread data on a RST; either loses the response
/// ("lingering close", as web servers do it).
async fn respond(stream: &mut TcpStream, r: Response, head_only: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        r.status,
        r.reason,
        r.content_type,
        r.body.len(),
        r.extra
    );
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(r.body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 1024];
    let mut drained = 0;
    let drain_until = Instant::now() + Duration::from_secs(1);
    while drained < 64 * 1024 {
        match timeout_at(drain_until, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use super::*;

    const BODY: &str = "# HELP edgeinfer_up Always 1.\n# TYPE edgeinfer_up gauge\nedgeinfer_up 1\n";
    /// Upper bound for anything that should happen promptly.
    const PATIENCE: Duration = Duration::from_secs(5);

    struct Server {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    async fn start(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, rx) = watch::channel(false);
        let render: Render = Arc::new(|| BODY.to_owned());
        let task = tokio::spawn(serve_with(listener, render, rx, limits));
        Server { addr, stop, task }
    }

    /// Sends `request` on a fresh connection and reads until the server closes it.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("send");
        read_all(&mut s).await
    }

    async fn read_all(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        timeout(PATIENCE, s.read_to_end(&mut out)).await.expect("server closes").expect("read");
        String::from_utf8(out).expect("utf-8 response")
    }

    /// Status, headers (lower-cased names) and body of a response.
    fn parse(response: &str) -> (u16, Vec<(String, String)>, &str) {
        let (head, body) = response.split_once("\r\n\r\n").expect("head ends");
        let mut lines = head.split("\r\n");
        let status = lines.next().expect("status line");
        assert!(status.starts_with("HTTP/1.1 "), "{status}");
        let code = status[9..12].parse().expect("status code");
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").expect("header");
                (k.to_ascii_lowercase(), v.to_owned())
            })
            .collect();
        (code, headers, body)
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn metrics_are_served_with_the_exposition_content_type() {
        let srv = start(Limits::default()).await;
        for target in ["/metrics", "/metrics?debug=1", "http://device.local/metrics"] {
            let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\nUser-Agent: test\r\n\r\n");
            let resp = exchange(srv.addr, req.as_bytes()).await;
            let (code, headers, body) = parse(&resp);
            assert_eq!(code, 200, "{target}");
            assert_eq!(
                header(&headers, "content-type"),
                Some("text/plain; version=0.0.4; charset=utf-8")
            );
            assert_eq!(header(&headers, "content-length"), Some(BODY.len().to_string().as_str()));
            assert_eq!(header(&headers, "connection"), Some("close"));
            assert_eq!(body, BODY);
        }
        // HTTP/1.0 and bare-LF clients are answered too.
        let resp = exchange(srv.addr, b"GET /metrics HTTP/1.0\n\n").await;
        assert_eq!(parse(&resp).0, 200);
    }

    #[tokio::test]
    async fn head_gets_the_headers_without_the_body() {
        let srv = start(Limits::default()).await;
        let resp = exchange(srv.addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (code, headers, body) = parse(&resp);
        assert_eq!(code, 200);
        assert_eq!(header(&headers, "content-length"), Some(BODY.len().to_string().as_str()));
        assert_eq!(body, "");
    }

    #[tokio::test]
    async fn index_points_to_metrics_and_other_paths_are_404() {
        let srv = start(Limits::default()).await;
        let resp = exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n").await;
        let (code, _, body) = parse(&resp);
        assert_eq!(code, 200);
        assert!(body.contains("/metrics"));
        for path in ["/metrics/", "/favicon.ico", "/metricsx", "/%2e%2e/etc/passwd"] {
            let req = format!("GET {path} HTTP/1.1\r\n\r\n");
            assert_eq!(parse(&exchange(srv.addr, req.as_bytes()).await).0, 404, "{path}");
        }
    }

    #[tokio::test]
    async fn other_methods_are_405() {
        let srv = start(Limits::default()).await;
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let req = format!("{method} /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
            let resp = exchange(srv.addr, req.as_bytes()).await;
            let (code, headers, _) = parse(&resp);
            assert_eq!(code, 405, "{method}");
            assert_eq!(header(&headers, "allow"), Some("GET, HEAD"));
        }
    }

    #[tokio::test]
    async fn malformed_requests_are_400() {
        let srv = start(Limits::default()).await;
        let garbage: [&[u8]; 9] = [
            b"hello\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"G(T /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n",
            b"\xff\xfe\x00\x01 / HTTP/1.1\r\n\r\n",
        ];
        for req in garbage {
            let resp = exchange(srv.addr, req).await;
            assert_eq!(parse(&resp).0, 400, "{:?}", String::from_utf8_lossy(req));
        }
    }

    #[tokio::test]
    async fn oversized_head_is_431() {
        let srv = start(Limits::default()).await;
        let mut req = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        req.resize(req.len() + 9000, b'a');
        req.extend_from_slice(b"\r\n\r\n");
        let resp = exchange(srv.addr, &req).await;
        assert_eq!(parse(&resp).0, 431);
        // Just under the limit is fine.
        let mut req = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        req.resize(Limits::default().max_head_bytes - 4, b'a');
        req.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse(&exchange(srv.addr, &req).await).0, 200);
    }

    #[tokio::test]
    async fn slow_or_silent_clients_are_dropped_after_the_read_timeout() {
        let limits = Limits { read_timeout: Duration::from_millis(200), ..Limits::default() };
        let srv = start(limits).await;
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        s.write_all(b"GET /metr").await.expect("send");
        assert_eq!(read_all(&mut s).await, "", "closed without a response");
        // A client that connects and leaves is no error either; the server goes on.
        drop(TcpStream::connect(srv.addr).await.expect("connect"));
        assert_eq!(parse(&exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n").await).0, 200);
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_first_byte_timeout() {
        let limits = Limits { first_byte_timeout: Duration::from_millis(200), ..Limits::default() };
        let srv = start(limits).await;
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        let t = Instant::now();
        assert_eq!(read_all(&mut s).await, "", "closed without a response");
        assert!(t.elapsed() < Duration::from_secs(3), "long before the 5 s head deadline");
    }

    /// Regression: 8 idle connections held the 8 slots for 5 s each and a scrape waited in the
    /// listen backlog (4.8 s a scrape; 200 idle connections: 84 s, far past Prometheus' 10 s
    /// scrape timeout).
    #[tokio::test]
    async fn idle_connections_beyond_the_limit_make_room_for_a_scraper() {
        let limits = Limits { max_connections: 4, ..Limits::default() };
        let srv = start(limits).await;
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(TcpStream::connect(srv.addr).await.expect("connect"));
        }
        // A slow client that sent half a head counts as busier than a silent one.
        let mut half = TcpStream::connect(srv.addr).await.expect("connect");
        half.write_all(b"GET /metr").await.expect("send");
        let t = Instant::now();
        let resp = timeout(PATIENCE, exchange(srv.addr, b"GET /metrics HTTP/1.1\r\n\r\n"))
            .await
            .expect("answered");
        assert_eq!(parse(&resp).0, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "answered at once: {:?}", t.elapsed());
        // The connections beyond the limit were closed: reading one gives EOF at once.
        let mut closed = 0;
        for s in idle.iter_mut().take(50) {
            let mut b = [0u8; 1];
            if matches!(
                timeout(Duration::from_millis(100), s.read(&mut b)).await,
                Ok(Ok(0) | Err(_))
            ) {
                closed += 1;
            }
        }
        assert!(closed >= 45, "the oldest idle connections were closed: {closed} of 50");
    }

    #[tokio::test]
    async fn shutdown_makes_serve_return() {
        let srv = start(Limits::default()).await;
        // An open connection does not hold the server up.
        let _idle = TcpStream::connect(srv.addr).await.expect("connect");
        assert_eq!(parse(&exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n").await).0, 200);
        srv.stop.send_replace(true);
        timeout(PATIENCE, srv.task).await.expect("serve returns").expect("no panic");
        assert!(TcpStream::connect(srv.addr).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn dropping_the_shutdown_sender_makes_serve_return() {
        let srv = start(Limits::default()).await;
        drop(srv.stop);
        timeout(PATIENCE, srv.task).await.expect("serve returns").expect("no panic");
    }

    #[test]
    fn request_lines_are_parsed() {
        fn ok(head: &[u8]) -> Result<Request<'_>, String> {
            parse_request(head).map_err(|e| e.to_string())
        }
        assert_eq!(
            ok(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a:1\r\n\r\n"),
            Ok(Request { method: "GET", path: "/metrics" })
        );
        assert_eq!(
            ok(b"HEAD https://h:9/ HTTP/1.0\r\n\r\n"),
            Ok(Request { method: "HEAD", path: "/" })
        );
        assert_eq!(ok(b"GET http://h HTTP/1.1\r\n\r\n"), Ok(Request { method: "GET", path: "/" }));
        assert!(ok(b"GET /a\x01b HTTP/1.1\r\n\r\n").is_err());
        assert!(ok(b"").is_err());
    }

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody", 0), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        // A terminator split across reads is found when scanning only the new bytes.
        let buf = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(head_end(buf, buf.len() - 1), Some(buf.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser() {
        // Deterministic pseudo-random heads biased towards the characters that matter.
        let alphabet = b"GETHAD /:?\r\n\x00\xffhttp1.0";
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut head = Vec::new();
            for _ in 0..(x % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                head.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            x = x.wrapping_add(1);
            let _ = head_end(&head, 0);
            let _ = parse_request(&head);
        }
    }

    #[test]
    fn non_loopback_binds_get_a_warning() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("address");
        for quiet in ["127.0.0.1:9464", "127.1.2.3:9464", "[::1]:9464", "[::ffff:127.0.0.1]:9464"] {
            assert_eq!(check_bind_address(&addr(quiet)), None, "{quiet}");
        }
        let all = check_bind_address(&addr("0.0.0.0:9464")).expect("warning");
        assert!(all.contains("every interface") && all.contains("hint:"), "{all}");
        assert!(check_bind_address(&addr("[::]:9464")).is_some());
        let lan = check_bind_address(&addr("192.168.1.20:9464")).expect("warning");
        assert!(lan.contains("192.168.1.20:9464") && lan.contains("beyond this host"), "{lan}");
    }
}
