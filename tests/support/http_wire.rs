//! A small HTTP/1.1 server on loopback, with the socket-level control the fake server needs.
//!
//! Why not `tiny_http`: its connection loop owns the sockets, so a handler can neither close a
//! connection without answering (dropping `Request::into_writer()` leaves the socket open and
//! the client waits for its read timeout) nor stop listening while keep-alive connections are
//! parked in its queue. Here every accepted socket is registered, so the server can
//! [`WireServer::go_down`] (close the listener and every connection: new connections are
//! refused), [`WireServer::come_back`] on the same port, a handler can answer
//! [`Reply::Drop`] (close this connection without writing a byte), and the server can
//! [`WireServer::swallow`] requests (accept and read them, never answer: a black hole).
//!
//! The port stays this server's while it is down: the listener and a socket bound without
//! listening share it through `SO_REUSEPORT`, so the outage refuses connections and no
//! other socket (another test's listener, a client's ephemeral port) can take the port
//! meanwhile. Without that, a listener of another test that never accepts could take the
//! port during an outage, `come_back` failed, and the agent's requests were swallowed.
//!
//! One thread per connection: a slow handler never blocks other clients. Requests are read
//! whole (`Content-Length` or chunked bodies, `Expect: 100-continue` honoured) before the
//! handler runs; malformed requests get a 4xx and the connection is closed. An answer is
//! written whole, or, when it carries a [`Streamed`] body (a job's whole output), piece by
//! piece as chunks, so that nothing large is built in memory and a client that stops
//! reading stops the work. Nothing here panics on request data.

use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn,
};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Longest accepted request line or header line.
const MAX_LINE: u64 = 16 * 1024;
/// Most header lines in one request.
const MAX_HEADERS: usize = 100;
/// Largest accepted request body; larger ones get 413 and the connection is closed.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// One request, read whole.
#[derive(Clone, Debug)]
pub struct WireRequest {
    pub method: String,
    /// The path part of the request target, still percent-encoded.
    pub path: String,
    /// The query string without `?` (empty when absent).
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the request line said HTTP/1.0 (otherwise HTTP/1.1).
    pub http10: bool,
}

impl WireRequest {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header of that name, in order.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response: complete, or with a body written as it is produced ([`Streamed`]).
#[derive(Clone, Debug)]
pub struct WireResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Written instead of `body` when set: chunked to an HTTP/1.1 client, to the end of
    /// the connection for HTTP/1.0.
    pub streamed: Option<Streamed>,
}

/// A body too large to build in memory first: written piece by piece into the connection,
/// so a client that stops reading (and closes) stops its production too.
#[derive(Clone)]
pub struct Streamed(pub Arc<WriteBody>);

/// Writes a streamed body into what it is given.
pub type WriteBody = dyn Fn(&mut dyn Write) -> io::Result<()> + Send + Sync;

impl std::fmt::Debug for Streamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Streamed(..)")
    }
}

impl WireResponse {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        WireResponse {
            status,
            headers: vec![("Content-Type".to_string(), content_type.to_string())],
            body: body.into(),
            streamed: None,
        }
    }

    /// A response without a body (e.g. 204).
    pub fn empty(status: u16) -> Self {
        WireResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            streamed: None,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// What the handler wants done with a request.
pub enum Reply {
    Send(WireResponse),
    /// Close the connection without writing anything: the client sees EOF/reset.
    Drop,
}

pub type Handler = Arc<dyn Fn(WireRequest) -> Reply + Send + Sync + 'static>;

/// Open connections and their threads.
#[derive(Default)]
struct Connections {
    next_id: u64,
    streams: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

struct Inner {
    port: u16,
    handler: Handler,
    /// Set once, when the server is dropped.
    closing: AtomicBool,
    /// While set, requests are read and never answered (see [`WireServer::swallow`]).
    swallowing: AtomicBool,
    /// Requests read and never answered so far.
    swallowed: AtomicU64,
    /// Held (shared) by each request from before it is handled until its answer is
    /// written; [`WireServer::go_down_between_requests`] takes it exclusively, so the
    /// outage starts between requests.
    handling: RwLock<()>,
    /// Set by [`WireServer::go_down_between_requests`]: requests read from now on are
    /// dropped unhandled.
    refusing: AtomicBool,
    conns: Mutex<Connections>,
}

/// One listening period: the listener thread and its stop flag.
struct Epoch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The server. Dropping it closes everything and joins every thread.
pub struct WireServer {
    inner: Arc<Inner>,
    epoch: Mutex<Option<Epoch>>,
    /// While down: the socket that keeps the port bound without listening.
    reserved: Mutex<Option<OwnedFd>>,
}

/// A TCP socket bound to 127.0.0.1:`port` (0: an ephemeral port) that shares its port only
/// with sockets of this process that say so too (`SO_REUSEPORT`), not listening yet.
fn bind_shared(port: u16) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Not SO_REUSEADDR: Linux lets two non-listening sockets that both set it share a
    // port, which is what another test's `TcpListener::bind` (std sets it) would do to the
    // reserved socket. Sockets left in TIME_WAIT by accepted connections inherit
    // SO_REUSEPORT from the listener, so they do not keep the port from listening again.
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
    )?;
    Ok(fd)
}

/// Starts listening on a socket from [`bind_shared`].
fn listen_shared(fd: OwnedFd) -> io::Result<TcpListener> {
    listen(&fd, Backlog::new(128).map_err(io::Error::from)?)?;
    Ok(TcpListener::from(fd))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl WireServer {
    /// Listens on 127.0.0.1 (port 0: an ephemeral port).
    pub fn start(port: u16, handler: Handler) -> io::Result<WireServer> {
        let listener = listen_shared(bind_shared(port)?)?;
        let port = listener.local_addr()?.port();
        let inner = Arc::new(Inner {
            port,
            handler,
            closing: AtomicBool::new(false),
            swallowing: AtomicBool::new(false),
            swallowed: AtomicU64::new(0),
            handling: RwLock::new(()),
            refusing: AtomicBool::new(false),
            conns: Mutex::new(Connections::default()),
        });
        let server = WireServer {
            inner,
            epoch: Mutex::new(None),
            reserved: Mutex::new(None),
        };
        server.listen_on(listener)?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// How many connections were accepted so far.
    pub fn connections_accepted(&self) -> u64 {
        lock(&self.inner.conns).next_id
    }

    pub fn is_listening(&self) -> bool {
        lock(&self.epoch).is_some()
    }

    fn listen_on(&self, listener: TcpListener) -> io::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let inner = Arc::clone(&self.inner);
        let thread_stop = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("fake-server-accept-{}", self.inner.port))
            .spawn(move || accept_loop(listener, inner, thread_stop))?;
        *lock(&self.epoch) = Some(Epoch { stop, thread });
        Ok(())
    }

    /// Stops listening (new connections are refused) and closes every open connection.
    /// Requests being handled finish, but their answers go nowhere. The port stays
    /// reserved for [`Self::come_back`] (a socket bound to it, not listening), unless the
    /// server is closing for good.
    pub fn go_down(&self) {
        // Reserved before the listener closes, so that the port is never free.
        let closing = self.inner.closing.load(Ordering::SeqCst);
        if !closing && self.is_listening() {
            match bind_shared(self.inner.port) {
                Ok(fd) => *lock(&self.reserved) = Some(fd),
                Err(e) => eprintln!(
                    "fake server: cannot reserve port {} during the outage: {e}",
                    self.inner.port
                ),
            }
        }
        let epoch = lock(&self.epoch).take();
        if let Some(epoch) = epoch {
            stop_epoch(self.inner.port, epoch);
        }
        self.close_connections();
        if closing {
            lock(&self.reserved).take();
        }
    }

    /// Like [`Self::go_down`], but between requests: a request being handled gets its whole
    /// answer first, and a request read from now on is dropped without being handled. An
    /// outage then never loses the answer to a request the server applied (a job handed
    /// out by `GET /v1/job`, which nobody could hand out again); `go_down` is the outage
    /// that can.
    pub fn go_down_between_requests(&self) {
        self.inner.refusing.store(true, Ordering::SeqCst);
        let in_flight = self
            .inner
            .handling
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.go_down();
        drop(in_flight);
    }

    /// Listens again on the same port: on the socket that kept it reserved, or, when there
    /// is none, binding it again (retried for a few seconds if the port is busy).
    pub fn come_back(&self) -> io::Result<()> {
        self.inner.refusing.store(false, Ordering::SeqCst);
        if self.is_listening() {
            return Ok(());
        }
        if let Some(fd) = lock(&self.reserved).take() {
            return self.listen_on(listen_shared(fd)?);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match bind_shared(self.inner.port).and_then(listen_shared) {
                Ok(listener) => return self.listen_on(listener),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// While `on`, every request is read and never answered, on new and kept-alive
    /// connections alike (connections are accepted: a black hole, not an outage). The
    /// requests swallowed stay unanswered until the server is dropped, like requests lost
    /// in a proxy that hangs; turning it off serves the requests that come after.
    pub fn swallow(&self, on: bool) {
        self.inner.swallowing.store(on, Ordering::SeqCst);
    }

    /// Requests read and never answered by [`Self::swallow`] so far.
    pub fn swallowed(&self) -> u64 {
        self.inner.swallowed.load(Ordering::SeqCst)
    }

    fn close_connections(&self) {
        let conns = lock(&self.inner.conns);
        for stream in conns.streams.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Wakes the accept thread with a connection of our own, then joins it; the listener is
/// closed when that thread returns.
fn stop_epoch(port: u16, epoch: Epoch) {
    epoch.stop.store(true, Ordering::SeqCst);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // If it cannot be woken, leave the thread detached rather than hang.
    if let Ok(waker) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        drop(waker);
        let _ = epoch.thread.join();
    }
}

impl WireServer {
    /// Stops for good: nothing more is written to any connection (answers still being
    /// computed are discarded), the listener and every connection are closed. Threads are
    /// joined when the server is dropped.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        self.go_down();
    }
}

impl Drop for WireServer {
    fn drop(&mut self) {
        self.close();
        let threads = std::mem::take(&mut lock(&self.inner.conns).threads);
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(_) => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        let mut conns = lock(&inner.conns);
        conns.threads.retain(|t| !t.is_finished());
        let id = conns.next_id;
        conns.next_id += 1;
        conns.streams.insert(id, registered);
        let conn_inner = Arc::clone(&inner);
        let spawned = thread::Builder::new()
            .name(format!("fake-server-conn-{id}"))
            .spawn(move || {
                serve_connection(stream, &conn_inner);
                lock(&conn_inner.conns).streams.remove(&id);
            });
        match spawned {
            Ok(handle) => conns.threads.push(handle),
            Err(_) => {
                if let Some(s) = conns.streams.remove(&id) {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// A request that could not be read: answer this status and close.
struct Malformed {
    status: u16,
    message: &'static str,
}

fn malformed(status: u16, message: &'static str) -> Malformed {
    Malformed { status, message }
}

fn serve_connection(stream: TcpStream, inner: &Inner) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let request = match read_request(&mut reader, &mut writer) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(Ok(bad)) => {
                let resp = WireResponse::new(
                    bad.status,
                    "text/plain; charset=utf-8",
                    format!("{}\n", bad.message),
                );
                let _ = write_response(&mut writer, &resp, false);
                break;
            }
            Err(Err(_io)) => break,
        };
        if inner.swallowing.load(Ordering::SeqCst) {
            inner.swallowed.fetch_add(1, Ordering::SeqCst);
            // Hold the connection, answering nothing, until the server closes.
            while !inner.closing.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
            break;
        }
        let keep_alive = wants_keep_alive(&request);
        let http10 = request.http10;
        // From here until the answer is written, an outage between requests waits.
        let handling = inner
            .handling
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if inner.refusing.load(Ordering::SeqCst) {
            break;
        }
        let reply = (inner.handler)(request);
        if inner.closing.load(Ordering::SeqCst) {
            break;
        }
        let written = match reply {
            Reply::Drop => {
                let _ = writer.shutdown(Shutdown::Both);
                false
            }
            Reply::Send(resp) => {
                // An HTTP/1.0 client gets a streamed body up to the end of the connection.
                let keep_alive = keep_alive && !(http10 && resp.streamed.is_some());
                write_response(&mut writer, &resp, keep_alive).is_ok() && keep_alive
            }
        };
        drop(handling);
        if !written {
            break;
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

fn wants_keep_alive(req: &WireRequest) -> bool {
    let connection = req.header("Connection").unwrap_or("").to_ascii_lowercase();
    let tokens: Vec<&str> = connection.split(',').map(str::trim).collect();
    if tokens.contains(&"close") {
        return false;
    }
    // HTTP/1.0 closes unless asked not to.
    if req.http10 {
        return tokens.contains(&"keep-alive");
    }
    true
}

type ReadResult = Result<Option<WireRequest>, Result<Malformed, io::Error>>;

/// Reads one line (without CR LF); `None` at a clean EOF before any byte.
fn read_line(
    reader: &mut BufReader<TcpStream>,
) -> Result<Option<String>, Result<Malformed, io::Error>> {
    let mut buf = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut buf)
        .map_err(Err)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if n as u64 >= MAX_LINE {
            return Err(Ok(malformed(431, "Request Header Fields Too Large")));
        }
        // EOF in the middle of a line.
        return Err(Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| Ok(malformed(400, "Bad Request: header is not UTF-8")))
}

fn read_request(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream) -> ReadResult {
    // Request line, skipping empty lines between requests (RFC 9112 §2.2).
    let mut line = String::new();
    for _ in 0..8 {
        match read_line(reader)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => {
                line = l;
                break;
            }
        }
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Ok(malformed(400, "Bad Request: malformed request line")));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Ok(malformed(400, "Bad Request: malformed method")));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(Ok(malformed(505, "HTTP Version Not Supported")));
    }
    if !target.starts_with('/') {
        return Err(Ok(malformed(
            400,
            "Bad Request: request target must be a path",
        )));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.to_string(), String::new()),
    };

    let mut headers = Vec::new();
    loop {
        let Some(l) = read_line(reader)? else {
            return Err(Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
        };
        if l.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(Ok(malformed(431, "Request Header Fields Too Large")));
        }
        if l.starts_with(' ') || l.starts_with('\t') {
            return Err(Ok(malformed(400, "Bad Request: obsolete header folding")));
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(Ok(malformed(400, "Bad Request: malformed header")));
        };
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err(Ok(malformed(400, "Bad Request: malformed header name")));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }

    let mut request = WireRequest {
        method: method.to_string(),
        path,
        query,
        headers,
        body: Vec::new(),
        http10: version == "HTTP/1.0",
    };

    let chunked = request
        .headers_named("Transfer-Encoding")
        .any(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = {
        let mut lengths = request.headers_named("Content-Length").map(str::trim);
        match lengths.next() {
            None => None,
            Some(first) => {
                if lengths.any(|other| other != first) {
                    return Err(Ok(malformed(
                        400,
                        "Bad Request: conflicting Content-Length",
                    )));
                }
                match first.parse::<usize>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        return Err(Ok(malformed(400, "Bad Request: invalid Content-Length")))
                    }
                }
            }
        }
    };
    if chunked && length.is_some() {
        return Err(Ok(malformed(
            400,
            "Bad Request: both chunked and Content-Length",
        )));
    }
    if length.is_some_and(|n| n > MAX_BODY) {
        return Err(Ok(malformed(413, "Payload Too Large")));
    }
    let expects_body = chunked || length.is_some_and(|n| n > 0);
    if expects_body
        && request
            .header("Expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        writer
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(Err)?;
    }
    if chunked {
        request.body = read_chunked(reader)?;
    } else if let Some(n) = length {
        let mut body = vec![0; n];
        reader.read_exact(&mut body).map_err(Err)?;
        request.body = body;
    }
    Ok(Some(request))
}

fn read_chunked(
    reader: &mut BufReader<TcpStream>,
) -> Result<Vec<u8>, Result<Malformed, io::Error>> {
    let mut body = Vec::new();
    loop {
        let Some(size_line) = read_line(reader)? else {
            return Err(Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
        };
        let size_text = size_line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return Err(Ok(malformed(400, "Bad Request: invalid chunk size")));
        };
        if size == 0 {
            // Trailer section, ignored.
            loop {
                match read_line(reader)? {
                    None => return Ok(body),
                    Some(l) if l.is_empty() => return Ok(body),
                    Some(_) => {}
                }
            }
        }
        if body.len().saturating_add(size) > MAX_BODY {
            return Err(Ok(malformed(413, "Payload Too Large")));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).map_err(Err)?;
        match read_line(reader)? {
            Some(l) if l.is_empty() => {}
            _ => return Err(Ok(malformed(400, "Bad Request: malformed chunk"))),
        }
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn write_response(writer: &mut TcpStream, resp: &WireResponse, keep_alive: bool) -> io::Result<()> {
    let mut out = Vec::with_capacity(256 + resp.body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            resp.status,
            reason_phrase(resp.status)
        )
        .as_bytes(),
    );
    for (name, value) in &resp.headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    let bodyless = resp.status == 204 || resp.status == 304 || resp.status < 200;
    // A streamed body on a connection kept alive is chunked; otherwise the close ends it.
    let streamed = resp.streamed.as_ref().filter(|_| !bodyless);
    let chunked = streamed.is_some() && keep_alive;
    if chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    } else if !bodyless && streamed.is_none() {
        out.extend_from_slice(format!("Content-Length: {}\r\n", resp.body.len()).as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    match streamed {
        Some(body) => {
            writer.write_all(&out)?;
            if chunked {
                let mut chunks = Chunked {
                    inner: &mut *writer,
                    buf: Vec::with_capacity(CHUNK + 2),
                };
                (body.0)(&mut chunks)?;
                chunks.finish()?;
            } else {
                let mut buffered = io::BufWriter::with_capacity(CHUNK, &mut *writer);
                (body.0)(&mut buffered)?;
                buffered.flush()?;
            }
        }
        None => {
            if !bodyless {
                out.extend_from_slice(&resp.body);
            }
            writer.write_all(&out)?;
        }
    }
    writer.flush()
}

/// Size of the chunks of a streamed body.
const CHUNK: usize = 64 * 1024;

/// Writes what it is given as HTTP/1.1 chunks of up to [`CHUNK`] bytes.
struct Chunked<'a> {
    inner: &'a mut TcpStream,
    buf: Vec<u8>,
}

impl Chunked<'_> {
    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.inner
            .write_all(format!("{:x}\r\n", self.buf.len()).as_bytes())?;
        self.buf.extend_from_slice(b"\r\n");
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// The last chunk and the end of the body.
    fn finish(mut self) -> io::Result<()> {
        self.emit()?;
        self.inner.write_all(b"0\r\n\r\n")
    }
}

impl Write for Chunked<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.emit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
