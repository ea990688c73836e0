//! The Unix side of the process runner: nix calls, process groups, the subreaper sweep.
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
//! to a single process goes through a pidfd opened before its start time is checked, so a
//! reused pid is never signalled.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, pipe2, read, write, Pid};

use super::sweep::{self, PhaseMarks, ProcStat, TOKEN_VAR};
use super::{
    stop_line, straggler_line, CommandEvent, CommandOutcome, CommandSpec, CommandState, OutputSink,
    ProcessError, StopKind, StopSignal, Termination, KILL_NOW_LINE,
};

/// One read from the output pipe; the buffer is reused for the whole command.
const READ_CHUNK: usize = 256 * 1024;
/// Requested size of the output pipe (the unprivileged maximum by default).
const PIPE_SIZE: i32 = 1 << 20;
/// How long the sweep keeps rescanning while processes of the phase are still alive.
const SWEEP_BOUND: Duration = Duration::from_secs(2);
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
/// While terminating, how many pidfds of signalled processes `poll()` watches at most (the
/// rescans notice the others).
const MAX_EXIT_WATCHES: usize = 64;

fn sys(what: &'static str) -> impl FnOnce(Errno) -> ProcessError {
    move |source| ProcessError::Sys { what, source }
}

/// A non-blocking self-pipe used to wake a `poll()` when a stop is requested.
#[derive(Debug)]
pub struct WakePipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl WakePipe {
    pub fn new() -> Result<WakePipe, ProcessError> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
            .map_err(sys("creating the stop signal's wake pipe"))?;
        Ok(WakePipe { read, write })
    }

    /// Wakes whoever polls the read end. A full pipe already means "wake up".
    pub fn wake(&self) {
        let _ = write(&self.write, &[1]);
    }

    /// Blocks until the pipe is woken or `timeout` passes, then empties it. For a waiter
    /// between commands (no runner polls the pipe at the same time).
    pub fn wait(&self, timeout: Duration) {
        let now = Instant::now();
        let mut fds = [PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
        if let Ok(n) = poll(&mut fds, poll_timeout(now, Some(later(now, timeout)))) {
            if n > 0 {
                self.drain();
            }
        }
    }

    /// Empties the pipe so that the next `poll()` blocks again.
    fn drain(&self) {
        let mut buf = [0u8; 64];
        loop {
            match read(&self.read, &mut buf) {
                Ok(0) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }
}

/// Makes this process the child subreaper (prctl), so that descendants that leave the
/// process group are re-parented to the agent and can be found and killed.
pub fn become_subreaper() -> Result<(), ProcessError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(sys("prctl(PR_SET_CHILD_SUBREAPER)"))
}

/// Reaps every exited child of the agent without waiting, and returns how many.
///
/// As child subreaper the agent adopts orphaned descendants of its commands; one that left
/// the group and exited on its own before its phase ended stays a zombie child. Call this
/// only when no command is running and the process has no other children (the daemon
/// between jobs, `run-job` at its end): it reaps any child.
pub fn reap_orphans() -> usize {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut reaped = 0;
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
        reaped += 1;
    }
    reaped
}

/// A fresh 128-bit hex token, unique per command.
fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    let random = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        use std::hash::{BuildHasher, Hasher};
        let state = std::collections::hash_map::RandomState::new();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = state.build_hasher();
            h.write_u32(std::process::id());
            h.write_u128(nanos);
            h.write_u64(count);
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits. `None` when the
/// kernel does not have it.
fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
    // memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One process, pinned: its pidfd was opened before its start time was checked, so if
/// the pid was reused in between the check failed, and a signal or a `poll()` through the
/// pidfd can only concern the process it was opened on. Without pidfds (Linux < 5.3)
/// signals fall back to `kill` right after the check.
struct Pinned {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

impl Pinned {
    /// `None` when `(pid, starttime)` is gone, a zombie, or the pid is another process now.
    fn new(pid: i32, starttime: u64, buf: &mut Vec<u8>) -> Option<Pinned> {
        let pidfd = pidfd_open(Pid::from_raw(pid));
        sweep::read_stat(pid, buf)
            .is_some_and(|s| s.starttime == starttime && s.is_alive())
            .then_some(Pinned { pid, pidfd })
    }

    fn signal(&self, signal: Signal) -> bool {
        match &self.pidfd {
            Some(pidfd) => {
                // SAFETY: pidfd_send_signal takes a descriptor we own, a signal number, a
                // null siginfo pointer (meaning "as kill(2)") and flags; no memory is written.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        signal as libc::c_int,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                r == 0
            }
            None => kill(Pid::from_raw(self.pid), signal).is_ok(),
        }
    }
}

/// Sends `signal` to the process `(pid, starttime)` and to nothing else (see [`Pinned`]).
/// `false` when it is gone.
fn signal_process(pid: i32, starttime: u64, signal: Signal, buf: &mut Vec<u8>) -> bool {
    Pinned::new(pid, starttime, buf).is_some_and(|p| p.signal(signal))
}

/// The value to write to `/proc/self/oom_score_adj` in the child, formatted before the
/// fork so that the child only calls `open`, `write` and `close` (async-signal-safe).
#[derive(Clone, Copy)]
struct OomScoreAdj {
    text: [u8; 12],
    len: usize,
}

impl OomScoreAdj {
    fn new(value: i32) -> OomScoreAdj {
        let digits = value.to_string();
        let mut text = [0u8; 12];
        // An i32 has at most 11 characters ("-2147483648").
        let len = digits.len().min(text.len());
        text[..len].copy_from_slice(&digits.as_bytes()[..len]);
        OomScoreAdj { text, len }
    }

    /// Runs in the child between fork and exec: no allocation, no lock, errors ignored (a
    /// sandbox without a writable `/proc`, or a value refused without privilege, must not
    /// stop the command).
    fn apply(&self) {
        const PATH: &std::ffi::CStr = c"/proc/self/oom_score_adj";
        // SAFETY: open, write and close are async-signal-safe; the path is a static C
        // string and the buffer lives in this closure's captured copy.
        unsafe {
            let fd = libc::open(PATH.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                let _ = libc::write(fd, self.text.as_ptr().cast(), self.len);
                let _ = libc::close(fd);
            }
        }
    }
}

/// `waitpid(pid)`, returning the raw status; `Ok(None)` with `nohang` when still running.
/// Raw statuses are kept (not nix's `WaitStatus`) because decoding a real-time signal
/// number fails in nix after the child has already been reaped.
fn reap(pid: Pid, nohang: bool) -> Result<Option<i32>, Errno> {
    let flags = if nohang { libc::WNOHANG } else { 0 };
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes one c_int through a valid pointer to a local.
        let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, flags) };
        if r > 0 {
            return Ok(Some(status));
        }
        if r == 0 {
            return Ok(None);
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

fn decode_status(status: i32) -> Termination {
    if libc::WIFEXITED(status) {
        Termination::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Termination::Signaled(libc::WTERMSIG(status))
    } else {
        // waitpid without WUNTRACED/WCONTINUED reports only exits and deaths.
        Termination::Signaled(status & 0x7f)
    }
}

/// Owns a command's process group from spawn to reap.
///
/// `Drop` kills the group and every process carrying the phase token, then reaps them and
/// the leader, so an early return or a panic in the sink never leaks a tree. The leader
/// stays unreaped (a zombie at worst) until [`ProcessGroupGuard::reap_leader`], which keeps
/// its pid, and so the group id, from being reused while the group is signalled.
#[derive(Debug)]
struct ProcessGroupGuard {
    /// The shell; its pid is the group id.
    leader: Pid,
    pidfd: Option<OwnedFd>,
    token_entry: Vec<u8>,
    min_starttime: u64,
    own_pid: i32,
    /// `(pid, starttime)` of processes seen alive with the token and not reaped yet: an
    /// exited process shows an empty environment, so its zombie is matched by these.
    known: Vec<(i32, u64)>,
    /// Distinct processes (other than the leader) the sweeps found alive and killed.
    killed: Vec<(i32, u64)>,
    /// Processes that got SIGTERM when the command was stopped (the group's members by
    /// `killpg`, the others one by one), so that none is signalled twice.
    terminated: Vec<Terminated>,
    /// Set once the leader is reaped; the group is never signalled after that.
    leader_status: Option<i32>,
    /// The first sweep found the leader already exited and no other process of the phase:
    /// nothing can be left to adopt once the leader is reaped (an exited shell forks no
    /// more), so that scan is skipped.
    nothing_to_adopt: bool,
}

impl ProcessGroupGuard {
    fn new(leader: Pid, token: &str) -> ProcessGroupGuard {
        let mut buf = Vec::new();
        let min_starttime = sweep::read_stat(leader.as_raw(), &mut buf).map_or(0, |s| s.starttime);
        ProcessGroupGuard {
            leader,
            pidfd: pidfd_open(leader),
            token_entry: sweep::token_entry(token),
            min_starttime,
            own_pid: getpid().as_raw(),
            known: Vec::new(),
            killed: Vec::new(),
            terminated: Vec::new(),
            leader_status: None,
            nothing_to_adopt: false,
        }
    }

    fn signal_group(&self, signal: Signal) {
        if self.leader_status.is_none() {
            // ESRCH: nobody left in the group. Nothing else can fail for our own group.
            let _ = killpg(self.leader, signal);
        }
    }

    /// Whether the leader has exited (without reaping it). Used when there is no pidfd.
    fn leader_has_exited(&self) -> bool {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        !matches!(
            waitid(Id::Pid(self.leader), flags),
            Ok(WaitStatus::StillAlive)
        )
    }

    fn marks(&self, group_only: bool) -> PhaseMarks<'_> {
        PhaseMarks {
            pgid: self.leader.as_raw(),
            token_entry: &self.token_entry,
            min_starttime: self.min_starttime,
            known: &self.known,
            own_pid: self.own_pid,
            group_only,
        }
    }

    /// Sends SIGTERM to the processes of the phase that have not had it, and returns how
    /// many processes of the phase other than the leader are alive.
    ///
    /// `first` is the scan right after `killpg(SIGTERM)`: the group's members had it from
    /// `killpg`, every other process of the phase gets it now. In later scans, every
    /// process outside the group not seen before gets it (late forks of the escapees). A
    /// new member of the group gets it only when its parent is not the living leader or
    /// another living member that had it: as with `killpg` alone, what the command starts
    /// while handling SIGTERM (a trap's cleanup command) is left to it; an orphan gets it.
    ///
    /// Every process that had SIGTERM is kept pinned by a pidfd, which `poll()` watches to
    /// notice its exit at once (see [`ProcessGroupGuard::exit_watch`]).
    fn terminate(&mut self, first: bool) -> usize {
        let leader = self.leader.as_raw();
        let found = sweep::scan(&self.marks(false));
        let mut buf = Vec::new();
        let mut alive = 0;
        for stat in &found {
            if !stat.is_alive() || stat.pid == leader {
                continue;
            }
            let id = (stat.pid, stat.starttime);
            if let Some(done) = self.terminated.iter_mut().find(|t| t.id == id) {
                // A SIGTERM that reached a forked shell before it exec'd can be taken by
                // the handler of a `trap` it inherited and lost at the exec: a process that
                // has exec'd since it was signalled gets SIGTERM again.
                if done.comm != stat.comm {
                    done.comm = stat.comm;
                    if let Some(pinned) = Pinned::new(stat.pid, stat.starttime, &mut buf) {
                        pinned.signal(Signal::SIGTERM);
                    }
                }
                alive += 1;
                continue;
            }
            let in_group = stat.pgrp == leader;
            if in_group && !first && self.parent_handles_the_stop(stat, &found) {
                alive += 1;
                continue;
            }
            let Some(pinned) = Pinned::new(stat.pid, stat.starttime, &mut buf) else {
                continue;
            };
            // In the first scan the group's members already had it from `killpg`.
            let had_it = (first && in_group) || pinned.signal(Signal::SIGTERM);
            if !had_it {
                continue;
            }
            alive += 1;
            if !self.known.contains(&id) {
                self.known.push(id);
            }
            self.terminated.push(Terminated {
                id,
                escapee: !in_group,
                pidfd: pinned.pidfd,
                comm: stat.comm,
            });
        }
        alive
    }

    /// Whether `stat`'s parent is the living leader, or a living process of the phase
    /// that already had SIGTERM.
    fn parent_handles_the_stop(&self, stat: &ProcStat, found: &[ProcStat]) -> bool {
        found.iter().any(|parent| {
            parent.pid == stat.ppid
                && parent.is_alive()
                && (parent.pid == self.leader.as_raw()
                    || self
                        .terminated
                        .iter()
                        .any(|t| t.id == (parent.pid, parent.starttime)))
        })
    }

    /// Up to [`MAX_EXIT_WATCHES`] pidfds of processes that had SIGTERM and have not been
    /// seen exiting, with their index in `terminated`, for `poll()`.
    fn exit_watch(&self) -> impl Iterator<Item = (usize, &OwnedFd)> {
        self.terminated
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((i, t.pidfd.as_ref()?)))
            .take(MAX_EXIT_WATCHES)
    }

    /// Processes outside the group that had SIGTERM and that no sweep had to kill.
    fn escapees_terminated(&self) -> usize {
        self.terminated
            .iter()
            .filter(|t| t.escapee && !self.killed.contains(&t.id))
            .count()
    }

    /// Kills every process of the phase (the group and the token carriers), rescanning
    /// until none is left alive (bounded), and reaps those that are our children. Returns
    /// how many processes other than the leader it found alive. Never touches a process
    /// that is not the phase's, never reaps a pid that is not the phase's.
    /// Returns how many processes it killed, and how many of those had left the group.
    fn sweep(&mut self) -> (usize, usize) {
        let leader = self.leader.as_raw();
        let before = self.killed.len();
        let mut escapees = 0;
        let deadline = Instant::now() + SWEEP_BOUND;
        let mut pause = Duration::from_millis(1);
        let mut buf = Vec::new();
        let mut first = true;
        loop {
            let found = sweep::scan(&self.marks(false));
            if std::mem::take(&mut first) {
                self.nothing_to_adopt = found.iter().all(|s| s.pid == leader && !s.is_alive())
                    && found.iter().any(|s| s.pid == leader);
            }
            let mut alive = 0;
            for stat in &found {
                let id = (stat.pid, stat.starttime);
                if stat.is_alive() {
                    if stat.pid == leader {
                        continue;
                    }
                    alive += 1;
                    if !self.known.contains(&id) {
                        self.known.push(id);
                    }
                    if !self.killed.contains(&id) {
                        self.killed.push(id);
                        if stat.pgrp != leader {
                            escapees += 1;
                        }
                    }
                    signal_process(stat.pid, stat.starttime, Signal::SIGKILL, &mut buf);
                } else if stat.ppid == self.own_pid && stat.pid != leader {
                    if let Ok(Some(_)) | Err(_) = reap(Pid::from_raw(stat.pid), true) {
                        self.known.retain(|&(pid, _)| pid != stat.pid);
                    }
                }
            }
            // The leader is not reaped yet, so the group id is still ours.
            self.signal_group(Signal::SIGKILL);
            if alive == 0 {
                break;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "process group {leader}: {alive} processes still alive after {} ms of SIGKILL",
                    SWEEP_BOUND.as_millis()
                );
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        (self.killed.len() - before, escapees)
    }

    /// Kills what is left of the group and reaps the leader. Returns its raw status.
    fn reap_leader(&mut self) -> Result<i32, ProcessError> {
        if let Some(status) = self.leader_status {
            return Ok(status);
        }
        // Signal the group before reaping its leader (pid reuse).
        self.signal_group(Signal::SIGKILL);
        match reap(self.leader, false) {
            Ok(Some(status)) => {
                self.leader_status = Some(status);
                if !self.nothing_to_adopt {
                    self.reap_adopted_zombies();
                }
                Ok(status)
            }
            // waitpid without WNOHANG does not return 0; treat it like an error.
            Ok(None) => self.give_up_leader(Errno::ECHILD),
            Err(source) => self.give_up_leader(source),
        }
    }

    /// A member killed while the shell was still exiting died as the shell's child; the
    /// shell's exit then handed its zombie to the agent (the subreaper). Once the shell is
    /// reaped, every such zombie is ours: reap those of the phase.
    fn reap_adopted_zombies(&mut self) {
        for stat in sweep::scan(&self.marks(false)) {
            if !stat.is_alive() && stat.ppid == self.own_pid && stat.pid != self.leader.as_raw() {
                if let Ok(Some(_)) | Err(_) = reap(Pid::from_raw(stat.pid), true) {
                    self.known.retain(|&(pid, _)| pid != stat.pid);
                }
            }
        }
    }

    fn give_up_leader(&mut self, source: Errno) -> Result<i32, ProcessError> {
        // Nothing more can be done with this pid; never signal its group again.
        self.leader_status = Some(0);
        Err(ProcessError::Sys {
            what: "waitpid on the command's shell",
            source,
        })
    }
}

/// A process that got SIGTERM when the command was stopped.
#[derive(Debug)]
struct Terminated {
    /// `(pid, starttime)`.
    id: (i32, u64),
    /// Outside the command's process group when it was signalled.
    escapee: bool,
    /// Readable once it exits; dropped when seen readable.
    pidfd: Option<OwnedFd>,
    /// Its command name's hash when it was signalled (see [`ProcStat::comm`]).
    comm: u64,
}

impl Drop for ProcessGroupGuard {
    fn drop(&mut self) {
        if self.leader_status.is_none() {
            self.signal_group(Signal::SIGKILL);
            self.sweep();
            let _ = self.reap_leader();
        }
    }
}

/// Milliseconds until `deadline`, rounded up so that `poll()` never wakes just before it.
fn poll_timeout(now: Instant, deadline: Option<Instant>) -> PollTimeout {
    match deadline {
        None => PollTimeout::NONE,
        Some(deadline) => {
            let left = deadline.saturating_duration_since(now);
            let ms = left.as_nanos().div_ceil(1_000_000);
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// `at + wait`, saturating at a year from `at` for absurd durations (no overflow panic).
fn later(at: Instant, wait: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    at.checked_add(wait.min(YEAR)).unwrap_or(at)
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

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

/// Where the command's output goes.
enum Capture {
    /// A pipe the agent reads, chunk by chunk to [`OutputSink::output`].
    Pipe(OwnedFd),
    /// The command writes into the sink's file itself ([`OutputSink::direct_output`]); an
    /// inotify watch on that file wakes the runner when the command's description of it is
    /// closed for the last time (`IN_CLOSE_WRITE`: no process holds the output any more, as
    /// the pipe's EOF says).
    Follow(Watch),
}

impl Capture {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Capture::Pipe(fd) => fd.as_fd(),
            Capture::Follow(watch) => watch.inotify().as_fd(),
        }
    }
}

/// An inotify instance kept for the next command: closing one waits for the kernel's
/// SRCU grace period, several milliseconds a phase. Each command takes it (or makes one
/// while another command holds it) and gives it back with its watch removed.
static SPARE_INOTIFY: std::sync::Mutex<Option<Inotify>> = std::sync::Mutex::new(None);

/// One command's watch on its log file.
struct Watch {
    /// Always `Some` until dropped.
    inotify: Option<Inotify>,
    wd: WatchDescriptor,
}

impl Watch {
    fn inotify(&self) -> &Inotify {
        self.inotify
            .as_ref()
            .expect("a watch holds its inotify instance until it is dropped")
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let Some(inotify) = self.inotify.take() else {
            return;
        };
        if inotify.rm_watch(self.wd).is_err() {
            return;
        }
        // Events still queued for this watch are told apart by their descriptor.
        let mut spare = SPARE_INOTIFY
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if spare.is_none() {
            *spare = Some(inotify);
        }
    }
}

/// The [`Instant`] of a wall-clock time in the past (`now` for one in the future).
fn instant_of(at: std::time::SystemTime, now: Instant) -> Instant {
    let ago = std::time::SystemTime::now()
        .duration_since(at)
        .unwrap_or_default();
    now.checked_sub(ago).unwrap_or(now)
}

/// Watches the file a sink offered for direct capture. `None` (the pipe is used) when the
/// kernel cannot watch it.
fn watch_direct(file: File) -> Option<(Watch, File)> {
    let spare = SPARE_INOTIFY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let inotify = match spare {
        Some(inotify) => Ok(inotify),
        None => Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC),
    };
    let watched = inotify.and_then(|inotify| {
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let wd = inotify.add_watch(path.as_str(), AddWatchFlags::IN_CLOSE_WRITE)?;
        Ok(Watch {
            inotify: Some(inotify),
            wd,
        })
    });
    match watched {
        Ok(watch) => Some((watch, file)),
        Err(err) => {
            log::debug!("cannot watch the log file ({err}); the output goes through a pipe");
            None
        }
    }
}

/// Reads the watch's pending events; whether one says the file was closed after writing.
/// Only the command's tree holds a writable description of its own (the agent's copies
/// are closed once the command has spawned), so the first close is the last holder's.
fn last_holder_closed(watch: &Watch) -> bool {
    let mut closed = false;
    while let Ok(events) = watch.inotify().read_events() {
        if events.is_empty() {
            break;
        }
        closed |= events
            .iter()
            .any(|e| e.wd == watch.wd && e.mask.contains(AddWatchFlags::IN_CLOSE_WRITE));
    }
    closed
}

/// Reads what the killed processes left in the pipe, until EOF or `bound` (a writer outside
/// the phase could hold the pipe for ever). With a zero bound, reads only what is there.
fn drain_output(
    out_read: &OwnedFd,
    buf: &mut [u8],
    sink: &mut dyn OutputSink,
    bound: Duration,
) -> Result<(), ProcessError> {
    let deadline = Instant::now() + bound;
    loop {
        match read(out_read, buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                sink.output(&buf[..n]);
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {}
            Err(e) => return Err(sys("reading the command's output")(e)),
        }
        let now = Instant::now();
        if now >= deadline {
            if !bound.is_zero() {
                log::warn!("output pipe still open after the phase's processes were killed");
            }
            return Ok(());
        }
        let mut fds = [PollFd::new(out_read.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, poll_timeout(now, Some(deadline))) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(sys("poll on the command's output")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_never_reaches_a_process_with_another_start_time() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let pid = i32::try_from(child.id()).expect("a Linux pid fits in i32");
        let mut buf = Vec::new();
        let start = sweep::read_stat(pid, &mut buf)
            .expect("child's stat")
            .starttime;
        // The same pid with another start time stands for a reused pid.
        assert!(!signal_process(pid, start + 1, Signal::SIGKILL, &mut buf));
        assert!(Pinned::new(pid, start + 1, &mut buf).is_none());
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the process was signalled"
        );
        assert!(signal_process(pid, start, Signal::SIGKILL, &mut buf));
        let status = child.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // Reaped: gone, so nothing is signalled.
        assert!(!signal_process(pid, start, Signal::SIGKILL, &mut buf));
    }

    #[test]
    fn oom_score_adj_is_formatted_before_the_fork() {
        for (value, text) in [
            (500, "500"),
            (-1000, "-1000"),
            (0, "0"),
            (i32::MIN, "-2147483648"),
        ] {
            let adj = OomScoreAdj::new(value);
            assert_eq!(&adj.text[..adj.len], text.as_bytes());
        }
    }
}
