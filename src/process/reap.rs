//! The agent's children: the subreaper setting, reaping adopted orphans between commands,
//! and `waitpid` keeping the raw status.

use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;

use super::{sys, ProcessError, Termination};

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

/// `waitpid(pid)`, returning the raw status; `Ok(None)` with `nohang` when still running.
/// Raw statuses are kept (not nix's `WaitStatus`) because decoding a real-time signal
/// number fails in nix after the child has already been reaped.
pub(super) fn reap(pid: Pid, nohang: bool) -> Result<Option<i32>, Errno> {
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

pub(super) fn decode_status(status: i32) -> Termination {
    if libc::WIFEXITED(status) {
        Termination::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Termination::Signaled(libc::WTERMSIG(status))
    } else {
        // waitpid without WUNTRACED/WCONTINUED reports only exits and deaths.
        Termination::Signaled(status & 0x7f)
    }
}
