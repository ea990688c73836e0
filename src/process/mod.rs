//! Runs one phase command: `sh -c CMD` in its own process group, output pumped with
//! `poll()` against deadlines, kill escalation (SIGTERM to the group, grace period,
//! SIGKILL), and a sweep that leaves no descendant alive when the phase ends.
//!
//! All nix calls live in `unix.rs`; this file holds the platform-neutral types.

mod unix;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use unix::{become_subreaper, run_command};

/// Exit code recorded when the agent killed the command (Python reports -9, modulo 256).
pub const KILLED_EXIT_CODE: i32 = 247;
/// Exit code recorded when the agent could not run the command at all.
pub const AGENT_FAILURE_EXIT_CODE: i32 = 100;

/// Everything needed to run one phase command.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    /// Passed to `/bin/sh -c`.
    pub command: String,
    /// Working directory: the job's run directory.
    pub cwd: PathBuf,
    /// Added to (and overriding) the agent's own environment.
    pub env: Vec<(OsString, OsString)>,
    /// Kill the command when it has run this long.
    pub global_timeout: Option<Duration>,
    /// Kill the command when it has printed nothing for this long.
    pub output_timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL.
    pub grace_period: Duration,
    /// After the leader exits, how long background processes may keep the output pipe
    /// open before they are killed.
    pub straggler_wait: Duration,
    /// Whether [`StopKind::Cancel`] ends this command (not for provision and cleanup).
    pub honour_cancel: bool,
    /// Whether [`StopKind::Shutdown`] ends this command (not for cleanup).
    pub honour_shutdown: bool,
}

/// Receives the command's output as it arrives, byte-exact, in order.
pub trait OutputSink {
    fn output(&mut self, chunk: &[u8]);
}

impl<F: FnMut(&[u8])> OutputSink for F {
    fn output(&mut self, chunk: &[u8]) {
        self(chunk)
    }
}

/// Why someone asked the running command to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// The job was cancelled on the server.
    Cancel = 1,
    /// The agent is shutting down (first SIGTERM/SIGINT).
    Shutdown = 2,
    /// Kill everything now (second SIGTERM/SIGINT).
    KillNow = 4,
}

/// A job-wide, sticky stop request that wakes a command blocked in `poll()`.
///
/// Cloning shares the same request. Requests accumulate: once made, a kind stays requested.
#[derive(Clone, Debug)]
pub struct StopSignal {
    inner: Arc<StopInner>,
}

#[derive(Debug)]
struct StopInner {
    kinds: AtomicU8,
    wake: unix::WakePipe,
}

impl StopSignal {
    /// A signal with nothing requested.
    pub fn new() -> Result<StopSignal, ProcessError> {
        Ok(StopSignal {
            inner: Arc::new(StopInner {
                kinds: AtomicU8::new(0),
                wake: unix::WakePipe::new()?,
            }),
        })
    }

    /// Requests a stop and wakes any command waiting on this signal.
    pub fn request(&self, kind: StopKind) {
        self.inner.kinds.fetch_or(kind as u8, Ordering::SeqCst);
        self.inner.wake.wake();
    }

    /// Whether `kind` has been requested.
    pub fn is_requested(&self, kind: StopKind) -> bool {
        self.inner.kinds.load(Ordering::SeqCst) & kind as u8 != 0
    }

    pub(crate) fn wake_pipe(&self) -> &unix::WakePipe {
        &self.inner.wake
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Termination {
    /// The command exited on its own with this status.
    Exited(i32),
    /// The command was killed by a signal the agent did not send.
    Signaled(i32),
    /// The agent killed it: the global timeout expired.
    GlobalTimeout,
    /// The agent killed it: no output for the output timeout.
    OutputTimeout,
    /// The agent killed it: the job was cancelled.
    Cancelled,
    /// The agent killed it: the agent is shutting down.
    Shutdown,
}

impl Termination {
    /// The Testflinger exit code: status modulo 256, 247 when the agent killed it.
    pub fn exit_code(self) -> i32 {
        match self {
            Termination::Exited(code) => code.rem_euclid(256),
            Termination::Signaled(signal) => (-signal).rem_euclid(256),
            Termination::GlobalTimeout
            | Termination::OutputTimeout
            | Termination::Cancelled
            | Termination::Shutdown => KILLED_EXIT_CODE,
        }
    }

    /// Whether the agent ended the command (timeout, cancel, shutdown).
    pub fn killed_by_agent(self) -> bool {
        !matches!(self, Termination::Exited(_) | Termination::Signaled(_))
    }
}

/// What [`run_command`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOutcome {
    pub termination: Termination,
    /// SIGTERM was not enough: SIGKILL had to be sent to the group.
    pub needed_sigkill: bool,
    /// Processes still alive (or holding the pipe) after the leader exited, which the
    /// final sweep killed.
    pub stragglers_killed: usize,
    /// Wall time from spawn to the last process reaped.
    pub duration: Duration,
}

/// Errors from running a command. All of them are the agent's or the host's fault.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start `/bin/sh -c` in {cwd}: {source}")]
    Spawn {
        cwd: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
}
