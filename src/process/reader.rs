//! The output pipe read on a thread of its own, so that reading the pipe and writing the
//! log (with masking, in the sink) run on two cores at once instead of one after the other.
//!
//! The reader fills buffers from a small pool and queues them; the runner takes them when
//! the reader's ready pipe wakes its `poll()`, hands them to the sink and gives them back.
//! When every buffer is queued the reader waits, so a command that prints faster than the
//! log is written is held back by the pipe, as without the thread. The pipe stays the
//! runner's: stopping the reader hands back what it queued, and the runner reads what is
//! left itself ([`super::capture::drain_output`]).

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::read;

use super::poll::WakePipe;
use crate::pagebuf::PageBuf;

/// Buffers in the pool, and the size of each: 1 MiB of output in flight at most, the
/// size of the pipe itself. Each starts at a page boundary, as the pipe's pages do
/// ([`crate::pagebuf`]).
const BUFFERS: usize = 8;
const BUFFER_SIZE: usize = 128 * 1024;

/// Bytes the reader read, in order.
pub(super) struct Chunk {
    buf: PageBuf,
    len: usize,
}

impl Chunk {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[..self.len]
    }
}

/// How the reader's reading ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// End of file: no process holds the pipe any more.
    Eof,
    /// A read failed.
    Failed(Errno),
}

/// What the reader and the runner share, under one lock.
struct Queue {
    filled: VecDeque<Chunk>,
    free: Vec<PageBuf>,
    /// Set once the reader has read its last: after the last chunk in `filled`.
    end: Option<End>,
    /// The runner asks the reader to stop.
    stop: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a buffer is given back, and on stop.
    room: Condvar,
    /// Woken by the reader when `filled` stops being empty, or at the end.
    ready: WakePipe,
    /// Woken by the runner to stop a reader waiting in `poll()`.
    stop: WakePipe,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue stays consistent across a panic (every change is one push or pop).
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The output pipe, read on a thread.
pub(super) struct PipeReader {
    shared: Arc<Shared>,
    fd: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl PipeReader {
    /// Starts reading `fd` (non-blocking) on a new thread. Gives `fd` back when no thread
    /// can be started: the runner then reads the pipe itself.
    pub(super) fn start(fd: OwnedFd) -> Result<PipeReader, (OwnedFd, String)> {
        let (ready, stop) = match (WakePipe::new(), WakePipe::new()) {
            (Ok(ready), Ok(stop)) => (ready, stop),
            (Err(err), _) | (_, Err(err)) => return Err((fd, err.to_string())),
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                filled: VecDeque::with_capacity(BUFFERS),
                free: (0..BUFFERS).map(|_| PageBuf::new(BUFFER_SIZE)).collect(),
                end: None,
                stop: false,
            }),
            room: Condvar::new(),
            ready,
            stop,
        });
        let fd = Arc::new(fd);
        let spawned = std::thread::Builder::new()
            .name("output-reader".into())
            .spawn({
                let (shared, fd) = (Arc::clone(&shared), Arc::clone(&fd));
                move || read_loop(&shared, &fd)
            });
        match spawned {
            Ok(thread) => Ok(PipeReader {
                shared,
                fd,
                thread: Some(thread),
            }),
            Err(err) => {
                let fd = Arc::try_unwrap(fd)
                    .expect("a thread that failed to start dropped its copy of the pipe");
                Err((fd, err.to_string()))
            }
        }
    }

    /// What the runner polls: readable when chunks wait or the reading has ended.
    pub(super) fn ready_fd(&self) -> BorrowedFd<'_> {
        self.shared.ready.read.as_fd()
    }

    /// After `ready_fd` woke the runner: empties the ready pipe (before the queue is
    /// looked at, so that a chunk queued later wakes the next `poll()`).
    pub(super) fn acknowledge(&self) {
        self.shared.ready.drain();
    }

    /// The oldest chunk not yet taken.
    pub(super) fn next(&self) -> Option<Chunk> {
        self.shared.lock().filled.pop_front()
    }

    /// The most chunks to take in one go: what the pool holds. A reader refilling as fast
    /// as chunks are taken never keeps the runner from its other checks for longer.
    pub(super) const BATCH: usize = BUFFERS;

    /// After a batch: wakes the ready pipe again when chunks are still waiting, so the
    /// runner's next `poll()` returns at once instead of sleeping on them.
    pub(super) fn rearm(&self) {
        if !self.shared.lock().filled.is_empty() {
            self.shared.ready.wake();
        }
    }

    /// Gives a taken chunk's buffer back to the reader.
    pub(super) fn recycle(&self, chunk: Chunk) {
        self.shared.lock().free.push(chunk.buf);
        self.shared.room.notify_one();
    }

    /// How the reading ended, once every chunk has been taken.
    pub(super) fn end(&self) -> Option<End> {
        let queue = self.shared.lock();
        if queue.filled.is_empty() {
            queue.end
        } else {
            None
        }
    }

    /// Stops the reader and waits for its thread. Returns the chunks it queued and not
    /// taken, how its reading ended (`None`: stopped before the end), and the pipe, for the
    /// runner to read the rest itself.
    pub(super) fn stop(mut self) -> (Vec<Chunk>, Option<End>, Arc<OwnedFd>) {
        self.halt();
        let mut queue = self.shared.lock();
        let chunks = queue.filled.drain(..).collect();
        let end = queue.end;
        drop(queue);
        (chunks, end, Arc::clone(&self.fd))
    }

    fn halt(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.lock().stop = true;
        self.shared.room.notify_all();
        self.shared.stop.wake();
        if thread.join().is_err() {
            log::error!("the thread reading a command's output panicked");
        }
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The reader: takes a free buffer (waits for one), fills it with one read, queues it;
/// until end of file, a failed read or a stop.
fn read_loop(shared: &Shared, fd: &OwnedFd) {
    loop {
        let mut buf = {
            let mut queue = shared.lock();
            loop {
                if queue.stop {
                    return;
                }
                if let Some(buf) = queue.free.pop() {
                    break buf;
                }
                queue = shared
                    .room
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let read = loop {
            match read(fd, buf.as_mut_slice()) {
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {}
                done => break done,
            }
            let mut fds = [
                PollFd::new(fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(shared.stop.read.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(err) => break Err(err),
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return;
            }
        };
        let mut queue = shared.lock();
        let was_empty = queue.filled.is_empty();
        match read {
            Ok(0) => queue.end = Some(End::Eof),
            Ok(len) => queue.filled.push_back(Chunk { buf, len }),
            Err(err) => queue.end = Some(End::Failed(err)),
        }
        let ended = queue.end.is_some();
        drop(queue);
        if was_empty || ended {
            shared.ready.wake();
        }
        if ended {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::unistd::{pipe2, write};

    fn nonblocking_pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = pipe2(OFlag::O_CLOEXEC).expect("a pipe");
        fcntl(&r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("O_NONBLOCK on a pipe");
        (r, w)
    }

    /// Takes chunks until the reader ends, waiting on its ready pipe as the runner does.
    fn take_all(reader: &PipeReader) -> (Vec<u8>, End) {
        let mut out = Vec::new();
        loop {
            reader.acknowledge();
            while let Some(chunk) = reader.next() {
                out.extend_from_slice(chunk.bytes());
                reader.recycle(chunk);
            }
            if let Some(end) = reader.end() {
                return (out, end);
            }
            let mut fds = [PollFd::new(reader.ready_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(10_000u16)).expect("poll on the ready pipe");
        }
    }

    #[test]
    fn every_byte_arrives_in_order_through_the_bounded_pool() {
        let (r, w) = nonblocking_pipe();
        let reader = PipeReader::start(r).unwrap_or_else(|(_, err)| panic!("{err}"));
        // Far more than the pool holds: the writer is held back until chunks are taken.
        let data: Vec<u8> = (0..(BUFFERS * BUFFER_SIZE * 3 + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        let writer = std::thread::spawn({
            let data = data.clone();
            move || {
                let mut at = 0;
                while at < data.len() {
                    at += write(&w, &data[at..]).expect("write to the pipe");
                }
            }
        });
        let (out, end) = take_all(&reader);
        writer.join().expect("the writer thread");
        assert_eq!(end, End::Eof);
        assert_eq!(out.len(), data.len());
        assert!(out == data, "the bytes came out changed or reordered");
        let (rest, end, _) = reader.stop();
        assert!(rest.is_empty());
        assert_eq!(end, Some(End::Eof));
    }

    #[test]
    fn a_stopped_reader_hands_back_what_it_queued_and_the_pipe_with_the_rest() {
        let (r, w) = nonblocking_pipe();
        let reader = PipeReader::start(r).unwrap_or_else(|(_, err)| panic!("{err}"));
        write(&w, b"first").expect("write to the pipe");
        // Wait until the reader queued it.
        let mut fds = [PollFd::new(reader.ready_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(10_000u16)).expect("poll on the ready pipe");
        let (chunks, end, fd) = reader.stop();
        assert_eq!(end, None, "the writer still holds the pipe");
        let queued: Vec<u8> = chunks.iter().flat_map(|c| c.bytes().to_vec()).collect();
        assert_eq!(queued, b"first");
        // The pipe is the caller's again: what comes next is read from it directly.
        write(&w, b"second").expect("write to the pipe");
        drop(w);
        let mut buf = [0u8; 64];
        let n = read(&*fd, &mut buf).expect("read the pipe");
        assert_eq!(&buf[..n], b"second");
    }

    #[test]
    fn dropping_a_reader_blocked_on_a_silent_pipe_returns() {
        let (r, w) = nonblocking_pipe();
        let reader = PipeReader::start(r).unwrap_or_else(|(_, err)| panic!("{err}"));
        // The writer stays open and silent: only the stop can end the reader's poll().
        drop(reader);
        drop(w);
    }
}
