//! The typestate job engine.
//!
//! A job is a [`Job<S, R>`]: `S` is its state (one zero-sized type per state, in
//! [`states`]), `R` the [`PhaseRunner`] that does the I/O of each phase. Each transition
//! consumes the job, runs exactly one phase (or records why it is skipped) and returns the
//! next state, or [`Aborted`] when the phase ended the forward path. The only transition
//! out of [`Aborted`] and [`Reserved`] is `cleanup()`, and an outcome can only be read from
//! a [`Job<Cleaned, R>`]. So cleanup runs exactly once on every path, and the compiler
//! checks it. The edges are generated from one table in [`transitions`], which also
//! yields [`TRANSITIONS`] for the diagrams.
//!
//! # What the compiler refuses
//!
//! A phase cannot be skipped: provision only exists on a job that has been set up.
//!
//! ```compile_fail
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let _ = job.provision(); // error: no method `provision` on `Job<Polled, _>`
//! ```
//!
//! Its twin, which starts with setup, compiles:
//!
//! ```
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let _ = job.setup();
//! ```
//!
//! A phase cannot run twice: the transition consumes the job.
//!
//! ```compile_fail
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let _first = job.setup();
//! let _again = job.setup(); // error: use of moved value `job`
//! ```
//!
//! ```
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let _first = job.setup();
//! ```
//!
//! Nor can a later state go back to an earlier phase:
//!
//! ```compile_fail
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner, Step};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let Step::Next(job) = job.setup() else { panic!() };
//! let _ = job.setup(); // error: no method `setup` on `Job<Setup, _>`
//! ```
//!
//! ```
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner, Step};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let Step::Next(job) = job.setup() else { panic!() };
//! let _ = job.provision();
//! ```
//!
//! After an abort, nothing but cleanup can follow.
//!
//! ```compile_fail
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner, Step};
//! use testflinger_agent::phase::Phase;
//! let runner = ScriptedRunner::default().exit(Phase::Setup, 1);
//! let job = Job::new("job-1", Plan::all_run(), runner);
//! let Step::Aborted(job) = job.setup() else { panic!("setup fails") };
//! let _ = job.provision(); // error: no method `provision` on `Job<Aborted, _>`
//! ```
//!
//! ```
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner, Step};
//! use testflinger_agent::phase::Phase;
//! let runner = ScriptedRunner::default().exit(Phase::Setup, 1);
//! let job = Job::new("job-1", Plan::all_run(), runner);
//! let Step::Aborted(job) = job.setup() else { panic!("setup fails") };
//! let _ = job.cleanup();
//! ```
//!
//! An outcome cannot be taken before cleanup.
//!
//! ```compile_fail
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner, Step};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let Step::Next(job) = job.setup() else { panic!() };
//! let _ = job.outcome(); // error: no method `outcome` on `Job<Setup, _>`
//! ```
//!
//! ```
//! use testflinger_agent::lifecycle::{Job, Plan, ScriptedRunner, Step};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let Step::Next(job) = job.setup() else { panic!() };
//! let _ = job.records();
//! ```
//!
//! A cleaned job cannot be cleaned again.
//!
//! ```compile_fail
//! use testflinger_agent::lifecycle::{run_to_completion, Job, Plan, ScriptedRunner};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let done = run_to_completion(job);
//! let _ = done.cleanup(); // error: no method `cleanup` on `Job<Cleaned, _>`
//! ```
//!
//! ```
//! use testflinger_agent::lifecycle::{run_to_completion, Job, Plan, ScriptedRunner};
//! let job = Job::new("job-1", Plan::all_run(), ScriptedRunner::default());
//! let done = run_to_completion(job);
//! let _ = done.outcome();
//! ```

pub mod diagram;
mod scripted;
pub mod states;
mod transitions;

pub use scripted::{Call, ScriptedRunner};
pub use states::{
    Aborted, Allocated, Cleaned, FirmwareUpdated, Polled, Provisioned, Reserved, Setup, State,
    Tested,
};
pub use transitions::{AnyJob, EdgeKind, Transition, STATES, TRANSITIONS};

use crate::phase::{Phase, SkipReason};
use std::marker::PhantomData;
use std::time::Duration;

/// Exit code by which a device connector says it could not recover the device.
pub const RECOVERY_FAILED_EXIT_CODE: i32 = 46;

/// How a phase command ended, as the lifecycle sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseEnd {
    /// The command exited on its own (the exit code says how).
    Exited,
    /// The command died of a signal the agent did not send.
    Signaled,
    /// The agent killed it: global timeout.
    GlobalTimeout,
    /// The agent killed it: no output for the output timeout.
    OutputTimeout,
    /// The agent killed it: the job was cancelled.
    Cancelled,
    /// The agent killed it: the agent is shutting down.
    Shutdown,
    /// The agent could not run the command at all (exit code 100).
    AgentError,
    /// The agent could not record the job (its log, journal or outcome: disk full, a
    /// directory gone read-only) and stopped the phase; exit code 100. The job goes to
    /// cleanup whatever the phase.
    StorageFailed,
}

impl PhaseEnd {
    /// A short description for the run summary.
    pub fn describe(self) -> &'static str {
        match self {
            PhaseEnd::Exited => "exited",
            PhaseEnd::Signaled => "killed by a signal",
            PhaseEnd::GlobalTimeout => "global timeout",
            PhaseEnd::OutputTimeout => "output timeout",
            PhaseEnd::Cancelled => "cancelled",
            PhaseEnd::Shutdown => "agent shutdown",
            PhaseEnd::AgentError => "could not run",
            PhaseEnd::StorageFailed => "could not be recorded",
        }
    }
}

/// What running one phase produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseResult {
    /// The Testflinger exit code (0..=255).
    pub exit_code: i32,
    pub end: PhaseEnd,
    pub duration: Duration,
}

impl PhaseResult {
    /// A command that exited on its own with `exit_code`.
    pub fn exited(exit_code: i32) -> PhaseResult {
        PhaseResult {
            exit_code,
            end: PhaseEnd::Exited,
            duration: Duration::ZERO,
        }
    }
}

/// What happened to one phase of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseStatus {
    Ran(PhaseResult),
    Skipped(SkipReason),
}

/// One phase the job reached, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseRecord {
    pub phase: Phase,
    pub status: PhaseStatus,
}

impl PhaseRecord {
    /// The exit code, or `None` for a skipped phase.
    pub fn exit_code(&self) -> Option<i32> {
        match self.status {
            PhaseStatus::Ran(result) => Some(result.exit_code),
            PhaseStatus::Skipped(_) => None,
        }
    }
}

/// A stop asked for from outside the phase (seen before a phase starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The job was cancelled on the server.
    Cancelled,
    /// The agent is shutting down.
    Shutdown,
    /// The agent cannot run this job (e.g. its attachments were refused).
    Unrunnable,
    /// The agent can no longer record the job (disk full, directory unwritable).
    StorageFailed,
}

/// Why a job left the forward path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortReason {
    /// A phase other than test exited non-zero.
    Failed { phase: Phase, exit_code: i32 },
    /// A phase exited 46: the device connector could not recover the device.
    RecoveryFailed { phase: Phase },
    /// A phase hit the global timeout.
    GlobalTimeout { phase: Phase },
    /// The job was cancelled, during `phase` or before it started.
    Cancelled { phase: Phase },
    /// The agent is shutting down, during `phase` or before it started.
    Shutdown { phase: Phase },
    /// The agent could not run the job at all (seen before `phase`).
    Unrunnable { phase: Phase },
    /// The agent could not record the job during (or before) `phase`.
    StorageFailed { phase: Phase },
    /// The agent died during `phase` (or before it started); the agent restarted after
    /// it ends the job (crash recovery).
    AgentDied { phase: Phase },
}

impl AbortReason {
    /// The Testflinger event that ended the job (the `job_end` detail).
    pub fn event_name(&self) -> String {
        match self {
            AbortReason::Failed { phase, .. } => format!("{phase}_fail"),
            AbortReason::RecoveryFailed { .. } => "recovery_fail".to_owned(),
            AbortReason::GlobalTimeout { .. } => "global_timeout".to_owned(),
            AbortReason::Cancelled { .. } => "cancelled".to_owned(),
            AbortReason::Shutdown { .. } => "agent_shutdown".to_owned(),
            AbortReason::Unrunnable { .. } => "job_unrunnable".to_owned(),
            AbortReason::StorageFailed { .. } => "storage_failed".to_owned(),
            AbortReason::AgentDied { .. } => "agent_died".to_owned(),
        }
    }

    /// The phase during (or before) which the job was aborted.
    pub fn phase(&self) -> Phase {
        match *self {
            AbortReason::Failed { phase, .. }
            | AbortReason::RecoveryFailed { phase }
            | AbortReason::GlobalTimeout { phase }
            | AbortReason::Cancelled { phase }
            | AbortReason::Shutdown { phase }
            | AbortReason::Unrunnable { phase }
            | AbortReason::StorageFailed { phase }
            | AbortReason::AgentDied { phase } => phase,
        }
    }

    /// The abort rule of PROTOCOL §5.4, plus stops: decides from one phase's result whether
    /// the job leaves the forward path. Cleanup never aborts (it is the end anyway).
    pub fn from_result(phase: Phase, result: &PhaseResult) -> Option<AbortReason> {
        if phase == Phase::Cleanup {
            return None;
        }
        match result.end {
            PhaseEnd::Cancelled => return Some(AbortReason::Cancelled { phase }),
            PhaseEnd::Shutdown => return Some(AbortReason::Shutdown { phase }),
            PhaseEnd::GlobalTimeout => return Some(AbortReason::GlobalTimeout { phase }),
            PhaseEnd::StorageFailed => return Some(AbortReason::StorageFailed { phase }),
            _ => {}
        }
        if result.exit_code == RECOVERY_FAILED_EXIT_CODE {
            Some(AbortReason::RecoveryFailed { phase })
        } else if result.exit_code != 0 && phase.failure_aborts() {
            Some(AbortReason::Failed {
                phase,
                exit_code: result.exit_code,
            })
        } else {
            None
        }
    }
}

/// Which phases run and which are skipped (and why), decided once when the job starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    skips: [Option<SkipReason>; 7],
}

impl Plan {
    /// Every phase runs.
    pub fn all_run() -> Plan {
        Plan { skips: [None; 7] }
    }

    /// Builds a plan from one decision per phase.
    pub fn from_fn(mut decide: impl FnMut(Phase) -> Option<SkipReason>) -> Plan {
        Plan {
            skips: Phase::ALL.map(&mut decide),
        }
    }

    /// The plan of a real job: the skip rules of PROTOCOL §5.3 over the agent's commands
    /// and the job's phase data.
    pub fn for_job(config: &crate::config::Config, spec: &crate::job::JobSpec) -> Plan {
        Plan::from_fn(|phase| {
            crate::phase::skip_reason(phase, config.command(phase), spec.phase_data(phase))
        })
    }

    /// Why `phase` is skipped, `None` when it runs.
    pub fn skip(&self, phase: Phase) -> Option<SkipReason> {
        self.skips[phase as usize]
    }
}

/// Does the I/O of each phase for the engine: the real one runs commands and talks to the
/// server ([`crate::executor`]); [`ScriptedRunner`] plays back scripted results.
pub trait PhaseRunner {
    /// Asked before each phase from setup to reserve: should the job stop instead?
    fn stop_requested(&mut self, next: Phase) -> Option<StopCause>;

    /// Called before each phase, whether it runs or is skipped.
    fn phase_starting(&mut self, phase: Phase, skip: Option<SkipReason>);

    /// Runs the phase's command.
    fn run_phase(&mut self, phase: Phase) -> PhaseResult;

    /// Called after each phase, run or skipped, with the abort it caused, if any.
    fn phase_finished(&mut self, record: &PhaseRecord, abort: Option<&AbortReason>);

    /// Called when the job leaves the forward path because of a stop seen before `phase`.
    fn stopped_before(&mut self, reason: &AbortReason);
}

/// A job in state `S`, run by `R`. Its fields are private to this module, so a job can
/// only be created in [`Polled`] and only move along the edges of [`TRANSITIONS`].
#[derive(Debug)]
pub struct Job<S, R> {
    job_id: String,
    plan: Plan,
    runner: R,
    records: Vec<PhaseRecord>,
    abort: Option<AbortReason>,
    state: PhantomData<S>,
}

/// The result of a forward transition: the next state, or [`Aborted`].
#[must_use = "a job must be driven to cleanup"]
#[derive(Debug)]
pub enum Step<S, R> {
    Next(Job<S, R>),
    Aborted(Job<Aborted, R>),
}

impl<R: PhaseRunner> Job<Polled, R> {
    /// A job that has been taken from a queue; no phase has run yet.
    pub fn new(job_id: impl Into<String>, plan: Plan, runner: R) -> Job<Polled, R> {
        Job {
            job_id: job_id.into(),
            plan,
            runner,
            records: Vec::with_capacity(Phase::ALL.len()),
            abort: None,
            state: PhantomData,
        }
    }
}

impl<R: PhaseRunner> Job<Aborted, R> {
    /// A job whose agent died during it, restored from its journal by the agent restarted
    /// after it (crash recovery): `records` are the phases that ended before, `phase` the
    /// one it died in (or was about to start). Only cleanup can follow.
    pub fn recovered(
        job_id: impl Into<String>,
        plan: Plan,
        runner: R,
        records: Vec<PhaseRecord>,
        phase: Phase,
    ) -> Job<Aborted, R> {
        Job {
            job_id: job_id.into(),
            plan,
            runner,
            records,
            abort: Some(AbortReason::AgentDied { phase }),
            state: PhantomData,
        }
    }
}

impl<S, R: PhaseRunner> Job<S, R> {
    /// The job's id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The phases reached so far, in order.
    pub fn records(&self) -> &[PhaseRecord] {
        &self.records
    }

    fn into_state<T>(self) -> Job<T, R> {
        Job {
            job_id: self.job_id,
            plan: self.plan,
            runner: self.runner,
            records: self.records,
            abort: self.abort,
            state: PhantomData,
        }
    }

    /// One forward phase: stop check, skip or run, abort decision.
    fn forward<T>(mut self, phase: Phase) -> Step<T, R> {
        if let Some(cause) = self.runner.stop_requested(phase) {
            let reason = match cause {
                StopCause::Cancelled => AbortReason::Cancelled { phase },
                StopCause::Shutdown => AbortReason::Shutdown { phase },
                StopCause::Unrunnable => AbortReason::Unrunnable { phase },
                StopCause::StorageFailed => AbortReason::StorageFailed { phase },
            };
            self.runner.stopped_before(&reason);
            self.abort = Some(reason);
            return Step::Aborted(self.into_state());
        }
        let abort = self.run_or_skip(phase);
        match abort {
            Some(reason) => {
                self.abort = Some(reason);
                Step::Aborted(self.into_state())
            }
            None => Step::Next(self.into_state()),
        }
    }

    fn run_or_skip(&mut self, phase: Phase) -> Option<AbortReason> {
        let skip = self.plan.skip(phase);
        self.runner.phase_starting(phase, skip);
        let (status, abort) = match skip {
            Some(reason) => (PhaseStatus::Skipped(reason), None),
            None => {
                let result = self.runner.run_phase(phase);
                (
                    PhaseStatus::Ran(result),
                    AbortReason::from_result(phase, &result),
                )
            }
        };
        let record = PhaseRecord { phase, status };
        self.runner.phase_finished(&record, abort.as_ref());
        self.records.push(record);
        abort
    }

    /// Cleanup: runs whatever happened before. Only reachable through the generated
    /// `cleanup()` methods of [`Reserved`] and [`Aborted`].
    fn clean(mut self) -> Job<Cleaned, R> {
        self.run_or_skip(Phase::Cleanup);
        self.into_state()
    }
}

/// What a finished job produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobOutcome {
    /// Every phase the job reached, in order, cleanup last.
    pub records: Vec<PhaseRecord>,
    /// Why the job left the forward path, if it did.
    pub abort: Option<AbortReason>,
}

impl JobOutcome {
    /// Whether every phase that ran exited 0 and nothing aborted the job.
    pub fn succeeded(&self) -> bool {
        self.abort.is_none() && self.records.iter().all(|r| r.exit_code().unwrap_or(0) == 0)
    }

    /// The `job_end` event detail: `normal_exit` or the event that ended the job.
    pub fn end_detail(&self) -> String {
        self.abort
            .map_or_else(|| "normal_exit".to_owned(), |reason| reason.event_name())
    }
}

impl<R: PhaseRunner> Job<Cleaned, R> {
    /// The outcome: only a cleaned job has one.
    pub fn outcome(&self) -> JobOutcome {
        JobOutcome {
            records: self.records.clone(),
            abort: self.abort,
        }
    }

    /// The outcome and the runner, for reporting.
    pub fn finish(self) -> (JobOutcome, R) {
        let outcome = self.outcome();
        (outcome, self.runner)
    }
}

/// Drives a job from [`Polled`] to [`Cleaned`]: each phase in order, cleanup exactly once.
pub fn run_to_completion<R: PhaseRunner>(job: Job<Polled, R>) -> Job<Cleaned, R> {
    macro_rules! or_cleanup {
        ($step:expr) => {
            match $step {
                Step::Next(job) => job,
                Step::Aborted(job) => return job.cleanup(),
            }
        };
    }
    let job = or_cleanup!(job.setup());
    let job = or_cleanup!(job.provision());
    let job = or_cleanup!(job.firmware_update());
    let job = or_cleanup!(job.test());
    let job = or_cleanup!(job.allocate());
    let job = or_cleanup!(job.reserve());
    job.cleanup()
}

#[cfg(test)]
mod tests;
