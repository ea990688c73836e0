//! The request machinery under [`super::http::HttpServer`]: one ureq agent, the identity
//! cookie and bearer token on every request, the 401 refresh-and-replay, retries with
//! jittered back-off for what is safe to repeat, and the mapping of every answer and
//! transport failure to a [`ServerError`]. No ureq type leaves this file (and
//! [`super::tls`], which chooses the trusted roots and words certificate failures, and
//! [`super::resolve`], which keeps the server's addresses between requests).
//!
//! Nothing a server sends (a status, a body, a dropped connection) can panic here; it
//! becomes a [`ServerError`] whose kind says whether trying again later may help.

use super::auth::{human, load_refresh_token, TokenSource};
use super::fragment::FragmentBody;
use super::resolve;
use super::settings::HttpSettings;
use super::tls;
use super::{LogType, RefreshCheckError, ServerError, ServerErrorKind};
use crate::phase::Phase;
use crate::time::now_iso;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use std::fs::File;
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest answer read into memory (a job document, an agent record, an error body).
const MAX_ANSWER: u64 = 64 * 1024 * 1024;
/// How much of an error answer is kept for messages.
const MAX_DETAIL: u64 = 8 * 1024;
/// The most of an unneeded success answer read to reuse its connection (see
/// [`Reply::discard`]).
const MAX_DISCARDED: u64 = 64 * 1024;
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Method {
    Get,
    Post,
}

/// Which failures a request may be repeated after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Repeat {
    /// Repeating has no further effect: after any transport error and any 5xx.
    Idempotent,
    /// Repeating may duplicate: only when the server surely did not act (no connection,
    /// or it answered 5xx).
    Unsafe,
    /// Only when no connection was made.
    Once,
    /// A log fragment: like `Unsafe`, and also after an ambiguous failure, with a warning,
    /// because a lost fragment is worse than a rare duplicate (PROTOCOL §3.11).
    Fragment,
}

pub(super) enum Payload {
    None,
    Json(Vec<u8>),
    /// A JSON body that starts `from` bytes into the buffer (a log fragment built in place,
    /// see [`FragmentBody`]).
    JsonFrom {
        body: Vec<u8>,
        from: usize,
    },
    /// A `multipart/form-data` body with one part `file`, streamed from `path`.
    Multipart {
        path: PathBuf,
        boundary: String,
    },
}

/// Whether a request needs the access token (PROTOCOL §1.3, the role table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Auth {
    /// An agent endpoint: the token goes along, renewed first when it is due.
    Required,
    /// An endpoint any role may read, anonymous callers too while the server has OIDC off
    /// (the job state, the agent record): the cached token goes along while it is fresh,
    /// none otherwise, and none is obtained or renewed for it, so that a phase that only
    /// checks for cancellation never refreshes a token. Once the server refuses such a
    /// request sent without a token (OIDC on), these requests are treated as
    /// [`Auth::Required`] for the rest of the agent's life.
    Optional,
    /// Never a token (the health probe, the refresh itself).
    Never,
}

/// One request, replayable.
pub(super) struct Req {
    pub(super) method: Method,
    /// `/v1/...`, segments already escaped.
    pub(super) path: String,
    pub(super) query: Vec<(&'static str, String)>,
    pub(super) payload: Payload,
    pub(super) timeout: Option<Duration>,
    pub(super) repeat: Repeat,
    /// Attempts in total; `None` uses the retry policy.
    pub(super) attempts: Option<u32>,
    pub(super) auth: Auth,
    /// What the request carries, for warnings about possible duplicates.
    pub(super) label: Option<String>,
}

impl Req {
    pub(super) fn get(path: String) -> Req {
        Req {
            method: Method::Get,
            path,
            query: Vec::new(),
            payload: Payload::None,
            timeout: None,
            repeat: Repeat::Idempotent,
            attempts: None,
            auth: Auth::Required,
            label: None,
        }
    }

    pub(super) fn post_json(path: String, body: &Value) -> Req {
        // Serialising a `Value` cannot fail (its map keys are strings).
        let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
        Req {
            method: Method::Post,
            payload: Payload::Json(bytes),
            ..Req::get(path)
        }
    }

    pub(super) fn timeout(mut self, timeout: Duration) -> Req {
        self.timeout = Some(timeout);
        self
    }

    pub(super) fn repeat(mut self, repeat: Repeat) -> Req {
        self.repeat = repeat;
        self
    }

    pub(super) fn attempts(mut self, attempts: u32) -> Req {
        self.attempts = Some(attempts);
        self
    }

    pub(super) fn without_auth(mut self) -> Req {
        self.auth = Auth::Never;
        self
    }

    /// For an endpoint that any role, and an anonymous caller, may read (see
    /// [`Auth::Optional`]).
    pub(super) fn token_optional(mut self) -> Req {
        self.auth = Auth::Optional;
        self
    }

    /// The buffer of a fragment's body, for the next fragment to be built in.
    pub(super) fn into_buffer(self) -> Option<Vec<u8>> {
        match self.payload {
            Payload::JsonFrom { body, .. } | Payload::Json(body) => Some(body),
            _ => None,
        }
    }

    /// `POST /v1/result/<id>`, for messages (never with the host or credentials).
    pub(super) fn what(&self) -> String {
        let method = match self.method {
            Method::Get => "GET",
            Method::Post => "POST",
        };
        if self.query.is_empty() {
            format!("{method} {}", self.path)
        } else {
            let query: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{method} {}?{}", self.path, query.join("&"))
        }
    }
}

/// An answer; error answers have their body already read into `detail`.
pub(super) struct Reply {
    pub(super) status: u16,
    /// Whether the request that got this answer carried a token.
    pub(super) with_token: bool,
    body: ReplyBody,
}

enum ReplyBody {
    Stream(Box<ureq::Body>),
    Detail(String),
}

pub(super) enum SaveError {
    Read(io::Error),
    Write(io::Error),
}

impl Reply {
    /// The server's explanation for an error answer (`""` for a success).
    pub(super) fn detail(&self) -> &str {
        match &self.body {
            ReplyBody::Detail(d) => d,
            ReplyBody::Stream(_) => "",
        }
    }

    /// Done with a success answer whose body is not needed (`{}`, `OK`): reads what is left
    /// of it, at most [`MAX_DISCARDED`] bytes, so that its connection goes back to the pool.
    /// A body dropped unread closes the connection, and the next request opens a new one
    /// (over HTTPS, with a new TLS handshake): several per phase.
    pub(super) fn discard(self) {
        if let ReplyBody::Stream(body) = self.body {
            let _ = io::copy(&mut body.into_reader().take(MAX_DISCARDED), &mut io::sink());
        }
    }

    pub(super) fn read_all(self, what: &str) -> Result<Vec<u8>, ServerError> {
        match self.body {
            ReplyBody::Detail(d) => Ok(d.into_bytes()),
            ReplyBody::Stream(mut body) => body
                .with_config()
                .limit(MAX_ANSWER)
                .read_to_vec()
                .map_err(|e| {
                    let kind = if matches!(e, ureq::Error::BodyExceedsLimit(_)) {
                        ServerErrorKind::Malformed
                    } else {
                        ServerErrorKind::Unavailable
                    };
                    ServerError::new(kind, what, format!("reading the answer failed: {e}"))
                }),
        }
    }

    pub(super) fn save_to(self, dest: &Path) -> Result<u64, SaveError> {
        let ReplyBody::Stream(body) = self.body else {
            return Err(SaveError::Read(io::Error::other("no body")));
        };
        let mut reader = body.into_reader();
        let mut file = File::create(dest).map_err(SaveError::Write)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SaveError::Read(e)),
            };
            file.write_all(&buf[..n]).map_err(SaveError::Write)?;
            total += n as u64;
        }
        file.sync_all().map_err(SaveError::Write)?;
        Ok(total)
    }

    /// The `job_state` of a `GET /v1/result/<id>` answer (see [`parse_job_state`]).
    pub(super) fn job_state(self, what: &str) -> Result<Option<String>, ServerError> {
        let ReplyBody::Stream(body) = self.body else {
            return Ok(None);
        };
        parse_job_state(body.into_reader(), what)
    }
}

/// The `job_state` of a `GET /v1/result/<id>` answer, parsed as a stream: the answer
/// carries the job's whole output, which need not fit in memory. Reading stops as soon as
/// `job_state` has been seen (the real server sorts the keys, so it comes before the
/// `provision_`, `setup_` and `test_` logs); the rest of the answer is left unread.
/// `Ok(None)` for an empty answer, an object without `job_state` or a `job_state` that is
/// not a string; an error for anything else that is not a JSON object.
pub(crate) fn parse_job_state(body: impl Read, what: &str) -> Result<Option<String>, ServerError> {
    let mut counted = Counted {
        inner: body,
        seen_non_space: false,
    };
    let found = std::cell::RefCell::new(None);
    // serde_json reads byte by byte: give it large blocks.
    let buffered = io::BufReader::with_capacity(64 * 1024, &mut counted);
    let mut de = serde_json::Deserializer::from_reader(buffered);
    let parsed = serde::Deserializer::deserialize_map(&mut de, JobStateOnly { found: &found });
    if let Some(state) = found.into_inner() {
        return Ok(state);
    }
    match parsed {
        Ok(()) => Ok(None),
        Err(e) if !counted.seen_non_space && e.is_eof() => Ok(None),
        Err(e) if e.is_io() => Err(ServerError::new(
            ServerErrorKind::Unavailable,
            what,
            format!("reading the answer failed: {e}"),
        )),
        Err(e) => Err(ServerError::new(
            ServerErrorKind::Malformed,
            what,
            format!("the answer is not a JSON object with a job_state: {e}"),
        )),
    }
}

/// Walks a JSON object until its `job_state`, stores it in `found` and stops the parse
/// there (by an error the caller ignores once `found` is set).
struct JobStateOnly<'a> {
    found: &'a std::cell::RefCell<Option<Option<String>>>,
}

impl<'de> serde::de::Visitor<'de> for JobStateOnly<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "job_state" {
                let state = match map.next_value::<Value>()? {
                    Value::String(s) => Some(s),
                    _ => None,
                };
                *self.found.borrow_mut() = Some(state);
                return Err(serde::de::Error::custom(
                    "job_state found; the rest is not read",
                ));
            }
            map.next_value::<serde::de::IgnoredAny>()?;
        }
        Ok(())
    }
}

/// Remembers whether anything but whitespace went through, to tell an empty answer from a
/// truncated one.
struct Counted<R> {
    inner: R,
    seen_non_space: bool,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if !self.seen_non_space && buf[..n].iter().any(|b| !b.is_ascii_whitespace()) {
            self.seen_non_space = true;
        }
        Ok(n)
    }
}

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
                        return Ok(reply);
                    }
                    if status < 500 {
                        if status == 422 {
                            log::error!(
                                "{what}: the server refused the request body as invalid (422): {}",
                                reply.detail()
                            );
                        }
                        return Ok(reply);
                    }
                    let why = format!("answered {status}: {}", reply.detail());
                    (why, false, req.repeat != Repeat::Once, true)
                }
            };
            failures += 1;
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

/// The access token of a 200 answer to `POST /v1/oauth2/refresh`: a JSON object with a
/// non-empty string `access_token` (other keys, e.g. `refresh_token`, are ignored).
pub(crate) fn parse_refresh_answer(body: &[u8], what: &str) -> Result<String, String> {
    let parsed: Value = serde_json::from_slice(body)
        .map_err(|e| format!("{what} answered 200 with a body that is not JSON: {e}"))?;
    match parsed.get("access_token") {
        Some(Value::String(t)) if !t.is_empty() => Ok(t.clone()),
        _ => Err(format!("{what} answered 200 without an access_token")),
    }
}

/// The streamed multipart body and its exact length.
fn multipart_body(path: &Path, boundary: &str) -> Result<(impl Read + 'static, u64), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot read the size of {}: {e}", path.display()))?
        .len();
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n\
         Content-Type: application/x-gzip\r\n\r\n"
    )
    .into_bytes();
    let tail = format!("\r\n--{boundary}--\r\n").into_bytes();
    let length = head.len() as u64 + size + tail.len() as u64;
    let reader = Cursor::new(head)
        .chain(Exact {
            inner: file.take(size),
            left: size,
        })
        .chain(Cursor::new(tail));
    Ok((reader, length))
}

/// Yields exactly `left` bytes: an error if the file shrank, so the request fails instead
/// of leaving the server waiting for the promised length.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being uploaded",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The endpoint class of a request, for the request-failure metric: a few fixed words,
/// never a job id or an agent name.
fn endpoint_class(method: Method, path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (_, ["v1", "oauth2", ..]) => "token",
        (_, ["v1", "agents", "data", ..]) => "agent_data",
        (_, ["v1", "agents", "provision_logs", ..]) => "provision_logs",
        (_, ["v1", "agents", ..]) => "advertise",
        (_, ["v1", "job", _, "attachments"]) => "attachments",
        (_, ["v1", "job", _, "events"]) => "events",
        (Method::Get, ["v1", "job"]) => "job_poll",
        (_, ["v1", "result", _, "log", ..]) => "log",
        (_, ["v1", "result", _, "artifact"]) => "artifact",
        (Method::Get, ["v1", "result", _] | ["v1", "result", _, "status"]) => "job_state",
        (_, ["v1", "result", _]) => "result",
        _ => "other",
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

/// A URL without any `user:password@`, for messages.
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{host_and_path}")
        }
        None => url.to_string(),
    }
}

fn is_https(base: &str) -> bool {
    base.get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
}

/// `server_address` as a base URL: `http://` prepended unless it starts with `http` (any
/// case), trailing `/` removed, any path prefix kept.
pub fn normalize_base(server_address: &str) -> String {
    let address = server_address.trim();
    let has_scheme = address
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("http"));
    let url = if has_scheme {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    url.trim_end_matches('/').to_string()
}

/// What a path segment keeps as it is: RFC 3986's unreserved characters (letters, digits,
/// `-`, `.`, `_`, `~`); every other byte is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment (job ids and agent names are meant to need nothing).
pub(super) fn seg(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

/// A short rendering of an error body: `message` and `detail` of a JSON error, else the
/// text, truncated to 500 bytes (and an ellipsis); never empty.
pub(crate) fn detail_of(body: &[u8]) -> String {
    const MAX: usize = 500;
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        let message = map.get("message").and_then(Value::as_str);
        let detail = map.get("detail").filter(|d| match d {
            Value::Null => false,
            Value::Object(o) => !o.is_empty(),
            Value::String(s) => !s.is_empty(),
            _ => true,
        });
        let text = match (message, detail) {
            (Some(m), Some(Value::String(d))) => format!("{m}: {d}"),
            (Some(m), Some(d)) => format!("{m}: {d}"),
            (Some(m), None) => m.to_string(),
            (None, Some(Value::String(d))) => d.clone(),
            (None, Some(d)) => d.to_string(),
            (None, None) => Value::Object(map).to_string(),
        };
        return truncate(text, MAX);
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_string()
    } else {
        truncate(text.to_string(), MAX)
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn endpoint_classes_name_no_ids() {
        for (method, path, class) in [
            (Method::Get, "/v1/job", "job_poll"),
            (Method::Get, "/v1/job/abc/attachments", "attachments"),
            (Method::Post, "/v1/job/abc/events", "events"),
            (Method::Post, "/v1/agents/data/dut-1", "agent_data"),
            (Method::Get, "/v1/agents/data/dut-1", "agent_data"),
            (Method::Post, "/v1/agents/queues", "advertise"),
            (
                Method::Post,
                "/v1/agents/provision_logs/dut-1",
                "provision_logs",
            ),
            (Method::Post, "/v1/result/abc/log/output", "log"),
            (Method::Post, "/v1/result/abc/artifact", "artifact"),
            (Method::Get, "/v1/result/abc", "job_state"),
            (Method::Get, "/v1/result/abc/status", "job_state"),
            (Method::Post, "/v1/result/abc", "result"),
            (Method::Post, "/v1/oauth2/refresh", "token"),
            (Method::Get, "/v1", "other"),
        ] {
            assert_eq!(endpoint_class(method, path), class, "{path}");
        }
    }

    #[test]
    fn base_keeps_prefix_and_adds_scheme() {
        assert_eq!(normalize_base("tf.example.com"), "http://tf.example.com");
        assert_eq!(normalize_base("HTTPS://tf/"), "HTTPS://tf");
        assert_eq!(
            normalize_base(" http://host:8000/prefix/ "),
            "http://host:8000/prefix"
        );
        assert_eq!(normalize_base("é"), "http://é");
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(seg("2bac1457-7d5e"), "2bac1457-7d5e");
        assert_eq!(seg("a/b?c d"), "a%2Fb%3Fc%20d");
        assert_eq!(seg("dev_01.lab~x"), "dev_01.lab~x");
        assert_eq!(seg("é%#"), "%C3%A9%25%23");
    }

    #[test]
    fn details_are_short_and_readable() {
        assert_eq!(
            detail_of(br#"{"message": "Validation error", "detail": {"json": {"x": ["Unknown field."]}}}"#),
            r#"Validation error: {"json":{"x":["Unknown field."]}}"#
        );
        assert_eq!(detail_of(br#"{"message": "Nope", "detail": {}}"#), "Nope");
        assert_eq!(detail_of(b"Invalid job id\n"), "Invalid job id");
        assert_eq!(detail_of(b""), "(empty body)");
        let long = "é".repeat(600);
        let d = detail_of(long.as_bytes());
        assert!(d.len() <= 504 && d.ends_with('…'));
    }

    #[test]
    fn multipart_body_has_the_promised_length() {
        let dir = std::env::temp_dir().join(format!("tf-mp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("a.tar.gz");
        std::fs::write(&path, b"\x1f\x8b binary \r\n-- data").expect("write");
        let (mut reader, length) = multipart_body(&path, "XYZ").expect("body");
        let mut all = Vec::new();
        reader.read_to_end(&mut all).expect("read");
        assert_eq!(all.len() as u64, length);
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with(
            "--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n"
        ));
        assert!(text.ends_with("\r\n--XYZ--\r\n"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
