//! [`HttpServer`]: the Testflinger REST API as the agent uses it (PROTOCOL §1-§3): the
//! daemon-level calls, the [`Server`] trait for the job lifecycle, and the hand-over of
//! undelivered live output. Requests go through the private `client` module; live output
//! through [`super::stream`].

use super::agent_record::parse_agent_record;
pub use super::agent_record::AgentRecord;
use super::backoff;
use super::client::Core;
use super::reply::{Reply, SaveError};
use super::request::{Method, Payload, Repeat, Req};
pub use super::settings::{HttpSettings, Timeouts, FRAGMENT_SIZE, MAX_FRAGMENT_TEXT};
use super::stream::{self, Streamer};
pub use super::stream::{PendingOutput, PendingPhase};
use super::urls::seg;
use super::{LogType, PendingState, RefreshCheckError, Server, ServerError, ServerErrorKind};
use crate::phase::Phase;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A job's serial logs: the next fragment number, and the logs (with the bytes already
/// accepted) that could not be delivered yet, in order; they go with the report.
#[derive(Clone, Debug, Default)]
struct SerialState {
    next: u64,
    pending: Vec<PendingPhase>,
}

/// The Testflinger server over HTTP. Cheap to share between threads; dropping it stops the
/// live-output streamer (output not yet delivered stays in the log files).
pub struct HttpServer {
    core: Arc<Core>,
    streamer: Streamer,
    /// Per job: the next `serial` fragment number and the serial logs not delivered yet.
    serial: Mutex<HashMap<String, SerialState>>,
    /// For [`HttpServer::send_pending`]: a record as given, and how far a failed call got
    /// with it, per job.
    resume: Mutex<HashMap<String, (PendingOutput, PendingOutput)>>,
    /// How this server's job state is read, once known, and the count of outages
    /// ([`Core::outages`]) when that was learnt: after another outage it is asked again.
    state_endpoint: Mutex<Option<(StateEndpoint, u64)>>,
}

/// Which request reads a job's state (PROTOCOL §3.10, §15.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateEndpoint {
    /// `GET /v1/result/<id>/status`: the state and exit codes, no logs.
    Status,
    /// `GET /v1/result/<id>`: a server without `/status`, which rebuilds every log of the
    /// job for each read.
    Full,
}

/// What one `GET /v1/result/<id>/status` told.
enum StatusRead {
    /// The server has the endpoint: the state, `None` when unknown (204, no `job_state`).
    Answered(Option<String>),
    /// 404: the server has no such endpoint.
    Missing,
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
            state_endpoint: Mutex::new(None),
        }
    }

    /// How job states are read on this server, `None` until the first read has told
    /// (and again after an outage, until the next read).
    pub fn state_endpoint(&self) -> Option<StateEndpoint> {
        let outages = self.core.outages();
        lock(&self.state_endpoint)
            .filter(|(_, seen)| *seen == outages)
            .map(|(endpoint, _)| endpoint)
    }

    /// Remembers how job states are read (logged when it is new or has changed).
    fn learn_state_endpoint(&self, endpoint: StateEndpoint, outages: u64) {
        let before = lock(&self.state_endpoint).replace((endpoint, outages));
        let before = before.map(|(endpoint, _)| endpoint);
        if before == Some(endpoint) {
            // The same server after an outage: nothing new to say.
            return;
        }
        let base = self.core.base_for_messages();
        match (endpoint, before) {
            (StateEndpoint::Status, _) => log::info!(
                "{base}: job states are read through GET /v1/result/<id>/status (state only, no logs)"
            ),
            (StateEndpoint::Full, Some(StateEndpoint::Status)) => log::warn!(
                "{base}: GET /v1/result/<id>/status now answers 404 (an older server?); job states are read through GET /v1/result/<id>, which returns every log of the job, from now on"
            ),
            (StateEndpoint::Full, _) => log::info!(
                "{base}: the server has no GET /v1/result/<id>/status (404); job states are read through GET /v1/result/<id>, which returns every log of the job"
            ),
        }
    }

    /// `GET /v1/result/<id>/status` once (PROTOCOL §15.1).
    fn read_status(&self, job_id: &str) -> Result<StatusRead, ServerError> {
        let req = Req::get(format!("/v1/result/{}/status", seg(job_id)))
            .attempts(1)
            .token_optional();
        let what = req.what();
        let reply = self.core.call(&req)?;
        match reply.status {
            // The real endpoint answers 204 for a job it does not know; a 404 is the
            // route that does not exist (see `job_state`).
            404 => Ok(StatusRead::Missing),
            204 => {
                reply.discard();
                Ok(StatusRead::Answered(None))
            }
            200..=299 => reply.job_state(&what).map(StatusRead::Answered),
            _ => Err(self.core.answer_error(&req, &reply)),
        }
    }

    /// `GET /v1/result/<id>` once (PROTOCOL §3.10): only `job_state` is parsed, but the
    /// server builds the whole answer, every log of the job included.
    fn read_full(&self, job_id: &str) -> Result<Option<String>, ServerError> {
        read_full(&self.core, job_id)
    }

    /// The base every endpoint is joined to, e.g. `http://host:8000` (for messages and the
    /// `job_start` event detail).
    pub fn base_url(&self) -> &str {
        &self.core.base
    }

    /// `GET /v1`: whether the server is reachable (any status below 500). One attempt.
    pub fn health(&self) -> bool {
        match self.probe() {
            Ok(status) => status < 500,
            Err(e) => {
                log::debug!("health probe: {e}");
                false
            }
        }
    }

    /// `GET /v1` once, without a token: the status of the answer (below 500), or why there
    /// was none (no connection, TLS refused, a 5xx).
    pub fn probe(&self) -> Result<u16, ServerError> {
        let req = Req::get("/v1".to_string())
            .timeout(self.core.settings.timeouts.health)
            .attempts(1)
            .without_auth();
        self.core.call(&req).map(|reply| {
            let status = reply.status;
            reply.discard();
            status
        })
    }

    /// Reads the refresh-token file and exchanges the token once for an access token,
    /// which is thrown away (`check-config --server`).
    pub fn check_refresh(&self) -> Result<(), RefreshCheckError> {
        self.core.check_refresh()
    }

    /// `POST /v1/agents/data/<agent>` (PROTOCOL §3.3). A refusal is logged, not returned:
    /// the protocol ignores the status. Errors only when the server cannot be reached.
    pub fn post_agent_data(&self, data: &Value) -> Result<(), ServerError> {
        let path = format!("/v1/agents/data/{}", seg(&self.core.settings.agent_id));
        self.core
            .post_status_ignored(path, data, Repeat::Idempotent)
    }

    /// `GET /v1/agents/data/<agent>` (PROTOCOL §3.4) as read at start-up, where "unknown" is not good enough: `Ok(None)`
    /// when the server has no record of this agent (404), an error when it cannot be read
    /// (the daemon then waits and asks again before posting anything).
    pub fn read_agent_record(&self) -> Result<Option<AgentRecord>, ServerError> {
        self.read_agent_record_within(None)
    }

    /// [`Self::read_agent_record`] as one attempt that gives up after `timeout`: the
    /// daemon's probe while the server does not answer, so that probes keep their cadence
    /// even when the server accepts connections and never answers.
    pub fn probe_agent_record(
        &self,
        timeout: Duration,
    ) -> Result<Option<AgentRecord>, ServerError> {
        self.read_agent_record_within(Some(timeout))
    }

    fn read_agent_record_within(
        &self,
        probe: Option<Duration>,
    ) -> Result<Option<AgentRecord>, ServerError> {
        let path = format!("/v1/agents/data/{}", seg(&self.core.settings.agent_id));
        // Any role may read an agent's record: no token is obtained for it.
        let mut req = Req::get(path).token_optional();
        if let Some(timeout) = probe {
            req = req.timeout(timeout).attempts(1);
        }
        let what = req.what();
        let reply = self.core.call(&req)?;
        if reply.status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&reply.status) {
            return Err(self.core.answer_error(&req, &reply));
        }
        let bytes = reply.read_all(&what)?;
        parse_agent_record(&bytes)
            .map(Some)
            .map_err(|why| ServerError::new(ServerErrorKind::Malformed, what, why))
    }

    /// `GET /v1/agents/data/<agent>` (PROTOCOL §3.4) once a cycle. Any failure gives the
    /// empty record (state unknown, no restricted queues) and a logged warning.
    pub fn agent_record(&self) -> AgentRecord {
        match self.read_agent_record() {
            Ok(Some(record)) => record,
            Ok(None) => {
                log::warn!(
                    "the server has no record of this agent (404), treating its state as unknown"
                );
                AgentRecord::default()
            }
            Err(e) => {
                log::warn!("could not read the agent record, treating its state as unknown: {e}");
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
        Ok(parse_job_poll(reply.read_all(&what)?))
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

    /// A job starts: its live output is streamed from now on, even if a job with the same
    /// id ran (and was detached) before.
    pub fn attach(&self, job_id: &str) {
        self.streamer.attach(job_id);
    }

    /// Stops streaming `job_id` and returns what is left to send of its live output: the
    /// daemon stores it with the run directory and later hands it to [`Self::send_pending`].
    /// Waits for a fragment being sent at this moment (bounded by the log timeout).
    pub fn detach(&self, job_id: &str) -> PendingOutput {
        let serial = lock(&self.serial).remove(job_id).unwrap_or_default();
        let mut pending = self.streamer.detach(job_id);
        pending.next_serial_fragment = serial.next;
        pending.serial = serial.pending;
        pending
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
        self.core.expect_success(&req).map(Reply::discard)
    }

    fn job_state(&self, job_id: &str) -> Result<Option<String>, ServerError> {
        // One attempt: callers read the state again soon anyway (the next phase, the next
        // cancellation check), and retries would hold up the end of a phase. Any role may
        // read it: a phase that only checks for cancellation never renews a token.
        //
        // `/status` is asked first, until the server has said whether it has it; then that
        // answer holds until the agent sees an outage (the server may come back as another
        // build) or `/status` answers 404 after it had answered. A 404 always means "no such
        // endpoint": the real one answers 204 for a job it does not know, and the agent
        // only reads jobs this server handed out (its own, and their parents).
        let outages = self.core.outages();
        if self.state_endpoint() == Some(StateEndpoint::Full) {
            return self.read_full(job_id);
        }
        match self.read_status(job_id)? {
            StatusRead::Answered(state) => {
                self.learn_state_endpoint(StateEndpoint::Status, outages);
                Ok(state)
            }
            StatusRead::Missing => {
                self.learn_state_endpoint(StateEndpoint::Full, outages);
                self.read_full(job_id)
            }
        }
    }

    fn state_reads_are_costly(&self) -> bool {
        self.state_endpoint() == Some(StateEndpoint::Full)
    }

    fn start_job_state(&self, job_id: &str) -> PendingState {
        if self.state_endpoint() != Some(StateEndpoint::Full) {
            return PendingState::ready(self.job_state(job_id));
        }
        let core = Arc::clone(&self.core);
        let job_id = job_id.to_owned();
        PendingState::spawn(move || read_full(&core, &job_id))
    }

    fn post_agent_state(&self, state: &str, comment: &str) -> Result<(), ServerError> {
        self.post_agent_data(&json!({"state": state, "comment": comment}))
    }

    fn reads_output_back(&self) -> bool {
        // The streamer reads every fragment from the log file.
        true
    }

    fn output(&self, job_id: &str, phase: Phase, _chunk: &[u8], log_path: &Path, log_len: u64) {
        self.streamer.note(job_id, phase, log_path, log_len);
    }

    fn finish_output(&self, job_id: &str, phase: Phase) {
        self.streamer
            .finish(job_id, phase, self.core.settings.finish_wait);
    }

    fn output_progress(&self, job_id: &str) -> Option<crate::journal::OutputProgress> {
        use crate::journal::LogProgress;
        let (next_fragment, logs) = self.streamer.progress(job_id);
        let serial = lock(&self.serial).get(job_id).cloned().unwrap_or_default();
        let progress = |phase: String, log_file: String, sent: u64| LogProgress {
            phase,
            log_file,
            sent,
        };
        Some(crate::journal::OutputProgress {
            next_fragment,
            logs: logs
                .into_iter()
                .map(|(phase, file, sent)| progress(phase.name().to_owned(), file, sent))
                .collect(),
            next_serial_fragment: serial.next,
            serial_pending: serial
                .pending
                .into_iter()
                .map(|p| progress(p.phase, p.log_file, p.sent))
                .collect(),
        })
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
        let log_file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut state = lock(&self.serial).get(job_id).cloned().unwrap_or_default();
        if !state.pending.is_empty() {
            // An earlier serial log is still undelivered: keep the order, send this one
            // after it, with the report.
            state.pending.push(PendingPhase {
                phase: phase.name().to_owned(),
                log_file,
                sent: 0,
            });
            lock(&self.serial).insert(job_id.to_string(), state);
            return Err(ServerError::new(
                ServerErrorKind::Unavailable,
                format!("sending the serial log of {phase} of job {job_id}"),
                "queued behind an earlier serial log; it goes with the report",
            ));
        }
        let mut offset = 0;
        let result = stream::send_file(
            &self.core,
            job_id,
            LogType::Serial,
            phase,
            path,
            &mut offset,
            &mut state.next,
        );
        if matches!(&result, Err(e) if e.is_retryable()) {
            state.pending.push(PendingPhase {
                phase: phase.name().to_owned(),
                log_file,
                sent: offset,
            });
        }
        lock(&self.serial).insert(job_id.to_string(), state);
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
        self.core.expect_success(&req).map(Reply::discard)
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
        self.core.expect_success(&req).map(Reply::discard)
    }

    fn agent_state(&self) -> Option<(String, String)> {
        let record = self.agent_record();
        Some((record.state?, record.comment))
    }

    fn releases_allocations(&self) -> bool {
        true
    }
}

/// The body of a 200 answer to `GET /v1/job`: the job document as received, `None` when
/// it is empty or only whitespace (no job). The daemon parses the document itself.
pub(crate) fn parse_job_poll(body: Vec<u8>) -> Option<Vec<u8>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(body)
    }
}

/// `GET /v1/result/<id>` (every log of the job comes with it) for the job state.
fn read_full(core: &Core, job_id: &str) -> Result<Option<String>, ServerError> {
    let req = Req::get(format!("/v1/result/{}", seg(job_id)))
        .attempts(1)
        .token_optional();
    let what = req.what();
    let reply = core.expect_success(&req)?;
    if reply.status == 204 {
        return Ok(None);
    }
    reply.job_state(&what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_poll_bodies() {
        assert_eq!(parse_job_poll(b" \n\t".to_vec()), None);
        assert_eq!(parse_job_poll(Vec::new()), None);
        assert_eq!(parse_job_poll(b"{}".to_vec()), Some(b"{}".to_vec()));
    }
}
