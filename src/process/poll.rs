//! Waiting in `poll()`: the stop signal's wake pipe, and deadlines turned into `poll()`
//! timeouts.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::{pipe2, read, write};

use super::{sys, ProcessError};

/// A non-blocking self-pipe used to wake a `poll()` when a stop is requested.
#[derive(Debug)]
pub struct WakePipe {
    pub(super) read: OwnedFd,
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
    pub(super) fn drain(&self) {
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

/// Milliseconds until `deadline`, rounded up so that `poll()` never wakes just before it.
pub(super) fn poll_timeout(now: Instant, deadline: Option<Instant>) -> PollTimeout {
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
pub(super) fn later(at: Instant, wait: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    at.checked_add(wait.min(YEAR)).unwrap_or(at)
}

pub(super) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
