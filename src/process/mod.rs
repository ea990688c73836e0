//! Runs one phase command: `sh -c CMD` in its own process group, output pumped with
//! `poll()` against deadlines, kill escalation (SIGTERM to the group and to every process
//! that left it, grace period, SIGKILL), and a sweep that leaves no descendant alive when
//! the phase ends.
//!
//! This file holds the platform-neutral types, the stop lines and the command state table;
//! the nix calls are in the files below it, one concept each:
//!
//! - `unix.rs`: the runner, one command from spawn to reap ([`run_command`]);
//! - `spawn.rs`: the phase token and the `oom_score_adj` written between fork and exec;
//! - `capture.rs`: the output pipe, or the sink's file followed with direct capture;
//! - `reader.rs`: the output pipe read on a thread, beside the runner that writes it;
//! - `poll.rs`: the stop signal's wake pipe and deadlines as `poll()` timeouts;
//! - `group.rs`: the process group from spawn to reap: SIGTERM, the final sweep, reaping;
//! - `pinned.rs`: signalling one process through a pidfd, never a reused pid;
//! - `reap.rs`: the subreaper setting and `waitpid`;
//! - `sweep.rs`: the `/proc` scan that finds a phase's processes;
//! - `leftovers.rs`: killing what a dead agent's phase left running.
//!
//! A command's states, in order: `running` (the shell or the output pipe is alive),
//! `terminating` (SIGTERM sent to the group and to every process of the phase outside it,
//! grace period running, until none of them is alive), `killed` (SIGKILL sent to the
//! group and to every process of the phase), `exited` (everything reaped).
//!
//! "The processes of the phase" are the members of the group, every process whose
//! environment carries the phase token, and (after [`claim_orphans`]) every orphan the
//! agent adopted as subreaper. [`COMMAND_TRANSITIONS`] lists every edge the runner takes: the
//! runner's state changes only along it, in every build.

mod capture;
mod group;
mod leftovers;
mod pinned;
mod poll;
mod reader;
mod reap;
mod spawn;
mod sweep;
mod unix;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use leftovers::{kill_leftovers, Leftovers};
pub use reap::{become_subreaper, reap_orphans};
pub use sweep::claim_orphans;
pub use unix::run_command;

/// Exit code recorded when the agent killed the command (Python reports -9, modulo 256).
pub const KILLED_EXIT_CODE: i32 = 247;
/// Exit code recorded when the agent could not run the command at all.
pub const AGENT_FAILURE_EXIT_CODE: i32 = 100;

/// Every edge of a command's state machine: `(from, event, to)`.
///
/// The runner moves through these and nothing else: `CommandState::step` takes the
/// target state from this table; [`command_machine`] draws it.
pub const COMMAND_TRANSITIONS: &[(CommandState, CommandEvent, CommandState)] = &[
    (S::Running, E::Exit, S::Exited),
    (S::Running, E::ExitLeftBackground, S::Killed),
    (S::Running, E::StragglerWaitOver, S::Killed),
    (S::Running, E::GlobalTimeout, S::Terminating),
    (S::Running, E::OutputTimeout, S::Terminating),
    (S::Running, E::Cancel, S::Terminating),
    (S::Running, E::Shutdown, S::Terminating),
    (S::Running, E::OutputUnrecordable, S::Terminating),
    (S::Running, E::KillNow, S::Killed),
    (S::Terminating, E::GroupExited, S::Exited),
    (S::Terminating, E::GroupExitedLeftEscapees, S::Killed),
    (S::Terminating, E::GraceExpired, S::Killed),
    (S::Terminating, E::KillNow, S::Killed),
    (S::Killed, E::Reaped, S::Exited),
];

use CommandEvent as E;
use CommandState as S;

/// The command machine to draw, from [`COMMAND_TRANSITIONS`].
pub fn command_machine() -> crate::diagram::Machine {
    let table: Vec<(&'static str, &'static str, &'static str)> = COMMAND_TRANSITIONS
        .iter()
        .map(|(from, event, to)| (from.name(), event.label(), to.name()))
        .collect();
    crate::diagram::Machine::from_table(
        "command",
        "One phase command (process group)",
        S::Running.name(),
        S::Exited.name(),
        &table,
    )
}

/// What moves a command along [`COMMAND_TRANSITIONS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandEvent {
    /// The shell exited and the output closed; nothing of the phase was left.
    Exit,
    /// The shell exited and the output closed, but the final sweep found processes left.
    ExitLeftBackground,
    /// The shell exited; background processes kept the output open past `straggler_wait`
    /// (or a stop request / the global deadline cut that wait short).
    StragglerWaitOver,
    /// The command ran for its global timeout.
    GlobalTimeout,
    /// The command printed nothing for its output timeout.
    OutputTimeout,
    /// The job was cancelled ([`StopKind::Cancel`]).
    Cancel,
    /// The agent is shutting down ([`StopKind::Shutdown`]), or a command that outlives a
    /// shutdown used up its budget.
    Shutdown,
    /// The sink could not record the command's output (disk full, directory unwritable).
    OutputUnrecordable,
    /// [`StopKind::KillNow`]: kill at once.
    KillNow,
    /// After SIGTERM the shell and every process of the phase exited (the output need not
    /// be closed: only a process outside the phase can still hold it).
    GroupExited,
    /// As above, but the final sweep still found processes of the phase alive (forked just
    /// as the last scan ran).
    GroupExitedLeftEscapees,
    /// The grace period after SIGTERM ran out.
    GraceExpired,
    /// The shell was reaped after SIGKILL.
    Reaped,
}

impl CommandEvent {
    pub const ALL: [CommandEvent; 13] = [
        E::Exit,
        E::ExitLeftBackground,
        E::StragglerWaitOver,
        E::GlobalTimeout,
        E::OutputTimeout,
        E::Cancel,
        E::Shutdown,
        E::OutputUnrecordable,
        E::KillNow,
        E::GroupExited,
        E::GroupExitedLeftEscapees,
        E::GraceExpired,
        E::Reaped,
    ];

    /// The label of the event's edges (in the diagram, the transition table and the log).
    pub fn label(self) -> &'static str {
        match self {
            E::Exit => "exit",
            E::ExitLeftBackground => "exit, background processes left",
            E::StragglerWaitOver => "straggler wait over",
            E::GlobalTimeout => "global timeout",
            E::OutputTimeout => "output timeout",
            E::Cancel => "cancel",
            E::Shutdown => "shutdown",
            E::OutputUnrecordable => "output cannot be recorded",
            E::KillNow => "kill now",
            E::GroupExited => "group exited within grace",
            E::GroupExitedLeftEscapees => "group exited, escapees left",
            E::GraceExpired => "grace expired",
            E::Reaped => "reaped",
        }
    }
}

/// Where the runner is in [`COMMAND_TRANSITIONS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandState {
    /// The shell or the output is alive.
    Running,
    /// SIGTERM sent to the group and to every process of the phase outside it; the grace
    /// period runs until none of them is alive.
    Terminating,
    /// SIGKILL sent to the group and to every process of the phase.
    Killed,
    /// Everything reaped.
    Exited,
}

impl CommandState {
    pub const ALL: [CommandState; 4] = [S::Running, S::Terminating, S::Killed, S::Exited];

    pub fn name(self) -> &'static str {
        match self {
            S::Running => "running",
            S::Terminating => "terminating",
            S::Killed => "killed",
            S::Exited => "exited",
        }
    }

    /// Takes the edge of [`COMMAND_TRANSITIONS`] that `event` labels from this state: the
    /// state it leads to comes from the table, in every build, so an edge the table lacks
    /// cannot be taken. Such an event is a bug: debug builds panic, release builds log it
    /// and stay (the runner's kills do not depend on the state's name).
    pub(crate) fn step(&mut self, event: CommandEvent) {
        let to = COMMAND_TRANSITIONS
            .iter()
            .find(|(from, on, _)| *from == *self && *on == event)
            .map(|(_, _, to)| *to);
        match to {
            Some(to) => *self = to,
            None => {
                debug_assert!(
                    false,
                    "command transition {} --{}--> is not in COMMAND_TRANSITIONS",
                    self.name(),
                    event.label()
                );
                log::error!(
                    "internal: command transition {} --{}--> is not in the table; staying",
                    self.name(),
                    event.label()
                );
            }
        }
    }
}

/// The line written to the output when the agent stops a command, as the Python agent
/// writes it. `None` for an end the agent did not cause.
pub(crate) fn stop_line(termination: Termination, spec: &CommandSpec) -> Option<String> {
    let secs = |t: Option<Duration>| t.map_or(0, |t| t.as_secs());
    match termination {
        Termination::GlobalTimeout => Some(format!(
            "\nERROR: Global timeout reached! ({}s)\n",
            secs(spec.global_timeout)
        )),
        Termination::OutputTimeout => Some(format!(
            "\nERROR: Output timeout reached! ({}s)\n",
            secs(spec.output_timeout)
        )),
        Termination::Cancelled => Some("\nJob cancellation was requested, exiting.\n".into()),
        Termination::Shutdown => Some("\nThe agent is shutting down: ending this phase.\n".into()),
        // The sink cannot take this line: it says why itself, elsewhere.
        Termination::Exited(_) | Termination::Signaled(_) | Termination::Unrecordable => None,
    }
}

/// The line written when [`StopKind::KillNow`] ends a running command.
pub(crate) const KILL_NOW_LINE: &str = "\nThe agent is shutting down now: killing this phase.\n";

/// The line written when the sweep had to kill processes the command left behind.
/// `held_output_for` is set when they kept the output pipe open that long.
pub(crate) fn straggler_line(count: usize, held_output_for: Option<Duration>) -> String {
    let what = if count == 1 {
        "1 background process".to_string()
    } else {
        format!("{count} background processes")
    };
    let them = if count == 1 { "it" } else { "them" };
    match held_output_for {
        Some(waited) => format!(
            "\nWARNING: {what} still held the output {} ms after the command exited; killed {them}.\n",
            waited.as_millis()
        ),
        None => format!(
            "\nWARNING: {what} still running after the command exited; killed {them}.\n"
        ),
    }
}

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
    /// For a command that does not honour [`StopKind::Shutdown`]: once a shutdown is
    /// requested (or from the start, when it already was), the command may run this much
    /// longer; then it is ended like a timeout ([`Termination::Shutdown`]). `None`: no bound
    /// beyond its own timeouts.
    pub shutdown_budget: Option<Duration>,
    /// Written to the shell's `/proc/self/oom_score_adj` before it runs the command, so
    /// that the whole tree inherits it and the kernel's OOM killer picks the job before the
    /// agent. `None` leaves the agent's own value. A value the kernel refuses (out of
    /// -1000..=1000, or lower than allowed without privilege) is ignored: the command runs.
    pub oom_score_adj: Option<i32>,
}

/// Receives the command's output as it arrives, byte-exact, in order.
pub trait OutputSink {
    fn output(&mut self, chunk: &[u8]);

    /// The command is about to be spawned with this phase token: the job journal records it
    /// now, so that an agent restarted after its own death finds the whole tree by it, even
    /// when the agent died the moment the command started.
    fn spawning(&mut self, _token: &str) {}

    /// The command has just spawned: its process group and phase token.
    fn spawned(&mut self, _pgid: i32, _token: &str) {}

    /// Whether the output can no longer be recorded and the command must be stopped (the
    /// runner ends it like a timeout, as [`Termination::Unrecordable`]). Asked after every
    /// chunk handed to [`OutputSink::output`].
    fn unrecordable(&self) -> bool {
        false
    }

    /// Direct capture: a file the command's stdout and stderr are connected to, so that its
    /// output never passes through the agent. It must be a description of its own (opened
    /// anew, for append), not a duplicate of one the agent keeps: the runner takes its last
    /// close as the sign that no process holds the output any more. `None` (the default):
    /// the output comes through a pipe, to [`OutputSink::output`].
    fn direct_output(&mut self) -> Option<std::fs::File> {
        None
    }

    /// Direct capture: a look at the file, now and then while the command runs. The sink
    /// takes what is new (and notices when no more can be written, for
    /// [`OutputSink::unrecordable`]). When the file grew: when it was last written.
    fn follow(&mut self) -> Option<std::time::SystemTime> {
        None
    }

    /// Direct capture: the longest pause between two looks at the file while it does not
    /// grow (`None`: the runner's own, a second), for a reader of the output that should
    /// not wait that long once the command speaks again.
    fn follow_pause_max(&self) -> Option<std::time::Duration> {
        None
    }
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
/// Many commands may use one signal one after the other; commands running at the same time
/// should each have their own (the runner drains the wake pipe, so a second concurrent
/// waiter could miss the wake-up until its next event).
#[derive(Clone, Debug)]
pub struct StopSignal {
    inner: Arc<StopInner>,
}

#[derive(Debug)]
struct StopInner {
    kinds: AtomicU8,
    wake: poll::WakePipe,
}

impl StopSignal {
    /// A signal with nothing requested.
    pub fn new() -> Result<StopSignal, ProcessError> {
        Ok(StopSignal {
            inner: Arc::new(StopInner {
                kinds: AtomicU8::new(0),
                wake: poll::WakePipe::new()?,
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

    /// Withdraws a request of `kind`: the daemon clears [`StopKind::Cancel`] before each
    /// job, as a cancellation belongs to the job it was made for.
    pub fn clear(&self, kind: StopKind) {
        self.inner.kinds.fetch_and(!(kind as u8), Ordering::SeqCst);
    }

    /// Whether the agent is shutting down ([`StopKind::Shutdown`] or [`StopKind::KillNow`]).
    pub fn is_shutting_down(&self) -> bool {
        self.is_requested(StopKind::Shutdown) || self.is_requested(StopKind::KillNow)
    }

    /// Sleeps `period`, waking at once on a shutdown request (it blocks on the wake pipe,
    /// with no periodic wake-up); `false` when the agent is shutting down. For waits
    /// between commands (polling, allocation), which must not run beside a command of the
    /// same signal: the wait empties the pipe.
    pub fn sleep_unless_shutdown(&self, period: Duration) -> bool {
        let deadline = std::time::Instant::now() + period;
        loop {
            if self.is_shutting_down() {
                return false;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return true;
            }
            self.inner.wake.wait(deadline - now);
        }
    }

    pub(crate) fn wake_pipe(&self) -> &poll::WakePipe {
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
    /// The agent stopped it because its output could not be recorded (the sink said so:
    /// disk full, directory unwritable). Exit code 100, like any agent failure.
    Unrecordable,
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
            Termination::Unrecordable => AGENT_FAILURE_EXIT_CODE,
        }
    }

    /// Whether the agent ended the command (timeout, cancel, shutdown, unrecordable output).
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
    /// Of those, the processes that had left the command's process group (`setsid`, a
    /// double fork into another group).
    pub escapees_killed: usize,
    /// Processes outside the command's process group that the agent sent SIGTERM when it
    /// stopped the command, and that were gone before any SIGKILL.
    pub escapees_terminated: usize,
    /// Wall time from spawn to the last process reaped.
    pub duration: Duration,
}

/// Sets the agent's own `oom_score_adj` (-1000..=1000; lower means less likely to be
/// killed when memory runs out). Raising it needs no privilege; lowering it below the value
/// the agent started with needs CAP_SYS_RESOURCE (root).
///
/// # Errors
/// The write's error: `InvalidInput` out of range, `PermissionDenied` without privilege.
pub fn set_own_oom_score_adj(value: i32) -> std::io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", value.to_string())
}

/// Maps a failed system call to [`ProcessError::Sys`], naming what was attempted.
fn sys(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> ProcessError {
    move |source| ProcessError::Sys { what, source }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(global: Option<Duration>, output: Option<Duration>) -> CommandSpec {
        CommandSpec {
            command: "true".into(),
            cwd: PathBuf::from("/"),
            env: Vec::new(),
            global_timeout: global,
            output_timeout: output,
            grace_period: Duration::ZERO,
            straggler_wait: Duration::ZERO,
            honour_cancel: true,
            honour_shutdown: true,
            shutdown_budget: None,
            oom_score_adj: None,
        }
    }

    /// A wait between commands ends on a shutdown request from another thread, not on a
    /// cancel, and otherwise runs its whole period (no busy loop: it blocks on the pipe).
    #[test]
    fn a_wait_ends_on_shutdown_only() {
        let stop = StopSignal::new().expect("pipe");
        let started = std::time::Instant::now();
        assert!(stop.sleep_unless_shutdown(Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        let waker = stop.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.request(StopKind::Cancel);
            std::thread::sleep(Duration::from_millis(50));
            waker.request(StopKind::Shutdown);
        });
        let started = std::time::Instant::now();
        assert!(
            !stop.sleep_unless_shutdown(Duration::from_secs(60)),
            "ended by the shutdown"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "not by the cancel"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "well before its period"
        );
        thread.join().expect("thread");
        assert!(
            !stop.sleep_unless_shutdown(Duration::from_secs(60)),
            "sticky"
        );
    }

    #[test]
    fn transitions_end_in_exited() {
        for (from, _, _) in COMMAND_TRANSITIONS {
            assert_ne!(*from, CommandState::Exited, "exited is terminal");
        }
        // Every state is reachable from running and reaches exited.
        for state in CommandState::ALL {
            let mut seen = vec![CommandState::Running];
            let mut i = 0;
            while i < seen.len() {
                for (from, _, to) in COMMAND_TRANSITIONS {
                    if *from == seen[i] && !seen.contains(to) {
                        seen.push(*to);
                    }
                }
                i += 1;
            }
            assert!(seen.contains(&state), "{state:?} unreachable from running");
            let mut at = state;
            for _ in 0..CommandState::ALL.len() {
                if at == CommandState::Exited {
                    break;
                }
                at = COMMAND_TRANSITIONS
                    .iter()
                    .find(|(from, _, _)| *from == at)
                    .map(|(_, _, to)| *to)
                    .expect("non-terminal state has an edge");
            }
            assert_eq!(at, CommandState::Exited, "{state:?} does not reach exited");
        }
    }

    /// Every event labels an edge, and no two events share a label (the diagram and the
    /// log name an event by its label).
    #[test]
    fn every_event_is_used_and_labelled_once() {
        for (i, event) in CommandEvent::ALL.iter().enumerate() {
            assert!(!event.label().is_empty());
            assert!(
                COMMAND_TRANSITIONS.iter().any(|(_, on, _)| on == event),
                "{event:?} labels no edge"
            );
            for other in &CommandEvent::ALL[i + 1..] {
                assert_ne!(event.label(), other.label(), "{event:?} and {other:?}");
            }
        }
    }

    #[test]
    fn a_step_follows_the_table() {
        let mut state = CommandState::Running;
        state.step(CommandEvent::OutputTimeout);
        assert_eq!(state, CommandState::Terminating);
        state.step(CommandEvent::GraceExpired);
        assert_eq!(state, CommandState::Killed);
        state.step(CommandEvent::Reaped);
        assert_eq!(state, CommandState::Exited);
    }

    #[test]
    fn no_duplicate_edges() {
        for (i, a) in COMMAND_TRANSITIONS.iter().enumerate() {
            for b in &COMMAND_TRANSITIONS[i + 1..] {
                assert!(
                    !(a.0 == b.0 && a.1 == b.1),
                    "{a:?} and {b:?} share an event"
                );
            }
        }
    }

    #[test]
    fn stop_lines_match_the_python_agent() {
        let s = spec(
            Some(Duration::from_secs(14400)),
            Some(Duration::from_millis(900_500)),
        );
        assert_eq!(
            stop_line(Termination::GlobalTimeout, &s).as_deref(),
            Some("\nERROR: Global timeout reached! (14400s)\n")
        );
        assert_eq!(
            stop_line(Termination::OutputTimeout, &s).as_deref(),
            Some("\nERROR: Output timeout reached! (900s)\n")
        );
        assert_eq!(
            stop_line(Termination::Cancelled, &s).as_deref(),
            Some("\nJob cancellation was requested, exiting.\n")
        );
        assert_eq!(stop_line(Termination::Exited(0), &s), None);
        let ms = spec(Some(Duration::from_millis(300)), None);
        assert_eq!(
            stop_line(Termination::GlobalTimeout, &ms).as_deref(),
            Some("\nERROR: Global timeout reached! (0s)\n")
        );
    }

    #[test]
    fn straggler_lines() {
        assert_eq!(
            straggler_line(2, Some(Duration::from_millis(1000))),
            "\nWARNING: 2 background processes still held the output 1000 ms after the command exited; killed them.\n"
        );
        assert_eq!(
            straggler_line(1, None),
            "\nWARNING: 1 background process still running after the command exited; killed it.\n"
        );
    }

    #[test]
    fn own_oom_score_adj_is_written_and_checked_by_the_kernel() {
        let own: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
            .expect("own oom_score_adj")
            .trim()
            .parse()
            .expect("a number");
        // Writing the current value changes nothing and needs no privilege.
        set_own_oom_score_adj(own).expect("the current value is accepted");
        let err = set_own_oom_score_adj(5000).expect_err("out of range");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Termination::Exited(300).exit_code(), 44);
        assert_eq!(Termination::Signaled(11).exit_code(), 245);
        assert_eq!(Termination::GlobalTimeout.exit_code(), KILLED_EXIT_CODE);
        assert!(Termination::Cancelled.killed_by_agent());
        assert!(!Termination::Signaled(9).killed_by_agent());
    }
}
