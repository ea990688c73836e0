//! Live output (PROTOCOL §3.11, §6.4): each phase's `<phase>.log` file is the buffer, and
//! one streamer thread sends what the server has not accepted yet.
//!
//! [`Server::output`](super::Server::output) only records, under a short lock, that a log
//! file has grown, so the phase loop never waits for the network and memory stays bounded
//! however much a command prints or however long the server is away. The streamer thread reads the unsent range of
//! the file and posts it as one fragment, at most once per `output_post_interval` while a
//! phase runs (immediately when a phase has ended or a full fragment is waiting).
//!
//! Numbering is gap-free: one `output` counter per job, across phases, that moves only when
//! the server accepted a fragment; a fragment that failed is sent again with the same
//! number from the same byte of the log (extended by what the log gained meanwhile, up to
//! the fragment size). A later phase's bytes never go out before an earlier
//! phase's. A fragment ends at the last complete UTF-8 character, unless its phase has
//! ended, so a character split across reads never turns into U+FFFD on the server.
//!
//! Serial logs (`<phase>-serial.log`, written by the device connector) are sent whole
//! after their phase by [`send_file`], masked fragment by fragment with the phase's
//! secrets from the run directory's `testflinger.json`; each fragment ends where the
//! masker has decided every byte, so a resend, even after a restart, is the same fragment.

use super::auth::human;
use super::client::{Core, Req};
use super::{LogType, ServerError, ServerErrorKind};
use crate::mask::Masker;
use crate::phase::Phase;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How many detached job ids are remembered, to ignore late output for them.
const REMEMBERED_DETACHED: usize = 32;

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

/// Streams live output on its own thread; dropping it stops the thread.
pub(super) struct Streamer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// The streamer thread waits here for work.
    wake: Condvar,
    /// Callers of finish, drain and detach wait here for the streamer's progress.
    progress: Condvar,
    /// False once the streamer thread has ended (or could not start).
    alive: AtomicBool,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, JobStream>,
    /// Recently detached jobs, whose late output is ignored.
    detached: VecDeque<String>,
    stopping: bool,
    /// The streamer waits with nothing to do: new bytes must wake it.
    idle: bool,
}

#[derive(Default)]
struct JobStream {
    next_fragment: u64,
    phases: Vec<PhaseStream>,
    /// A fragment of this job is being sent.
    in_flight: bool,
    /// Being detached: the streamer takes no more work from it.
    detaching: bool,
    /// Consecutive failed sends.
    failures: u32,
    retry_at: Option<Instant>,
    last_post: Option<Instant>,
}

struct PhaseStream {
    phase: Phase,
    path: PathBuf,
    /// Bytes the log file is known to hold.
    known: u64,
    /// Bytes the server accepted (or refused for good).
    sent: u64,
    /// The phase's output is complete.
    finished: bool,
    /// The unsent bytes up to this length are only an incomplete character: wait for more.
    held_at: Option<u64>,
}

impl PhaseStream {
    fn pending(&self) -> bool {
        self.sent < self.known
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
}

impl JobStream {
    fn delivered_up_to(&self, last: usize) -> bool {
        self.phases.iter().take(last + 1).all(|p| !p.pending())
    }
}

/// One fragment to send, copied out of the state.
struct Work {
    job_id: String,
    index: usize,
    phase: Phase,
    path: PathBuf,
    start: u64,
    end: u64,
    finished: bool,
    number: u64,
}

enum Next {
    Work(Work),
    Until(Instant),
    Idle,
}

/// What became of one fragment.
enum Outcome {
    Sent(u64),
    Skipped(u64),
    Held,
    Failed(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sets `alive` to false when the thread ends, even by unwinding.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        self.0.progress.notify_all();
    }
}

impl Streamer {
    pub(super) fn start(core: Arc<Core>) -> Streamer {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            progress: Condvar::new(),
            alive: AtomicBool::new(true),
        });
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("live-output".to_string())
            .spawn(move || {
                let guard = AliveGuard(for_thread);
                run(&guard.0, &core);
            });
        let thread = match thread {
            Ok(handle) => Some(handle),
            Err(e) => {
                shared.alive.store(false, Ordering::SeqCst);
                log::error!(
                    "cannot start the live-output thread ({e}); output stays in the log files \
                     and is sent when the job is reported"
                );
                None
            }
        };
        Streamer { shared, thread }
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
                    // A phase that was all sent may be due a post before the streamer's
                    // current wait ends.
                    wake |= !p.pending();
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
            state = self
                .shared
                .progress
                .wait_timeout(state, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
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
            if job.phases.iter().all(|p| !p.pending()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || !self.shared.alive.load(Ordering::SeqCst) {
                return false;
            }
            state = self
                .shared
                .progress
                .wait_timeout(state, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Stops streaming `job_id` (after the fragment in flight, if any) and returns what is
    /// left to send.
    pub(super) fn detach(&self, job_id: &str) -> PendingOutput {
        let mut state = lock(&self.shared.state);
        if let Some(job) = state.jobs.get_mut(job_id) {
            job.detaching = true;
        }
        while state.jobs.get(job_id).is_some_and(|j| j.in_flight)
            && self.shared.alive.load(Ordering::SeqCst)
        {
            state = self
                .shared
                .progress
                .wait_timeout(state, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
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
            .filter(|p| p.pending())
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
        lock(&self.shared.state).stopping = true;
        self.shared.wake.notify_all();
        self.shared.progress.notify_all();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the live-output thread ended with a panic");
            }
        }
    }
}

/// The streamer thread.
fn run(shared: &Shared, core: &Core) {
    let interval = core.settings.output_post_interval;
    let max = core.settings.fragment_size;
    let backoff = core.settings.retry.backoff();
    loop {
        let work = {
            let mut state = lock(&shared.state);
            loop {
                if state.stopping {
                    return;
                }
                let now = Instant::now();
                match next(&mut state, now, interval, max) {
                    Next::Work(work) => break work,
                    Next::Until(at) => {
                        state = shared
                            .wake
                            .wait_timeout(state, at.saturating_duration_since(now))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    Next::Idle => {
                        state.idle = true;
                        state = shared
                            .wake
                            .wait(state)
                            .unwrap_or_else(PoisonError::into_inner);
                        state.idle = false;
                    }
                }
            }
        };
        let outcome = deliver(core, &work, max);
        let mut state = lock(&shared.state);
        if let Some(job) = state.jobs.get_mut(&work.job_id) {
            job.in_flight = false;
            apply(
                job,
                &work,
                outcome,
                backoff.delay(job.failures.saturating_add(1)),
            );
        }
        state.report_backlog();
        drop(state);
        shared.progress.notify_all();
    }
}

/// Picks the next fragment to send, or says when to look again.
fn next(state: &mut State, now: Instant, interval: Duration, max: usize) -> Next {
    let mut earliest: Option<Instant> = None;
    for (job_id, job) in state.jobs.iter_mut() {
        if job.in_flight || job.detaching {
            continue;
        }
        let Some(index) = job.phases.iter().position(PhaseStream::pending) else {
            continue;
        };
        let later_phase_started = index + 1 < job.phases.len();
        let p = &job.phases[index];
        let finished = p.finished || later_phase_started;
        if !finished && p.held_at == Some(p.known) {
            continue;
        }
        let full = p.known - p.sent >= max as u64;
        let mut ready_at = job.retry_at;
        if !finished && !full {
            if let Some(last) = job.last_post {
                ready_at = ready_at.max(Some(last + interval));
            }
        }
        if let Some(at) = ready_at.filter(|at| *at > now) {
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
            continue;
        }
        job.in_flight = true;
        return Next::Work(Work {
            job_id: job_id.clone(),
            index,
            phase: p.phase,
            path: p.path.clone(),
            start: p.sent,
            end: p.known,
            finished,
            number: job.next_fragment,
        });
    }
    earliest.map_or(Next::Idle, Next::Until)
}

/// Reads and sends one fragment (one attempt; the streamer paces the retries).
fn deliver(core: &Core, work: &Work, max: usize) -> Outcome {
    let (text, consumed) = match read_piece(&work.path, work.start, work.end, max, work.finished) {
        Piece::Text { text, consumed } => (text, consumed),
        Piece::Incomplete => return Outcome::Held,
        Piece::Unreadable(why) => {
            log::error!(
                "live output of {} of job {}: {why}; bytes {}..{} of it are not sent",
                work.phase,
                work.job_id,
                work.start,
                work.end
            );
            return Outcome::Skipped(work.end - work.start);
        }
    };
    let req = core
        .fragment_request(
            &work.job_id,
            LogType::Output,
            work.number,
            work.phase,
            &text,
        )
        .attempts(1);
    match post(core, &req) {
        Posted::Accepted => Outcome::Sent(consumed),
        Posted::Refused(why) => {
            log::error!(
                "output fragment {} of job {} ({} bytes of {}) was refused and is skipped: {why}",
                work.number,
                work.job_id,
                consumed,
                work.phase
            );
            Outcome::Skipped(consumed)
        }
        Posted::Failed(why) => Outcome::Failed(why),
    }
}

/// Records what became of a fragment; `wait` is the back-off should it have failed.
fn apply(job: &mut JobStream, work: &Work, outcome: Outcome, wait: Duration) {
    let Some(p) = job.phases.get_mut(work.index) else {
        return;
    };
    let now = Instant::now();
    match outcome {
        Outcome::Sent(n) => {
            p.sent = work.start + n;
            job.next_fragment += 1;
            if job.failures > 0 {
                log::info!(
                    "live output of job {} is delivered again, after {} failed attempt(s)",
                    work.job_id,
                    job.failures
                );
            }
            job.failures = 0;
            job.retry_at = None;
            job.last_post = Some(now);
        }
        Outcome::Skipped(n) => {
            p.sent = work.start + n;
            job.last_post = Some(now);
        }
        Outcome::Held => p.held_at = Some(work.end),
        Outcome::Failed(why) => {
            job.failures = job.failures.saturating_add(1);
            job.retry_at = Some(now + wait);
            let message = format!(
                "output fragment {} of job {} was not delivered ({why}); the output stays in {} \
                 and is sent again in {} (failure {})",
                work.number,
                work.job_id,
                work.path.display(),
                human(wait),
                job.failures
            );
            if job.failures.is_power_of_two() {
                log::warn!("{message}");
            } else {
                log::debug!("{message}");
            }
        }
    }
}

/// What the server made of one fragment.
enum Posted {
    Accepted,
    /// Refused for good (4xx other than an authentication failure): sending it again
    /// cannot help.
    Refused(String),
    /// Not stored, or maybe not: worth sending again later.
    Failed(String),
}

fn post(core: &Core, req: &Req) -> Posted {
    match core.call(req) {
        Ok(reply) if (200..300).contains(&reply.status) => {
            reply.discard();
            Posted::Accepted
        }
        Ok(reply) if core.is_auth_refusal(&reply) => {
            Posted::Failed(core.answer_error(req, &reply).detail)
        }
        Ok(reply) => Posted::Refused(core.answer_error(req, &reply).detail),
        Err(e) => Posted::Failed(e.detail),
    }
}

/// A fragment read from a log file.
enum Piece {
    Text {
        text: String,
        consumed: u64,
    },
    /// Only the start of a character so far.
    Incomplete,
    /// The file cannot be read (or is shorter than recorded).
    Unreadable(String),
}

/// Reads bytes `start..end` of `path`, at most `max`, ending at the last complete UTF-8
/// character unless `finished` and the read reaches `end`; decodes lossily.
fn read_piece(path: &Path, start: u64, end: u64, max: usize, finished: bool) -> Piece {
    match read_bytes(path, start, end, max, finished) {
        Ok((bytes, _)) => Piece::Text {
            consumed: bytes.len() as u64,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        },
        Err(piece) => piece,
    }
}

/// The bytes [`read_piece`] decodes, and whether they reach `end`; `Err` is the piece to
/// return instead (nothing complete, or unreadable).
fn read_bytes(
    path: &Path,
    start: u64,
    end: u64,
    max: usize,
    finished: bool,
) -> Result<(Vec<u8>, bool), Piece> {
    let want = end.saturating_sub(start).min(max as u64);
    let mut file = File::open(path)
        .map_err(|e| Piece::Unreadable(format!("cannot open {}: {e}", path.display())))?;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| Piece::Unreadable(format!("cannot seek in {}: {e}", path.display())))?;
    let mut buf = Vec::with_capacity(want as usize);
    file.take(want)
        .read_to_end(&mut buf)
        .map_err(|e| Piece::Unreadable(format!("cannot read {}: {e}", path.display())))?;
    if buf.is_empty() {
        return Err(Piece::Unreadable(format!(
            "{} ends at byte {start}, before the {end} bytes recorded",
            path.display()
        )));
    }
    let reaches_end = start + buf.len() as u64 >= end;
    let keep = if finished && reaches_end {
        buf.len()
    } else {
        complete_prefix(&buf)
    };
    if keep == 0 {
        return Err(Piece::Incomplete);
    }
    let last = reaches_end && keep == buf.len();
    buf.truncate(keep);
    Ok((buf, last))
}

/// The next fragment of the finished file `path` from `start` (of `end` bytes), masked:
/// about `max` bytes of the file, ending where `masker` has decided every byte, so that the
/// next fragment starts afresh there (see [`Masker::mask_prefix`]) and a fragment sent
/// again after a failure is the same. `consumed` counts bytes of the file.
fn masked_piece(path: &Path, start: u64, end: u64, max: usize, masker: &Masker) -> Piece {
    if masker.is_empty() {
        return read_piece(path, start, end, max, true);
    }
    // When all of `max` bytes could still begin a secret, read on by the longest secret
    // (and a cut character): then at least one byte is decided.
    for want in [max, max.saturating_add(masker.max_len() + 4)] {
        let (bytes, last) = match read_bytes(path, start, end, want, true) {
            Ok(read) => read,
            Err(piece) => return piece,
        };
        let (masked, used) = masker.mask_prefix(&bytes, last);
        if used > 0 {
            return Piece::Text {
                text: String::from_utf8_lossy(&masked).into_owned(),
                consumed: used as u64,
            };
        }
    }
    Piece::Unreadable(format!(
        "{}: no byte from {start} could be masked (a bug)",
        path.display()
    ))
}

/// The length of `bytes` without a trailing incomplete UTF-8 sequence (invalid bytes
/// elsewhere are kept: the lossy decoding replaces them the same way in any cut).
fn complete_prefix(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(_) => return bytes.len(),
            Err(e) => match e.error_len() {
                Some(bad) => at += e.valid_up_to() + bad,
                None => return at + e.valid_up_to(),
            },
        }
    }
}

/// Sends `path` from `*offset` to its end as fragments of `log_type`, synchronously, each
/// retried as the policy allows; `*offset` and `*number` follow what the server accepted.
/// A refused fragment is logged and skipped (its number is reused). A serial log is masked
/// fragment by fragment with the secrets of `phase` from the job file beside it (see
/// [`serial_masker`], [`masked_piece`]); a phase log was masked as it was written.
pub(super) fn send_file(
    core: &Core,
    job_id: &str,
    log_type: LogType,
    phase: Phase,
    path: &Path,
    offset: &mut u64,
    number: &mut u64,
) -> Result<(), ServerError> {
    let masker = match (log_type, path.parent()) {
        (LogType::Serial, Some(rundir)) => serial_masker(rundir, phase),
        _ => Masker::default(),
    };
    let what = format!(
        "sending the {} log of {phase} of job {job_id}",
        log_type.name()
    );
    let len = std::fs::metadata(path)
        .map_err(|e| {
            ServerError::new(
                ServerErrorKind::Local,
                what.as_str(),
                format!("cannot read {}: {e}", path.display()),
            )
        })?
        .len();
    let mut refused = None;
    while *offset < len {
        let (text, consumed) =
            match masked_piece(path, *offset, len, core.settings.fragment_size, &masker) {
                Piece::Text { text, consumed } => (text, consumed),
                Piece::Incomplete => break,
                Piece::Unreadable(why) => {
                    return Err(ServerError::new(ServerErrorKind::Local, what.as_str(), why))
                }
            };
        let req = core.fragment_request(job_id, log_type, *number, phase, &text);
        match core.call(&req) {
            Ok(reply) if (200..300).contains(&reply.status) => {
                reply.discard();
                *offset += consumed;
                *number += 1;
            }
            Ok(reply) if core.is_auth_refusal(&reply) => {
                return Err(core.answer_error(&req, &reply));
            }
            Ok(reply) => {
                let error = core.answer_error(&req, &reply);
                log::error!(
                    "{} fragment {} of job {job_id} ({consumed} bytes of {}) was refused and \
                     is skipped: {error}",
                    log_type.name(),
                    *number,
                    path.display()
                );
                *offset += consumed;
                refused = Some(error);
            }
            Err(e) => return Err(e),
        }
    }
    refused.map_or(Ok(()), Err)
}

/// Sends what [`Streamer::detach`] left, from the files in `rundir`; `pending` follows
/// what the server accepted, so it can be stored again after an error.
pub(super) fn send_pending(
    core: &Core,
    job_id: &str,
    rundir: &Path,
    pending: &mut PendingOutput,
) -> Result<(), ServerError> {
    send_queue(
        core,
        job_id,
        rundir,
        LogType::Output,
        &mut pending.phases,
        &mut pending.next_fragment,
    )?;
    send_queue(
        core,
        job_id,
        rundir,
        LogType::Serial,
        &mut pending.serial,
        &mut pending.next_serial_fragment,
    )
}

/// Sends the rest of each file of `queue` as `log_type` fragments numbered from `number`,
/// updating the queue and the number as the server accepts them.
fn send_queue(
    core: &Core,
    job_id: &str,
    rundir: &Path,
    log_type: LogType,
    queue: &mut Vec<PendingPhase>,
    number: &mut u64,
) -> Result<(), ServerError> {
    while let Some(first) = queue.first_mut() {
        let plain_name = !first.log_file.is_empty()
            && Path::new(&first.log_file).file_name() == Some(first.log_file.as_ref());
        let phase = Phase::from_name(&first.phase);
        let (Some(phase), true) = (phase, plain_name) else {
            log::error!(
                "pending {} log of job {job_id} names phase {:?} and file {:?}, which is not a \
                 phase and a file name; it is dropped",
                log_type.name(),
                first.phase,
                first.log_file
            );
            queue.remove(0);
            continue;
        };
        let path = rundir.join(&first.log_file);
        let mut offset = first.sent;
        let result = send_file(core, job_id, log_type, phase, &path, &mut offset, number);
        first.sent = offset;
        match result {
            Ok(()) => {}
            Err(e) if e.kind == ServerErrorKind::Rejected => {}
            Err(e) if e.kind == ServerErrorKind::Local => {
                log::error!(
                    "pending {} log of job {job_id} cannot be sent and is dropped: {e}",
                    log_type.name()
                );
            }
            Err(e) => return Err(e),
        }
        queue.remove(0);
    }
    Ok(())
}

/// The masker for the serial log of `phase` in `rundir`: the phase's secrets, read from
/// the job document the run directory holds (`testflinger.json`, exactly as the server
/// sent it), so that a serial log sent from the spool or after a restart is masked like
/// one sent at the end of its phase. A document that cannot be read masks nothing (its
/// job never ran a phase).
fn serial_masker(rundir: &Path, phase: Phase) -> Masker {
    let document = std::fs::read(rundir.join(crate::outcome::JOB_FILE)).unwrap_or_default();
    Masker::new(crate::job::secret_values(&document, phase))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_prefix_cuts_only_an_incomplete_tail() {
        assert_eq!(complete_prefix(b"abc"), 3);
        assert_eq!(complete_prefix("a€".as_bytes()), 4);
        assert_eq!(complete_prefix(&"a€".as_bytes()[..3]), 1);
        assert_eq!(complete_prefix(&"a€".as_bytes()[..2]), 1);
        assert_eq!(complete_prefix(b"a\xffb"), 3);
        assert_eq!(complete_prefix(b"a\xff\xe2\x82"), 2);
        assert_eq!(complete_prefix(b"\xe2"), 0);
        // Invalid after a lead byte: already undecodable, nothing to wait for.
        assert_eq!(complete_prefix(b"\xe2A"), 2);
        assert_eq!(complete_prefix(b""), 0);
    }

    /// Cutting at `complete_prefix` and decoding each piece lossily gives the lossy
    /// decoding of the whole, for every cut of some nasty inputs.
    #[test]
    fn lossy_pieces_concatenate_to_the_lossy_whole() {
        let inputs: [&[u8]; 4] = [
            "héllo €𝄞 wörld".as_bytes(),
            b"\xf0\x9f\x98\x80\xff\xe2\x82\xac\xe2\x82A\xc3",
            b"\xed\xa0\x80\xf4\x90\x80\x80\xe0\x80\x80ok",
            b"\xc3\xa9\xc3",
        ];
        for input in inputs {
            let whole = String::from_utf8_lossy(input).into_owned();
            for first_cut in 0..=input.len() {
                // Stream with bytes arriving in two reads split at `first_cut`.
                let mut out = String::new();
                let mut sent = 0;
                for known in [first_cut, input.len()] {
                    let last = known == input.len();
                    while sent < known {
                        let piece = &input[sent..known];
                        let keep = if last {
                            piece.len()
                        } else {
                            complete_prefix(piece)
                        };
                        if keep == 0 {
                            break;
                        }
                        out.push_str(&String::from_utf8_lossy(&piece[..keep]));
                        sent += keep;
                    }
                }
                assert_eq!(out, whole, "input {input:?} cut at {first_cut}");
            }
        }
    }

    #[test]
    fn read_piece_respects_max_and_finished() {
        let dir = std::env::temp_dir().join(format!(
            "tf-stream-{}-{}",
            std::process::id(),
            super::super::backoff::random_u64()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("test.log");
        std::fs::write(&path, "ab€".as_bytes()).expect("write");
        match read_piece(&path, 0, 4, 100, false) {
            Piece::Text { text, consumed } => assert_eq!((text.as_str(), consumed), ("ab", 2)),
            _ => panic!("expected text"),
        }
        assert!(matches!(
            read_piece(&path, 2, 4, 100, false),
            Piece::Incomplete
        ));
        match read_piece(&path, 2, 4, 100, true) {
            Piece::Text { text, consumed } => {
                assert_eq!((text.as_str(), consumed), ("\u{fffd}", 2))
            }
            _ => panic!("expected text"),
        }
        match read_piece(&path, 0, 5, 3, true) {
            Piece::Text { text, consumed } => assert_eq!((text.as_str(), consumed), ("ab", 2)),
            _ => panic!("expected text"),
        }
        assert!(matches!(
            read_piece(&path, 5, 9, 100, true),
            Piece::Unreadable(_)
        ));
        assert!(matches!(
            read_piece(&dir.join("absent"), 0, 1, 100, true),
            Piece::Unreadable(_)
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// A serial log sent fragment by fragment from its file, each masked afresh where
        /// the previous one stopped, whatever the fragment size: no fragment holds a
        /// secret, and together they are the whole file masked at once and decoded.
        #[test]
        fn masked_fragments_hold_no_secret_and_add_up_to_the_whole(
            secrets in proptest::collection::vec("[g-k]{1,5}|é[g-k]{0,3}", 1..4),
            parts in proptest::collection::vec(("[g-k €é\n]{0,8}", 0usize..4), 0..16),
            max in 4usize..24,
        ) {
            let mut data = Vec::new();
            for (filler, pick) in &parts {
                data.extend_from_slice(filler.as_bytes());
                if let Some(secret) = secrets.get(*pick) {
                    data.extend_from_slice(secret.as_bytes());
                }
            }
            let dir = std::env::temp_dir().join(format!(
                "tf-stream-mask-{}-{}",
                std::process::id(),
                super::super::backoff::random_u64()
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let path = dir.join("test-serial.log");
            std::fs::write(&path, &data).expect("write");
            let masker = Masker::new(&secrets);
            let mut sent = String::new();
            let mut offset = 0u64;
            while offset < data.len() as u64 {
                match masked_piece(&path, offset, data.len() as u64, max, &masker) {
                    Piece::Text { text, consumed } => {
                        for secret in &secrets {
                            proptest::prop_assert!(!text.contains(secret.as_str()), "{:?} in {:?}", secret, text);
                        }
                        proptest::prop_assert!(consumed > 0);
                        sent.push_str(&text);
                        offset += consumed;
                    }
                    Piece::Incomplete => proptest::prop_assert!(false, "incomplete at {}", offset),
                    Piece::Unreadable(why) => proptest::prop_assert!(false, "{}", why),
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            for secret in &secrets {
                proptest::prop_assert!(!sent.contains(secret.as_str()), "{:?} in {:?}", secret, sent);
            }
            let whole = String::from_utf8_lossy(&masker.mask_all(&data)).into_owned();
            proptest::prop_assert_eq!(sent, whole);
        }
    }

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
