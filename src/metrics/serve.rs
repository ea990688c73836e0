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
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::bind::{bind_error, resolve};
use super::request::{parse, response, route, Parsed, MAX_HEADERS, TEXT};
use super::{Metrics, MetricsError};

/// Open connections at most; a further one closes the oldest that is still sending its head.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request line plus headers; a larger head is answered 431.
pub const MAX_HEAD: usize = 8 * 1024;
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
