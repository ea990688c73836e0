//! The runner: one command from spawn to reap.
//!
//! One command is `/bin/sh -c CMD` in a new process group whose stdout and stderr share
//! one pipe, or, when the sink offers a file ([`OutputSink::direct_output`]), that file:
//! the command then writes its log itself and the runner follows the file (see
//! [`Capture`]). The runner blocks in `poll()` on the pipe (or the file's inotify watch),
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

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::Signal;
use nix::unistd::{pipe2, read, Pid};

use super::capture::{drain_output, instant_of, last_holder_closed, watch_direct, Capture};
use super::group::ProcessGroupGuard;
use super::poll::{earliest, later, poll_timeout};
#[cfg(doc)]
use super::reap::become_subreaper;
use super::reap::decode_status;
use super::spawn::{new_token, OomScoreAdj};
use super::sweep::TOKEN_VAR;
use super::{
    stop_line, straggler_line, sys, CommandEvent, CommandOutcome, CommandSpec, CommandState,
    OutputSink, ProcessError, StopKind, StopSignal, Termination, KILL_NOW_LINE,
};

/// One read from the output pipe; the buffer is reused for the whole command.
const READ_CHUNK: usize = 256 * 1024;
/// Requested size of the output pipe (the unprivileged maximum by default).
const PIPE_SIZE: i32 = 1 << 20;
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

/// Runs one phase command to its end and reports how it ended.
///
/// `/bin/sh -c spec.command` runs in `spec.cwd`, in a new process group, with stdin from
/// `/dev/null`, stdout and stderr on one pipe whose bytes go to `sink` as they arrive
/// (byte-exact, in chunks of at most 256 KiB), and the agent's environment plus `spec.env`
/// plus `TESTFLINGER_PHASE_TOKEN=<random hex>`, which marks the phase's processes.
///
/// A global or output timeout, or a stop request the spec honours, writes its line to the
/// sink and sends SIGTERM to the group and to every process of the phase outside it
/// (token carriers, adopted orphans); the command ends as soon as the shell and all of
/// them are gone, even if the output pipe is still open, and after `spec.grace_period`
/// whatever is left gets SIGKILL.
/// [`StopKind::KillNow`] kills at once. When the shell exits but background processes keep
/// the output open, they get `spec.straggler_wait` before they are killed. In every case
/// the end is a sweep: the group and every process carrying the token are killed and the
/// phase's processes reaped, so none outlives the call (escapees from the group are only
/// re-parented to the agent, and so reaped, after [`become_subreaper`]).
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
    let token = new_token();
    let spawn_error = |source| ProcessError::Spawn {
        cwd: spec.cwd.clone(),
        source,
    };
    // Direct capture when the sink offers a file and the kernel can watch it; else the pipe.
    let (capture, out_write, err_write) = match sink.direct_output().and_then(watch_direct) {
        Some((watch, file)) => {
            let err = file.try_clone().map_err(spawn_error)?;
            (Capture::Follow(watch), Stdio::from(file), Stdio::from(err))
        }
        None => {
            let (out_read, out_write) =
                pipe2(OFlag::O_CLOEXEC).map_err(sys("creating the command's output pipe"))?;
            let flags =
                fcntl(&out_read, FcntlArg::F_GETFL).map_err(sys("F_GETFL on the output pipe"))?;
            fcntl(
                &out_read,
                FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
            )
            .map_err(sys("making the output pipe non-blocking"))?;
            // Throughput only: a larger pipe means fewer wake-ups. The default 64 KiB works.
            let _ = fcntl(&out_read, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
            // The duplicate is close-on-exec too (F_DUPFD_CLOEXEC), so a command spawned by
            // another thread cannot inherit it and hold this pipe open.
            let err_write = out_write.try_clone().map_err(spawn_error)?;
            (
                Capture::Pipe(out_read),
                Stdio::from(out_write),
                Stdio::from(err_write),
            )
        }
    };

    let leader_pid = {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&spec.command)
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(out_write)
            .stderr(err_write)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env(TOKEN_VAR, &token)
            .process_group(0);
        if let Some(oom) = spec.oom_score_adj.map(OomScoreAdj::new) {
            // SAFETY: the hook runs between fork and exec and only makes async-signal-safe
            // calls (open, write, close) on a buffer formatted before the fork; it allocates
            // nothing and takes no lock.
            unsafe {
                cmd.pre_exec(move || {
                    oom.apply();
                    Ok(())
                });
            }
        }
        sink.spawning(&token);
        // std's Child neither kills nor waits on drop; the guard owns the process from here.
        cmd.spawn().map_err(spawn_error)?.id()
        // `cmd` drops here, closing the agent's copies of the pipe's write end (or of the
        // command's own description of the log file).
    };
    let start = Instant::now();
    let leader = Pid::from_raw(i32::try_from(leader_pid).expect("a Linux pid fits in i32"));
    let mut guard = ProcessGroupGuard::new(leader, &token);
    sink.spawned(leader.as_raw(), &token);
    log::debug!("command started: pgid {leader}, cwd {}", spec.cwd.display());

    let wake = stop.wake_pipe();
    let mut buf = match capture {
        Capture::Pipe(_) => vec![0u8; READ_CHUNK],
        Capture::Follow(_) => Vec::new(),
    };
    // Until the pipe's EOF, or until the last holder of the command's description of the
    // log file closed it: background processes still hold the output.
    let mut pipe_open = true;
    // Direct capture: when the sink next looks at the file, and the pause after that.
    let mut follow_pause = FOLLOW_FIRST;
    let follow_max = sink
        .follow_pause_max()
        .unwrap_or(FOLLOW_MAX)
        .max(FOLLOW_FIRST);
    let mut next_follow = start + follow_pause;
    let mut leader_exit_at: Option<Instant> = None;
    let mut state = CommandState::Running;
    let mut reason: Option<Termination> = None;
    let mut kill_at = start;
    let mut needed_sigkill = false;
    let mut held_output_for: Option<Duration> = None;
    // While terminating: when to rescan the phase's processes, and the pause after that.
    let mut next_rescan = start;
    let mut last_scan = start;
    let mut rescan_pause = TERM_RESCAN_FIRST;
    let global_deadline = spec.global_timeout.and_then(|t| start.checked_add(t));
    let mut last_output = start;
    // A command that outlives a shutdown (cleanup) only within its budget.
    let mut shutdown_deadline: Option<Instant> = None;

    let end = loop {
        let now = Instant::now();
        if guard.pidfd.is_none() && leader_exit_at.is_none() && guard.leader_has_exited() {
            leader_exit_at = Some(now);
        }
        let command_running = leader_exit_at.is_none() || state == CommandState::Terminating;

        // Stop requests and deadlines while the command itself is running.
        if command_running {
            if stop.is_requested(StopKind::KillNow) {
                if reason.is_none() {
                    reason = Some(Termination::Shutdown);
                    sink.output(KILL_NOW_LINE.as_bytes());
                }
                needed_sigkill = true;
                state.step(CommandEvent::KillNow);
                break LoopEnd::Kill;
            }
            if let (None, Some(budget), false, true) = (
                shutdown_deadline,
                spec.shutdown_budget,
                spec.honour_shutdown,
                stop.is_requested(StopKind::Shutdown),
            ) {
                shutdown_deadline = now.checked_add(budget);
                log::info!(
                    "pgid {leader}: the agent is stopping; this command may run {}s more",
                    budget.as_secs()
                );
            }
            if state == CommandState::Running {
                let mut output_deadline =
                    spec.output_timeout.and_then(|t| last_output.checked_add(t));
                if let (Capture::Follow(_), true) =
                    (&capture, output_deadline.is_some_and(|d| now >= d))
                {
                    // The sink looks at the file only now and then: what the command wrote
                    // since the last look counts before the deadline is taken as passed.
                    if let Some(written) = sink.follow() {
                        last_output = instant_of(written, now).max(last_output);
                        follow_pause = FOLLOW_FIRST;
                        next_follow = now + follow_pause;
                        output_deadline =
                            spec.output_timeout.and_then(|t| last_output.checked_add(t));
                    }
                }
                let stop_for = if spec.honour_cancel && stop.is_requested(StopKind::Cancel) {
                    Some((Termination::Cancelled, CommandEvent::Cancel))
                } else if spec.honour_shutdown && stop.is_requested(StopKind::Shutdown) {
                    Some((Termination::Shutdown, CommandEvent::Shutdown))
                } else if global_deadline.is_some_and(|d| now >= d) {
                    Some((Termination::GlobalTimeout, CommandEvent::GlobalTimeout))
                } else if output_deadline.is_some_and(|d| now >= d) {
                    Some((Termination::OutputTimeout, CommandEvent::OutputTimeout))
                } else if shutdown_deadline.is_some_and(|d| now >= d) {
                    Some((Termination::Shutdown, CommandEvent::Shutdown))
                } else if sink.unrecordable() {
                    Some((Termination::Unrecordable, CommandEvent::OutputUnrecordable))
                } else {
                    None
                };
                if let Some((termination, event)) = stop_for {
                    if let Some(line) = stop_line(termination, spec) {
                        sink.output(line.as_bytes());
                    }
                    reason = Some(termination);
                    guard.signal_group(Signal::SIGTERM);
                    kill_at = later(now, spec.grace_period);
                    state.step(event);
                    // Right after the group: every process of the phase outside it.
                    let alive = guard.terminate(true);
                    last_scan = Instant::now();
                    rescan_pause = TERM_RESCAN_FIRST;
                    next_rescan = last_scan + rescan_pause;
                    log::debug!(
                        "pgid {leader}: {}, SIGTERM sent to the group and {} other processes",
                        event.label(),
                        guard.terminated.iter().filter(|t| t.escapee).count()
                    );
                    if leader_exit_at.is_some() && alive == 0 {
                        break LoopEnd::Done;
                    }
                    continue;
                }
            }
        }

        // The shell exited and nothing holds the output any more.
        if state == CommandState::Running && leader_exit_at.is_some() && !pipe_open {
            break LoopEnd::Done;
        }

        if state == CommandState::Terminating {
            // Stopped: done when the shell and every process of the phase are gone,
            // whether or not the output pipe has closed.
            if now >= next_rescan {
                let alive = guard.terminate(false);
                if leader_exit_at.is_some() && alive == 0 {
                    break LoopEnd::Done;
                }
                last_scan = Instant::now();
                rescan_pause = (rescan_pause * 2).min(TERM_RESCAN_MAX);
                next_rescan = last_scan + rescan_pause;
            }
            if now >= kill_at {
                needed_sigkill = true;
                state.step(CommandEvent::GraceExpired);
                break LoopEnd::Kill;
            }
        }

        // The shell exited but background processes hold the output: wait a bounded time.
        let mut straggler_deadline = None;
        if let (CommandState::Running, Some(exit_at)) = (state, leader_exit_at) {
            let deadline = earliest(exit_at.checked_add(spec.straggler_wait), global_deadline);
            let stop_requested = stop.is_requested(StopKind::KillNow)
                || sink.unrecordable()
                || (spec.honour_cancel && stop.is_requested(StopKind::Cancel))
                || (spec.honour_shutdown && stop.is_requested(StopKind::Shutdown));
            if stop_requested || deadline.is_some_and(|d| now >= d) {
                held_output_for = Some(now.duration_since(exit_at).min(spec.straggler_wait));
                state.step(CommandEvent::StragglerWaitOver);
                break LoopEnd::Kill;
            }
            straggler_deadline = deadline;
        }

        // Sleep in poll() until output, a stop request, the shell's exit or a deadline.
        let deadline = match state {
            CommandState::Running if leader_exit_at.is_some() => straggler_deadline,
            CommandState::Running => earliest(
                earliest(global_deadline, shutdown_deadline),
                spec.output_timeout.and_then(|t| last_output.checked_add(t)),
            ),
            CommandState::Terminating => Some(kill_at.min(next_rescan)),
            _ => Some(kill_at),
        };
        let deadline = if guard.pidfd.is_none() && leader_exit_at.is_none() {
            earliest(deadline, Some(now + NO_PIDFD_TICK))
        } else {
            deadline
        };
        let deadline = match capture {
            Capture::Follow(_) => earliest(deadline, Some(next_follow)),
            Capture::Pipe(_) => deadline,
        };
        let watch_leader = leader_exit_at.is_none();
        let watch_exits = state == CommandState::Terminating;
        let (out_ready, wake_ready, leader_ready, exited) = {
            let mut fds = Vec::with_capacity(3);
            fds.push(PollFd::new(wake.read.as_fd(), PollFlags::POLLIN));
            if pipe_open {
                fds.push(PollFd::new(capture.as_fd(), PollFlags::POLLIN));
            }
            if let (true, Some(pidfd)) = (watch_leader, &guard.pidfd) {
                fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
            }
            let mut watched = Vec::new();
            if watch_exits {
                for (index, pidfd) in guard.exit_watch() {
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
            let wake_ready = ready(it.next());
            let out_ready = pipe_open && ready(it.next());
            let leader_ready = watch_leader && guard.pidfd.is_some() && ready(it.next());
            let exited: Vec<usize> = watched
                .into_iter()
                .zip(it)
                .filter(|(_, fd)| ready(Some(fd)))
                .map(|(index, _)| index)
                .collect();
            (out_ready, wake_ready, leader_ready, exited)
        };
        for &index in &exited {
            guard.terminated[index].pidfd = None;
        }
        if wake_ready {
            wake.drain();
        }
        if leader_ready {
            leader_exit_at = Some(Instant::now());
        }
        let mut rescan_now = leader_ready || !exited.is_empty();
        match &capture {
            Capture::Pipe(out_read) if out_ready => match read(out_read, &mut buf) {
                Ok(0) => {
                    pipe_open = false;
                    rescan_now = true;
                }
                Ok(n) => {
                    sink.output(&buf[..n]);
                    last_output = Instant::now();
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => return Err(sys("reading the command's output")(e)),
            },
            Capture::Pipe(_) => {}
            Capture::Follow(watch) => {
                if out_ready && last_holder_closed(watch) {
                    pipe_open = false;
                    rescan_now = true;
                }
                let now = Instant::now();
                if now >= next_follow || rescan_now {
                    match sink.follow() {
                        Some(written) => {
                            last_output = instant_of(written, now).max(last_output);
                            follow_pause = FOLLOW_FIRST;
                        }
                        None => follow_pause = (follow_pause * 2).min(follow_max),
                    }
                    next_follow = now + follow_pause;
                }
            }
        }
        // A signalled process exiting, the shell exiting or the output closing: the rest
        // may be gone too.
        if rescan_now && state == CommandState::Terminating {
            // At once, but scans at least TERM_RESCAN_FIRST apart when many exit in a row.
            rescan_pause = TERM_RESCAN_FIRST;
            next_rescan = next_rescan.min(last_scan + TERM_RESCAN_FIRST);
        }
    };

    // The watch is done with: removed now, the kernel's grace period for it runs while the
    // phase ends instead of when the inotify instance is closed (the agent's exit).
    let (pipe, followed) = match capture {
        Capture::Pipe(out_read) => (Some(out_read), false),
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
    if pipe_open {
        // After a stop that every process obeyed, whoever still holds the pipe is outside
        // the phase (a descriptor passed elsewhere): take what is there and do not wait.
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
            drain_output(out_read, &mut buf, sink, bound)?;
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
