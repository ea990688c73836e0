//! In-process fake Testflinger server for integration tests, built from docs/protocol.md.
//!
//! [`FakeServer::start`] listens on `127.0.0.1:<ephemeral port>` (loopback only) and answers
//! the agent-facing endpoints of PROTOCOL §2–§3 with the real server's status codes and
//! bodies, plus the client-side endpoints of §3.16 that tests use to create, cancel and
//! inspect jobs over HTTP. Tests can also drive and inspect it in-process (no HTTP):
//! [`FakeServer::submit_job`], [`FakeServer::fragments`], [`FakeServer::requests`], …
//!
//! # Fidelity
//!
//! Kept from the real server, because an agent must cope with them: log fragments are stored
//! as they arrive (duplicates included) and rebuilt in number order; a job handed out is in
//! state `running`; `started_at` is rendered `…+00:00Z`; `POST /v1/result/<id>` shallow-sets
//! each top-level key (`status` replaces the whole map); result, log and artifact posts do
//! not check that the job exists; a 204 means "nothing"; request bodies are validated
//! strictly (unknown fields and wrong types → 422); a body sent without a JSON content type,
//! or an empty one, is read as `{}` (as webargs does); `GET /v1/job` needs the `agent_name`
//! cookie. A job id that is not a UUID gets 400 with the body of that endpoint: plain
//! `Invalid job id\n` (attachments, artifacts, action) or JSON `Invalid job_id specified`
//! (results, log posts, events).
//!
//! `GET /v1/result/<id>/status` (PROTOCOL §15.1) is there unless
//! [`FakeConfig::status_endpoint`] or [`FakeServer::set_status_endpoint`] switch it off, to
//! play a server from before it (404, an unknown route). Every answered job-state read is
//! recorded with its kind and the log bytes it carried ([`FakeServer::state_reads`]).
//!
//! Deliberate differences: integers must be JSON integers and booleans JSON booleans
//! (marshmallow would also take `"17"` or `"yes"`); provision data is only checked to be an
//! object; access tokens are opaque strings and expire exactly at their TTL (no 5 s
//! leeway); job-submission permission checks (priority, restricted queues, reservation
//! time) are not made; client-side endpoints need no token (a bearer token there is the
//! agent's, which the real server refuses with 403, and so does the fake); resubmitting an
//! existing `job_id` replaces that job.
//!
//! # Authentication (PROTOCOL §1.3)
//!
//! With [`FakeConfig::require_auth`] (the default), agent endpoints need
//! `Authorization: Bearer <token>` with a token issued by `POST /v1/oauth2/refresh` for one
//! of [`FakeConfig::refresh_tokens`] (by default [`DEFAULT_REFRESH_TOKEN`]) and not yet
//! expired. Expired → 401 `Token has expired`; unknown → 403; missing → 403 with OIDC off,
//! 401 with OIDC on. `GET /v1/result/<id>`, `GET /v1/result/<id>/status` and
//! `GET /v1/agents/data/<agent>` also accept anonymous requests when OIDC is off. With
//! `require_auth: false` (archived-era server) tokens are ignored, but `GET /v1/job` still
//! needs the cookie.
//!
//! # Fault injection
//!
//! Faults target a [`Route`] (a named endpoint, [`Route::Any`], or [`Route::prefix`] for a
//! method and raw path prefix) and are consumed in the order they were added:
//!
//! * [`FakeServer::fail_next`]`(route, n, status)`: the next `n` matching requests get
//!   `status` (e.g. 500, 503) with a plain-text body, and are **not** applied.
//! * [`FakeServer::drop_next`]`(route, n)`: the next `n` matching requests are read whole,
//!   not applied, and their connection is closed without a byte of response: the client sees
//!   a connection error at once (recorded with status 0).
//! * [`FakeServer::delay`]`(route, d)`: every matching request waits `d` before being
//!   handled (other connections are served meanwhile); `Duration::ZERO` removes the delay.
//! * [`FakeServer::expire_all_tokens`]: every access token issued so far is expired; the
//!   next authenticated request gets 401 `Token has expired`.
//! * [`FakeServer::go_down`]: the listener is closed and every open connection shut, so new
//!   connections are refused; [`FakeServer::come_back`] listens again on the same port,
//!   which no other socket can take meanwhile.
//! * [`FakeServer::swallow`]`(true)`: a black hole; connections are accepted and requests
//!   read, but nothing is answered until it is turned off (the swallowed requests never are).
//! * [`FakeServer::clear_faults`] removes pending fail/drop counts and delays.
//!
//! Dropping the server stops it: delayed requests are cut short, every connection is
//! closed and every thread joined. Nothing in `Drop` panics.

use crate::http_wire::{Handler, Reply, Streamed, WireRequest, WireResponse, WireServer};
use crate::iso_time::{now_micros, parse_iso_datetime, render_aware, render_naive};
use crate::multipart;
use crate::schema::{self, is_valid_uuid, validate, PHASES};
use serde_json::{json, Map, Value};
use std::cmp::Reverse;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The refresh token every fake server accepts unless [`FakeConfig::refresh_tokens`] says
/// otherwise.
pub const DEFAULT_REFRESH_TOKEN: &str = "fake-refresh-token";

/// Requests of 16 MiB or more to `POST /v1/result/<id>` get 413.
const RESULT_SIZE_LIMIT: usize = 16 * 1024 * 1024;

/// The server's text for an unknown route.
const NOT_FOUND_TEXT: &str = "Not found: 404 Not Found: The requested URL was not found on \
the server. If you entered the URL manually please check your spelling and try again.\n";

/// Client id recorded on jobs that use secrets.
const FAKE_CLIENT_ID: &str = "fake-client";

/// How the fake server behaves.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// Agent endpoints need a bearer token (current server). Default true.
    pub require_auth: bool,
    /// OIDC enabled on the server: tokenless requests get 401 instead of 403. Default false.
    pub oidc_enabled: bool,
    /// Refresh tokens accepted by `POST /v1/oauth2/refresh`. Default:
    /// `[DEFAULT_REFRESH_TOKEN]`.
    pub refresh_tokens: Vec<String>,
    /// Lifetime of issued access tokens. Default 600 s, like the server.
    pub access_token_ttl: Duration,
    /// The server's `WEBHOOK_URL`. `None`: `POST /v1/job/<id>/events` answers 500 like a
    /// server without webhook configuration. Some: events whose webhook has the same scheme
    /// and host are accepted with 200 (others 403).
    pub webhook_base: Option<String>,
    /// Secrets store: `(path, value)` pairs that jobs may reference in `test_data.secrets`.
    pub secrets: Vec<(String, String)>,
    /// The server has `GET /v1/result/<id>/status` (PROTOCOL §15.1). Default true; false
    /// plays a server from before it, which answers that path 404. Can be switched while
    /// running with [`FakeServer::set_status_endpoint`].
    pub status_endpoint: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            require_auth: true,
            oidc_enabled: false,
            refresh_tokens: vec![DEFAULT_REFRESH_TOKEN.to_string()],
            access_token_ttl: Duration::from_secs(600),
            webhook_base: None,
            secrets: Vec::new(),
            status_endpoint: true,
        }
    }
}

/// An endpoint, for fault injection and for reading [`RequestRecord`]s.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// `GET /v1`
    Health,
    /// `POST /v1/oauth2/refresh`
    Refresh,
    /// `POST /v1/agents/data/<agent>`
    AgentDataPost,
    /// `GET /v1/agents/data/<agent>`
    AgentDataGet,
    /// `POST /v1/agents/queues`
    Queues,
    /// `POST /v1/agents/images`
    Images,
    /// `GET /v1/job?queue=…`
    JobPoll,
    /// `GET /v1/job/<id>/attachments`
    AttachmentsGet,
    /// `POST /v1/result/<id>`
    ResultPost,
    /// `GET /v1/result/<id>`
    ResultGet,
    /// `GET /v1/result/<id>/status` (404 when the endpoint is switched off)
    ResultStatusGet,
    /// `POST /v1/result/<id>/log/<type>`
    LogPost,
    /// `POST /v1/result/<id>/artifact`
    ArtifactPost,
    /// `POST /v1/agents/provision_logs/<agent>`
    ProvisionLogs,
    /// `POST /v1/job/<id>/events`
    Events,
    /// `POST /v1/job` (client)
    JobSubmit,
    /// `GET /v1/job/<id>` (client)
    JobGet,
    /// `POST /v1/job/<id>/attachments` (client)
    AttachmentsPost,
    /// `POST /v1/job/<id>/action` (client)
    JobAction,
    /// `GET /v1/result/<id>/artifact` (client)
    ArtifactGet,
    /// `GET /v1/result/<id>/log/<type>` (client)
    LogGet,
    /// Every request (fault injection only).
    Any,
    /// Requests whose method matches (`"*"` or `""`: any) and whose raw path starts with
    /// `prefix` (fault injection only).
    Prefix { method: String, prefix: String },
}

impl Route {
    /// A method + raw path prefix matcher, e.g. `Route::prefix("POST", "/v1/result/")`.
    pub fn prefix(method: &str, prefix: &str) -> Route {
        Route::Prefix {
            method: method.to_string(),
            prefix: prefix.to_string(),
        }
    }

    fn matches(&self, method: &str, path: &str, classified: Option<&Route>) -> bool {
        match self {
            Route::Any => true,
            Route::Prefix { method: m, prefix } => {
                (m.is_empty() || m == "*" || m.eq_ignore_ascii_case(method))
                    && path.starts_with(prefix.as_str())
            }
            named => classified == Some(named),
        }
    }
}

/// One request the server received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// Raw path, without the query string.
    pub path: String,
    pub query: String,
    /// The endpoint, when the path named one.
    pub route: Option<Route>,
    /// The status answered; 0 when the connection was dropped (see [`FakeServer::drop_next`]).
    pub status: u16,
    /// When the request was received (whole).
    pub at: Instant,
    /// The first 2 KiB of the body, lossily decoded, for diagnostics.
    pub body_excerpt: String,
    /// Whether the request carried an `Authorization` header.
    pub authorization: bool,
}

/// One stored log fragment (PROTOCOL §3.11), exactly as posted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub job_id: String,
    pub log_type: String,
    pub phase: String,
    pub fragment_number: i64,
    pub timestamp: String,
    pub log_data: String,
}

/// Which request read a job's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadKind {
    /// `GET /v1/result/<id>`: every log of the job rebuilt into the answer.
    Full,
    /// `GET /v1/result/<id>/status`: the state and exit codes only.
    Status,
}

/// One answered job-state read and what it cost the server.
#[derive(Clone, Debug)]
pub struct StateRead {
    pub kind: ReadKind,
    pub job_id: String,
    /// When the request was handled.
    pub at: Instant,
    /// Bytes of log text the answer carried (always 0 for [`ReadKind::Status`]).
    pub log_bytes: usize,
}

struct StoredFragment {
    fragment: Fragment,
    /// The timestamp in microseconds since the epoch.
    at: i64,
}

struct Job {
    id: String,
    queue: String,
    priority: i64,
    /// The submitted definition (normalised), plus `attachments_status`/`client_id`.
    data: Map<String, Value>,
    result: Map<String, Value>,
}

impl Job {
    fn state(&self) -> &str {
        self.result
            .get("job_state")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

struct Agent {
    record: Map<String, Value>,
    log: Vec<String>,
}

#[derive(Clone, Copy)]
enum FaultKind {
    Fail(u16),
    Drop,
}

struct Fault {
    route: Route,
    remaining: usize,
    kind: FaultKind,
}

#[derive(Default)]
struct State {
    jobs: Vec<Job>,
    /// Shared, so that an answer holding a job's whole output streams from them after the
    /// lock is released.
    fragments: Vec<Arc<StoredFragment>>,
    artifacts: HashMap<String, Vec<Vec<u8>>>,
    attachments: HashMap<String, Vec<u8>>,
    agents: HashMap<String, Agent>,
    agent_posts: HashMap<String, Vec<Value>>,
    provision_logs: HashMap<String, Vec<Value>>,
    events: HashMap<String, Vec<Value>>,
    queues: Map<String, Value>,
    images: Map<String, Value>,
    restricted: HashMap<String, Vec<String>>,
    /// Refresh token → revoked.
    refresh_tokens: HashMap<String, bool>,
    /// Access token → expiry.
    access_tokens: HashMap<String, Instant>,
    counter: u64,
    secrets: HashMap<String, String>,
    requests: Vec<RequestRecord>,
    faults: Vec<Fault>,
    delays: Vec<(Route, Duration)>,
    server_errors: Vec<String>,
    /// Raw bodies handed out by the next polls of their queue (see `serve_raw_job`).
    raw_jobs: Vec<(String, String)>,
    /// Whether `GET /v1/result/<id>/status` exists now.
    status_endpoint: bool,
    /// Job-state reads answered (200 or 204), in order.
    state_reads: Vec<StateRead>,
}

struct Shared {
    config: FakeConfig,
    port: u16,
    state: Mutex<State>,
    stopping: Mutex<bool>,
    wake: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The fake server. See the module documentation.
pub struct FakeServer {
    shared: Arc<Shared>,
    wire: WireServer,
}

impl FakeServer {
    /// Starts a server with [`FakeConfig::default`].
    pub fn start() -> FakeServer {
        Self::start_with(FakeConfig::default())
    }

    /// Starts a server with this configuration.
    pub fn start_with(config: FakeConfig) -> FakeServer {
        let mut state = State::default();
        for token in &config.refresh_tokens {
            state.refresh_tokens.insert(token.clone(), false);
        }
        state.secrets = config.secrets.iter().cloned().collect();
        state.status_endpoint = config.status_endpoint;
        // The handler needs `Shared`, which needs the port, known once bound.
        let slot: Arc<OnceLock<Arc<Shared>>> = Arc::new(OnceLock::new());
        let handler_slot = Arc::clone(&slot);
        let handler: Handler = Arc::new(move |req| match handler_slot.get() {
            Some(shared) => shared.handle(req),
            None => Reply::Send(WireResponse::new(
                503,
                "text/plain; charset=utf-8",
                "starting\n",
            )),
        });
        let wire = WireServer::start(0, handler).expect("bind the fake server on 127.0.0.1:0");
        let shared = Arc::new(Shared {
            config,
            port: wire.port(),
            state: Mutex::new(state),
            stopping: Mutex::new(false),
            wake: Condvar::new(),
        });
        let _ = slot.set(Arc::clone(&shared));
        FakeServer { shared, wire }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.wire.port())
    }

    pub fn port(&self) -> u16 {
        self.wire.port()
    }

    /// How many TCP connections the server accepted so far (a client that reuses its
    /// connections opens few).
    pub fn connections_accepted(&self) -> u64 {
        self.wire.connections_accepted()
    }

    pub fn config(&self) -> &FakeConfig {
        &self.shared.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    // ----- jobs ---------------------------------------------------------------------------

    /// Queues a job as `POST /v1/job` would (same validation, attachments → waiting for
    /// them, secrets checked), except that it does not require an agent able to run a job
    /// with `exclude_agents`, so tests may queue work before agents start.
    /// Panics with the server's error body if the job is invalid.
    pub fn submit_job(&self, job: Value) -> String {
        match self.try_submit_job(job) {
            Ok(id) => id,
            Err(e) => panic!("fake server refused the job: {e}"),
        }
    }

    /// [`Self::submit_job`] returning the server's error body instead of panicking.
    pub fn try_submit_job(&self, job: Value) -> Result<String, Value> {
        let mut st = self.state();
        self.shared
            .create_job(&mut st, &job, false)
            .map_err(|resp| serde_json::from_slice(&resp.body).unwrap_or(Value::Null))
    }

    /// Cancels like `POST /v1/job/<id>/action {"action": "cancel"}`; false if the job is
    /// unknown or already complete/completed/cancelled.
    /// The next `GET /v1/job` polling `queue` answers 200 with exactly `body`, whatever it
    /// is (for testing how the agent copes with a malformed job document).
    pub fn serve_raw_job(&self, queue: &str, body: &str) {
        lock(&self.shared.state)
            .raw_jobs
            .push((queue.to_string(), body.to_string()));
    }

    pub fn cancel_job(&self, id: &str) -> bool {
        cancel(&mut self.state(), id)
    }

    /// `result_data.job_state`, if the job exists.
    pub fn job_state(&self, id: &str) -> Option<String> {
        let st = self.state();
        st.jobs
            .iter()
            .find(|j| j.id == id)
            .map(|j| j.state().to_string())
    }

    /// Sets `result_data.job_state` (e.g. to complete a parent job in allocate tests).
    pub fn set_job_state(&self, id: &str, state: &str) -> bool {
        let mut st = self.state();
        match st.jobs.iter_mut().find(|j| j.id == id) {
            Some(job) => {
                job.result.insert("job_state".into(), json!(state));
                true
            }
            None => false,
        }
    }

    /// The stored `result_data` object, `Value::Null` for an unknown job.
    pub fn result_data(&self, id: &str) -> Value {
        let st = self.state();
        st.jobs
            .iter()
            .find(|j| j.id == id)
            .map_or(Value::Null, |j| Value::Object(j.result.clone()))
    }

    /// The job definition as stored (submitted fields, `job_id`, `attachments_status`…).
    pub fn job_definition(&self, id: &str) -> Option<Value> {
        let st = self.state();
        st.jobs.iter().find(|j| j.id == id).map(|j| {
            let mut doc = j.data.clone();
            doc.insert("job_id".into(), json!(j.id));
            Value::Object(doc)
        })
    }

    /// Stores the attachments archive of a job and marks its attachments complete, like
    /// `POST /v1/job/<id>/attachments`. False if the job is not waiting for attachments.
    pub fn set_attachments(&self, id: &str, archive: Vec<u8>) -> bool {
        let mut st = self.state();
        let Some(job) = st
            .jobs
            .iter_mut()
            .find(|j| j.id == id && j.state() == "waiting")
        else {
            return false;
        };
        if job.data.get("attachments_status").is_none() {
            return false;
        }
        job.data
            .insert("attachments_status".into(), json!("complete"));
        st.attachments.insert(id.to_string(), archive);
        true
    }

    // ----- logs and artifacts -------------------------------------------------------------

    /// Every fragment stored for that job and log type (`"output"`/`"serial"`), in arrival
    /// order, duplicates included.
    pub fn fragments(&self, id: &str, log_type: &str) -> Vec<Fragment> {
        let st = self.state();
        st.fragments
            .iter()
            .filter(|f| f.fragment.job_id == id && f.fragment.log_type == log_type)
            .map(|f| f.fragment.clone())
            .collect()
    }

    /// The whole log of that type, as the server rebuilds it: all phases, fragments sorted
    /// by number (stable), duplicates included.
    pub fn log_text(&self, id: &str, log_type: &str) -> String {
        let mut frags = self.fragments(id, log_type);
        frags.sort_by_key(|f| f.fragment_number);
        frags.iter().map(|f| f.log_data.as_str()).collect()
    }

    /// The latest uploaded artifact archive.
    pub fn artifact(&self, id: &str) -> Option<Vec<u8>> {
        self.state()
            .artifacts
            .get(id)
            .and_then(|v| v.last().cloned())
    }

    /// Every artifact upload of the job, oldest first.
    pub fn artifacts(&self, id: &str) -> Vec<Vec<u8>> {
        self.state().artifacts.get(id).cloned().unwrap_or_default()
    }

    // ----- agents -------------------------------------------------------------------------

    /// The stored agent record (without `log` and `restricted_to`).
    pub fn agent_record(&self, name: &str) -> Option<Value> {
        self.state()
            .agents
            .get(name)
            .map(|a| Value::Object(a.record.clone()))
    }

    /// The server-side ring of `log` lines posted with agent data (last 100).
    pub fn agent_log(&self, name: &str) -> Vec<String> {
        self.state()
            .agents
            .get(name)
            .map(|a| a.log.clone())
            .unwrap_or_default()
    }

    /// Every body accepted by `POST /v1/agents/data/<name>`, in order (rejected bodies are
    /// only in [`Self::requests`]).
    pub fn agent_posts(&self, name: &str) -> Vec<Value> {
        self.state()
            .agent_posts
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Every accepted provision log entry of the agent (body plus server `timestamp`).
    pub fn provision_logs(&self, name: &str) -> Vec<Value> {
        self.state()
            .provision_logs
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Every schema-valid event body posted for an existing job, whatever was answered.
    pub fn events(&self, id: &str) -> Vec<Value> {
        self.state().events.get(id).cloned().unwrap_or_default()
    }

    /// Advertised queues: name → description.
    pub fn advertised_queues(&self) -> Value {
        Value::Object(self.state().queues.clone())
    }

    /// Advertised images: queue → {image → provision data}.
    pub fn advertised_images(&self) -> Value {
        Value::Object(self.state().images.clone())
    }

    /// What an administrator does through `POST /v1/agents/data/<name>`: upserts `state`
    /// and `comment` (and `updated_at`). Not recorded in [`Self::agent_posts`].
    pub fn set_agent_state(&self, name: &str, state: &str, comment: &str) {
        let mut st = self.state();
        let agent = upsert_agent(&mut st, name);
        agent.record.insert("state".into(), json!(state));
        agent.record.insert("comment".into(), json!(comment));
    }

    /// Sets any field of the agent record, creating it if needed (e.g. an old
    /// `updated_at` to test the heartbeat).
    pub fn set_agent_field(&self, name: &str, key: &str, value: Value) {
        let mut st = self.state();
        let agent = upsert_agent(&mut st, name);
        agent.record.insert(key.to_string(), value);
    }

    /// Makes `queue` a restricted queue owned by `owners` (an empty list: restricted
    /// without owners, which `restricted_to` does not show).
    pub fn set_restricted_queue(&self, queue: &str, owners: &[&str]) {
        self.state().restricted.insert(
            queue.to_string(),
            owners.iter().map(|o| o.to_string()).collect(),
        );
    }

    // ----- auth ---------------------------------------------------------------------------

    /// Accepts one more refresh token.
    pub fn add_refresh_token(&self, token: &str) {
        self.state().refresh_tokens.insert(token.to_string(), false);
    }

    /// Revokes a refresh token: refreshing with it then gets 400 `Refresh token revoked.`.
    pub fn revoke_refresh_token(&self, token: &str) {
        self.state().refresh_tokens.insert(token.to_string(), true);
    }

    /// Issues a valid access token without HTTP (e.g. for admin-style posts in tests).
    pub fn issue_access_token(&self) -> String {
        let mut st = self.state();
        self.shared.issue_token(&mut st)
    }

    /// Expires every access token issued so far.
    pub fn expire_all_tokens(&self) {
        let now = Instant::now();
        for expiry in self.state().access_tokens.values_mut() {
            *expiry = now;
        }
    }

    /// Adds a secret to the store (`test_data.secrets` paths resolve to it).
    pub fn add_secret(&self, path: &str, value: &str) {
        self.state()
            .secrets
            .insert(path.to_string(), value.to_string());
    }

    // ----- observation --------------------------------------------------------------------

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state().requests.clone()
    }

    /// The last `n` requests, one line each (seconds from the first request, method,
    /// path, status; 0 for a dropped connection), for a failing test's message.
    pub fn request_tail(&self, n: usize) -> String {
        let requests = self.state().requests.clone();
        let tail = &requests[requests.len().saturating_sub(n)..];
        let origin = requests.first().map(|r| r.at);
        let lines: Vec<String> = tail
            .iter()
            .map(|r| {
                let at = origin.map_or(0.0, |o| r.at.duration_since(o).as_secs_f64());
                let query = if r.query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", r.query)
                };
                format!("{at:9.3} s  {} {}{query} -> {}", r.method, r.path, r.status)
            })
            .collect();
        format!(
            "--- the fake server's last {} of {} requests (s from the first; 0: dropped), {} swallowed:\n{}",
            tail.len(),
            requests.len(),
            self.swallowed(),
            lines.join("\n")
        )
    }

    /// How many requests hit that route (faults count too).
    pub fn request_count(&self, route: &Route) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| route.matches(&r.method, &r.path, r.route.as_ref()))
            .count()
    }

    /// The job-state reads of job `id` answered so far (200 or 204), in order.
    pub fn state_reads(&self, id: &str) -> Vec<StateRead> {
        self.state()
            .state_reads
            .iter()
            .filter(|r| r.job_id == id)
            .cloned()
            .collect()
    }

    /// How many job-state reads of `kind` job `id` got so far.
    pub fn state_read_count(&self, id: &str, kind: ReadKind) -> usize {
        self.state_reads(id)
            .iter()
            .filter(|r| r.kind == kind)
            .count()
    }

    /// Switches `GET /v1/result/<id>/status` on or off (off: 404, as a server before it).
    pub fn set_status_endpoint(&self, on: bool) {
        self.state().status_endpoint = on;
    }

    /// Panics caught inside request handlers (each answered 500); should stay empty.
    pub fn server_errors(&self) -> Vec<String> {
        self.state().server_errors.clone()
    }

    /// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it
    /// held.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&FakeServer) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // ----- faults -------------------------------------------------------------------------

    /// The next `n` requests matching `route` are answered `status` without being applied.
    pub fn fail_next(&self, route: Route, n: usize, status: u16) {
        self.state().faults.push(Fault {
            route,
            remaining: n,
            kind: FaultKind::Fail(status),
        });
    }

    /// The next `n` requests matching `route` are read, not applied, and their connection
    /// closed without any response.
    pub fn drop_next(&self, route: Route, n: usize) {
        self.state().faults.push(Fault {
            route,
            remaining: n,
            kind: FaultKind::Drop,
        });
    }

    /// Every request matching `route` waits `delay` before being handled; `Duration::ZERO`
    /// removes the delay for that route.
    pub fn delay(&self, route: Route, delay: Duration) {
        let mut st = self.state();
        st.delays.retain(|(r, _)| *r != route);
        if !delay.is_zero() {
            st.delays.push((route, delay));
        }
    }

    /// Removes pending fail/drop faults and delays.
    pub fn clear_faults(&self) {
        let mut st = self.state();
        st.faults.clear();
        st.delays.clear();
    }

    /// Stops listening and closes every connection: clients get "connection refused".
    pub fn go_down(&self) {
        self.wire.go_down();
    }

    /// Goes down between requests: answers being written are finished first, and nothing
    /// read from now on is handled (see [`WireServer::go_down_between_requests`]).
    pub fn go_down_between_requests(&self) {
        self.wire.go_down_between_requests();
    }

    /// Listens again, on the same port.
    pub fn come_back(&self) {
        self.wire
            .come_back()
            .expect("listen again on the fake server's port");
    }

    /// While `on`, requests are accepted and read but never answered (a server or proxy
    /// that hangs); see [`WireServer::swallow`].
    pub fn swallow(&self, on: bool) {
        self.wire.swallow(on);
    }

    /// Requests swallowed so far (see [`Self::swallow`]).
    pub fn swallowed(&self) -> u64 {
        self.wire.swallowed()
    }

    /// Whether the server is down (see [`Self::go_down`]).
    pub fn is_down(&self) -> bool {
        !self.wire.is_listening()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        // A failing test explains itself: the last requests the server saw.
        if std::thread::panicking() {
            eprintln!("{}", self.request_tail(REQUEST_TAIL));
        }
        // Close the wire first, so that a handler woken from its delay answers nobody.
        self.wire.close();
        *lock(&self.shared.stopping) = true;
        self.shared.wake.notify_all();
        // `wire` is dropped next and joins every thread.
    }
}

/// How many requests a failing test prints (see `Drop for FakeServer`).
const REQUEST_TAIL: usize = 60;

fn upsert_agent<'a>(st: &'a mut State, name: &str) -> &'a mut Agent {
    let agent = st.agents.entry(name.to_string()).or_insert_with(|| {
        let mut record = Map::new();
        record.insert("name".into(), json!(name));
        Agent {
            record,
            log: Vec::new(),
        }
    });
    agent
        .record
        .insert("updated_at".into(), json!(render_naive(now_micros())));
    agent
}

fn cancel(st: &mut State, id: &str) -> bool {
    match st.jobs.iter_mut().find(|j| j.id == id) {
        Some(job) if !["cancelled", "complete", "completed"].contains(&job.state()) => {
            job.result.insert("job_state".into(), json!("cancelled"));
            true
        }
        _ => false,
    }
}

// ----- responses ---------------------------------------------------------------------------

type Answer = Result<WireResponse, WireResponse>;

fn json_response(status: u16, value: &Value) -> WireResponse {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    WireResponse::new(status, "application/json", body)
}

/// Plain string return of a Flask view.
fn text(status: u16, body: &str) -> WireResponse {
    WireResponse::new(status, "text/html; charset=utf-8", body)
}

/// `abort(status, message)` of the API framework.
fn error(status: u16, message: impl Into<Value>) -> WireResponse {
    json_response(status, &json!({"message": message.into(), "detail": {}}))
}

fn validation_error(errors: Map<String, Value>) -> WireResponse {
    json_response(
        422,
        &json!({"message": "Validation error", "detail": {"json": errors}}),
    )
}

fn not_found() -> WireResponse {
    text(404, NOT_FOUND_TEXT)
}

fn ok_text() -> WireResponse {
    text(200, "OK")
}

fn bad_id_text() -> WireResponse {
    text(400, "Invalid job id\n")
}

fn bad_id_json() -> WireResponse {
    error(400, "Invalid job_id specified")
}

fn schema_error(message: String) -> WireResponse {
    let mut errors = Map::new();
    errors.insert("_schema".into(), json!([message]));
    validation_error(errors)
}

/// The body as the API framework (webargs) reads it: without a JSON content type, or when
/// empty, it is `{}`; otherwise it must parse (bad JSON → 400).
fn json_body(req: &WireRequest) -> Result<Value, WireResponse> {
    let is_json = req.header("Content-Type").is_some_and(|ct| {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    });
    if !is_json || req.body.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(&req.body).map_err(|_| {
        json_response(
            400,
            &json!({"message": "Bad Request", "detail": {"json": ["Invalid JSON body."]}}),
        )
    })
}

fn validated(
    req: &WireRequest,
    fields: &[schema::Field],
) -> Result<(Value, Map<String, Value>), WireResponse> {
    let body = json_body(req)?;
    let data = validate(&body, fields).map_err(validation_error)?;
    Ok((body, data))
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(name, value)` pairs of a query string, decoded.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k, true), percent_decode(v, true)),
            None => (percent_decode(p, true), String::new()),
        })
        .collect()
}

fn cookie(req: &WireRequest, name: &str) -> Option<String> {
    req.headers_named("Cookie")
        .flat_map(|h| h.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
}

// ----- routing -----------------------------------------------------------------------------

/// A matched path: the endpoint and its path parameter(s).
struct Matched {
    route: Route,
    /// Agent name or job id.
    param: String,
    /// Log type for log routes.
    log_type: String,
}

enum Routing {
    Found(Matched),
    MethodNotAllowed(&'static str),
    NotFound,
}

fn route_request(method: &str, raw_path: &str) -> Routing {
    let trimmed = raw_path.strip_suffix('/').unwrap_or(raw_path);
    let segments: Vec<String> = trimmed
        .split('/')
        .skip(1)
        .map(|s| percent_decode(s, false))
        .collect();
    if segments.iter().any(String::is_empty) {
        return Routing::NotFound;
    }
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let found = |route: Route, param: &str| {
        Routing::Found(Matched {
            route,
            param: param.to_string(),
            log_type: String::new(),
        })
    };
    let by_method =
        |get: Option<Route>, post: Option<Route>, param: &str, allow: &'static str| match (
            method, get, post,
        ) {
            ("GET", Some(r), _) | ("POST", _, Some(r)) => found(r, param),
            _ => Routing::MethodNotAllowed(allow),
        };
    match segs.as_slice() {
        ["v1"] => by_method(Some(Route::Health), None, "", "GET"),
        ["v1", "oauth2", "refresh"] => by_method(None, Some(Route::Refresh), "", "POST"),
        ["v1", "agents", "data", agent] => by_method(
            Some(Route::AgentDataGet),
            Some(Route::AgentDataPost),
            agent,
            "GET, POST",
        ),
        ["v1", "agents", "queues"] => by_method(None, Some(Route::Queues), "", "POST"),
        ["v1", "agents", "images"] => by_method(None, Some(Route::Images), "", "POST"),
        ["v1", "agents", "provision_logs", agent] => {
            by_method(None, Some(Route::ProvisionLogs), agent, "POST")
        }
        ["v1", "job"] => by_method(
            Some(Route::JobPoll),
            Some(Route::JobSubmit),
            "",
            "GET, POST",
        ),
        ["v1", "job", id] => by_method(Some(Route::JobGet), None, id, "GET"),
        ["v1", "job", id, "attachments"] => by_method(
            Some(Route::AttachmentsGet),
            Some(Route::AttachmentsPost),
            id,
            "GET, POST",
        ),
        ["v1", "job", id, "action"] => by_method(None, Some(Route::JobAction), id, "POST"),
        ["v1", "job", id, "events"] => by_method(None, Some(Route::Events), id, "POST"),
        ["v1", "result", id] => by_method(
            Some(Route::ResultGet),
            Some(Route::ResultPost),
            id,
            "GET, POST",
        ),
        ["v1", "result", id, "status"] => by_method(Some(Route::ResultStatusGet), None, id, "GET"),
        ["v1", "result", id, "artifact"] => by_method(
            Some(Route::ArtifactGet),
            Some(Route::ArtifactPost),
            id,
            "GET, POST",
        ),
        ["v1", "result", id, "log", log_type] if *log_type == "output" || *log_type == "serial" => {
            match by_method(Some(Route::LogGet), Some(Route::LogPost), id, "GET, POST") {
                Routing::Found(mut m) => {
                    m.log_type = log_type.to_string();
                    Routing::Found(m)
                }
                other => other,
            }
        }
        _ => Routing::NotFound,
    }
}

/// Who may call an endpoint (PROTOCOL §1.3).
#[derive(Clone, Copy)]
enum Access {
    /// Needs a valid token; the roles text is used in 403 messages.
    Agent(&'static str),
    /// Any role; anonymous too when OIDC is off.
    AnyRole,
    /// Client endpoints (admin, manager, contributor): anonymous is fine in the fake; the
    /// agent's token is refused with 403 like on the real server.
    Client,
}

const CLIENT_ROLES: &str = "admin, manager, contributor";
const ALL_ROLES: &str = "admin, manager, contributor, agent";

impl Shared {
    fn handle(&self, req: WireRequest) -> Reply {
        let at = Instant::now();
        let routing = route_request(&req.method, &req.path);
        let route = match &routing {
            Routing::Found(m) => Some(m.route.clone()),
            _ => None,
        };
        let (fault, delay) = {
            let mut st = lock(&self.state);
            (
                take_fault(&mut st, &req, route.as_ref()),
                st.delays
                    .iter()
                    .find(|(r, _)| r.matches(&req.method, &req.path, route.as_ref()))
                    .map(|(_, d)| *d),
            )
        };
        if let Some(d) = delay {
            self.sleep(d);
        }
        let (status, reply) = match fault {
            Some(FaultKind::Drop) => (0, Reply::Drop),
            Some(FaultKind::Fail(status)) => {
                let body = if status == 500 {
                    "Unhandled Exception: injected fault\n".to_string()
                } else {
                    format!("Injected fault: {status}\n")
                };
                (status, Reply::Send(text(status, &body)))
            }
            None => {
                let resp = match catch_unwind(AssertUnwindSafe(|| self.dispatch(&req, routing))) {
                    Ok(resp) => resp,
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "panic".to_string());
                        let message = format!("{} {}: {what}", req.method, req.path);
                        lock(&self.state).server_errors.push(message.clone());
                        text(500, &format!("Unhandled Exception: {message}\n"))
                    }
                };
                (resp.status, Reply::Send(resp))
            }
        };
        let excerpt_len = req.body.len().min(2048);
        let record = RequestRecord {
            authorization: req.header("Authorization").is_some(),
            method: req.method,
            path: req.path,
            query: req.query,
            route,
            status,
            at,
            body_excerpt: String::from_utf8_lossy(&req.body[..excerpt_len]).into_owned(),
        };
        lock(&self.state).requests.push(record);
        reply
    }

    /// Sleeps, cut short when the server is dropped.
    fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut stopping = lock(&self.stopping);
        while !*stopping {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            stopping = match self.wake.wait_timeout(stopping, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn dispatch(&self, req: &WireRequest, routing: Routing) -> WireResponse {
        let m = match routing {
            Routing::NotFound => return not_found(),
            Routing::MethodNotAllowed(allow) => {
                return error(405, "Method Not Allowed").with_header("Allow", allow)
            }
            Routing::Found(m) => m,
        };
        let mut st = lock(&self.state);
        let st = &mut *st;
        let answer = match m.route {
            Route::Health => Ok(text(200, "Testflinger Server vfake")),
            Route::Refresh => self.refresh(st, req),
            Route::AgentDataPost => self.agent_data_post(st, req, &m.param),
            Route::AgentDataGet => self.agent_data_get(st, req, &m.param),
            Route::Queues => self.queues_post(st, req),
            Route::Images => self.images_post(st, req),
            Route::JobPoll => self.job_poll(st, req),
            Route::AttachmentsGet => self.attachments_get(st, req, &m.param),
            Route::ResultPost => self.result_post(st, req, &m.param),
            Route::ResultGet => self.result_get(st, req, &m.param),
            Route::ResultStatusGet => self.result_status_get(st, req, &m.param),
            Route::LogPost => self.log_post(st, req, &m.param, &m.log_type),
            Route::ArtifactPost => self.artifact_post(st, req, &m.param),
            Route::ProvisionLogs => self.provision_logs_post(st, req, &m.param),
            Route::Events => self.events_post(st, req, &m.param),
            Route::JobSubmit => self.job_submit(st, req),
            Route::JobGet => self.job_get(st, req, &m.param),
            Route::AttachmentsPost => self.attachments_post(st, req, &m.param),
            Route::JobAction => self.job_action(st, req, &m.param),
            Route::ArtifactGet => self.artifact_get(st, req, &m.param),
            Route::LogGet => self.log_get(st, req, &m.param, &m.log_type),
            Route::Any | Route::Prefix { .. } => Ok(not_found()),
        };
        answer.unwrap_or_else(|e| e)
    }

    // ----- auth -----------------------------------------------------------------------------

    fn authorize(
        &self,
        st: &mut State,
        req: &WireRequest,
        access: Access,
    ) -> Result<(), WireResponse> {
        if !self.config.require_auth {
            return Ok(());
        }
        let header = req.header("Authorization");
        let oidc = self.config.oidc_enabled;
        let needs_auth = || error(401, "Authentication is required for specified endpoint");
        match (access, header) {
            (Access::Client, None) => Ok(()),
            (Access::Client, Some(h)) => {
                self.check_token(st, h, CLIENT_ROLES)?;
                Err(error(
                    403,
                    format!("Specified action requires role: {CLIENT_ROLES}"),
                ))
            }
            (Access::AnyRole, None) if !oidc => Ok(()),
            (Access::AnyRole, None) => Err(needs_auth()),
            (Access::AnyRole, Some(h)) => self.check_token(st, h, ALL_ROLES),
            (Access::Agent(_), None) if oidc => Err(needs_auth()),
            (Access::Agent(roles), None) => Err(error(
                403,
                format!("Specified action requires role: {roles}"),
            )),
            (Access::Agent(roles), Some(h)) => self.check_token(st, h, roles),
        }
    }

    /// A valid token carries the agent role.
    fn check_token(&self, st: &mut State, header: &str, roles: &str) -> Result<(), WireResponse> {
        let Some(token) = header.strip_prefix("Bearer ") else {
            // Not a bearer token: the server does not know the role.
            return Err(if self.config.oidc_enabled {
                error(401, "Authentication is required for specified endpoint")
            } else {
                error(403, format!("Specified action requires role: {roles}"))
            });
        };
        if token.is_empty() {
            return Err(error(401, "Unauthorized"));
        }
        match st.access_tokens.get(token) {
            None => Err(error(403, "Unable to decode token")),
            Some(expiry) if Instant::now() >= *expiry => Err(error(401, "Token has expired")),
            Some(_) => Ok(()),
        }
    }

    fn issue_token(&self, st: &mut State) -> String {
        st.counter += 1;
        // Shaped like the real server's tokens (a JWT whose `exp` and `iat` claims say its
        // lifetime), unsigned; the server itself only looks the whole string up.
        let now = now_micros() / 1_000_000;
        let ttl = self.config.access_token_ttl.as_secs_f64();
        let claims = json!({"exp": now as f64 + ttl, "iat": now, "sub": "agent"}).to_string();
        let token = format!(
            "{}.{}.fake-{}-{}-{:x}",
            base64url(br#"{"alg":"none","typ":"JWT"}"#),
            base64url(claims.as_bytes()),
            self.port,
            st.counter,
            now_micros()
        );
        st.access_tokens
            .insert(token.clone(), Instant::now() + self.config.access_token_ttl);
        token
    }

    fn refresh(&self, st: &mut State, req: &WireRequest) -> Answer {
        let (_, data) = validated(req, schema::REFRESH_TOKEN_IN)?;
        let token = data
            .get("refresh_token")
            .and_then(Value::as_str)
            .unwrap_or("");
        match st.refresh_tokens.get(token) {
            None => Err(error(400, "Invalid refresh token.")),
            Some(true) => Err(error(400, "Refresh token revoked.")),
            Some(false) => {
                let access = self.issue_token(st);
                let ttl = self.config.access_token_ttl;
                let expires_in = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
                Ok(json_response(
                    200,
                    &json!({
                        "access_token": access,
                        "token_type": "Bearer",
                        "expires_in": expires_in,
                    }),
                ))
            }
        }
    }

    // ----- agents ---------------------------------------------------------------------------

    fn agent_data_post(&self, st: &mut State, req: &WireRequest, agent: &str) -> Answer {
        self.authorize(st, req, Access::Agent("admin, manager, agent"))?;
        let (body, data) = validated(req, schema::AGENT_IN)?;
        st.agent_posts
            .entry(agent.to_string())
            .or_default()
            .push(body);
        let record = upsert_agent(st, agent);
        for (key, value) in data {
            if key == "log" {
                let lines = value.as_array().cloned().unwrap_or_default();
                record
                    .log
                    .extend(lines.iter().filter_map(|l| l.as_str().map(str::to_string)));
                let excess = record.log.len().saturating_sub(100);
                record.log.drain(..excess);
            } else {
                record.record.insert(key, value);
            }
        }
        Ok(json_response(200, &json!({"status": "OK"})).with_header(
            "Set-Cookie",
            &format!("agent_name={agent}; HttpOnly; SameSite=Strict; Path=/"),
        ))
    }

    fn agent_data_get(&self, st: &mut State, req: &WireRequest, agent: &str) -> Answer {
        self.authorize(st, req, Access::AnyRole)?;
        let Some(found) = st.agents.get(agent) else {
            return Ok(json_response(404, &json!({})));
        };
        let mut record = found.record.clone();
        let mut restricted_to = Map::new();
        let queues = record
            .get("queues")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for queue in queues.iter().filter_map(Value::as_str) {
            if let Some(owners) = st.restricted.get(queue).filter(|o| !o.is_empty()) {
                restricted_to.insert(queue.to_string(), json!(owners));
            }
        }
        record.insert("restricted_to".into(), Value::Object(restricted_to));
        Ok(json_response(200, &Value::Object(record)))
    }

    fn queues_post(&self, st: &mut State, req: &WireRequest) -> Answer {
        self.authorize(st, req, Access::Agent("admin, manager, agent"))?;
        let body = json_body(req)?;
        let Some(map) = body.as_object() else {
            return Err(schema_error("Invalid input type.".into()));
        };
        for (queue, description) in map {
            if queue.is_empty() {
                return Err(schema_error("Queue names must be non-empty strings".into()));
            }
            if !description.is_string() {
                return Err(schema_error(format!(
                    "Description for queue '{queue}' must be a string"
                )));
            }
        }
        for (queue, description) in map {
            st.queues.insert(queue.clone(), description.clone());
        }
        Ok(ok_text())
    }

    fn images_post(&self, st: &mut State, req: &WireRequest) -> Answer {
        self.authorize(st, req, Access::Agent("admin, manager, agent"))?;
        let body = json_body(req)?;
        let Some(map) = body.as_object() else {
            return Err(schema_error("Invalid input type.".into()));
        };
        for (queue, images) in map {
            if queue.is_empty() {
                return Err(schema_error("Queue names must be non-empty strings".into()));
            }
            let Some(images) = images.as_object() else {
                return Err(schema_error(format!(
                    "Images for queue '{queue}' must be a dict"
                )));
            };
            for (image, provision_data) in images {
                if image.is_empty()
                    || image.starts_with('$')
                    || image.contains('.')
                    || image.contains('\0')
                {
                    return Err(schema_error(format!(
                        "Names for queue '{queue}' must be non-empty strings, must not start \
                         with '$', contain '.' or null bytes"
                    )));
                }
                if !provision_data.is_string() {
                    return Err(schema_error(format!(
                        "Provision data for image '{image}' in queue '{queue}' must be a string"
                    )));
                }
            }
        }
        for (queue, images) in map {
            st.images.insert(queue.clone(), images.clone());
        }
        Ok(ok_text())
    }

    fn provision_logs_post(&self, st: &mut State, req: &WireRequest, agent: &str) -> Answer {
        self.authorize(st, req, Access::Agent("agent"))?;
        let (_, data) = validated(req, schema::PROVISION_LOGS_IN)?;
        let mut entry = data.clone();
        entry.insert("timestamp".into(), json!(render_naive(now_micros())));
        st.provision_logs
            .entry(agent.to_string())
            .or_default()
            .push(Value::Object(entry));
        let Some(found) = st.agents.get_mut(agent) else {
            return Ok(text(404, "Agent not found\n"));
        };
        let exit_code = data.get("exit_code").and_then(Value::as_i64).unwrap_or(0);
        let streak_type = if exit_code != 0 { "fail" } else { "pass" };
        let previous_type = found
            .record
            .get("provision_streak_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        let previous_count = found
            .record
            .get("provision_streak_count")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let count = if previous_type == streak_type {
            previous_count + 1
        } else {
            1
        };
        found
            .record
            .insert("provision_streak_type".into(), json!(streak_type));
        found
            .record
            .insert("provision_streak_count".into(), json!(count));
        Ok(ok_text())
    }

    // ----- jobs -----------------------------------------------------------------------------

    fn job_poll(&self, st: &mut State, req: &WireRequest) -> Answer {
        self.authorize(st, req, Access::Agent("agent"))?;
        let queues: Vec<String> = query_pairs(&req.query)
            .into_iter()
            .filter(|(k, _)| k == "queue")
            .map(|(_, v)| v)
            .collect();
        if queues.is_empty() {
            return Err(error(400, "No queue(s) specified in request"));
        }
        let agent = cookie(req, "agent_name").filter(|a| !a.is_empty());
        let Some(agent) = agent else {
            return Err(error(401, "Agent not identified"));
        };
        if let Some(at) = st.raw_jobs.iter().position(|(q, _)| queues.contains(q)) {
            let (_, body) = st.raw_jobs.remove(at);
            return Ok(WireResponse::new(
                200,
                "application/json",
                body.into_bytes(),
            ));
        }
        let pick = st
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, job)| {
                job.state() == "waiting"
                    && queues.contains(&job.queue)
                    && job
                        .data
                        .get("attachments_status")
                        .is_none_or(|s| s == "complete")
                    && !job
                        .data
                        .get("exclude_agents")
                        .and_then(Value::as_array)
                        .is_some_and(|ex| ex.iter().any(|a| a.as_str() == Some(agent.as_str())))
            })
            .min_by_key(|(i, job)| (Reverse(job.priority), *i))
            .map(|(i, _)| i);
        let Some(index) = pick else {
            return Ok(WireResponse::empty(204).with_header("Content-Type", "application/json"));
        };
        let secrets = st.secrets.clone();
        let job = &mut st.jobs[index];
        job.result.insert("job_state".into(), json!("running"));
        let mut doc = job.data.clone();
        if let Some(Value::Object(test_data)) = doc.get_mut("test_data") {
            if let Some(Value::Object(refs)) = test_data.get_mut("secrets") {
                for value in refs.values_mut() {
                    let resolved = value
                        .as_str()
                        .and_then(|path| secrets.get(path))
                        .cloned()
                        .unwrap_or_default();
                    *value = json!(resolved);
                }
            }
        }
        doc.insert("job_id".into(), json!(job.id));
        doc.insert("started_at".into(), json!(render_aware(now_micros())));
        Ok(json_response(200, &Value::Object(doc)))
    }

    /// `POST /v1/job` semantics; `check_agents`: refuse `exclude_agents` that leave no
    /// known agent on the queue (the HTTP endpoint does, the in-process helper does not).
    fn create_job(
        &self,
        st: &mut State,
        body: &Value,
        check_agents: bool,
    ) -> Result<String, WireResponse> {
        let mut data = validate(body, schema::JOB).map_err(validation_error)?;
        if !data.contains_key("exclude_agents") {
            data.insert("exclude_agents".into(), json!([]));
        }
        let queue = data
            .get("job_queue")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let excluded: Vec<String> = data
            .get("exclude_agents")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if check_agents && !excluded.is_empty() {
            let can_run = st.agents.values().any(|agent| {
                let on_queue = agent
                    .record
                    .get("queues")
                    .and_then(Value::as_array)
                    .is_some_and(|q| q.iter().any(|x| x.as_str() == Some(queue.as_str())));
                let name = agent
                    .record
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                on_queue && !excluded.iter().any(|e| e == name)
            });
            if !can_run {
                return Err(error(
                    422,
                    "There are no agents on the specified queue that are allowed to run this job",
                ));
            }
        }
        let secret_paths: Option<Vec<String>> = data
            .get("test_data")
            .and_then(|t| t.get("secrets"))
            .and_then(Value::as_object)
            .map(|s| {
                s.values()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect()
            });
        if let Some(paths) = secret_paths {
            let mut missing: Vec<String> = paths
                .into_iter()
                .filter(|p| !st.secrets.contains_key(p))
                .collect();
            if !missing.is_empty() {
                missing.sort();
                return Err(error(
                    422,
                    format!("Inaccessible secret paths: {}", missing.join(", ")),
                ));
            }
            data.insert("client_id".into(), json!(FAKE_CLIENT_ID));
        }
        let id = match data.remove("job_id") {
            Some(Value::String(id)) if !id.is_empty() => {
                if !is_valid_uuid(&id) {
                    return Err(bad_id_json());
                }
                id
            }
            _ => self.new_uuid(st),
        };
        let has_attachments = data.iter().any(|(key, value)| {
            key.ends_with("_data")
                && value
                    .as_object()
                    .is_some_and(|section| section.contains_key("attachments"))
        });
        if has_attachments {
            data.insert("attachments_status".into(), json!("waiting"));
        }
        let priority = data
            .get("job_priority")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let mut result = Map::new();
        result.insert("job_state".into(), json!("waiting"));
        st.jobs.retain(|j| j.id != id);
        st.jobs.push(Job {
            id: id.clone(),
            queue,
            priority,
            data,
            result,
        });
        Ok(id)
    }

    /// A random-looking version 4 UUID, unique within this server.
    fn new_uuid(&self, st: &mut State) -> String {
        fn mix(mut z: u64) -> u64 {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        loop {
            st.counter += 1;
            let seed = (now_micros() as u64) ^ (u64::from(self.port) << 48) ^ st.counter;
            let hi = mix(seed);
            let lo = mix(hi ^ st.counter.rotate_left(32));
            let hi = (hi & !0xf000) | 0x4000; // version 4
            let lo = (lo & !(0b11 << 62)) | (0b10 << 62); // RFC 4122 variant
            let id = format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                hi >> 32,
                (hi >> 16) & 0xffff,
                hi & 0xffff,
                lo >> 48,
                lo & 0xffff_ffff_ffff
            );
            if !st.jobs.iter().any(|j| j.id == id) {
                return id;
            }
        }
    }

    fn job_submit(&self, st: &mut State, req: &WireRequest) -> Answer {
        self.authorize(st, req, Access::Client)?;
        let body = json_body(req)?;
        let id = self.create_job(st, &body, true)?;
        Ok(json_response(200, &json!({"job_id": id})))
    }

    fn job_get(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        self.authorize(st, req, Access::Client)?;
        if !is_valid_uuid(id) {
            return Err(bad_id_json());
        }
        let Some(job) = st.jobs.iter().find(|j| j.id == id) else {
            return Ok(WireResponse::empty(204));
        };
        let mut doc = job.data.clone();
        doc.insert("job_id".into(), json!(job.id));
        Ok(json_response(200, &Value::Object(doc)))
    }

    fn attachments_get(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        self.authorize(st, req, Access::Agent("agent"))?;
        if !is_valid_uuid(id) {
            return Err(bad_id_text());
        }
        match st.attachments.get(id) {
            Some(archive) => Ok(WireResponse::new(200, "application/gzip", archive.clone())),
            None => Ok(WireResponse::empty(204)),
        }
    }

    fn attachments_post(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        self.authorize(st, req, Access::Client)?;
        if !is_valid_uuid(id) {
            return Err(bad_id_text());
        }
        let Some(job) = st
            .jobs
            .iter_mut()
            .find(|j| j.id == id && j.state() == "waiting")
        else {
            return Err(text(422, &format!("Job {id} is not valid\n")));
        };
        match job.data.get("attachments_status").and_then(Value::as_str) {
            None => return Err(text(422, &format!("Job {id} not awaiting attachments\n"))),
            Some("complete") => return Ok(ok_text()),
            Some(_) => {}
        }
        let archive = uploaded_file(req)?;
        job.data
            .insert("attachments_status".into(), json!("complete"));
        st.attachments.insert(id.to_string(), archive);
        Ok(ok_text())
    }

    fn job_action(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        self.authorize(st, req, Access::Client)?;
        validated(req, schema::ACTION_IN)?;
        if !is_valid_uuid(id) {
            return Err(bad_id_text());
        }
        if cancel(st, id) {
            Ok(ok_text())
        } else {
            Err(text(400, "The job is already completed or cancelled"))
        }
    }

    fn events_post(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        self.authorize(st, req, Access::Agent("agent"))?;
        let (body, data) = validated(req, schema::STATUS_UPDATE)?;
        if !is_valid_uuid(id) {
            return Err(bad_id_json());
        }
        if !st.jobs.iter().any(|j| j.id == id) {
            return Err(error(404, "Job not found"));
        }
        st.events.entry(id.to_string()).or_default().push(body);
        let Some(base) = &self.config.webhook_base else {
            return Err(error(500, "Webhook URL not configured"));
        };
        let hook = data
            .get("job_status_webhook")
            .and_then(Value::as_str)
            .unwrap_or("");
        if schema::url_origin(hook) != schema::url_origin(base) {
            return Err(error(403, "Invalid job_status_webhook URL specified"));
        }
        Ok(ok_text())
    }

    // ----- results, logs, artifacts ---------------------------------------------------------

    fn result_post(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        self.authorize(st, req, Access::Agent("agent"))?;
        // The server validates the body first; checking the size first gives the same
        // answers for any well-formed body without parsing 16 MiB of JSON.
        if req.body.len() >= RESULT_SIZE_LIMIT {
            return Err(if is_valid_uuid(id) {
                error(413, "Payload too large")
            } else {
                bad_id_json()
            });
        }
        let (_, data) = validated(req, schema::RESULT_POST)?;
        if !is_valid_uuid(id) {
            return Err(bad_id_json());
        }
        if let Some(job) = st.jobs.iter_mut().find(|j| j.id == id) {
            for (key, value) in data {
                job.result.insert(key, value);
            }
        }
        Ok(ok_text())
    }

    /// `GET /v1/result/<id>/status` (PROTOCOL §15.1): `job_state` and the phases' exit
    /// codes, 204 for an unknown job, 404 when switched off (an unknown route then).
    fn result_status_get(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        if !st.status_endpoint {
            return Ok(not_found());
        }
        self.authorize(st, req, Access::AnyRole)?;
        if !is_valid_uuid(id) {
            return Err(bad_id_json());
        }
        st.state_reads.push(StateRead {
            kind: ReadKind::Status,
            job_id: id.to_string(),
            at: Instant::now(),
            log_bytes: 0,
        });
        let Some(job) = st.jobs.iter().find(|j| j.id == id) else {
            return Ok(WireResponse::empty(204));
        };
        if job.result.is_empty() {
            return Ok(WireResponse::empty(204));
        }
        let mut out = Map::new();
        if let Some(status) = job.result.get("status").and_then(Value::as_object) {
            for phase in PHASES {
                if let Some(code) = status.get(phase).filter(|c| !c.is_null()) {
                    out.insert(format!("{phase}_status"), code.clone());
                }
            }
        }
        if let Some(state) = job.result.get("job_state").filter(|s| !s.is_null()) {
            out.insert("job_state".into(), state.clone());
        }
        Ok(json_response(200, &Value::Object(out)))
    }

    fn result_get(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        self.authorize(st, req, Access::AnyRole)?;
        if !is_valid_uuid(id) {
            return Err(bad_id_json());
        }
        let log_bytes = st
            .fragments
            .iter()
            .filter(|f| f.fragment.job_id == id)
            .map(|f| f.fragment.log_data.len())
            .sum();
        st.state_reads.push(StateRead {
            kind: ReadKind::Full,
            job_id: id.to_string(),
            at: Instant::now(),
            log_bytes,
        });
        let Some(job) = st.jobs.iter().find(|j| j.id == id) else {
            return Ok(WireResponse::empty(204));
        };
        if job.result.is_empty() {
            return Ok(WireResponse::empty(204));
        }
        let mut out = Map::new();
        for key in ["job_state", "device_info"] {
            if let Some(v) = job.result.get(key) {
                out.insert(key.into(), v.clone());
            }
        }
        if let Some(status) = job.result.get("status").and_then(Value::as_object) {
            for phase in PHASES {
                if let Some(code) = status.get(phase).filter(|c| !c.is_null()) {
                    out.insert(format!("{phase}_status"), code.clone());
                }
            }
        }
        let mut frags: Vec<Arc<StoredFragment>> = st
            .fragments
            .iter()
            .filter(|f| f.fragment.job_id == id)
            .cloned()
            .collect();
        frags.sort_by_key(|f| f.fragment.fragment_number);
        // `<phase>_<type>` keys in the order of their first fragment, each with its
        // fragments in number order: the logs are concatenated while they are written.
        let mut logs: Vec<(String, Vec<Arc<StoredFragment>>)> = Vec::new();
        for f in frags {
            let key = format!("{}_{}", f.fragment.phase, f.fragment.log_type);
            match logs.iter_mut().find(|(k, _)| *k == key) {
                Some((_, list)) => list.push(f),
                None => logs.push((key, vec![f])),
            }
        }
        if logs.is_empty() {
            return Ok(json_response(200, &Value::Object(out)));
        }
        let mut head = serde_json::to_vec(&Value::Object(out)).unwrap_or_default();
        // Reopen the object: `{...}` without its `}`.
        head.pop();
        let mut resp = WireResponse::new(200, "application/json", Vec::new());
        resp.streamed = Some(Streamed(Arc::new(move |w| {
            w.write_all(&head)?;
            let mut first = head.len() == 1;
            let mut escaped = Vec::new();
            for (key, list) in &logs {
                if !first {
                    w.write_all(b",")?;
                }
                first = false;
                serde_json::to_writer(&mut *w, key)?;
                w.write_all(b":\"")?;
                for f in list {
                    // JSON escaping is per character: the escaped pieces, unquoted, make
                    // the escaped whole.
                    escaped.clear();
                    serde_json::to_writer(&mut escaped, f.fragment.log_data.as_str())?;
                    w.write_all(&escaped[1..escaped.len() - 1])?;
                }
                w.write_all(b"\"")?;
            }
            w.write_all(b"}\n")
        })));
        Ok(resp)
    }

    fn log_post(&self, st: &mut State, req: &WireRequest, id: &str, log_type: &str) -> Answer {
        self.authorize(st, req, Access::Agent("agent"))?;
        let (mut body, data) = validated(req, schema::LOG_POST)?;
        if !is_valid_uuid(id) {
            return Err(bad_id_json());
        }
        let text_of = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let timestamp = text_of("timestamp");
        let Some(at) = parse_iso_datetime(&timestamp) else {
            return Err(error(422, "Not a valid datetime."));
        };
        // The validated text, moved out of the parsed body rather than copied once more.
        let log_data = match body.as_object_mut().and_then(|o| o.remove("log_data")) {
            Some(Value::String(text)) => text,
            _ => text_of("log_data"),
        };
        st.fragments.push(Arc::new(StoredFragment {
            fragment: Fragment {
                job_id: id.to_string(),
                log_type: log_type.to_string(),
                phase: text_of("phase"),
                fragment_number: data
                    .get("fragment_number")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
                timestamp,
                log_data,
            },
            at,
        }));
        Ok(ok_text())
    }

    fn log_get(&self, st: &mut State, req: &WireRequest, id: &str, log_type: &str) -> Answer {
        self.authorize(st, req, Access::Client)?;
        if !is_valid_uuid(id) {
            return Err(error(400, "Invalid job id\n"));
        }
        let mut start_fragment = 0i64;
        let mut start_timestamp: Option<i64> = None;
        let mut phase: Option<String> = None;
        let mut errors = Map::new();
        let mut seen: Vec<String> = Vec::new();
        for (key, value) in query_pairs(&req.query) {
            if seen.contains(&key) {
                continue; // the first value of a repeated parameter wins
            }
            seen.push(key.clone());
            match key.as_str() {
                "start_fragment" => match value.trim().parse::<i64>() {
                    Ok(n) if n >= 0 => start_fragment = n,
                    Ok(_) => {
                        errors.insert(key, json!(["Must be greater than or equal to 0."]));
                    }
                    Err(_) => {
                        errors.insert(key, json!(["Not a valid integer."]));
                    }
                },
                "start_timestamp" => match parse_iso_datetime(&value) {
                    Some(t) => start_timestamp = Some(t),
                    None => {
                        errors.insert(key, json!(["Not a valid datetime."]));
                    }
                },
                "phase" => {
                    if PHASES.contains(&value.as_str()) {
                        phase = Some(value);
                    } else {
                        errors.insert(
                            key,
                            json!([format!("Must be one of: {}.", PHASES.join(", "))]),
                        );
                    }
                }
                _ => {
                    errors.insert(key, json!(["Unknown field."]));
                }
            }
        }
        if !errors.is_empty() {
            return Err(error(400, Value::Object(errors)));
        }
        let phases: Vec<&str> = match &phase {
            Some(p) => vec![p.as_str()],
            None => PHASES.to_vec(),
        };
        let mut by_phase = Map::new();
        for p in phases {
            let mut frags: Vec<&StoredFragment> = st
                .fragments
                .iter()
                .map(Arc::as_ref)
                .filter(|f| {
                    f.fragment.job_id == id
                        && f.fragment.log_type == log_type
                        && f.fragment.phase == p
                        && f.fragment.fragment_number >= start_fragment
                        && start_timestamp.is_none_or(|t| f.at >= t)
                })
                .collect();
            frags.sort_by_key(|f| f.fragment.fragment_number);
            let last = frags.last().map_or(-1, |f| f.fragment.fragment_number);
            let text: String = frags.iter().map(|f| f.fragment.log_data.as_str()).collect();
            by_phase.insert(
                p.to_string(),
                json!({"last_fragment_number": last, "log_data": text}),
            );
        }
        let mut out = Map::new();
        out.insert(log_type.to_string(), Value::Object(by_phase));
        Ok(json_response(200, &Value::Object(out)))
    }

    fn artifact_post(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        self.authorize(st, req, Access::Agent("agent"))?;
        if !is_valid_uuid(id) {
            return Err(bad_id_text());
        }
        let archive = uploaded_file(req)?;
        st.artifacts
            .entry(id.to_string())
            .or_default()
            .push(archive);
        Ok(ok_text())
    }

    fn artifact_get(&self, st: &mut State, req: &WireRequest, id: &str) -> Answer {
        self.authorize(st, req, Access::Client)?;
        if !is_valid_uuid(id) {
            return Err(bad_id_text());
        }
        match st.artifacts.get(id).and_then(|v| v.last()) {
            Some(archive) => Ok(WireResponse::new(200, "application/x-tar", archive.clone())
                .with_header(
                    "Content-Disposition",
                    "attachment; filename=artifact.tar.gz",
                )),
            None => Ok(WireResponse::empty(204)),
        }
    }
}

/// The multipart part `file` (with a filename, as Werkzeug requires for `request.files`);
/// 400 when missing.
fn uploaded_file(req: &WireRequest) -> Result<Vec<u8>, WireResponse> {
    let parts = req
        .header("Content-Type")
        .and_then(multipart::boundary)
        .and_then(|b| multipart::parse(&req.body, &b).ok())
        .unwrap_or_default();
    parts
        .into_iter()
        .find(|p| p.name.as_deref() == Some("file") && p.filename.is_some())
        .map(|p| p.data)
        .ok_or_else(|| error(400, "Bad Request"))
}

fn take_fault(st: &mut State, req: &WireRequest, route: Option<&Route>) -> Option<FaultKind> {
    let fault = st
        .faults
        .iter_mut()
        .find(|f| f.remaining > 0 && f.route.matches(&req.method, &req.path, route))?;
    fault.remaining -= 1;
    let kind = fault.kind;
    st.faults.retain(|f| f.remaining > 0);
    Some(kind)
}

/// Unpadded base64url, for the fake access tokens' JWT parts.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}
