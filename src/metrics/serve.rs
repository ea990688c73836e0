//! The HTTP endpoint: `/metrics` and `/health` on a small, bounded HTTP/1.1 server.
//!
//! Written on std's `TcpListener` rather than an HTTP crate: `tiny_http` starts a thread per
//! waiting connection with no cap, and has no limit on the request head nor a deadline for
//! reading it, which are the bounds this endpoint needs. The whole server is one accepting
//! thread and [`WORKERS`] serving threads; a connection waits in a queue of [`QUEUE`]
//! places, beyond which it is closed at once. Each connection gets one request: its head is
//! capped at [`MAX_HEAD`] bytes and must arrive within [`IO_TIMEOUT`], bodies are discarded,
//! and every answer closes the connection. Rendering happens on the serving thread, so a
//! scrape never holds up the job loop for more than the copy of a few counters.

use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{Metrics, MetricsError, CONTENT_TYPE};

/// Threads that answer requests.
pub const WORKERS: usize = 2;
/// Accepted connections that may wait for a worker; more are closed unanswered.
pub const QUEUE: usize = 8;
/// Largest request line plus headers; a larger head is answered 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head, and that a write may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a worker blocked on a slow client looks whether the server is stopping.
const SLICE: Duration = Duration::from_millis(200);
/// What is read and thrown away from a client still sending after its answer.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// The running endpoint. Dropping it (or [`MetricsServer::shutdown`]) closes the listening
/// socket and stops its threads.
#[derive(Debug)]
pub struct MetricsServer {
    local: SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

/// Binds `address` (`None` or `""`: all IPv4 interfaces, as the Python agent; `::` for all
/// IPv6 ones (and IPv4 where the system maps them); an IP address, `[v6]`, or a host name,
/// whose first address is used) on `port` (0: any free port, see
/// [`MetricsServer::local_port`]), then serves `metrics` on a thread of its own. The bind
/// happens before this returns, so a port in use fails start-up with a message naming the
/// process that holds it.
pub fn serve(
    metrics: &'static Metrics,
    address: Option<&str>,
    port: u16,
) -> Result<MetricsServer, MetricsError> {
    let wanted = resolve(address, port)?;
    let listener = TcpListener::bind(wanted).map_err(|err| bind_error(wanted, &err))?;
    let local = listener
        .local_addr()
        .map_err(|err| bind_error(wanted, &err))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let (queue, waiting) = mpsc::sync_channel::<TcpStream>(QUEUE);
    let waiting = Arc::new(Mutex::new(waiting));

    let mut workers = Vec::with_capacity(WORKERS);
    for n in 0..WORKERS {
        let waiting = Arc::clone(&waiting);
        let stopping = Arc::clone(&stopping);
        let worker = thread::Builder::new()
            .name(format!("metrics-{n}"))
            .spawn(move || work(metrics, &waiting, &stopping))
            .map_err(MetricsError::Thread)?;
        workers.push(worker);
    }
    let acceptor = {
        let stopping = Arc::clone(&stopping);
        thread::Builder::new()
            .name("metrics-accept".to_string())
            .spawn(move || accept(&listener, &queue, &stopping))
            .map_err(MetricsError::Thread)?
    };
    Ok(MetricsServer {
        local,
        stopping,
        acceptor: Some(acceptor),
        workers,
    })
}

/// Whether [`serve`] could bind `address` and `port` now: binds and closes at once
/// (`check-config`). The error is the one start-up would give, naming a port's holder.
pub fn check_port(address: Option<&str>, port: u16) -> Result<SocketAddr, MetricsError> {
    let wanted = resolve(address, port)?;
    let listener = TcpListener::bind(wanted).map_err(|err| bind_error(wanted, &err))?;
    listener
        .local_addr()
        .map_err(|err| bind_error(wanted, &err))
}

impl MetricsServer {
    /// The address and port actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The port actually bound (the ephemeral one when 0 was asked for).
    pub fn local_port(&self) -> u16 {
        self.local.port()
    }

    /// Stops serving and closes the port; a request being answered is cut short within a
    /// fraction of a second.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // The acceptor sleeps in accept(): one connection wakes it to see the flag.
        let woke = TcpStream::connect_timeout(&wake_address(self.local), Duration::from_secs(1));
        if woke.is_err() {
            // It will stop at the next connection; joining now could wait for ever.
            log::warn!(
                "metrics endpoint on {}: could not wake its thread to stop it",
                self.local
            );
            return;
        }
        drop(woke);
        if acceptor.join().is_err() {
            log::error!(
                "metrics endpoint on {}: the accepting thread panicked",
                self.local
            );
        }
        // The acceptor dropped the queue's sender, so idle workers return; busy ones see the
        // flag within SLICE.
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                log::error!(
                    "metrics endpoint on {}: a serving thread panicked",
                    self.local
                );
            }
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a connection reaches a listener bound to `local` (the loopback for a wildcard).
fn wake_address(local: SocketAddr) -> SocketAddr {
    match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), local.port())
        }
        _ => local,
    }
}

fn accept(listener: &TcpListener, queue: &SyncSender<TcpStream>, stopping: &AtomicBool) {
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(stream) => match queue.try_send(stream) {
                Ok(()) => {}
                Err(TrySendError::Full(stream)) => busy(stream),
                Err(TrySendError::Disconnected(_)) => return,
            },
            Err(err) => match err.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => {}
                _ => {
                    // Out of descriptors or memory: accept would fail again at once.
                    log::warn!("metrics endpoint: accept failed: {err}");
                    thread::sleep(Duration::from_millis(100));
                }
            },
        }
    }
}

/// Every worker is busy and the queue is full: say so if the socket takes it now, and close.
fn busy(stream: TcpStream) {
    if stream.set_nonblocking(true).is_ok() {
        let mut stream = stream;
        let _ = stream.write_all(&response(
            503,
            "text/plain; charset=utf-8",
            b"busy\n",
            false,
            &[],
        ));
    }
}

fn work(metrics: &'static Metrics, waiting: &Mutex<Receiver<TcpStream>>, stopping: &AtomicBool) {
    loop {
        let next = {
            let queue = waiting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.recv()
        };
        let Ok(stream) = next else {
            return;
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        handle(metrics, stream, stopping);
    }
}

/// One request, one answer, then close.
fn handle(metrics: &Metrics, mut stream: TcpStream, stopping: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(len) = head_end(&buf) {
            break Some(len);
        }
        if buf.len() > MAX_HEAD {
            break None;
        }
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = stream.write_all(&response(
                408,
                TEXT,
                b"request head not received in time\n",
                false,
                &[],
            ));
            return;
        }
        if stream.set_read_timeout(Some(left.min(SLICE))).is_err() {
            return;
        }
        let room = (MAX_HEAD + 1 - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(err) if is_timeout(&err) || err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    };

    let (answer, unread_input) = match head_len {
        None => (
            response(
                431,
                TEXT,
                format!("request line and headers exceed {MAX_HEAD} bytes\n").as_bytes(),
                false,
                &[],
            ),
            true,
        ),
        Some(len) => match parse_head(&buf[..len]) {
            Err(why) => (
                response(400, TEXT, format!("{why}\n").as_bytes(), false, &[]),
                true,
            ),
            Ok(request) => {
                let more = request.has_body || buf.len() > len;
                (route(metrics, &request), more)
            }
        },
    };
    if stream.write_all(&answer).is_err() {
        return;
    }
    let _ = stream.flush();
    if unread_input {
        drain(&mut stream);
    }
}

/// Closing a socket with unread input sends a reset that can destroy the answer in flight:
/// end our side, then read and discard what the client still sends, within bounds.
fn drain(stream: &mut TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let until = Instant::now() + DRAIN_TIME;
    let mut thrown = 0;
    let mut chunk = [0u8; 4096];
    while thrown < DRAIN_LIMIT {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => thrown += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The parts of a request head this server looks at.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    /// The path without query or fragment.
    pub path: String,
    /// A `Content-Length` other than 0 or a `Transfer-Encoding` was sent.
    pub has_body: bool,
}

/// Length of the head (through its blank line) when `buf` holds all of it.
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses a request line and headers; the error is what a 400 answer says.
pub(crate) fn parse_head(head: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let parts: Vec<&str> = first.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(format!("malformed request line {first:?}"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("malformed method {method:?}"));
    }
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {version:?}: HTTP/1.x only"));
    }
    // An absolute-form target (`http://host:port/metrics`) names the path after its host.
    let origin = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    if !origin.starts_with('/') {
        return Err(format!("malformed request target {target:?}"));
    }
    let path = origin
        .split(['?', '#'])
        .next()
        .unwrap_or(origin)
        .to_string();
    let mut has_body = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length") && value != "0")
        {
            has_body = true;
        }
    }
    Ok(Request {
        method: method.to_string(),
        path,
        has_body,
    })
}

fn route(metrics: &Metrics, request: &Request) -> Vec<u8> {
    let head_only = request.method == "HEAD";
    let readable = head_only || request.method == "GET";
    match request.path.as_str() {
        "/metrics" | "/health" if !readable => response(
            405,
            TEXT,
            format!("method {} not allowed: use GET or HEAD\n", request.method).as_bytes(),
            false,
            &[("Allow", "GET, HEAD")],
        ),
        "/metrics" => response(
            200,
            CONTENT_TYPE,
            metrics.render().as_bytes(),
            head_only,
            &[],
        ),
        "/health" => {
            let (ok, body) = metrics.health().report();
            response(
                if ok { 200 } else { 503 },
                "application/json",
                body.as_bytes(),
                head_only,
                &[],
            )
        }
        _ => response(
            404,
            TEXT,
            b"not found: the paths are /metrics and /health\n",
            head_only,
            &[],
        ),
    }
}

fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// The socket address for `address` and `port`.
pub(crate) fn resolve(address: Option<&str>, port: u16) -> Result<SocketAddr, MetricsError> {
    let host = address.map(str::trim).unwrap_or("");
    if host.is_empty() {
        return Ok(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let failed = |reason: String| MetricsError::Resolve {
        address: host.to_string(),
        port,
        reason,
    };
    let mut found = (bare, port).to_socket_addrs().map_err(|err| {
        failed(format!(
            "not an IP address, and the name does not resolve: {err}"
        ))
    })?;
    found
        .next()
        .ok_or_else(|| failed("the name resolves to no address".to_string()))
}

fn bind_error(addr: SocketAddr, err: &io::Error) -> MetricsError {
    let reason = match err.kind() {
        io::ErrorKind::AddrInUse => {
            let holders = port_holders(addr.port());
            let by = if holders.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = holders
                    .iter()
                    .map(|(pid, comm)| match comm {
                        Some(comm) => format!("pid {pid} ({comm})"),
                        None => format!("pid {pid}"),
                    })
                    .collect();
                format!(" by {}", list.join(", "))
            };
            format!(
                "address already in use{by}; stop that process or choose another port \
                 (command line -p/--metrics_port, config key metrics_endpoint_port)"
            )
        }
        io::ErrorKind::PermissionDenied => format!(
            "{err}; ports below 1024 need root or CAP_NET_BIND_SERVICE \
             (command line -p/--metrics_port, config key metrics_endpoint_port)"
        ),
        io::ErrorKind::AddrNotAvailable => {
            format!("{err}; the address is not one of this machine's (config key metrics_endpoint_address)")
        }
        _ => err.to_string(),
    };
    MetricsError::Bind {
        address: addr.to_string(),
        reason,
    }
}

/// Processes holding a listening TCP socket on `port`, as far as `/proc` shows them (at most
/// five, by pid, with their command names when readable).
pub(crate) fn port_holders(port: u16) -> Vec<(u32, Option<String>)> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let links: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(Result::ok).any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| links.iter().any(|l| target.as_os_str() == l.as_str()))
                })
            })
        })
        .collect();
    pids.sort_unstable();
    pids.truncate(5);
    pids.into_iter()
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim().to_string());
            (pid, comm)
        })
        .collect()
}

/// Inodes of the sockets in LISTEN state on `port` in a `/proc/net/tcp{,6}` table.
pub(crate) fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let local_port = u16::from_str_radix(hex_port, 16).ok()?;
            if local_port != port || *fields.get(3)? != LISTEN {
                return None;
            }
            fields.get(9)?.parse().ok().filter(|inode| *inode != 0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    #[test]
    fn request_heads_are_parsed_or_refused_with_a_reason() {
        let r = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").expect("valid");
        assert_eq!(
            r,
            Request {
                method: "GET".into(),
                path: "/metrics".into(),
                has_body: false
            }
        );
        let r = parse_head(b"POST http://h:1/health HTTP/1.1\r\ncontent-length: 3\r\n\r\n")
            .expect("valid");
        assert_eq!((r.path.as_str(), r.has_body), ("/health", true));
        let r = parse_head(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").expect("valid");
        assert!(!r.has_body);
        for (bad, says) in [
            (&b"GET /metrics\r\n\r\n"[..], "malformed request line"),
            (b"get /metrics HTTP/1.1\r\n\r\n", "malformed method"),
            (b"GET /metrics SPDY/3\r\n\r\n", "HTTP/1.x only"),
            (b"GET metrics HTTP/1.1\r\n\r\n", "malformed request target"),
            (
                b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
                "malformed header line",
            ),
            (b"GET /\xff HTTP/1.1\r\n\r\n", "not UTF-8"),
        ] {
            let err = parse_head(bad).expect_err("refused");
            assert!(err.contains(says), "{err:?} should say {says:?}");
        }
    }

    #[test]
    fn addresses_resolve_like_the_python_agent() {
        let at = |a| resolve(a, 8001).expect("resolves");
        assert_eq!(at(None), "0.0.0.0:8001".parse().expect("addr"));
        assert_eq!(at(Some("")), "0.0.0.0:8001".parse().expect("addr"));
        assert_eq!(at(Some("::")), "[::]:8001".parse().expect("addr"));
        assert_eq!(at(Some("[::1]")), "[::1]:8001".parse().expect("addr"));
        assert_eq!(
            at(Some("127.0.0.1")),
            "127.0.0.1:8001".parse().expect("addr")
        );
        assert!(at(Some("localhost")).ip().is_loopback());
        let err = resolve(Some("no such host.invalid"), 8001).expect_err("cannot resolve");
        let msg = err.to_string();
        assert!(
            msg.contains("no such host.invalid")
                && msg.contains("8001")
                && msg.contains("metrics_endpoint_address"),
            "{msg}"
        );
    }

    #[test]
    fn listening_inodes_match_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1F41 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n\
   2: 0100007F:1F42 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 8001), vec![4242]);
        assert_eq!(listening_inodes(table, 8002), vec![4444]);
        assert!(listening_inodes(table, 80).is_empty());
        assert!(listening_inodes("garbage\nmore garbage here\n", 8001).is_empty());
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = String::from_utf8(response(
            405,
            TEXT,
            b"no\n",
            false,
            &[("Allow", "GET, HEAD")],
        ))
        .expect("utf-8");
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Length: 3\r\n") && r.contains("\r\nConnection: close\r\n"));
        assert!(r.contains("\r\nAllow: GET, HEAD\r\n") && r.ends_with("\r\n\r\nno\n"));
        let head = String::from_utf8(response(200, TEXT, b"body", true, &[])).expect("utf-8");
        assert!(
            head.contains("Content-Length: 4\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
    }
}
