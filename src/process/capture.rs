//! Where a command's output goes: a pipe the agent reads, or (direct capture) the sink's
//! own file, which the command writes itself while an inotify watch tells the runner when
//! the last writer closed it; and the last read of the pipe once the phase has ended.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use std::process::Stdio;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::unistd::{pipe2, read};

use super::poll::poll_timeout;
use super::reader::PipeReader;
use super::{sys, OutputSink, ProcessError};

/// Requested size of the output pipe (the unprivileged maximum by default).
const PIPE_SIZE: i32 = 1 << 20;

/// Where the command's output goes.
pub(super) enum Capture {
    /// A pipe the agent reads, chunk by chunk to [`OutputSink::output`].
    Pipe(OwnedFd),
    /// The same pipe read on a thread of its own ([`PipeReader`]); the runner takes the
    /// chunks it queued.
    Reader(PipeReader),
    /// The command writes into the sink's file itself ([`OutputSink::direct_output`]); an
    /// inotify watch on that file wakes the runner when the command's description of it is
    /// closed for the last time (`IN_CLOSE_WRITE`: no process holds the output any more, as
    /// the pipe's EOF says).
    Follow(Watch),
}

impl Capture {
    /// Opens the command's output: direct capture when the sink offers a file and the
    /// kernel can watch it, else a non-blocking pipe. Returns the runner's end and the
    /// command's stdout and stderr (one description, shared). `spawn_error` wraps an error
    /// duplicating a descriptor, as a failure to start the command.
    pub(super) fn open(
        sink: &mut dyn OutputSink,
        spawn_error: impl Fn(std::io::Error) -> ProcessError,
    ) -> Result<(Capture, Stdio, Stdio), ProcessError> {
        match sink.direct_output().and_then(watch_direct) {
            Some((watch, file)) => {
                let err = file.try_clone().map_err(spawn_error)?;
                Ok((Capture::Follow(watch), Stdio::from(file), Stdio::from(err)))
            }
            None => {
                let (out_read, out_write) =
                    pipe2(OFlag::O_CLOEXEC).map_err(sys("creating the command's output pipe"))?;
                let flags = fcntl(&out_read, FcntlArg::F_GETFL)
                    .map_err(sys("F_GETFL on the output pipe"))?;
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
                Ok((
                    Capture::Pipe(out_read),
                    Stdio::from(out_write),
                    Stdio::from(err_write),
                ))
            }
        }
    }

    /// A pipe is read on a thread of its own from now on, when one can be started.
    pub(super) fn read_on_thread(self) -> Capture {
        match self {
            Capture::Pipe(fd) => match PipeReader::start(fd) {
                Ok(reader) => Capture::Reader(reader),
                Err((fd, err)) => {
                    log::debug!("cannot read the output on a thread ({err}); the runner reads it");
                    Capture::Pipe(fd)
                }
            },
            other => other,
        }
    }

    pub(super) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Capture::Pipe(fd) => fd.as_fd(),
            Capture::Reader(reader) => reader.ready_fd(),
            Capture::Follow(watch) => watch.inotify().as_fd(),
        }
    }
}

/// An inotify instance kept for the next command: closing one waits for the kernel's
/// SRCU grace period, several milliseconds a phase. Each command takes it (or makes one
/// while another command holds it) and gives it back with its watch removed.
static SPARE_INOTIFY: std::sync::Mutex<Option<Inotify>> = std::sync::Mutex::new(None);

/// One command's watch on its log file.
pub(super) struct Watch {
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
pub(super) fn instant_of(at: std::time::SystemTime, now: Instant) -> Instant {
    let ago = std::time::SystemTime::now()
        .duration_since(at)
        .unwrap_or_default();
    now.checked_sub(ago).unwrap_or(now)
}

/// Watches the file a sink offered for direct capture. `None` (the pipe is used) when the
/// kernel cannot watch it.
pub(super) fn watch_direct(file: File) -> Option<(Watch, File)> {
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
pub(super) fn last_holder_closed(watch: &Watch) -> bool {
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
pub(super) fn drain_output(
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
