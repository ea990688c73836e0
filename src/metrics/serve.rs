//! The HTTP endpoint: `/metrics` and `/health` on a small, bounded HTTP/1.1 server.
//!
//! Written on std's sockets rather than an HTTP server crate: `tiny_http` starts a thread per
//! waiting connection with no cap, and has no limit on the request head nor a deadline for
//! reading it, which are the bounds this endpoint needs. Request heads are parsed by
//! `httparse` (already in the tree through ureq).
//!
//! The whole server is one thread that waits in `poll()` on the listening socket and every
//! open connection, all non-blocking, so a slow or silent client (the endpoint binds all
//! interfaces, like the Python agent's) holds a few bytes of memory, never the thread: a
//! scrape is answered as soon as its own head has arrived, however many others are pending.
//! The bounds: at most [`MAX_CONNECTIONS`] open connections (past that, the oldest still
//! sending its head is answered 503 and closed to make room); each connection gets one
//! request, whose head is capped at [`MAX_HEAD`] bytes and must be whole within
//! [`HEAD_TIMEOUT`] of the accept (else 408); the answer must be taken within
//! [`WRITE_TIMEOUT`]; bodies are discarded, and every answer closes the connection.
//! Rendering happens on this thread, so a scrape never holds up the job loop for more than
//! the copy of a few counters.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{Metrics, MetricsError, CONTENT_TYPE};

/// Open connections at most; a further one closes the oldest that is still sending its head.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request line plus headers; a larger head is answered 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// Headers a request may have; more are answered 431.
const MAX_HEADERS: usize = 64;
/// Time a client has, from the accept, to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take its answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// What is read and thrown away from a client still sending after its answer.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// How long accepting pauses after a failure that would repeat at once (out of descriptors).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The running endpoint. Dropping it (or [`MetricsServer::shutdown`]) closes the listening
/// socket and every connection, and stops its thread.
#[derive(Debug)]
pub struct MetricsServer {
    local: SocketAddr,
    stopping: Arc<AtomicBool>,
    /// A byte written here wakes the serving thread out of `poll()`.
    waker: UnixStream,
    thread: Option<JoinHandle<()>>,
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
    listener
        .set_nonblocking(true)
        .map_err(|err| bind_error(wanted, &err))?;
    let (waker, wake) = UnixStream::pair().map_err(MetricsError::Thread)?;
    waker.set_nonblocking(true).map_err(MetricsError::Thread)?;
    wake.set_nonblocking(true).map_err(MetricsError::Thread)?;
    let stopping = Arc::new(AtomicBool::new(false));
    let endpoint = Endpoint {
        metrics,
        listener,
        wake,
        stopping: Arc::clone(&stopping),
        conns: Vec::new(),
        accept_paused_until: None,
    };
    let thread = thread::Builder::new()
        .name("metrics".to_string())
        .spawn(move || endpoint.run())
        .map_err(MetricsError::Thread)?;
    Ok(MetricsServer {
        local,
        stopping,
        waker,
        thread: Some(thread),
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

    /// Stops serving and closes the port and every open connection at once.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // A full socket buffer already holds a wake-up; any other failure leaves the
        // thread in poll() for ever, and joining it would too.
        match (&self.waker).write(&[1]) {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => {
                log::warn!(
                    "metrics endpoint on {}: could not wake its thread to stop it: {err}",
                    self.local
                );
                return;
            }
        }
        if thread.join().is_err() {
            log::error!(
                "metrics endpoint on {}: the serving thread panicked",
                self.local
            );
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The serving thread's state.
struct Endpoint {
    metrics: &'static Metrics,
    listener: TcpListener,
    wake: UnixStream,
    stopping: Arc<AtomicBool>,
    conns: Vec<Conn>,
    /// Set after an accept failure that would repeat at once.
    accept_paused_until: Option<Instant>,
}

/// One accepted connection and where its one exchange is.
struct Conn {
    stream: TcpStream,
    accepted: Instant,
    stage: Stage,
}

enum Stage {
    /// Waiting for the whole request head (due [`HEAD_TIMEOUT`] after the accept).
    Head { buf: Vec<u8> },
    /// Sending the answer; then, when input is left unread, draining it.
    Answer {
        out: Vec<u8>,
        sent: usize,
        until: Instant,
        drain: bool,
    },
    /// Our side is shut; reading and discarding what the client still sends, within bounds.
    Drain { until: Instant, thrown: usize },
}

/// Whether a connection stays open after a step.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Keep,
    Close,
}

impl Endpoint {
    fn run(mut self) {
        let mut ready = Vec::new();
        while !self.stopping.load(Ordering::SeqCst) {
            let now = Instant::now();
            self.expire(now);
            let accepting = self.accept_paused_until.is_none_or(|t| now >= t);
            if accepting {
                self.accept_paused_until = None;
            }
            let timeout = self.next_deadline(now).map_or(PollTimeout::NONE, |at| {
                // Rounded up, so a deadline less than a millisecond away is not a busy loop.
                let ms = at.saturating_duration_since(now).as_millis() + 1;
                PollTimeout::try_from(ms.min(60_000)).unwrap_or(PollTimeout::NONE)
            });
            {
                let mut fds = Vec::with_capacity(self.conns.len() + 2);
                fds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
                if accepting {
                    fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
                }
                for conn in &self.conns {
                    fds.push(PollFd::new(conn.stream.as_fd(), conn.interest()));
                }
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(err) => {
                        // EINVAL/ENOMEM: nothing to wait on; do not spin.
                        log::warn!("metrics endpoint: poll failed: {err}");
                        drop(fds);
                        thread::sleep(ACCEPT_PAUSE);
                        continue;
                    }
                }
                ready.clear();
                ready.extend(
                    fds.iter()
                        .map(|fd| fd.revents().unwrap_or(PollFlags::empty())),
                );
            }
            if !ready[0].is_empty() {
                let mut sink = [0u8; 64];
                while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
            }
            let first_conn = if accepting { 2 } else { 1 };
            let now = Instant::now();
            let metrics = self.metrics;
            let mut index = 0;
            self.conns.retain_mut(|conn| {
                let events = ready
                    .get(first_conn + index)
                    .copied()
                    .unwrap_or(PollFlags::empty());
                index += 1;
                events.is_empty() || conn.step(metrics, now) == Next::Keep
            });
            if accepting && !ready[1].is_empty() {
                self.accept(now);
            }
        }
    }

    /// Ends the exchanges whose deadline has passed: a head not whole in time is answered
    /// 408; an answer not taken in time, or a drain, is closed.
    fn expire(&mut self, now: Instant) {
        let metrics = self.metrics;
        self.conns.retain_mut(|conn| {
            if conn.deadline() > now {
                return true;
            }
            match conn.stage {
                Stage::Head { .. } => {
                    conn.answer(
                        response(
                            408,
                            TEXT,
                            b"request head not received in time\n",
                            false,
                            &[],
                        ),
                        false,
                        now,
                    );
                    conn.step(metrics, now) == Next::Keep
                }
                _ => false,
            }
        });
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let conns = self.conns.iter().map(Conn::deadline).min();
        let resume = self.accept_paused_until.filter(|t| *t > now);
        match (conns, resume) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes every connection waiting in the listen queue.
    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    if self.conns.len() >= MAX_CONNECTIONS && !self.make_room() {
                        busy(stream, b"busy: every connection is being answered\n");
                        continue;
                    }
                    let mut conn = Conn {
                        stream,
                        accepted: now,
                        stage: Stage::Head {
                            buf: Vec::with_capacity(512),
                        },
                    };
                    // A client that sent its request with the connect is answered now.
                    if conn.step(self.metrics, now) == Next::Keep {
                        self.conns.push(conn);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(err) => {
                    // Out of descriptors or memory: accept would fail again at once.
                    log::warn!("metrics endpoint: accept failed: {err}");
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }

    /// Closes the connection that has waited longest for its head, answering it 503; false
    /// when every open connection is past its head (being answered or drained).
    fn make_room(&mut self) -> bool {
        let oldest = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c.stage, Stage::Head { .. }))
            .min_by_key(|(_, c)| c.accepted)
            .map(|(i, _)| i);
        let Some(index) = oldest else {
            return false;
        };
        let conn = self.conns.swap_remove(index);
        log::debug!(
            "metrics endpoint: {MAX_CONNECTIONS} connections open; closing the one that waited \
             longest ({:.1} s) for its request head",
            conn.accepted.elapsed().as_secs_f64()
        );
        busy(
            conn.stream,
            b"too many open connections: this one waited longest for its request\n",
        );
        true
    }
}

impl Conn {
    /// The poll events this connection waits for.
    fn interest(&self) -> PollFlags {
        match self.stage {
            Stage::Head { .. } | Stage::Drain { .. } => PollFlags::POLLIN,
            Stage::Answer { .. } => PollFlags::POLLOUT,
        }
    }

    /// When this connection's current stage runs out.
    fn deadline(&self) -> Instant {
        match self.stage {
            Stage::Head { .. } => self.accepted + HEAD_TIMEOUT,
            Stage::Answer { until, .. } | Stage::Drain { until, .. } => until,
        }
    }

    /// Moves to sending `out`; `drain` when input is left unread.
    fn answer(&mut self, out: Vec<u8>, drain: bool, now: Instant) {
        self.stage = Stage::Answer {
            out,
            sent: 0,
            until: now + WRITE_TIMEOUT,
            drain,
        };
    }

    /// Does what the socket allows now without waiting: reads head bytes (and answers once
    /// the head is whole), writes answer bytes, or discards input. Several stages may pass
    /// in one step.
    fn step(&mut self, metrics: &Metrics, now: Instant) -> Next {
        loop {
            match &mut self.stage {
                Stage::Head { buf } => {
                    let mut chunk = [0u8; 4096];
                    let room = (MAX_HEAD + 1 - buf.len()).min(chunk.len());
                    match self.stream.read(&mut chunk[..room]) {
                        // The client left before its head was whole.
                        Ok(0) => return Next::Close,
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            // A head ends, and a line can go wrong, only at a newline: parse
                            // again only then, so a client sending a byte at a time costs
                            // one parse a line, not one a byte.
                            if !chunk[..n].contains(&b'\n') && buf.len() <= MAX_HEAD {
                                continue;
                            }
                        }
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                        Err(_) => return Next::Close,
                    }
                    let (out, drain) = match parse(buf) {
                        Parsed::Partial if buf.len() <= MAX_HEAD => continue,
                        Parsed::Partial | Parsed::TooLarge => (
                            response(
                                431,
                                TEXT,
                                format!(
                                    "request line and headers exceed {MAX_HEAD} bytes or \
                                     {MAX_HEADERS} headers\n"
                                )
                                .as_bytes(),
                                false,
                                &[],
                            ),
                            true,
                        ),
                        Parsed::Invalid(why) => (
                            response(400, TEXT, format!("{why}\n").as_bytes(), false, &[]),
                            true,
                        ),
                        Parsed::Complete(request, len) => {
                            let more = request.has_body || buf.len() > len;
                            (route(metrics, &request), more)
                        }
                    };
                    self.answer(out, drain, now);
                }
                Stage::Answer {
                    out, sent, drain, ..
                } => {
                    match self.stream.write(&out[*sent..]) {
                        Ok(0) => return Next::Close,
                        Ok(n) => *sent += n,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                        Err(_) => return Next::Close,
                    }
                    if *sent < out.len() {
                        continue;
                    }
                    // Closing with unread input sends a reset that can destroy the answer
                    // in flight: end our side, then read and discard what is still sent.
                    if !*drain || self.stream.shutdown(Shutdown::Write).is_err() {
                        return Next::Close;
                    }
                    self.stage = Stage::Drain {
                        until: now + DRAIN_TIME,
                        thrown: 0,
                    };
                }
                Stage::Drain { thrown, .. } => {
                    let mut chunk = [0u8; 4096];
                    match self.stream.read(&mut chunk) {
                        Ok(0) => return Next::Close,
                        Ok(n) => *thrown += n,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                        Err(_) => return Next::Close,
                    }
                    if *thrown >= DRAIN_LIMIT {
                        return Next::Close;
                    }
                }
            }
        }
    }
}

/// Answers 503 with `why` if the socket takes it now, and closes. What the client had sent
/// is read first, so the close is a FIN, not a reset that could destroy the answer.
fn busy(mut stream: TcpStream, why: &[u8]) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut chunk = [0u8; 4096];
    let mut read = 0;
    while read < DRAIN_LIMIT {
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => read += n,
            _ => break,
        }
    }
    let _ = stream.write_all(&response(503, TEXT, why, false, &[]));
    let _ = stream.shutdown(Shutdown::Write);
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

/// What the bytes received so far hold.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// The head is not whole yet.
    Partial,
    /// A request, and the length of its head (through its blank line).
    Complete(Request, usize),
    /// More headers than [`MAX_HEADERS`].
    TooLarge,
    /// Not an HTTP/1.x request head; what a 400 answer says.
    Invalid(String),
}

/// Parses the request line and headers at the start of `buf` with `httparse`, then checks
/// what this server needs beyond it: an upper-case method and an origin-form (or
/// absolute-form) target.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooLarge,
        Err(err) => return Parsed::Invalid(parse_error(buf, err)),
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Parsed::Invalid("malformed request line".to_string());
    };
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Parsed::Invalid(format!("malformed method {method:?}"));
    }
    // An absolute-form target (`http://host:port/metrics`) names the path after its host.
    let origin = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    if !origin.starts_with('/') {
        return Parsed::Invalid(format!("malformed request target {target:?}"));
    }
    let path = origin
        .split(['?', '#'])
        .next()
        .unwrap_or(origin)
        .to_string();
    let has_body = request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
    });
    Parsed::Complete(
        Request {
            method: method.to_string(),
            path,
            has_body,
        },
        len,
    )
}

/// What a 400 answer says for an `httparse` error on `buf`.
fn parse_error(buf: &[u8], err: httparse::Error) -> String {
    let line_end = buf.iter().position(|b| *b == b'\n').unwrap_or(buf.len());
    let first = String::from_utf8_lossy(&buf[..line_end]);
    let first = first.trim_end_matches('\r');
    match err {
        httparse::Error::Version => {
            format!("unsupported protocol in {first:?}: HTTP/1.x only")
        }
        httparse::Error::HeaderName | httparse::Error::HeaderValue | httparse::Error::NewLine
            if std::str::from_utf8(&buf[..line_end]).is_ok() =>
        {
            "malformed header line".to_string()
        }
        _ if std::str::from_utf8(&buf[..line_end]).is_err() => {
            "request line is not UTF-8".to_string()
        }
        _ => format!("malformed request line {first:?}"),
    }
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

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Parsed::Complete(request, len) => (request, len),
            other => panic!(
                "{:?} should parse, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    #[test]
    fn a_head_is_partial_until_its_blank_line() {
        assert_eq!(complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody").1, 27);
        assert_eq!(complete(b"GET / HTTP/1.0\n\n").1, 16);
        for partial in [
            &b""[..],
            b"GET /metr",
            b"GET /metrics HTTP/1.1\r\nHost: sl",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert_eq!(parse(partial), Parsed::Partial, "{partial:?}");
        }
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for n in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{n}: y\r\n"));
        }
        assert_eq!(parse(many.as_bytes()), Parsed::TooLarge);
    }

    #[test]
    fn request_heads_are_parsed_or_refused_with_a_reason() {
        let (r, _) = complete(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            r,
            Request {
                method: "GET".into(),
                path: "/metrics".into(),
                has_body: false
            }
        );
        let (r, _) = complete(b"POST http://h:1/health HTTP/1.1\r\ncontent-length: 3\r\n\r\n");
        assert_eq!((r.path.as_str(), r.has_body), ("/health", true));
        let (r, _) = complete(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(!r.has_body);
        let (r, _) = complete(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(r.has_body);
        for (bad, says) in [
            (&b"GET /metrics\r\n\r\n"[..], "malformed request line"),
            (b"GARBAGE\r\n\r\n", "malformed request line"),
            (b"get /metrics HTTP/1.1\r\n\r\n", "malformed method"),
            (b"GET /metrics SPDY/3\r\n\r\n", "HTTP/1.x only"),
            (b"GET metrics HTTP/1.1\r\n\r\n", "malformed request target"),
            (
                b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
                "malformed header line",
            ),
            (b"GET /\xff HTTP/1.1\r\n\r\n", "not UTF-8"),
        ] {
            match parse(bad) {
                Parsed::Invalid(why) => assert!(why.contains(says), "{why:?} should say {says:?}"),
                other => panic!("{bad:?} should be refused, got {other:?}"),
            }
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
