//! Signalling one process and nothing else: its pidfd is opened before its start time is
//! checked, so a reused pid is never signalled.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::sweep;

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits. `None` when the
/// kernel does not have it.
pub(super) fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
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
pub(super) struct Pinned {
    pid: i32,
    pub(super) pidfd: Option<OwnedFd>,
}

impl Pinned {
    /// `None` when `(pid, starttime)` is gone, a zombie, or the pid is another process now.
    pub(super) fn new(pid: i32, starttime: u64, buf: &mut Vec<u8>) -> Option<Pinned> {
        let pidfd = pidfd_open(Pid::from_raw(pid));
        sweep::read_stat(pid, buf)
            .is_some_and(|s| s.starttime == starttime && s.is_alive())
            .then_some(Pinned { pid, pidfd })
    }

    pub(super) fn signal(&self, signal: Signal) -> bool {
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
pub(super) fn signal_process(pid: i32, starttime: u64, signal: Signal, buf: &mut Vec<u8>) -> bool {
    Pinned::new(pid, starttime, buf).is_some_and(|p| p.signal(signal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_never_reaches_a_process_with_another_start_time() {
        let mut child = std::process::Command::new("sleep")
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
}
