//! The runner: one command from spawn to reap.
//!
//! One command is `/bin/sh -c CMD` in a new process group whose stdout and stderr share
//! one pipe, or, when the sink offers a file ([`OutputSink::direct_output`]), that file:
//! the command then writes its log itself and the runner follows the file (see
//! [`Capture`]); the pipe is read on a thread of its own ([`super::reader`]) while the
//! runner hands what it read to the sink. The runner blocks in `poll()` on the pipe's
//! reader (or the pipe itself, or the file's inotify watch),
//! the [`StopSignal`]'s wake pipe and a pidfd of the shell (readable when it exits), with
//! the timeout computed from the nearest deadline. A [`ProcessGroupGuard`] owns the group
//! from spawn to reap: its final sweep (also run from `Drop`) kills the group and every
//! process carrying the phase token.
//!
//! Stopping a command sends SIGTERM to the group and, right after, to every process of the
//! phase outside it (found by the sweep's `/proc` scan); rescans with back-off while the
//! grace period runs send SIGTERM to processes that appear later and notice when none is
//! left, which ends the phase without waiting for the output pipe to close. Every signal
//! to a single process goes through a pidfd opened before its start time is checked
//! ([`super::pinned`]), so a reused pid is never signalled.

use std::ops::ControlFlow;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::Signal;
use nix::unistd::{read, Pid};

use super::capture::{drain_output, instant_of, last_holder_closed, Capture};
use super::group::ProcessGroupGuard;
use super::poll::{earliest, later, poll_timeout};
use super::reader::{End, PipeReader};
use super::reap::decode_status;
use super::spawn::{spawn, Spawned};
use super::{
    stop_line, straggler_line, sys, CommandEvent, CommandOutcome, CommandSpec, CommandState,
    OutputSink, ProcessError, StopKind, StopSignal, Termination, KILL_NOW_LINE,
};
use crate::pagebuf::PageBuf;

/// One read from the output pipe; the buffer is reused for the whole command.
const READ_CHUNK: usize = 256 * 1024;
/// After the sweep, how long to wait for the output pipe to report EOF.
const DRAIN_BOUND: Duration = Duration::from_millis(500);
/// With direct capture, how often the runner asks the sink to look at the file: every
/// `FOLLOW_FIRST` while it grows, backing off (doubling) to `FOLLOW_MAX` while it does
/// not. A watch on every write would cost the command more than the look (a wake-up and
/// an event per write); the file's mtime says when it was last written, so the output
/// timeout is kept exactly all the same.
const FOLLOW_FIRST: Duration = Duration::from_millis(20);
const FOLLOW_MAX: Duration = Duration::from_secs(1);
/// Without pidfd (Linux < 5.3) the shell's exit is checked this often.
const NO_PIDFD_TICK: Duration = Duration::from_millis(20);
/// While terminating, how often the phase's processes are rescanned (to SIGTERM late
/// forks and to notice that none is left): from the first pause, doubling up to the
/// maximum, and back to the first when the shell exits or the output closes.
const TERM_RESCAN_FIRST: Duration = Duration::from_millis(1);
const TERM_RESCAN_MAX: Duration = Duration::from_millis(50);

/// Why the pump loop ended.
enum LoopEnd {
    /// The shell exited and the output closed (and, when terminating, the group is gone).
    Done,
    /// The agent must kill what is left: grace expired, kill now, or stragglers.
    Kill,
}

/// What a stop check tells the pump loop.
enum Checked {
    /// Nothing to stop: go on to the other checks and the wait.
    Nothing,
    /// The command was just stopped: start the loop over (the time has moved on).
    Stopped,
    /// The pump is over.
    End(LoopEnd),
}

/// Runs one phase command to its end and reports how it ended.
///
/// `/bin/sh -c spec.command` runs in `spec.cwd`, in a new process group, with stdin from
/// `/dev/null` and the agent's environment plus `spec.env` plus
/// `TESTFLINGER_PHASE_TOKEN=<random hex>`, which marks the phase's processes. Its stdout
/// and stderr share one destination:
/// - with direct capture (the sink offers a file, [`OutputSink::direct_output`], and the
///   kernel can watch it), the command writes its log itself and its output never passes
///   through the agent: the runner asks the sink to look at the file
///   ([`OutputSink::follow`]) every 20 ms while it grows, backing off to a second (or the
///   sink's [`OutputSink::follow_pause_max`]) while it does not, takes the file's mtime as
///   the time of the last output, and knows from an inotify watch when the last process
///   holding the file closed it;
/// - otherwise a pipe, whose bytes go to [`OutputSink::output`] as they arrive
///   (byte-exact, in chunks of at most 256 KiB).
///
/// A global or output timeout, or a stop request the spec honours, writes its line to the
/// sink and sends SIGTERM to the group and to every process of the phase outside it
/// (token carriers, adopted orphans); the command ends as soon as the shell and all of
/// them are gone, even if the output is still open, and after `spec.grace_period`
/// whatever is left gets SIGKILL.
/// [`StopKind::KillNow`] kills at once. When the shell exits but background processes keep
/// the output open, they get `spec.straggler_wait` before they are killed. In every case
/// the end is a sweep: the group and every process carrying the token are killed and the
/// phase's processes reaped, so none outlives the call (escapees from the group are only
/// re-parented to the agent, and so reaped, after [`become_subreaper`](super::become_subreaper)).
///
/// The stages, in order: `spawn` (the shell started, see `spawn.rs`); the pump
/// (`Run::pump`), which checks stop requests and deadlines (`Run::check_stops`), the
/// shell's exit (`Run::check_exit`), the grace period (`Run::check_terminating`) and
/// background processes holding the output (`Run::check_stragglers`), then sleeps in
/// `poll()` (`Run::wait`) and takes what woke it (`Run::take`); and `Run::finish`: the
/// sweep, the output's last bytes, the reap.
///
/// # Errors
/// [`ProcessError::Spawn`] when the shell cannot be started (missing `cwd`, bad `env`);
/// [`ProcessError::Sys`] when the pipe cannot be created or read. The process tree is
/// killed and reaped before any error is returned.
pub fn run_command(
    spec: &CommandSpec,
    sink: &mut dyn OutputSink,
    stop: &StopSignal,
) -> Result<CommandOutcome, ProcessError> {
    let spawned = spawn(spec, sink)?;
    let mut run = Run::new(spec, sink, stop, spawned);
    let end = run.pump()?;
    run.finish(end)
}

/// One command between spawn and reap: everything its stages share. [`run_command`] owns
/// it and each stage is a method; dropping it early (an error) drops the
/// [`ProcessGroupGuard`], which kills and reaps the tree.
struct Run<'a> {
    spec: &'a CommandSpec,
    sink: &'a mut dyn OutputSink,
    stop: &'a StopSignal,
    /// Owns the process group; declared before `capture` so that it is dropped first.
    guard: ProcessGroupGuard,
    capture: Capture,
    /// The pipe's read buffer (empty with direct capture).
    buf: PageBuf,
    /// The shell, and the group id.
    leader: Pid,
    start: Instant,
    /// Where the command is in [`super::COMMAND_TRANSITIONS`].
    state: CommandState,
    /// Why the agent stopped the command; `None` while it ends on its own.
    reason: Option<Termination>,
    needed_sigkill: bool,
    /// How long stragglers held the output after the shell exited, when they were killed
    /// for it.
    held_output_for: Option<Duration>,
    /// When the shell was seen exiting (it is reaped only at the end).
    leader_exit_at: Option<Instant>,
    /// Until the pipe's EOF, or until the last holder of the command's description of the
    /// log file closed it: background processes still hold the output.
    output_open: bool,
    /// When the command last wrote output.
    last_output: Instant,
    /// Direct capture: when the sink next looks at the file, the pause after that, and
    /// the longest pause.
    next_follow: Instant,
    follow_pause: Duration,
    follow_max: Duration,
    global_deadline: Option<Instant>,
    /// A command that outlives a shutdown (cleanup) only within its budget.
    shutdown_deadline: Option<Instant>,
    /// Once terminating: when the grace period ends.
    kill_at: Instant,
    /// While terminating: when to rescan the phase's processes, when the last scan ran,
    /// and the pause after that.
    next_rescan: Instant,
    last_scan: Instant,
    rescan_pause: Duration,
}

/// What woke [`Run::wait`].
struct Ready {
    output: bool,
    wake: bool,
    leader: bool,
    /// Indexes in the guard's `terminated` of signalled processes seen exiting.
    exited: Vec<usize>,
}

impl<'a> Run<'a> {
    /// The state right after [`spawn`]: running, nothing stopped,
    /// the output open, the timeouts counted from the start.
    fn new(
        spec: &'a CommandSpec,
        sink: &'a mut dyn OutputSink,
        stop: &'a StopSignal,
        spawned: Spawned,
    ) -> Run<'a> {
        let Spawned {
            guard,
            capture,
            leader,
            start,
        } = spawned;
        let capture = capture.read_on_thread();
        let buf = match capture {
            Capture::Pipe(_) => PageBuf::new(READ_CHUNK),
            Capture::Reader(_) | Capture::Follow(_) => PageBuf::new(0),
        };
        let follow_max = sink
            .follow_pause_max()
            .unwrap_or(FOLLOW_MAX)
            .max(FOLLOW_FIRST);
        Run {
            spec,
            sink,
            stop,
            guard,
            capture,
            buf,
            leader,
            start,
            state: CommandState::Running,
            reason: None,
            needed_sigkill: false,
            held_output_for: None,
            leader_exit_at: None,
            output_open: true,
            last_output: start,
            next_follow: start + FOLLOW_FIRST,
            follow_pause: FOLLOW_FIRST,
            follow_max,
            global_deadline: spec.global_timeout.and_then(|t| start.checked_add(t)),
            shutdown_deadline: None,
            kill_at: start,
            next_rescan: start,
            last_scan: start,
            rescan_pause: TERM_RESCAN_FIRST,
        }
    }

    /// The pump: until the command is over or must be killed, checks the stops, the
    /// shell's exit, the grace period and the stragglers, sleeps in `poll()` and takes
    /// what woke it (output, a stop request, the shell's exit, a signalled process's exit).
    fn pump(&mut self) -> Result<LoopEnd, ProcessError> {
        loop {
            let now = Instant::now();
            if self.guard.pidfd.is_none()
                && self.leader_exit_at.is_none()
                && self.guard.leader_has_exited()
            {
                self.leader_exit_at = Some(now);
            }
            match self.check_stops(now) {
                Checked::Nothing => {}
                Checked::Stopped => continue,
                Checked::End(end) => return Ok(end),
            }
            if let Some(end) = self.check_exit() {
                return Ok(end);
            }
            if let Some(end) = self.check_terminating(now) {
                return Ok(end);
            }
            let straggler_deadline = match self.check_stragglers(now) {
                ControlFlow::Continue(deadline) => deadline,
                ControlFlow::Break(end) => return Ok(end),
            };
            let ready = self.wait(now, straggler_deadline)?;
            self.take(ready)?;
        }
    }

    /// Stop requests and deadlines while the command itself runs (the shell alive, or
    /// terminating): a kill-now kills at once; a shutdown starts the budget of a command
    /// that outlives it; a cancel or shutdown the spec honours, the global or output
    /// timeout, the shutdown budget spent or unrecordable output stops a running command
    /// ([`Run::stop_command`]).
    fn check_stops(&mut self, now: Instant) -> Checked {
        let command_running =
            self.leader_exit_at.is_none() || self.state == CommandState::Terminating;
        if !command_running {
            return Checked::Nothing;
        }
        let (spec, stop) = (self.spec, self.stop);
        if stop.is_requested(StopKind::KillNow) {
            if self.reason.is_none() {
                self.reason = Some(Termination::Shutdown);
                self.sink.output(KILL_NOW_LINE.as_bytes());
            }
            self.needed_sigkill = true;
            self.state.step(CommandEvent::KillNow);
            return Checked::End(LoopEnd::Kill);
        }
        if let (None, Some(budget), false, true) = (
            self.shutdown_deadline,
            spec.shutdown_budget,
            spec.honour_shutdown,
            stop.is_requested(StopKind::Shutdown),
        ) {
            self.shutdown_deadline = now.checked_add(budget);
            log::info!(
                "pgid {}: the agent is stopping; this command may run {}s more",
                self.leader,
                budget.as_secs()
            );
        }
        if self.state != CommandState::Running {
            return Checked::Nothing;
        }
        let mut output_deadline = self.output_deadline();
        if let (Capture::Follow(_), true) =
            (&self.capture, output_deadline.is_some_and(|d| now >= d))
        {
            // The sink looks at the file only now and then: what the command wrote since
            // the last look counts before the deadline is taken as passed.
            if let Some(written) = self.sink.follow() {
                self.last_output = instant_of(written, now).max(self.last_output);
                self.follow_pause = FOLLOW_FIRST;
                self.next_follow = now + self.follow_pause;
                output_deadline = self.output_deadline();
            }
        }
        let stop_for = if spec.honour_cancel && stop.is_requested(StopKind::Cancel) {
            Some((Termination::Cancelled, CommandEvent::Cancel))
        } else if spec.honour_shutdown && stop.is_requested(StopKind::Shutdown) {
            Some((Termination::Shutdown, CommandEvent::Shutdown))
        } else if self.global_deadline.is_some_and(|d| now >= d) {
            Some((Termination::GlobalTimeout, CommandEvent::GlobalTimeout))
        } else if output_deadline.is_some_and(|d| now >= d) {
            Some((Termination::OutputTimeout, CommandEvent::OutputTimeout))
        } else if self.shutdown_deadline.is_some_and(|d| now >= d) {
            Some((Termination::Shutdown, CommandEvent::Shutdown))
        } else if self.sink.unrecordable() {
            Some((Termination::Unrecordable, CommandEvent::OutputUnrecordable))
        } else {
            None
        };
        match stop_for {
            Some((termination, event)) => self.stop_command(now, termination, event),
            None => Checked::Nothing,
        }
    }

    /// Stops the running command: its line to the sink, SIGTERM to the group and right
    /// after to every process of the phase outside it, the grace period started. Over at
    /// once when the shell has exited and nothing of the phase is left.
    fn stop_command(
        &mut self,
        now: Instant,
        termination: Termination,
        event: CommandEvent,
    ) -> Checked {
        if let Some(line) = stop_line(termination, self.spec) {
            self.sink.output(line.as_bytes());
        }
        self.reason = Some(termination);
        self.guard.signal_group(Signal::SIGTERM);
        self.kill_at = later(now, self.spec.grace_period);
        self.state.step(event);
        // Right after the group: every process of the phase outside it.
        let alive = self.guard.terminate(true);
        self.last_scan = Instant::now();
        self.rescan_pause = TERM_RESCAN_FIRST;
        self.next_rescan = self.last_scan + self.rescan_pause;
        log::debug!(
            "pgid {}: {}, SIGTERM sent to the group and {} other processes",
            self.leader,
            event.label(),
            self.guard.terminated.iter().filter(|t| t.escapee).count()
        );
        if self.leader_exit_at.is_some() && alive == 0 {
            return Checked::End(LoopEnd::Done);
        }
        Checked::Stopped
    }

    /// Done when the shell exited on its own and nothing holds the output any more.
    fn check_exit(&self) -> Option<LoopEnd> {
        (self.state == CommandState::Running && self.leader_exit_at.is_some() && !self.output_open)
            .then_some(LoopEnd::Done)
    }

    /// Once stopped: rescans the phase's processes when due (SIGTERM to late forks), done
    /// when the shell and every process of the phase are gone, whether or not the output
    /// has closed; kill when the grace period is over.
    fn check_terminating(&mut self, now: Instant) -> Option<LoopEnd> {
        if self.state != CommandState::Terminating {
            return None;
        }
        if now >= self.next_rescan {
            let alive = self.guard.terminate(false);
            if self.leader_exit_at.is_some() && alive == 0 {
                return Some(LoopEnd::Done);
            }
            self.last_scan = Instant::now();
            self.rescan_pause = (self.rescan_pause * 2).min(TERM_RESCAN_MAX);
            self.next_rescan = self.last_scan + self.rescan_pause;
        }
        if now >= self.kill_at {
            self.needed_sigkill = true;
            self.state.step(CommandEvent::GraceExpired);
            return Some(LoopEnd::Kill);
        }
        None
    }

    /// The shell exited but background processes hold the output: they get
    /// `straggler_wait` (cut short by the global deadline or a stop request), then are
    /// killed. Continues with the deadline of that wait, if one runs.
    fn check_stragglers(&mut self, now: Instant) -> ControlFlow<LoopEnd, Option<Instant>> {
        let (CommandState::Running, Some(exit_at)) = (self.state, self.leader_exit_at) else {
            return ControlFlow::Continue(None);
        };
        let (spec, stop) = (self.spec, self.stop);
        let deadline = earliest(
            exit_at.checked_add(spec.straggler_wait),
            self.global_deadline,
        );
        let stop_requested = stop.is_requested(StopKind::KillNow)
            || self.sink.unrecordable()
            || (spec.honour_cancel && stop.is_requested(StopKind::Cancel))
            || (spec.honour_shutdown && stop.is_requested(StopKind::Shutdown));
        if stop_requested || deadline.is_some_and(|d| now >= d) {
            self.held_output_for = Some(now.duration_since(exit_at).min(spec.straggler_wait));
            self.state.step(CommandEvent::StragglerWaitOver);
            return ControlFlow::Break(LoopEnd::Kill);
        }
        ControlFlow::Continue(deadline)
    }

    /// When the output timeout expires, counted from the last output.
    fn output_deadline(&self) -> Option<Instant> {
        self.spec
            .output_timeout
            .and_then(|t| self.last_output.checked_add(t))
    }

    /// Sleeps in `poll()` until output (or, with direct capture, the log file's last
    /// close), a stop request, the shell's exit, a signalled process's exit (while
    /// terminating) or the nearest deadline: a timeout, the grace period, the next rescan,
    /// the next look at the followed file.
    fn wait(
        &mut self,
        now: Instant,
        straggler_deadline: Option<Instant>,
    ) -> Result<Ready, ProcessError> {
        let deadline = match self.state {
            CommandState::Running if self.leader_exit_at.is_some() => straggler_deadline,
            CommandState::Running => earliest(
                earliest(self.global_deadline, self.shutdown_deadline),
                self.output_deadline(),
            ),
            CommandState::Terminating => Some(self.kill_at.min(self.next_rescan)),
            _ => Some(self.kill_at),
        };
        let deadline = if self.guard.pidfd.is_none() && self.leader_exit_at.is_none() {
            earliest(deadline, Some(now + NO_PIDFD_TICK))
        } else {
            deadline
        };
        let deadline = match self.capture {
            Capture::Follow(_) => earliest(deadline, Some(self.next_follow)),
            Capture::Pipe(_) | Capture::Reader(_) => deadline,
        };
        let watch_leader = self.leader_exit_at.is_none();
        let watch_exits = self.state == CommandState::Terminating;
        let mut fds = Vec::with_capacity(3);
        fds.push(PollFd::new(
            self.stop.wake_pipe().read.as_fd(),
            PollFlags::POLLIN,
        ));
        if self.output_open {
            fds.push(PollFd::new(self.capture.as_fd(), PollFlags::POLLIN));
        }
        if let (true, Some(pidfd)) = (watch_leader, &self.guard.pidfd) {
            fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
        }
        let mut watched = Vec::new();
        if watch_exits {
            for (index, pidfd) in self.guard.exit_watch() {
                watched.push(index);
                fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
            }
        }
        match poll(&mut fds, poll_timeout(now, deadline)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(sys("poll on the command's output")(e)),
        }
        let ready = |fd: Option<&PollFd<'_>>| {
            fd.and_then(|fd| fd.revents())
                .is_some_and(|r| !r.is_empty())
        };
        let mut it = fds.iter();
        let wake = ready(it.next());
        let output = self.output_open && ready(it.next());
        let leader = watch_leader && self.guard.pidfd.is_some() && ready(it.next());
        let exited: Vec<usize> = watched
            .into_iter()
            .zip(it)
            .filter(|(_, fd)| ready(Some(fd)))
            .map(|(index, _)| index)
            .collect();
        Ok(Ready {
            output,
            wake,
            leader,
            exited,
        })
    }

    /// Takes what woke [`Run::wait`]: forgets the pidfds of processes seen exiting, empties
    /// the wake pipe, notes the shell's exit, reads the pipe into the sink (or, with direct
    /// capture, notes the file's last close and has the sink look at it when due), and
    /// while terminating brings the next rescan forward when something may have ended.
    fn take(&mut self, ready: Ready) -> Result<(), ProcessError> {
        for &index in &ready.exited {
            self.guard.terminated[index].pidfd = None;
        }
        if ready.wake {
            self.stop.wake_pipe().drain();
        }
        if ready.leader {
            self.leader_exit_at = Some(Instant::now());
        }
        let mut rescan_now = ready.leader || !ready.exited.is_empty();
        match &self.capture {
            Capture::Pipe(out_read) if ready.output => {
                match read(out_read, self.buf.as_mut_slice()) {
                    Ok(0) => {
                        self.output_open = false;
                        rescan_now = true;
                    }
                    Ok(n) => {
                        self.sink.output(&self.buf.as_slice()[..n]);
                        self.last_output = Instant::now();
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(e) => return Err(sys("reading the command's output")(e)),
                }
            }
            Capture::Reader(reader) if ready.output => {
                reader.acknowledge();
                // One batch, then the stops and deadlines are checked again: a command
                // printing as fast as the sink takes it never starves them.
                for _ in 0..PipeReader::BATCH {
                    let Some(chunk) = reader.next() else { break };
                    self.sink.output(chunk.bytes());
                    self.last_output = Instant::now();
                    reader.recycle(chunk);
                }
                reader.rearm();
                match reader.end() {
                    Some(End::Eof) => {
                        self.output_open = false;
                        rescan_now = true;
                    }
                    Some(End::Failed(e)) => return Err(sys("reading the command's output")(e)),
                    None => {}
                }
            }
            Capture::Pipe(_) | Capture::Reader(_) => {}
            Capture::Follow(watch) => {
                if ready.output && last_holder_closed(watch) {
                    self.output_open = false;
                    rescan_now = true;
                }
                let now = Instant::now();
                if now >= self.next_follow || rescan_now {
                    match self.sink.follow() {
                        Some(written) => {
                            self.last_output = instant_of(written, now).max(self.last_output);
                            self.follow_pause = FOLLOW_FIRST;
                        }
                        None => self.follow_pause = (self.follow_pause * 2).min(self.follow_max),
                    }
                    self.next_follow = now + self.follow_pause;
                }
            }
        }
        // A signalled process exiting, the shell exiting or the output closing: the rest
        // may be gone too.
        if rescan_now && self.state == CommandState::Terminating {
            // At once, but scans at least TERM_RESCAN_FIRST apart when many exit in a row.
            self.rescan_pause = TERM_RESCAN_FIRST;
            self.next_rescan = self.next_rescan.min(self.last_scan + TERM_RESCAN_FIRST);
        }
        Ok(())
    }

    /// The end, after the pump: removes the file's watch, sweeps (kills and reaps whatever
    /// of the phase is left), takes the output's last bytes (the pipe drained, bounded;
    /// the followed file looked at once more), reaps the shell and reports.
    fn finish(self, end: LoopEnd) -> Result<CommandOutcome, ProcessError> {
        let Run {
            sink,
            mut guard,
            capture,
            mut buf,
            leader,
            start,
            mut state,
            reason,
            mut needed_sigkill,
            held_output_for,
            mut output_open,
            ..
        } = self;
        // The watch is done with: removed now, the kernel's grace period for it runs while
        // the phase ends instead of when the inotify instance is closed (the agent's exit).
        let (pipe, followed) = match capture {
            Capture::Pipe(out_read) => (Some(Arc::new(out_read)), false),
            Capture::Reader(reader) => {
                // What the reader queued comes first; the runner reads the rest itself.
                let (chunks, ended, out_read) = reader.stop();
                for chunk in &chunks {
                    sink.output(chunk.bytes());
                }
                match ended {
                    Some(End::Eof) => output_open = false,
                    Some(End::Failed(e)) => return Err(sys("reading the command's output")(e)),
                    None => {}
                }
                if output_open {
                    buf = PageBuf::new(READ_CHUNK);
                }
                (Some(out_read), false)
            }
            Capture::Follow(watch) => {
                drop(watch);
                (None, true)
            }
        };
        // End of the command: kill and reap whatever is left.
        let (killed, escapees_killed) = guard.sweep();
        if let LoopEnd::Done = end {
            let event = match (state, killed > 0) {
                (CommandState::Running, false) => CommandEvent::Exit,
                (CommandState::Running, true) => CommandEvent::ExitLeftBackground,
                (_, false) => CommandEvent::GroupExited,
                (_, true) => CommandEvent::GroupExitedLeftEscapees,
            };
            state.step(event);
            if killed > 0 && reason.is_some() {
                needed_sigkill = true;
            }
        }
        if output_open {
            // After a stop that every process obeyed, whoever still holds the pipe is
            // outside the phase (a descriptor passed elsewhere): take what is there and do
            // not wait.
            let bound = match (&end, reason) {
                (LoopEnd::Done, Some(_)) => {
                    log::debug!(
                        "pgid {leader}: every process of the phase is gone but the output is still open; not waiting for it"
                    );
                    Duration::ZERO
                }
                _ => DRAIN_BOUND,
            };
            if let Some(out_read) = &pipe {
                drain_output(out_read, buf.as_mut_slice(), sink, bound)?;
            }
        }
        if followed {
            // What the killed processes wrote last.
            sink.follow();
        }
        let status = guard.reap_leader()?;
        let duration = start.elapsed();
        if state == CommandState::Killed {
            state.step(CommandEvent::Reaped);
        }
        debug_assert_eq!(state, CommandState::Exited);

        let termination = reason.unwrap_or_else(|| decode_status(status));
        if reason.is_none() && killed > 0 {
            sink.output(straggler_line(killed, held_output_for).as_bytes());
        }
        log::debug!(
            "pgid {leader}: {termination:?} after {} ms, {killed} left-over processes killed",
            duration.as_millis()
        );
        Ok(CommandOutcome {
            termination,
            needed_sigkill,
            stragglers_killed: killed,
            escapees_killed,
            escapees_terminated: guard.escapees_terminated(),
            duration,
        })
    }
}
