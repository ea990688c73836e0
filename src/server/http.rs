//! [`HttpServer`]: the Testflinger REST API (PROTOCOL §1-§3) over one ureq agent, with the
//! cookie and bearer token on every request, retries with jittered back-off for requests
//! that are safe to repeat, and the live-output streamer of [`super::stream`].
//!
//! Every answer is mapped here: ureq never turns a status into an error and no ureq type
//! leaves this module. Nothing a server sends (a status, a body, a dropped connection) can
//! panic or end the process; it becomes a [`ServerError`] whose kind says whether trying
//! again later may help.

use super::auth::{human, TokenSource};
use super::backoff::{self, Backoff, RetryPolicy};
use super::stream::{self, Streamer};
pub use super::stream::{PendingOutput, PendingPhase};
use super::{LogType, Server, ServerError, ServerErrorKind};
use crate::config::Config;
use crate::phase::Phase;
use crate::time::now_iso;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Largest answer read into memory (a job document, an agent record, an error body).
const MAX_ANSWER: u64 = 64 * 1024 * 1024;
/// How much of an error answer is kept for messages.
const MAX_DETAIL: u64 = 8 * 1024;
/// Largest fragment of a log sent in one request (PROTOCOL §6.2: 1 MiB).
pub const FRAGMENT_SIZE: usize = 1024 * 1024;

/// Per-request time limits (PROTOCOL §1.2). Every request also has the connect limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Most calls: 30 s.
    pub default: Duration,
    /// `POST .../log/<type>`: 60 s.
    pub log: Duration,
    /// Attachments download and artifact upload: 600 s.
    pub transfer: Duration,
    /// `POST /v1/oauth2/refresh`: 15 s.
    pub refresh: Duration,
    /// `GET /v1`: 10 s.
    pub health: Duration,
    /// Establishing a connection (capped by the request's own limit): 10 s.
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            default: Duration::from_secs(30),
            log: Duration::from_secs(60),
            transfer: Duration::from_secs(600),
            refresh: Duration::from_secs(15),
            health: Duration::from_secs(10),
            connect: Duration::from_secs(10),
        }
    }
}

/// Everything [`HttpServer`] needs to know.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// `server_address`; `http://` is prepended unless it starts with `http`
    /// (any case). A path prefix is kept: endpoints are joined under it.
    pub base_url: String,
    /// `agent_id`: the agent's name in paths and in the `agent_name` cookie.
    pub agent_id: String,
    /// The refresh-token file (`--token-file`); `None` sends no token at all.
    pub token_file: Option<PathBuf>,
    /// While output flows, at most one live-output post per this interval (1 s).
    pub output_post_interval: Duration,
    pub timeouts: Timeouts,
    /// Attempts and back-off for requests that are safe to repeat; the back-off (not the
    /// attempt count) also paces the resending of live output.
    pub retry: RetryPolicy,
    /// Back-off between failed token refreshes (1 s doubling to 60 s).
    pub refresh_backoff: Backoff,
    /// How long [`Server::finish_output`] waits for a phase's output to be delivered (5 s).
    pub finish_wait: Duration,
    /// Largest log fragment in bytes of the log file (1 MiB; at least 16).
    pub fragment_size: usize,
}

impl HttpSettings {
    /// The defaults of PROTOCOL §1.2 for `server_address` and `agent_id`.
    pub fn new(server_address: &str, agent_id: &str) -> HttpSettings {
        HttpSettings {
            base_url: server_address.to_string(),
            agent_id: agent_id.to_string(),
            token_file: None,
            output_post_interval: Duration::from_secs(1),
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
            refresh_backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(60),
            },
            finish_wait: Duration::from_secs(5),
            fragment_size: FRAGMENT_SIZE,
        }
    }

    /// The defaults, with `server_address`, `agent_id`, `token_file` and
    /// `output_post_interval` from the agent's config.
    pub fn from_config(config: &Config) -> HttpSettings {
        let mut settings = HttpSettings::new(&config.server_address, &config.agent_id);
        settings.token_file = config.token_file.as_ref().map(PathBuf::from);
        settings.output_post_interval = config.output_post_period();
        settings
    }
}

/// What the agent reads back from its own record (PROTOCOL §3.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentRecord {
    /// The server-side agent state; `None` when unknown.
    pub state: Option<String>,
    /// The reason for the state, `""` when none.
    pub comment: String,
    /// When the record was last written, as the server renders it.
    pub updated_at: Option<String>,
    /// The agent's queues that are restricted (with at least one owner).
    pub restricted_to: Vec<String>,
}

/// The Testflinger server over HTTP. Cheap to share between threads; dropping it stops the
/// live-output streamer (output not yet delivered stays in the log files).
pub struct HttpServer {
    core: Arc<Core>,
    streamer: Streamer,
    /// Next `serial` fragment number per job.
    serial: Mutex<HashMap<String, u64>>,
    /// For [`HttpServer::send_pending`]: a record as given, and how far a failed call got
    /// with it, per job.
    resume: Mutex<HashMap<String, (PendingOutput, PendingOutput)>>,
}

/// How many partly sent pending records [`HttpServer::send_pending`] remembers.
const REMEMBERED_RESUMES: usize = 256;

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("base", &self.core.base_for_messages())
            .field("agent_id", &self.core.settings.agent_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl HttpServer {
    /// Builds the client and starts the live-output streamer. No request is made yet.
    pub fn new(settings: HttpSettings) -> HttpServer {
        let core = Arc::new(Core::new(settings));
        let streamer = Streamer::start(Arc::clone(&core));
        HttpServer {
            core,
            streamer,
            serial: Mutex::new(HashMap::new()),
            resume: Mutex::new(HashMap::new()),
        }
    }

    /// The base every endpoint is joined to, e.g. `http://host:8000` (for messages and the
    /// `job_start` event detail).
    pub fn base_url(&self) -> &str {
        &self.core.base
    }

    /// `GET /v1`: whether the server is reachable (any status below 500). One attempt.
    pub fn health(&self) -> bool {
        let req = Req::get("/v1".to_string())
            .timeout(self.core.settings.timeouts.health)
            .attempts(1)
            .without_auth();
        match self.core.call(&req) {
            Ok(reply) => reply.status < 500,
            Err(e) => {
                log::debug!("health probe: {e}");
                false
            }
        }
    }

    /// `POST /v1/agents/data/<agent>` (PROTOCOL §3.3). A refusal is logged, not returned:
    /// the protocol ignores the status. Errors only when the server cannot be reached.
    pub fn post_agent_data(&self, data: &Value) -> Result<(), ServerError> {
        let path = format!("/v1/agents/data/{}", seg(&self.core.settings.agent_id));
        self.core
            .post_status_ignored(path, data, Repeat::Idempotent)
    }

    /// `GET /v1/agents/data/<agent>` (PROTOCOL §3.4). Any failure gives the empty record
    /// (state unknown, no restricted queues) and a logged warning.
    pub fn agent_record(&self) -> AgentRecord {
        let path = format!("/v1/agents/data/{}", seg(&self.core.settings.agent_id));
        let req = Req::get(path);
        let what = req.what();
        let bytes = match self
            .core
            .expect_success(&req)
            .and_then(|r| r.read_all(&what))
        {
            Ok(bytes) => bytes,
            Err(e) => {
                log::warn!("could not read the agent record, treating its state as unknown: {e}");
                return AgentRecord::default();
            }
        };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => parse_agent_record(&map),
            Ok(_) | Err(_) => {
                log::warn!(
                    "{what} answered something that is not a JSON object ({}); treating the \
                     agent state as unknown",
                    detail_of(&bytes)
                );
                AgentRecord::default()
            }
        }
    }

    /// `POST /v1/agents/queues` with `{"<queue>": "<description>"}` (PROTOCOL §3.5).
    /// A refusal is logged, not returned.
    pub fn post_queues(&self, queues: &Value) -> Result<(), ServerError> {
        self.core
            .post_status_ignored("/v1/agents/queues".to_string(), queues, Repeat::Idempotent)
    }

    /// `POST /v1/agents/images` (PROTOCOL §3.6). A refusal is logged, not returned.
    pub fn post_images(&self, images: &Value) -> Result<(), ServerError> {
        self.core
            .post_status_ignored("/v1/agents/images".to_string(), images, Repeat::Idempotent)
    }

    /// `GET /v1/job?queue=…` (PROTOCOL §3.7): the job document exactly as received, or
    /// `None` when there is no job. Retried only when the server surely did not hand a job
    /// out (no connection, or a 5xx answer).
    pub fn poll_job(&self, queues: &[String]) -> Result<Option<Vec<u8>>, ServerError> {
        let mut req = Req::get("/v1/job".to_string()).repeat(Repeat::Unsafe);
        req.query = queues.iter().map(|q| ("queue", q.clone())).collect();
        let what = req.what();
        let reply = self.core.expect_success(&req)?;
        if reply.status == 204 {
            return Ok(None);
        }
        let body = reply.read_all(&what)?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        Ok(Some(body))
    }

    /// `GET /v1/job/<id>/attachments` into `dest` (PROTOCOL §3.8), streamed. A 204 (no
    /// archive stored) is an error rather than an empty file.
    pub fn download_attachments(&self, job_id: &str, dest: &Path) -> Result<(), ServerError> {
        let req = Req::get(format!("/v1/job/{}/attachments", seg(job_id)))
            .timeout(self.core.settings.timeouts.transfer);
        let what = req.what();
        // A body that breaks off is downloaded once more; the request itself already
        // follows the retry policy.
        let mut broke_off = false;
        loop {
            let reply = self.core.expect_success(&req)?;
            if reply.status == 204 {
                return Err(ServerError::new(
                    ServerErrorKind::Malformed,
                    what,
                    "answered 204: no archive stored, although the job says its attachments \
                     are complete",
                ));
            }
            match reply.save_to(dest) {
                Ok(bytes) => {
                    log::debug!("{what}: saved {bytes} bytes to {}", dest.display());
                    return Ok(());
                }
                Err(SaveError::Write(e)) => {
                    let _ = std::fs::remove_file(dest);
                    return Err(ServerError::new(
                        ServerErrorKind::Local,
                        what,
                        format!("cannot write {}: {e}", dest.display()),
                    ));
                }
                Err(SaveError::Read(e)) if broke_off => {
                    let _ = std::fs::remove_file(dest);
                    return Err(ServerError::new(
                        ServerErrorKind::Unavailable,
                        what,
                        format!("the download broke off twice, last: {e}"),
                    ));
                }
                Err(SaveError::Read(e)) => {
                    let _ = std::fs::remove_file(dest);
                    log::warn!("{what}: the download broke off ({e}); downloading again");
                    broke_off = true;
                }
            }
        }
    }

    /// Stops streaming `job_id` and returns what is left to send of its live output: the
    /// daemon stores it with the run directory and later hands it to [`Self::send_pending`].
    /// Waits for a fragment being sent at this moment (bounded by the log timeout).
    pub fn detach(&self, job_id: &str) -> PendingOutput {
        lock(&self.serial).remove(job_id);
        self.streamer.detach(job_id)
    }

    /// Waits up to `timeout` until all known output of `job_id` is delivered; the job is
    /// over, so every phase counts as finished. Returns whether everything was delivered
    /// (or rejected by the server, which is logged).
    pub fn drain(&self, job_id: &str, timeout: Duration) -> bool {
        self.streamer.drain(job_id, timeout)
    }

    /// Sends what [`Self::detach`] left, from the log files in `rundir` (the run directory,
    /// wherever it has been moved), continuing the numbering. Each fragment is retried as
    /// the retry policy allows; a fragment the server refuses for good is logged and
    /// skipped.
    ///
    /// When a call fails part-way, this server remembers how far it got, so calling again
    /// with the same record resumes without sending accepted fragments twice. That memory
    /// does not survive a restart: a caller that stores the record should prefer
    /// [`Self::send_pending_resumable`] and store the updated record after an error.
    pub fn send_pending(
        &self,
        job_id: &str,
        rundir: &Path,
        pending: &PendingOutput,
    ) -> Result<(), ServerError> {
        let mut work = match lock(&self.resume).get(job_id) {
            Some((given, progressed)) if given == pending => progressed.clone(),
            _ => pending.clone(),
        };
        let result = self.send_pending_resumable(job_id, rundir, &mut work);
        let mut resume = lock(&self.resume);
        if result.is_ok() {
            resume.remove(job_id);
        } else {
            if resume.len() >= REMEMBERED_RESUMES && !resume.contains_key(job_id) {
                resume.clear();
            }
            resume.insert(job_id.to_string(), (pending.clone(), work));
        }
        result
    }

    /// [`Self::send_pending`] that updates `pending` as the server accepts fragments: after
    /// an error the caller stores it again, and a later call (even after a restart) resumes
    /// without duplicates.
    pub fn send_pending_resumable(
        &self,
        job_id: &str,
        rundir: &Path,
        pending: &mut PendingOutput,
    ) -> Result<(), ServerError> {
        stream::send_pending(&self.core, job_id, rundir, pending)
    }
}

impl Server for HttpServer {
    fn post_result(&self, job_id: &str, body: &Value) -> Result<(), ServerError> {
        let req = Req::post_json(format!("/v1/result/{}", seg(job_id)), body);
        self.core.expect_success(&req).map(drop)
    }

    fn job_state(&self, job_id: &str) -> Result<Option<String>, ServerError> {
        let req = Req::get(format!("/v1/result/{}", seg(job_id)));
        let what = req.what();
        let reply = self.core.expect_success(&req)?;
        if reply.status == 204 {
            return Ok(None);
        }
        reply.job_state(&what)
    }

    fn post_agent_state(&self, state: &str, comment: &str) -> Result<(), ServerError> {
        self.post_agent_data(&json!({"state": state, "comment": comment}))
    }

    fn output(&self, job_id: &str, phase: Phase, _chunk: &[u8], log_path: &Path, log_len: u64) {
        self.streamer.note(job_id, phase, log_path, log_len);
    }

    fn finish_output(&self, job_id: &str, phase: Phase) {
        self.streamer
            .finish(job_id, phase, self.core.settings.finish_wait);
    }

    fn post_serial_log(&self, job_id: &str, phase: Phase, path: &Path) -> Result<(), ServerError> {
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::debug!(
                    "no serial log for {phase} of job {job_id} at {}",
                    path.display()
                );
                return Ok(());
            }
            Err(e) => {
                return Err(ServerError::new(
                    ServerErrorKind::Local,
                    format!("reading the serial log of {phase}"),
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        }
        let mut number = lock(&self.serial).get(job_id).copied().unwrap_or(0);
        let mut offset = 0;
        let result = stream::send_file(
            &self.core,
            job_id,
            LogType::Serial,
            phase,
            path,
            &mut offset,
            &mut number,
        );
        lock(&self.serial).insert(job_id.to_string(), number);
        result
    }

    fn post_provision_log(
        &self,
        job_id: &str,
        exit_code: i32,
        detail: &str,
    ) -> Result<(), ServerError> {
        let path = format!(
            "/v1/agents/provision_logs/{}",
            seg(&self.core.settings.agent_id)
        );
        let body = json!({"job_id": job_id, "exit_code": exit_code, "detail": detail});
        self.core.post_status_ignored(path, &body, Repeat::Unsafe)
    }

    fn post_events(&self, job_id: &str, body: &Value) -> Result<(), ServerError> {
        // The list is cumulative, so the next event repairs a lost one; a server without a
        // webhook answers 500 to every event, which must not cost five requests each.
        let req =
            Req::post_json(format!("/v1/job/{}/events", seg(job_id)), body).repeat(Repeat::Once);
        self.core.expect_success(&req).map(drop)
    }

    fn upload_artifacts(&self, job_id: &str, tarball: &Path) -> Result<(), ServerError> {
        let boundary = format!(
            "testflinger-agent-{:016x}{:016x}",
            backoff::random_u64(),
            backoff::random_u64()
        );
        let req = Req {
            method: Method::Post,
            payload: Payload::Multipart {
                path: tarball.to_path_buf(),
                boundary,
            },
            ..Req::get(format!("/v1/result/{}/artifact", seg(job_id)))
        }
        .timeout(self.core.settings.timeouts.transfer);
        self.core.expect_success(&req).map(drop)
    }
}

// ---------------------------------------------------------------------------------------
// The request machinery, shared with the streamer.

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
    /// A `multipart/form-data` body with one part `file`, streamed from `path`.
    Multipart {
        path: PathBuf,
        boundary: String,
    },
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
    pub(super) auth: bool,
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
            auth: true,
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

    fn without_auth(mut self) -> Req {
        self.auth = false;
        self
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

enum SaveError {
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

    fn read_all(self, what: &str) -> Result<Vec<u8>, ServerError> {
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

    fn save_to(self, dest: &Path) -> Result<u64, SaveError> {
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

    /// The `job_state` of a `GET /v1/result/<id>` answer, parsed as a stream: the answer
    /// carries the job's whole output, which need not fit in memory.
    fn job_state(self, what: &str) -> Result<Option<String>, ServerError> {
        #[derive(serde::Deserialize)]
        struct Result_ {
            job_state: Option<Value>,
        }
        let ReplyBody::Stream(body) = self.body else {
            return Ok(None);
        };
        let mut counted = Counted {
            inner: body.into_reader(),
            seen_non_space: false,
        };
        match serde_json::from_reader::<_, Result_>(&mut counted) {
            Ok(r) => Ok(match r.job_state {
                Some(Value::String(s)) => Some(s),
                _ => None,
            }),
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
    /// The normalised base URL, without a trailing `/`.
    base: String,
    cookie: String,
    auth: TokenSource,
    pub(super) settings: HttpSettings,
}

impl Core {
    fn new(mut settings: HttpSettings) -> Core {
        settings.fragment_size = settings.fragment_size.max(16);
        let base = normalize_base(&settings.base_url);
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(concat!("testflinger-agent-rs/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(settings.timeouts.connect))
            .timeout_global(Some(settings.timeouts.default))
            .build();
        Core {
            agent: ureq::Agent::new_with_config(config),
            cookie: format!("agent_name={}", settings.agent_id),
            auth: TokenSource::new(settings.token_file.clone(), settings.refresh_backoff),
            base,
            settings,
        }
    }

    /// The base URL without any `user:password@`, for messages.
    fn base_for_messages(&self) -> String {
        match self.base.split_once("://") {
            Some((scheme, rest)) => {
                let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                format!("{scheme}://{host_and_path}")
            }
            None => self.base.clone(),
        }
    }

    /// `POST` where the protocol ignores the status: a refusal is logged, not returned.
    fn post_status_ignored(
        &self,
        path: String,
        body: &Value,
        repeat: Repeat,
    ) -> Result<(), ServerError> {
        let req = Req::post_json(path, body).repeat(repeat);
        match self.expect_success(&req) {
            Ok(_) => Ok(()),
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

    /// The error for a non-2xx answer that was not retried.
    pub(super) fn answer_error(&self, req: &Req, reply: &Reply) -> ServerError {
        let status = reply.status;
        let detail = reply.detail();
        let what = req.what();
        let tokenless = if !reply.with_token && req.auth {
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
        let attempts = req
            .attempts
            .unwrap_or(self.settings.retry.max_attempts)
            .max(1);
        let backoff = self.settings.retry.backoff();
        let exchange = |refresh: &str| self.refresh_exchange(refresh);
        let mut failures = 0u32;
        let mut replayed = false;
        loop {
            let token = if req.auth {
                self.auth.token(&exchange)
            } else {
                None
            };
            let (why, ambiguous, retryable) = match self.once(req, token.as_deref()) {
                Err(AttemptError::Local(text)) => {
                    return Err(ServerError::new(ServerErrorKind::Local, what, text))
                }
                Err(AttemptError::Transport { text, sent }) => {
                    let retryable = match sent {
                        Sent::No => true,
                        Sent::Maybe => matches!(req.repeat, Repeat::Idempotent | Repeat::Fragment),
                        Sent::Never => false,
                    };
                    (text, sent == Sent::Maybe, retryable)
                }
                Ok(reply) => {
                    let status = reply.status;
                    let refused = status == 401 || (status == 403 && token.is_none());
                    if req.auth && refused && !replayed && self.auth.configured() {
                        replayed = true;
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
                    (why, false, req.repeat != Repeat::Once)
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
            if !retryable || failures >= attempts {
                return Err(ServerError::new(
                    ServerErrorKind::Unavailable,
                    what,
                    format!("{why} (after {failures} attempt(s))"),
                ));
            }
            let wait = backoff.delay(failures);
            log::debug!(
                "{what}: {why}; attempt {failures} of {attempts}, next in {}",
                human(wait)
            );
            std::thread::sleep(wait);
        }
    }

    /// `POST /v1/oauth2/refresh` once (PROTOCOL §3.2), no token, no retries.
    fn refresh_exchange(&self, refresh_token: &str) -> Result<String, String> {
        let req = Req::post_json(
            "/v1/oauth2/refresh".to_string(),
            &json!({"refresh_token": refresh_token}),
        )
        .timeout(self.settings.timeouts.refresh)
        .without_auth();
        let what = req.what();
        match self.once(&req, None) {
            Ok(reply) if reply.status == 200 => {
                let bytes = reply.read_all(&what).map_err(|e| e.to_string())?;
                let parsed: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    format!("{what} answered 200 with a body that is not JSON: {e}")
                })?;
                match parsed.get("access_token") {
                    Some(Value::String(t)) if !t.is_empty() => Ok(t.clone()),
                    _ => Err(format!("{what} answered 200 without an access_token")),
                }
            }
            Ok(reply) => Err(format!(
                "{what} answered {}: {}",
                reply.status,
                reply.detail()
            )),
            Err(AttemptError::Transport { text, .. }) | Err(AttemptError::Local(text)) => {
                Err(format!("{what}: {text}"))
            }
        }
    }

    /// One exchange: builds the request with the cookie and token, sends it, and reads the
    /// body of an error answer.
    fn once(&self, req: &Req, token: Option<&str>) -> Result<Reply, AttemptError> {
        let url = format!("{}{}", self.base, req.path);
        let timeout = req.timeout.unwrap_or(self.settings.timeouts.default);
        let connect = self.settings.timeouts.connect.min(timeout);
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
                b.config()
                    .timeout_global(Some(timeout))
                    .timeout_connect(Some(connect))
                    .build()
                    .call()
            }
            Method::Post => {
                let mut b = self.agent.post(&url).header("Cookie", &self.cookie);
                for (key, value) in &req.query {
                    b = b.query(*key, value);
                }
                if let Some(bearer) = &bearer {
                    b = b.header("Authorization", bearer);
                }
                let b = b
                    .config()
                    .timeout_global(Some(timeout))
                    .timeout_connect(Some(connect))
                    .build();
                match &req.payload {
                    Payload::None => b.send_empty(),
                    Payload::Json(bytes) => b
                        .header("Content-Type", "application/json")
                        .send(&bytes[..]),
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
        let response = result.map_err(classify)?;
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

    /// `POST /v1/result/<id>/log/<type>` with one fragment, as `req` says how often.
    pub(super) fn fragment_request(
        &self,
        job_id: &str,
        log_type: LogType,
        number: u64,
        phase: Phase,
        text: &str,
    ) -> Req {
        let body = json!({
            "fragment_number": number,
            "timestamp": now_iso(),
            "phase": phase.name(),
            "log_data": text,
        });
        let mut req = Req::post_json(
            format!("/v1/result/{}/log/{}", seg(job_id), log_type.name()),
            &body,
        )
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
        reply.status == 401 || (reply.status == 403 && !reply.with_token && self.auth.configured())
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

/// Sorts a ureq failure by whether the server may have seen the request.
fn classify(e: ureq::Error) -> AttemptError {
    let sent = match &e {
        ureq::Error::Timeout(ureq::Timeout::Resolve | ureq::Timeout::Connect)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::ConnectProxyFailed(_) => Sent::No,
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
        _ => e.to_string(),
    };
    AttemptError::Transport { text, sent }
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

/// Percent-encodes one path segment (job ids and agent names are meant to need nothing).
pub(super) fn seg(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A short rendering of an error body: `message` and `detail` of a JSON error, else the
/// text, truncated.
pub(super) fn detail_of(body: &[u8]) -> String {
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

fn parse_agent_record(map: &serde_json::Map<String, Value>) -> AgentRecord {
    let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
    let restricted_to = match map.get("restricted_to") {
        Some(Value::Object(queues)) => queues.keys().cloned().collect(),
        Some(Value::Array(queues)) => queues
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    AgentRecord {
        state: text("state"),
        comment: text("comment").unwrap_or_default(),
        updated_at: text("updated_at"),
        restricted_to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn agent_record_fields() {
        let v: Value = serde_json::from_str(
            r#"{"state": "offline", "comment": "why", "updated_at": "2026-01-05T10:00:00Z",
                "restricted_to": {"q1": ["alice"], "q2": ["bob"]}, "name": "a"}"#,
        )
        .expect("valid json");
        let Value::Object(map) = v else {
            panic!("object")
        };
        let r = parse_agent_record(&map);
        assert_eq!(r.state.as_deref(), Some("offline"));
        assert_eq!(r.comment, "why");
        assert_eq!(r.updated_at.as_deref(), Some("2026-01-05T10:00:00Z"));
        assert_eq!(r.restricted_to, ["q1", "q2"]);
        let r = parse_agent_record(&serde_json::Map::new());
        assert_eq!(r, AgentRecord::default());
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
