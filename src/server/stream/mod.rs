//! Live output (PROTOCOL §3.11, §6.4): each phase's `<phase>.log` file is the buffer, and
//! a two-stage pipeline sends what the server has not accepted yet.
//!
//! [`Server::output`](super::Server::output) only records, under a short lock, that a log
//! file has grown, so the phase loop never waits for the network and memory stays bounded
//! however much a command prints or however long the server is away. The preparing thread
//! (`live-output`) reads the next unsent range of the file with one `pread` into a reused
//! buffer and builds the fragment's JSON body straight from those bytes into another
//! ([`FragmentBody`]: lossy UTF-8 and escaping in one pass, no `String` or
//! `serde_json::Value`), while the posting thread (`live-output-post`) has the previous
//! fragment on the wire; the posting thread sends them one after the other on one
//! connection. A job has at most two fragments in the pipeline (one posted, one ready),
//! so it holds two bodies and one read buffer, reused from fragment to fragment and given
//! back when output stops. A fragment is at most `fragment_size` bytes of the log (1 MiB)
//! and its escaped text at most [`MAX_FRAGMENT_TEXT`]; fragments go out at most once per
//! `output_post_interval` while a phase runs (immediately when a phase has ended or a full
//! fragment is waiting).
//!
//! Numbering is gap-free: one `output` counter per job, across phases, that moves only when
//! the server accepted a fragment. A fragment is posted only if it starts exactly at the
//! first byte the server has not accepted, with the next number; when one fails or is
//! refused, the fragment prepared behind it is dropped (its start or its number is no
//! longer right) and prepared again, so a fragment that failed is sent again with the same
//! number from the same byte of the log (extended by what the log gained meanwhile, up to
//! the fragment size), and one refused for good gives its number to the next. A later
//! phase's bytes never go out before an earlier phase's. A fragment ends at the last
//! complete UTF-8 character, unless its phase has ended, so a character split across reads
//! never turns into U+FFFD on the server. What the daemon stores to resume after an outage
//! or a restart ([`PendingOutput`], the journal's output progress) is only what the server
//! accepted.
//!
//! Serial logs (`<phase>-serial.log`, written by the device connector) are sent whole
//! after their phase by [`send_file`], masked fragment by fragment with the phase's
//! secrets from the run directory's `testflinger.json`; each fragment ends where the
//! masker has decided every byte, so a resend, even after a restart, is the same fragment.

mod read;
mod send;
mod threads;

use super::auth::human;
use super::client::Core;
use super::fragment::FragmentBody;
use crate::phase::Phase;
pub(super) use send::{send_file, send_pending};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use threads::{post_loop, prepare_loop};

/// How many detached job ids are remembered, to ignore late output for them.
const REMEMBERED_DETACHED: usize = 32;

/// A fragment whose escaped text is too long is cut by half, down to this many bytes of
/// the log (whose text cannot exceed the limit: six bytes a byte at most).
const MIN_CUT: usize = 64;

/// What is left to send of a job's live output once it stopped streaming: stored in the
/// run directory by the daemon and handed back to
/// [`HttpServer::send_pending`](super::http::HttpServer::send_pending).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOutput {
    /// The job's next `output` fragment number.
    pub next_fragment: u64,
    /// The phases with undelivered output, in running order.
    pub phases: Vec<PendingPhase>,
    /// The job's next `serial` fragment number.
    #[serde(default)]
    pub next_serial_fragment: u64,
    /// The serial logs (`<phase>-serial.log`) not delivered yet, in running order.
    #[serde(default)]
    pub serial: Vec<PendingPhase>,
}

/// One phase's undelivered output: the bytes of `log_file` from `sent` to its end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPhase {
    /// The Testflinger phase name.
    pub phase: String,
    /// The log file's name inside the run directory, e.g. `test.log`.
    pub log_file: String,
    /// Bytes of the file the server has accepted.
    pub sent: u64,
}

impl PendingOutput {
    /// Whether nothing is left to send.
    pub fn is_empty(&self) -> bool {
        self.phases.is_empty() && self.serial.is_empty()
    }
}

/// Streams live output on two threads; dropping it stops them.
pub(super) struct Streamer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// The preparing thread waits here for work (new bytes, a fragment delivered).
    wake: Condvar,
    /// The posting thread waits here for a prepared fragment.
    post: Condvar,
    /// Callers of finish, drain and detach wait here for the streamer's progress.
    progress: Condvar,
    /// False once a streamer thread has ended (or could not start).
    alive: AtomicBool,
    /// Fragments of a job in the pipeline at most: [`PIPELINE_DEPTH`], or 1.
    depth: u32,
    /// Bytes of the log in a full fragment (`fragment_size`): one that is due at once.
    full: u64,
}

/// Fragments of one job prepared, waiting or being posted at a time: one on the wire and
/// the next one ready behind it (1 without [`HttpSettings::prepare_ahead`]). This bounds
/// the memory the pipeline holds.
///
/// [`HttpSettings::prepare_ahead`]: super::settings::HttpSettings::prepare_ahead
const PIPELINE_DEPTH: u32 = 2;

#[derive(Default)]
struct State {
    jobs: HashMap<String, JobStream>,
    /// Recently detached jobs, whose late output is ignored.
    detached: VecDeque<String>,
    stopping: bool,
    /// The preparing thread waits with nothing to do: new bytes must wake it.
    idle: bool,
    /// Prepared fragments in sending order, for the posting thread (at most one).
    ready: VecDeque<Prepared>,
    /// Body buffers of delivered fragments, to build the next ones in.
    spare: Vec<Vec<u8>>,
}

#[derive(Default)]
struct JobStream {
    /// The number of the next fragment the server is to accept.
    next_fragment: u64,
    /// The number the next fragment prepared gets (ahead of `next_fragment` by the
    /// fragments prepared and not accepted yet).
    next_number: u64,
    phases: Vec<PhaseStream>,
    /// Fragments of this job being prepared, waiting or being posted.
    outstanding: u32,
    /// Moves on whenever fragments prepared ahead become void (a fragment before them
    /// failed or was refused): those are dropped, never sent, and prepared again.
    epoch: u64,
    /// Being detached: the streamer takes no more work from it.
    detaching: bool,
    /// Consecutive failed sends.
    failures: u32,
    retry_at: Option<Instant>,
    /// When the last fragment was taken for sending (the post cadence).
    last_post: Option<Instant>,
}

struct PhaseStream {
    phase: Phase,
    path: PathBuf,
    /// Bytes the log file is known to hold.
    known: u64,
    /// Bytes the server accepted (or refused for good).
    sent: u64,
    /// Bytes taken by fragments prepared so far: `sent` plus those prepared ahead.
    queued: u64,
    /// The phase's output is complete.
    finished: bool,
    /// The bytes from `queued` up to this length are only an incomplete character: wait
    /// for more.
    held_at: Option<u64>,
}

impl PhaseStream {
    /// Bytes the server has not accepted yet.
    fn undelivered(&self) -> bool {
        self.sent < self.known
    }

    /// Bytes no fragment has been prepared for yet.
    fn unqueued(&self) -> bool {
        self.queued < self.known
    }
}

impl State {
    /// Publishes the live-output bytes not accepted by the server yet (the backlog metric).
    fn report_backlog(&self) {
        if let Some(metrics) = crate::metrics::get() {
            let backlog = self
                .jobs
                .values()
                .flat_map(|job| &job.phases)
                .map(|p| p.known.saturating_sub(p.sent))
                .sum();
            metrics.set_output_backlog_bytes(backlog);
        }
    }

    /// Takes a buffer for a fragment body.
    fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// Keeps a body buffer for later fragments, unless enough are kept or no output is
    /// waiting (an idle agent holds no fragment's memory). A body holds at most
    /// [`MAX_FRAGMENT_TEXT`] bytes of text, however the log escapes.
    fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < PIPELINE_DEPTH as usize && !self.idle {
            self.spare.push(buf);
        }
    }

    /// Voids what `job_id` has prepared ahead of what the server accepted: the fragments
    /// waiting are dropped, and the next one is prepared from the first byte not accepted,
    /// with the first number not accepted.
    fn rewind(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.epoch += 1;
        job.next_number = job.next_fragment;
        for p in &mut job.phases {
            p.queued = p.sent;
            p.held_at = None;
        }
        let (dropped, kept): (Vec<Prepared>, Vec<Prepared>) = std::mem::take(&mut self.ready)
            .into_iter()
            .partition(|r| r.work.job_id == job_id);
        self.ready = kept.into();
        job.outstanding = job.outstanding.saturating_sub(dropped.len() as u32);
        for prepared in dropped {
            self.recycle(prepared.body.into_buffer());
        }
    }
}

impl JobStream {
    fn delivered_up_to(&self, last: usize) -> bool {
        self.phases.iter().take(last + 1).all(|p| !p.undelivered())
    }

    /// Whether `work` starts exactly where the server's copy of the job ends: the phases
    /// before it all accepted, its first byte the first not accepted, its number the next.
    fn continues(&self, work: &Work) -> bool {
        self.epoch == work.epoch
            && self.next_fragment == work.number
            && self
                .phases
                .get(work.index)
                .is_some_and(|p| p.sent == work.start)
            && self
                .phases
                .iter()
                .take(work.index)
                .all(|p| !p.undelivered())
    }
}

/// One fragment to prepare, copied out of the state.
struct Work {
    job_id: String,
    epoch: u64,
    index: usize,
    phase: Phase,
    path: PathBuf,
    start: u64,
    end: u64,
    finished: bool,
    number: u64,
}

/// A fragment ready for the posting thread.
struct Prepared {
    work: Work,
    /// Bytes of the log the fragment holds.
    consumed: u64,
    /// The text, escaped (empty for a skip).
    body: FragmentBody,
    /// The log could not be read: the bytes are skipped, no request is made.
    skip: bool,
}

enum Next {
    Work(Work),
    Until(Instant),
    /// The pipeline is full: the posting thread wakes us.
    Blocked,
    /// Nothing to send until new bytes arrive.
    Idle,
}

/// What became of one fragment.
enum Outcome {
    Sent(u64),
    Skipped(u64),
    Failed(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a streamer thread runs.
type ThreadBody = fn(&Shared, &Core);

/// Sets `alive` to false when a streamer thread ends, even by unwinding, and wakes
/// everyone who waits for it.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        self.0.wake.notify_all();
        self.0.post.notify_all();
        self.0.progress.notify_all();
    }
}

impl Streamer {
    pub(super) fn start(core: Arc<Core>) -> Streamer {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            post: Condvar::new(),
            progress: Condvar::new(),
            alive: AtomicBool::new(true),
            depth: if core.settings.prepare_ahead {
                PIPELINE_DEPTH
            } else {
                1
            },
            full: core.settings.fragment_size as u64,
        });
        let mut threads = Vec::new();
        let bodies: [(&str, ThreadBody); 2] = [
            ("live-output", prepare_loop),
            ("live-output-post", post_loop),
        ];
        for (name, body) in bodies {
            let for_thread = Arc::clone(&shared);
            let core = Arc::clone(&core);
            let spawned = std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    let guard = AliveGuard(for_thread);
                    body(&guard.0, &core);
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    shared.alive.store(false, Ordering::SeqCst);
                    log::error!(
                        "cannot start the {name} thread ({e}); output stays in the log files \
                         and is sent when the job is reported"
                    );
                    break;
                }
            }
        }
        let streamer = Streamer { shared, threads };
        if !streamer.shared.alive.load(Ordering::SeqCst) {
            streamer.stop();
        }
        streamer
    }

    /// Stops both threads (after the post in flight, if any).
    fn stop(&self) {
        lock(&self.shared.state).stopping = true;
        self.shared.wake.notify_all();
        self.shared.post.notify_all();
        self.shared.progress.notify_all();
    }

    /// A job starts (again): output for `job_id` is streamed even if a job of that id was
    /// detached before (a job handed out a second time).
    pub(super) fn attach(&self, job_id: &str) {
        lock(&self.shared.state).detached.retain(|d| d != job_id);
    }

    /// How far `job_id`'s output has reached the server: its next fragment number and, for
    /// every log it streamed, the bytes accepted (for the job journal).
    pub(super) fn progress(&self, job_id: &str) -> (u64, Vec<(Phase, String, u64)>) {
        let state = lock(&self.shared.state);
        let Some(job) = state.jobs.get(job_id) else {
            return (0, Vec::new());
        };
        let logs = job
            .phases
            .iter()
            .map(|p| {
                let file = p
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("{}.log", p.phase.name()));
                (p.phase, file, p.sent)
            })
            .collect();
        (job.next_fragment, logs)
    }

    /// `path` (the log of `phase`) now holds `len` bytes. Never blocks on the network.
    pub(super) fn note(&self, job_id: &str, phase: Phase, path: &Path, len: u64) {
        let mut guard = lock(&self.shared.state);
        let state = &mut *guard;
        if state.detached.iter().any(|d| d == job_id) {
            log::debug!("output of job {job_id} after it was detached is not streamed");
            return;
        }
        if !state.jobs.contains_key(job_id) {
            state.jobs.insert(job_id.to_string(), JobStream::default());
        }
        let Some(job) = state.jobs.get_mut(job_id) else {
            return;
        };
        let mut wake = state.idle;
        match job
            .phases
            .iter_mut()
            .rev()
            .find(|p| p.phase == phase && p.path == path)
        {
            Some(p) => {
                if len > p.known {
                    // A phase with nothing left to prepare may be due a post before the
                    // streamer's current wait ends; so is one whose bytes waiting now make
                    // a full fragment, which does not wait for `output_post_interval`.
                    let full = self.shared.full;
                    wake |= !p.unqueued()
                        || (p.known.saturating_sub(p.queued) < full
                            && len.saturating_sub(p.queued) >= full);
                    p.known = len;
                    p.held_at = None;
                }
            }
            None => {
                job.phases.push(PhaseStream {
                    phase,
                    path: path.to_path_buf(),
                    known: len,
                    sent: 0,
                    queued: 0,
                    finished: false,
                    held_at: None,
                });
                wake = true;
            }
        }
        state.report_backlog();
        drop(guard);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Waits up to `left` for the streamer's next progress (a fragment delivered or given
    /// up, a thread ended), and gives the state back.
    fn wait_progress<'s>(
        &'s self,
        state: MutexGuard<'s, State>,
        left: Duration,
    ) -> MutexGuard<'s, State> {
        self.shared
            .progress
            .wait_timeout(state, left)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0)
    }

    /// `phase` of `job_id` has ended: send the rest now and wait up to `wait` for it, or
    /// less when the server is failing (the rest then stays in the log file).
    pub(super) fn finish(&self, job_id: &str, phase: Phase, wait: Duration) {
        let deadline = Instant::now() + wait;
        let mut state = lock(&self.shared.state);
        let Some(job) = state.jobs.get_mut(job_id) else {
            return;
        };
        let Some(last) = job.phases.iter().rposition(|p| p.phase == phase) else {
            return;
        };
        for p in job.phases.iter_mut().filter(|p| p.phase == phase) {
            p.finished = true;
            p.held_at = None;
        }
        self.shared.wake.notify_one();
        loop {
            let Some(job) = state.jobs.get(job_id) else {
                return;
            };
            if job.delivered_up_to(last) {
                return;
            }
            if job.failures > 0 || !self.shared.alive.load(Ordering::SeqCst) {
                log::info!(
                    "output of {phase} of job {job_id} is not delivered yet (the server is \
                     not taking it now); it stays in the log file and is sent later"
                );
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                log::info!(
                    "output of {phase} of job {job_id} is not delivered after {}; it stays in \
                     the log file and is sent later",
                    human(wait)
                );
                return;
            }
            state = self.wait_progress(state, deadline - now);
        }
    }

    /// The job is over: marks every phase finished and waits up to `timeout` until all of
    /// its known output is delivered. Returns whether it was.
    pub(super) fn drain(&self, job_id: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.shared.state);
        let Some(job) = state.jobs.get_mut(job_id) else {
            return true;
        };
        for p in &mut job.phases {
            p.finished = true;
            p.held_at = None;
        }
        self.shared.wake.notify_one();
        loop {
            let Some(job) = state.jobs.get(job_id) else {
                return true;
            };
            if job.phases.iter().all(|p| !p.undelivered()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || !self.shared.alive.load(Ordering::SeqCst) {
                return false;
            }
            state = self.wait_progress(state, deadline - now);
        }
    }

    /// Stops streaming `job_id` (after the fragment in flight, if any; fragments prepared
    /// ahead are dropped) and returns what is left to send.
    pub(super) fn detach(&self, job_id: &str) -> PendingOutput {
        let mut state = lock(&self.shared.state);
        if let Some(job) = state.jobs.get_mut(job_id) {
            job.detaching = true;
        }
        // What was prepared ahead is not sent: the rest goes with the run directory.
        state.rewind(job_id);
        while state.jobs.get(job_id).is_some_and(|j| j.outstanding > 0)
            && self.shared.alive.load(Ordering::SeqCst)
        {
            state = self.wait_progress(state, Duration::from_millis(100));
        }
        let job = state.jobs.remove(job_id);
        // What is left of a detached job travels with its run directory, not this backlog.
        state.report_backlog();
        if !state.detached.iter().any(|d| d == job_id) {
            state.detached.push_back(job_id.to_string());
            if state.detached.len() > REMEMBERED_DETACHED {
                state.detached.pop_front();
            }
        }
        drop(state);
        let Some(job) = job else {
            return PendingOutput::default();
        };
        let phases = job
            .phases
            .iter()
            .filter(|p| p.undelivered())
            .map(|p| PendingPhase {
                phase: p.phase.name().to_string(),
                log_file: p
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("{}.log", p.phase.name())),
                sent: p.sent,
            })
            .collect();
        PendingOutput {
            next_fragment: job.next_fragment,
            phases,
            ..PendingOutput::default()
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a live-output thread ended with a panic");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_output_round_trips_through_json() {
        let p = PendingOutput {
            next_fragment: 7,
            phases: vec![PendingPhase {
                phase: "test".into(),
                log_file: "test.log".into(),
                sent: 42,
            }],
            next_serial_fragment: 3,
            serial: vec![PendingPhase {
                phase: "provision".into(),
                log_file: "provision-serial.log".into(),
                sent: 1_048_576,
            }],
        };
        let text = serde_json::to_string(&p).expect("serialise");
        let back: PendingOutput = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, p);
        assert!(!back.is_empty());
        assert!(PendingOutput::default().is_empty());
    }
}
