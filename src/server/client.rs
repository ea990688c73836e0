//! The request machinery under [`super::http::HttpServer`]: one ureq agent, the identity
//! cookie and bearer token on every request, the 401 refresh-and-replay, retries with
//! jittered back-off for what is safe to repeat, and the mapping of every answer and
//! transport failure to a [`ServerError`]. No ureq type leaves this file (and
//! [`super::reply`], which holds an answer's body, [`super::tls`], which chooses the
//! trusted roots and words certificate failures, and [`super::resolve`], which keeps the
//! server's addresses between requests).
//!
//! Nothing a server sends (a status, a body, a dropped connection) can panic here; it
//! becomes a [`ServerError`] whose kind says whether trying again later may help.

use super::auth::{human, load_refresh_token, TokenSource};
use super::fragment::FragmentBody;
use super::reply::{detail_of, parse_refresh_answer, Reply, ReplyBody};
use super::request::{multipart_body, Auth, Method, Payload, Repeat, Req};
use super::resolve;
use super::settings::HttpSettings;
use super::tls;
use super::urls::{endpoint_class, is_https, normalize_base, seg, without_credentials};
use super::{LogType, RefreshCheckError, ServerError, ServerErrorKind};
use crate::phase::Phase;
use crate::time::now_iso;
use serde_json::{json, Value};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How much of an error answer is kept for messages.
const MAX_DETAIL: u64 = 8 * 1024;

/// Why one attempt produced no answer.
enum AttemptError {
    Transport { text: String, sent: Sent },
    Local(String),
}

/// Whether the server may have received a request that got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// No connection was made (refused, unresolvable, connect timeout).
    No,
    /// The connection broke or timed out after (part of) the request went out.
    Maybe,
    /// The request could not even be built (bad URL): repeating cannot help.
    Never,
}

/// The shared client: one ureq agent, the token and the settings.
pub(super) struct Core {
    agent: ureq::Agent,
    /// The agent's resolver, to forget the server's addresses after a failure.
    resolver: Arc<resolve::CachingResolver>,
    /// The normalised base URL, without a trailing `/`.
    pub(super) base: String,
    cookie: String,
    auth: TokenSource,
    pub(super) settings: HttpSettings,
    /// For TLS failures: the server as named in messages, and what the agent trusts.
    tls: TlsContext,
    /// How many requests found no server to connect to (refused, unreachable): a server
    /// that comes back after one may be another build, so what was learnt about it (the
    /// job-state endpoint) is asked again.
    outages: AtomicU64,
}

/// What a TLS failure message needs to say.
struct TlsContext {
    url: String,
    trusted: String,
}

impl Core {
    pub(super) fn new(mut settings: HttpSettings) -> Core {
        settings.fragment_size = settings.fragment_size.max(16);
        let base = normalize_base(&settings.base_url);
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(concat!("testflinger-agent-rs/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(settings.timeouts.connect))
            .timeout_global(Some(settings.timeouts.default));
        let url = without_credentials(&base);
        // Redirects are not followed, so only an https:// base ever needs trust roots.
        let trusted = if is_https(&base) {
            let trust = tls::Trust::load();
            for warning in trust.warnings() {
                log::warn!("TLS: {warning}");
            }
            let trusted = trust.summary();
            log::info!("TLS: {url}: trusting {trusted}");
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(trust.root_certs())
                    .build(),
            );
            trusted
        } else {
            String::new()
        };
        let resolver = resolve::Shared::default();
        Core {
            agent: ureq::Agent::with_parts(
                config.build(),
                ureq::unversioned::transport::DefaultConnector::new(),
                resolver.clone(),
            ),
            resolver: resolver.0,
            cookie: format!("agent_name={}", settings.agent_id),
            auth: TokenSource::new(settings.token_file.clone(), settings.refresh_backoff),
            base,
            settings,
            tls: TlsContext { url, trusted },
            outages: AtomicU64::new(0),
        }
    }

    /// How many requests so far could not connect to the server at all (see `outages`).
    pub(super) fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// The base URL without any `user:password@`, for messages.
    pub(super) fn base_for_messages(&self) -> String {
        without_credentials(&self.base)
    }

    /// `POST` where the protocol ignores the status: a refusal is logged, not returned.
    pub(super) fn post_status_ignored(
        &self,
        path: String,
        body: &Value,
        repeat: Repeat,
    ) -> Result<(), ServerError> {
        let req = Req::post_json(path, body).repeat(repeat);
        match self.expect_success(&req) {
            Ok(reply) => {
                reply.discard();
                Ok(())
            }
            Err(e) if e.kind == ServerErrorKind::Unavailable => Err(e),
            Err(e) => {
                log::warn!("{e}");
                Ok(())
            }
        }
    }

    /// Sends `req` and maps anything but a 2xx answer to an error.
    pub(super) fn expect_success(&self, req: &Req) -> Result<Reply, ServerError> {
        let reply = self.call(req)?;
        if (200..300).contains(&reply.status) {
            Ok(reply)
        } else {
            Err(self.answer_error(req, &reply))
        }
    }

    /// Whether `req` goes out with a token, obtained or renewed first if need be: an agent
    /// endpoint, or a read any role may make once the server refused one without a token.
    fn wants_token(&self, req: &Req) -> bool {
        match req.auth {
            Auth::Required => true,
            Auth::Optional => self.auth.anonymous_refused(),
            Auth::Never => false,
        }
    }

    /// The error for a non-2xx answer that was not retried.
    pub(super) fn answer_error(&self, req: &Req, reply: &Reply) -> ServerError {
        let status = reply.status;
        let detail = reply.detail();
        let what = req.what();
        let tokenless = if !reply.with_token && self.wants_token(req) {
            if self.auth.configured() {
                " (sent without a token: obtaining one failed, see the earlier warning)"
            } else {
                " (sent without a token: no refresh-token file configured, option --token-file)"
            }
        } else {
            ""
        };
        match status {
            401 => ServerError::new(
                ServerErrorKind::Unavailable,
                what,
                format!("answered 401, not authenticated{tokenless}: {detail}"),
            ),
            403 if !reply.with_token && self.auth.configured() => ServerError::new(
                ServerErrorKind::Unavailable,
                what,
                format!("answered 403, not authorized{tokenless}: {detail}"),
            ),
            300..=399 => ServerError::new(
                ServerErrorKind::Rejected,
                what,
                format!(
                    "answered {status}, a redirect ({detail}); set server_address to the \
                     address the server redirects to"
                ),
            ),
            400..=499 => ServerError::new(
                ServerErrorKind::Rejected,
                what,
                format!("answered {status}{tokenless}: {detail}"),
            ),
            _ => ServerError::new(
                ServerErrorKind::Malformed,
                what,
                format!("answered the unexpected status {status}: {detail}"),
            ),
        }
    }

    /// Sends `req`, refreshing the token and replaying once after a 401 (or a 403 without
    /// a token), and repeating after failures as `req.repeat` allows. Returns the answer
    /// for any status below 500; a 5xx or transport failure that is not (or no longer)
    /// repeated is an [`ServerErrorKind::Unavailable`] error.
    pub(super) fn call(&self, req: &Req) -> Result<Reply, ServerError> {
        let what = req.what();
        // Seen while it waits: logged and shown as a stall on /health past the limit.
        let _in_flight = crate::metrics::call_started(&what);
        let result = self.call_with_retries(req);
        let failed = match &result {
            Err(_) => true,
            // 404 is an answer (no record, no such job), not a failed request.
            Ok(reply) => reply.status >= 400 && reply.status != 404,
        };
        if failed {
            if let Some(metrics) = crate::metrics::get() {
                metrics.request_failed(endpoint_class(req.method, &req.path));
            }
        }
        result
    }

    fn call_with_retries(&self, req: &Req) -> Result<Reply, ServerError> {
        let what = req.what();
        let attempts = req
            .attempts
            .unwrap_or(self.settings.retry.max_attempts)
            .max(1);
        let backoff = self.settings.retry.backoff();
        let exchange = |refresh: &str| self.refresh_exchange(refresh);
        let mut failures = 0u32;
        // Why the first attempt failed, for the line that says the server answered after all.
        let mut first_failure: Option<String> = None;
        let mut replayed = false;
        // One deadline for the whole call, attempts and waits between them included: a
        // server that accepts and never answers costs one timeout, not one per attempt.
        let budget = req.timeout.unwrap_or(self.settings.timeouts.default);
        let started = Instant::now();
        let deadline = started.checked_add(budget).unwrap_or(started);
        loop {
            let token = if self.wants_token(req) {
                self.auth.token(&exchange)
            } else if req.auth == Auth::Optional {
                self.auth.fresh_token()
            } else {
                None
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let (why, ambiguous, retryable, answered) = match self.once(req, token.as_deref(), left)
            {
                Err(AttemptError::Local(text)) => {
                    return Err(ServerError::new(ServerErrorKind::Local, what, text))
                }
                Err(AttemptError::Transport { text, sent }) => {
                    // The server may have moved: look its name up again next time.
                    self.resolver.forget();
                    if sent == Sent::No {
                        self.outages.fetch_add(1, Ordering::Relaxed);
                    }
                    let retryable = match sent {
                        Sent::No => true,
                        Sent::Maybe => matches!(req.repeat, Repeat::Idempotent | Repeat::Fragment),
                        Sent::Never => false,
                    };
                    (text, sent == Sent::Maybe, retryable, false)
                }
                Ok(reply) => {
                    let status = reply.status;
                    // 401: expired or missing token. 403: no token yet, or one the server
                    // no longer accepts (e.g. its signing key changed): renew and replay once.
                    let refused = status == 401 || status == 403;
                    if req.auth != Auth::Never && refused && !replayed && self.auth.configured() {
                        replayed = true;
                        if req.auth == Auth::Optional && token.is_none() {
                            self.auth.note_anonymous_refused(&what, status);
                        }
                        if self.auth.renew(token.as_deref(), &exchange).is_some() {
                            log::debug!("{what}: answered {status}; replaying with a new token");
                            continue;
                        }
                        answered_after(&what, failures, first_failure.as_deref(), started);
                        return Ok(reply);
                    }
                    if status < 500 {
                        if status == 422 {
                            log::error!(
                                "{what}: the server refused the request body as invalid (422): {}",
                                reply.detail()
                            );
                        }
                        answered_after(&what, failures, first_failure.as_deref(), started);
                        return Ok(reply);
                    }
                    let why = format!("answered {status}: {}", reply.detail());
                    (why, false, req.repeat != Repeat::Once, true)
                }
            };
            failures += 1;
            first_failure.get_or_insert_with(|| why.clone());
            if ambiguous && req.repeat == Repeat::Fragment {
                log::warn!(
                    "{what}: {why}; the server may have stored {} although it did not \
                     answer, so the job's log may show it twice once it is sent again",
                    req.label.as_deref().unwrap_or("this fragment")
                );
            }
            let wait = backoff.delay(failures);
            let out_of_time = Instant::now() + wait >= deadline;
            if !retryable || failures >= attempts || out_of_time {
                let err = ServerError::new(
                    ServerErrorKind::Unavailable,
                    what,
                    format!(
                        "{why} (after {failures} attempt(s) in {})",
                        human(started.elapsed())
                    ),
                );
                return Err(if answered { err } else { err.without_answer() });
            }
            log::debug!(
                "{what}: {why}; attempt {failures} of {attempts}, next in {}",
                human(wait)
            );
            std::thread::sleep(wait);
        }
    }

    /// `POST /v1/oauth2/refresh` once (PROTOCOL §3.2), no token, no retries.
    fn refresh_exchange(&self, refresh_token: &str) -> Result<String, String> {
        self.refresh_once(refresh_token).map_err(|e| e.to_string())
    }

    /// [`Core::refresh_exchange`] with the answer's status kept, for `check-config`.
    fn refresh_once(&self, refresh_token: &str) -> Result<String, RefreshCheckError> {
        let req = Req::post_json(
            "/v1/oauth2/refresh".to_string(),
            &json!({"refresh_token": refresh_token}),
        )
        .timeout(self.settings.timeouts.refresh)
        .without_auth();
        let what = req.what();
        match self.once(&req, None, self.settings.timeouts.refresh) {
            Ok(reply) if reply.status == 200 => {
                let bytes = reply
                    .read_all(&what)
                    .map_err(|e| RefreshCheckError::Unavailable(e.to_string()))?;
                parse_refresh_answer(&bytes, &what).map_err(|detail| RefreshCheckError::Refused {
                    status: 200,
                    detail,
                })
            }
            Ok(reply) => Err(RefreshCheckError::Refused {
                status: reply.status,
                detail: format!("{what} answered {}: {}", reply.status, reply.detail()),
            }),
            Err(AttemptError::Transport { text, .. }) | Err(AttemptError::Local(text)) => {
                Err(RefreshCheckError::Unavailable(format!("{what}: {text}")))
            }
        }
    }

    /// Reads the refresh-token file and exchanges its token once, keeping nothing: the
    /// `check-config --server` check.
    pub(super) fn check_refresh(&self) -> Result<(), RefreshCheckError> {
        let path = self
            .settings
            .token_file
            .as_deref()
            .ok_or(RefreshCheckError::NoFile)?;
        let refresh = load_refresh_token(path).map_err(RefreshCheckError::File)?;
        self.refresh_once(&refresh).map(|_| ())
    }

    /// One exchange: builds the request with the cookie and token, sends it, and reads the
    /// body of an error answer.
    fn once(&self, req: &Req, token: Option<&str>, left: Duration) -> Result<Reply, AttemptError> {
        let url = format!("{}{}", self.base, req.path);
        // What is left of the call's deadline, never less than a moment to fail in.
        let timeout = req
            .timeout
            .unwrap_or(self.settings.timeouts.default)
            .min(left)
            .max(Duration::from_millis(100));
        let connect = self.settings.timeouts.connect.min(timeout);
        // The agent's own timeouts serve most requests; a request-level configuration (a
        // copy of the agent's) only when they differ.
        let own_timeouts =
            timeout != self.settings.timeouts.default || connect != self.settings.timeouts.connect;
        let bearer = token.map(|t| format!("Bearer {t}"));
        let result = match req.method {
            Method::Get => {
                let mut b = self.agent.get(&url).header("Cookie", &self.cookie);
                for (key, value) in &req.query {
                    b = b.query(*key, value);
                }
                if let Some(bearer) = &bearer {
                    b = b.header("Authorization", bearer);
                }
                if own_timeouts {
                    b = b
                        .config()
                        .timeout_global(Some(timeout))
                        .timeout_connect(Some(connect))
                        .build();
                }
                b.call()
            }
            Method::Post => {
                let mut b = self.agent.post(&url).header("Cookie", &self.cookie);
                for (key, value) in &req.query {
                    b = b.query(*key, value);
                }
                if let Some(bearer) = &bearer {
                    b = b.header("Authorization", bearer);
                }
                if own_timeouts {
                    b = b
                        .config()
                        .timeout_global(Some(timeout))
                        .timeout_connect(Some(connect))
                        .build();
                }
                match &req.payload {
                    Payload::None => b.send_empty(),
                    Payload::Json(bytes) => b
                        .header("Content-Type", "application/json")
                        .send(&bytes[..]),
                    Payload::JsonFrom { body, from } => b
                        .header("Content-Type", "application/json")
                        .send(body.get(*from..).unwrap_or_default()),
                    Payload::Multipart { path, boundary } => {
                        let (reader, length) =
                            multipart_body(path, boundary).map_err(AttemptError::Local)?;
                        b.header(
                            "Content-Type",
                            format!("multipart/form-data; boundary={boundary}"),
                        )
                        .header("Content-Length", length.to_string())
                        .send(ureq::SendBody::from_owned_reader(reader))
                    }
                }
            }
        };
        let response = result.map_err(|e| classify(e, &self.tls))?;
        let status = response.status().as_u16();
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.into_body();
        let body = if (200..300).contains(&status) {
            ReplyBody::Stream(Box::new(body))
        } else {
            let mut text = Vec::new();
            // The explanation is best effort: a broken error body still is the error.
            let _ = body.into_reader().take(MAX_DETAIL).read_to_end(&mut text);
            let mut detail = detail_of(&text);
            if let Some(location) = location {
                detail = format!("Location: {location}; {detail}");
            }
            ReplyBody::Detail(detail)
        };
        Ok(Reply {
            status,
            with_token: token.is_some(),
            body,
        })
    }

    /// `POST /v1/result/<id>/log/<type>` with one fragment, as `req` says how often: the
    /// head of the body (number, timestamp of now, phase) is written into the room
    /// `text` keeps for it, so the text is not copied again.
    pub(super) fn fragment_request(
        &self,
        job_id: &str,
        log_type: LogType,
        number: u64,
        phase: Phase,
        text: FragmentBody,
    ) -> Req {
        let (body, from) = text.finish(number, &now_iso(), phase);
        let mut req = Req {
            method: Method::Post,
            payload: Payload::JsonFrom { body, from },
            ..Req::get(format!(
                "/v1/result/{}/log/{}",
                seg(job_id),
                log_type.name()
            ))
        }
        .timeout(self.settings.timeouts.log)
        .repeat(Repeat::Fragment);
        req.label = Some(format!(
            "{} fragment {number} of job {job_id}",
            log_type.name()
        ));
        req
    }

    /// Whether an answer to a fragment means "not stored, but may be later": an
    /// authentication failure.
    pub(super) fn is_auth_refusal(&self, reply: &Reply) -> bool {
        reply.status == 401 || (reply.status == 403 && self.auth.configured())
    }
}

/// Sorts a ureq failure by whether the server may have seen the request, and words it.
fn classify(e: ureq::Error, context: &TlsContext) -> AttemptError {
    if let Some(err) = tls::rustls_error(&e) {
        let sent = if tls::before_request(err) {
            Sent::No
        } else {
            Sent::Maybe
        };
        let text = tls::describe(err, &context.url, &context.trusted);
        return AttemptError::Transport { text, sent };
    }
    let sent = match &e {
        ureq::Error::Timeout(ureq::Timeout::Resolve | ureq::Timeout::Connect)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::ConnectProxyFailed(_)
        // ureq's own TLS refusals (e.g. a host name TLS cannot carry) come before sending.
        | ureq::Error::Tls(_) => Sent::No,
        ureq::Error::Io(io) => match io.kind() {
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NetworkDown
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::NotFound => Sent::No,
            _ => Sent::Maybe,
        },
        ureq::Error::BadUri(_)
        | ureq::Error::Http(_)
        | ureq::Error::InvalidProxyUrl
        | ureq::Error::RequireHttpsOnly(_) => Sent::Never,
        _ => Sent::Maybe,
    };
    let text = match &e {
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => {
            format!("cannot build the request ({e}); check server_address and agent_id")
        }
        ureq::Error::Tls(why) => format!("TLS: the connection to {} failed: {why}", context.url),
        _ => e.to_string(),
    };
    AttemptError::Transport { text, sent }
}

/// A call that succeeded after failed attempts says so: the retries that absorbed a server
/// blip are otherwise logged at debug level only, and an operator would see nothing of an
/// outage shorter than a call's retries.
fn answered_after(what: &str, failures: u32, first: Option<&str>, started: Instant) {
    if failures > 0 {
        log::warn!(
            "{what}: answered after {failures} failed attempt(s) in {} (the first: {})",
            human(started.elapsed()),
            first.unwrap_or("no answer")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A server on loopback that answers every request with `200 ok`, keeping connections
    /// open; it stops accepting when the returned flag is set (and the next connection
    /// wakes it).
    fn keep_alive_server() -> (u16, Arc<std::sync::atomic::AtomicBool>) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().expect("local address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let stopped = Arc::clone(&stopped);
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || stopped.load(Ordering::SeqCst) {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if conn.write_all(answer).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, stop)
    }

    #[test]
    fn the_server_name_is_resolved_once_until_a_request_fails() {
        use std::sync::atomic::Ordering;
        let (port, stop) = keep_alive_server();
        let core = Core::new(HttpSettings::new(&format!("localhost:{port}"), "agent"));
        let probe = || Req::get("/v1".to_string()).without_auth().attempts(1);
        for _ in 0..20 {
            let reply = core.call(&probe()).expect("the server answers");
            assert_eq!(reply.status, 200);
            reply.discard();
        }
        assert_eq!(core.resolver.lookups(), 1, "one look-up for 20 requests");
        // The server goes away: each failed request forgets the addresses, so the next one
        // looks the name up again.
        stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", port));
        let failed = (0..5).filter(|_| core.call(&probe()).is_err()).count();
        assert!(failed >= 3, "{failed} of 5 requests failed");
        assert!(
            core.resolver.lookups() >= 3,
            "looked up {} times",
            core.resolver.lookups()
        );
    }
}
