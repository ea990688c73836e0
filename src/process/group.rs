//! A command's process group from spawn to reap: SIGTERM to the phase's processes when the
//! command is stopped (and to late forks while the grace period runs), the final sweep
//! that kills what is left, and reaping the leader.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, Pid};

use super::pinned::{pidfd_open, signal_process, Pinned};
use super::reap::reap;
use super::sweep::{self, PhaseMarks, ProcStat};
use super::ProcessError;

/// How long the sweep keeps rescanning while processes of the phase are still alive.
const SWEEP_BOUND: Duration = Duration::from_secs(2);
/// While terminating, how many pidfds of signalled processes `poll()` watches at most (the
/// rescans notice the others).
const MAX_EXIT_WATCHES: usize = 64;

/// Owns a command's process group from spawn to reap.
///
/// `Drop` kills the group and every process carrying the phase token, then reaps them and
/// the leader, so an early return or a panic in the sink never leaks a tree. The leader
/// stays unreaped (a zombie at worst) until [`ProcessGroupGuard::reap_leader`], which keeps
/// its pid, and so the group id, from being reused while the group is signalled.
#[derive(Debug)]
pub(super) struct ProcessGroupGuard {
    /// The shell; its pid is the group id.
    leader: Pid,
    pub(super) pidfd: Option<OwnedFd>,
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
    pub(super) terminated: Vec<Terminated>,
    /// Set once the leader is reaped; the group is never signalled after that.
    leader_status: Option<i32>,
    /// The first sweep found the leader already exited and no other process of the phase:
    /// nothing can be left to adopt once the leader is reaped (an exited shell forks no
    /// more), so that scan is skipped.
    nothing_to_adopt: bool,
}

impl ProcessGroupGuard {
    pub(super) fn new(leader: Pid, token: &str) -> ProcessGroupGuard {
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

    pub(super) fn signal_group(&self, signal: Signal) {
        if self.leader_status.is_none() {
            // ESRCH: nobody left in the group. Nothing else can fail for our own group.
            let _ = killpg(self.leader, signal);
        }
    }

    /// Whether the leader has exited (without reaping it). Used when there is no pidfd.
    pub(super) fn leader_has_exited(&self) -> bool {
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
    pub(super) fn terminate(&mut self, first: bool) -> usize {
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
                // has exec'd since it was signalled gets SIGTERM again. Not a member the
                // first scan only assumed `killpg` reached: the command's trap may have
                // forked it after the `killpg` (what the trap starts is left to it).
                if done.comm != stat.comm && !done.by_killpg {
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
            let by_killpg = first && in_group;
            let had_it = by_killpg || pinned.signal(Signal::SIGTERM);
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
                by_killpg,
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
    pub(super) fn exit_watch(&self) -> impl Iterator<Item = (usize, &OwnedFd)> {
        self.terminated
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((i, t.pidfd.as_ref()?)))
            .take(MAX_EXIT_WATCHES)
    }

    /// Processes outside the group that had SIGTERM and that no sweep had to kill.
    pub(super) fn escapees_terminated(&self) -> usize {
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
    pub(super) fn sweep(&mut self) -> (usize, usize) {
        let leader = self.leader.as_raw();
        let before = self.killed.len();
        let mut escapees = 0;
        let mut rescans = Rescans::new();
        let mut buf = Vec::new();
        let mut first = true;
        loop {
            let found = sweep::scan(&self.marks(false));
            if std::mem::take(&mut first) {
                self.nothing_to_adopt = found.iter().all(|s| s.pid == leader && !s.is_alive())
                    && found.iter().any(|s| s.pid == leader);
            }
            let mut alive = 0;
            let mut exiting = 0;
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
                } else if stat.ppid == self.own_pid && stat.pid != leader && !self.reap_child(stat)
                {
                    exiting += 1;
                }
            }
            // The leader is not reaped yet, so the group id is still ours.
            self.signal_group(Signal::SIGKILL);
            if alive == 0 && exiting == 0 {
                break;
            }
            if !rescans.wait() {
                log::warn!(
                    "process group {leader}: {alive} processes still alive and {exiting} still exiting after {} ms of SIGKILL",
                    SWEEP_BOUND.as_millis()
                );
                break;
            }
        }
        (self.killed.len() - before, escapees)
    }

    /// Kills what is left of the group and reaps the leader. Returns its raw status.
    pub(super) fn reap_leader(&mut self) -> Result<i32, ProcessError> {
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
    /// reaped, every such zombie is ours: reap those of the phase. A killed process is
    /// neither alive nor a zombie while it is inside `exit()`, and its environment reads
    /// empty by then; it is waited for (rescanning, within [`SWEEP_BOUND`]) until it is a
    /// zombie that is reaped here or that has a parent other than the agent.
    fn reap_adopted_zombies(&mut self) {
        let leader = self.leader.as_raw();
        let mut rescans = Rescans::new();
        loop {
            let mut exiting = 0;
            for stat in sweep::scan(&self.marks(false)) {
                if stat.is_alive() || stat.pid == leader {
                    continue;
                }
                let ours = stat.ppid == self.own_pid;
                if (ours && !self.reap_child(&stat)) || (!ours && stat.state != b'Z') {
                    exiting += 1;
                }
            }
            if exiting == 0 {
                break;
            }
            if !rescans.wait() {
                log::warn!(
                    "process group {leader}: {exiting} processes still exiting {} ms after the shell was reaped",
                    SWEEP_BOUND.as_millis()
                );
                break;
            }
        }
    }

    /// Reaps `stat`, a child of the agent that is no longer alive. Returns `false` while it
    /// is still inside `exit()` (not a zombie yet, so not reapable), `true` once it is
    /// reaped or is no child to wait for (then it is forgotten).
    fn reap_child(&mut self, stat: &ProcStat) -> bool {
        match reap(Pid::from_raw(stat.pid), true) {
            Ok(None) => false,
            Ok(Some(_)) | Err(_) => {
                self.known.retain(|&(pid, _)| pid != stat.pid);
                true
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

/// The pace of a sweep's rescans: 1 ms after the first, doubling up to 50 ms, for at
/// most [`SWEEP_BOUND`].
struct Rescans {
    deadline: Instant,
    pause: Duration,
}

impl Rescans {
    fn new() -> Rescans {
        Rescans {
            deadline: Instant::now() + SWEEP_BOUND,
            pause: Duration::from_millis(1),
        }
    }

    /// Waits before the next rescan; `false` (at once) when the bound is past.
    fn wait(&mut self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        std::thread::sleep(self.pause);
        self.pause = (self.pause * 2).min(Duration::from_millis(50));
        true
    }
}

/// A process that got SIGTERM when the command was stopped.
#[derive(Debug)]
pub(super) struct Terminated {
    /// `(pid, starttime)`.
    id: (i32, u64),
    /// Outside the command's process group when it was signalled.
    pub(super) escapee: bool,
    /// Readable once it exits; dropped when seen readable.
    pub(super) pidfd: Option<OwnedFd>,
    /// Its command name's hash when it was signalled (see [`ProcStat::comm`]).
    comm: u64,
    /// Counted as signalled by the first scan's `killpg`, not by a signal of its own: it
    /// may have been forked after the `killpg` (by the command's SIGTERM trap), and is
    /// then left to the command as with `killpg` alone, exec or not.
    by_killpg: bool,
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
