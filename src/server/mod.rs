//! What the lifecycle and the daemon need from a Testflinger server, as a trait, with a
//! local implementation for `run-job` ([`local`]) and the HTTP one for the daemon.

mod agent_record;
mod auth;
pub mod backoff;
mod client;
mod fragment;
pub mod http;
pub mod local;
mod reply;
mod request;
mod resolve;
mod settings;
pub mod stream;
mod tls;
mod urls;

// The pure parsers of every answer the agent reads from the server (and of the
// refresh-token file), for `crate::fuzz_api`; the request code calls these same functions.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use agent_record::parse_agent_record;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use auth::parse_token_file;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use http::parse_job_poll;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use reply::{detail_of, parse_job_state, parse_refresh_answer};

use crate::phase::Phase;
use serde_json::Value;
use std::path::Path;

/// The two live log streams of a job (PROTOCOL §3.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogType {
    Output,
    Serial,
}

impl LogType {
    pub fn name(self) -> &'static str {
        match self {
            LogType::Output => "output",
            LogType::Serial => "serial",
        }
    }
}

/// Whose fault a server error is; this alone decides whether to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerErrorKind {
    /// Could not reach the server, or it answered 5xx: worth retrying later.
    Unavailable,
    /// The server refused the request (4xx other than a token expiry): retrying the same
    /// request will not help.
    Rejected,
    /// The server answered something that is not what the protocol says.
    Malformed,
    /// A local file needed for the request could not be read.
    Local,
}

/// A failed server call: what was tried, on what, and what came back.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct ServerError {
    pub kind: ServerErrorKind,
    /// e.g. `POST /v1/result/<id>`.
    pub what: String,
    pub detail: String,
    /// The server gave no answer at all (refused, unreachable, timed out, connection
    /// broken), as opposed to an answer that was an error.
    pub no_answer: bool,
}

impl ServerError {
    pub fn new(kind: ServerErrorKind, what: impl Into<String>, detail: impl Into<String>) -> Self {
        ServerError {
            kind,
            what: what.into(),
            detail: detail.into(),
            no_answer: false,
        }
    }

    /// The same error, marked as one where the server did not answer.
    pub fn without_answer(mut self) -> Self {
        self.no_answer = true;
        self
    }

    /// Whether the server could not be reached or did not answer (an outage, a server
    /// that hangs), rather than answering with an error.
    pub fn is_no_answer(&self) -> bool {
        self.no_answer
    }

    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        self.kind == ServerErrorKind::Unavailable
    }
}

pub use auth::TokenFileError;

/// Reads the refresh-token file as the agent does before each token exchange
/// (`check-config`).
pub fn check_token_file(path: &Path) -> Result<(), TokenFileError> {
    auth::load_refresh_token(path).map(|_| ())
}

/// Why the refresh token could not be exchanged for an access token (`check-config
/// --server`).
#[derive(Debug, thiserror::Error)]
pub enum RefreshCheckError {
    #[error("no refresh-token file is configured (option --token-file)")]
    NoFile,
    #[error(transparent)]
    File(TokenFileError),
    /// The server answered, but not with an access token.
    #[error("{detail}")]
    Refused { status: u16, detail: String },
    /// The server could not be reached.
    #[error("{0}")]
    Unavailable(String),
}

/// A job-state read started by [`Server::start_job_state`].
#[derive(Debug)]
pub struct PendingState(Pending);

#[derive(Debug)]
enum Pending {
    Ready(Result<Option<String>, ServerError>),
    Running(std::thread::JoinHandle<Result<Option<String>, ServerError>>),
}

impl PendingState {
    /// A read that has already answered.
    pub fn ready(answer: Result<Option<String>, ServerError>) -> PendingState {
        PendingState(Pending::Ready(answer))
    }

    /// Runs `read` on a thread of its own (inline when no thread can be made: the closure
    /// waits in a slot both sides share, since a failed spawn does not give it back).
    pub fn spawn<F>(read: F) -> PendingState
    where
        F: FnOnce() -> Result<Option<String>, ServerError> + Send + 'static,
    {
        /// Runs the closure left in `slot`, once.
        fn run<F>(slot: &std::sync::Mutex<Option<F>>) -> Result<Option<String>, ServerError>
        where
            F: FnOnce() -> Result<Option<String>, ServerError>,
        {
            let read = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            match read {
                Some(read) => read(),
                None => Err(ServerError::new(
                    ServerErrorKind::Local,
                    "job state read",
                    "the read was already made",
                )),
            }
        }
        let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(read)));
        let on_thread = std::sync::Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name("state-read".into())
            .spawn(move || run(&on_thread));
        match spawned {
            Ok(handle) => PendingState(Pending::Running(handle)),
            Err(err) => {
                log::warn!("cannot start a thread for a job state read ({err}); reading now");
                PendingState::ready(run(&slot))
            }
        }
    }

    /// The read's answer, once it has come (a read whose thread panicked is an error:
    /// state unknown).
    pub fn wait(self) -> Result<Option<String>, ServerError> {
        match self.0 {
            Pending::Ready(answer) => answer,
            Pending::Running(handle) => handle.join().unwrap_or_else(|_| {
                Err(ServerError::new(
                    ServerErrorKind::Local,
                    "job state read",
                    "the reading thread panicked",
                ))
            }),
        }
    }
}

/// The job-level calls the lifecycle makes. Implementations must be cheap to call from
/// the phase loop: [`Server::output`] in particular must never block on the network.
pub trait Server: Send + Sync {
    /// `POST /v1/result/<id>` with `body` (`job_state`, `status` or `device_info`).
    fn post_result(&self, job_id: &str, body: &Value) -> Result<(), ServerError>;

    /// The job's state on the server (`GET /v1/result/<id>/status`, or `GET /v1/result/<id>`
    /// on a server without it), `None` when unknown.
    fn job_state(&self, job_id: &str) -> Result<Option<String>, ServerError>;

    /// Whether each [`Server::job_state`] read makes the server rebuild every log of the
    /// job (a server known to lack `/status`, PROTOCOL §3.10): the agent then reads the
    /// state only where it can change what the agent does next.
    fn state_reads_are_costly(&self) -> bool {
        false
    }

    /// Starts a [`Server::job_state`] read that runs beside the caller (on a thread where
    /// the read is a costly one); [`PendingState::wait`] takes its answer. The server sees
    /// the read now, so the answer tells the state as of this call.
    fn start_job_state(&self, job_id: &str) -> PendingState {
        PendingState::ready(self.job_state(job_id))
    }

    /// Agent state while a job runs (`POST /v1/agents/data/<agent>` with `state`, `comment`).
    fn post_agent_state(&self, state: &str, comment: &str) -> Result<(), ServerError>;

    /// New command output of `phase`: `log_path` is now `log_len` bytes long, and `chunk` is
    /// what the agent has just appended to it (empty when the bytes were written by the
    /// command itself, with direct capture: see [`Server::reads_output_back`], or when a
    /// write failed part-way). Must not block on the network.
    fn output(&self, job_id: &str, phase: Phase, chunk: &[u8], log_path: &Path, log_len: u64);

    /// Whether the live output is read back from `<phase>.log` (not taken from the chunks
    /// handed to [`Server::output`]): then a command without secrets writes its log itself
    /// (direct capture), and the agent only follows the file.
    fn reads_output_back(&self) -> bool {
        false
    }

    /// The phase's output is complete: deliver what is pending (bounded wait).
    fn finish_output(&self, job_id: &str, phase: Phase);

    /// Send the connector's `<phase>-serial.log` as `serial` fragments.
    fn post_serial_log(&self, job_id: &str, phase: Phase, path: &Path) -> Result<(), ServerError>;

    /// `POST /v1/agents/provision_logs/<agent>` after a provision phase.
    fn post_provision_log(
        &self,
        job_id: &str,
        exit_code: i32,
        detail: &str,
    ) -> Result<(), ServerError>;

    /// `POST /v1/job/<id>/events` with the cumulative event list (only for jobs that
    /// have a `job_status_webhook`).
    fn post_events(&self, job_id: &str, body: &Value) -> Result<(), ServerError>;

    /// `POST /v1/result/<id>/artifact` with a gzip tarball.
    fn upload_artifacts(&self, job_id: &str, tarball: &Path) -> Result<(), ServerError>;

    /// The agent's own state and comment on the server (an administrator may have set
    /// `offline`, `maintenance` or `restart`), `None` when it cannot be read.
    fn agent_state(&self) -> Option<(String, String)>;

    /// Whether another job (a multi-device parent) can use and then release this job after
    /// its allocate phase (PROTOCOL §5.7). `false` for `run-job`, where nothing could.
    fn releases_allocations(&self) -> bool;

    /// How far the job's live output (and serial logs) had reached the server, for the
    /// job journal; `None` when this server does not stream (`run-job`).
    fn output_progress(&self, _job_id: &str) -> Option<crate::journal::OutputProgress> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_state_read_gives_the_threads_answer() {
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let pending = PendingState::spawn(move || {
            // Answers only once the caller has gone on: the read runs beside it.
            wait.recv().map_err(|_| {
                ServerError::new(ServerErrorKind::Local, "test", "the caller went away")
            })?;
            Ok(Some("cancelled".to_owned()))
        });
        go.send(())
            .expect("the reading thread waits on this channel");
        assert_eq!(pending.wait().ok().flatten().as_deref(), Some("cancelled"));
        let ready = PendingState::ready(Ok(None));
        assert!(matches!(ready.wait(), Ok(None)));
    }

    #[test]
    fn a_pending_state_read_whose_thread_panicked_is_an_error() {
        let pending = PendingState::spawn(|| panic!("a read that panics"));
        let err = pending.wait().expect_err("a panicked read has no answer");
        assert_eq!(err.kind, ServerErrorKind::Local);
    }
}
