//! The pipeline's two threads: the preparing thread (`live-output`) picks the next
//! fragment, reads it from its log file and builds its body while the posting thread
//! (`live-output-post`) has the previous one on the wire, then applies what the server
//! made of it to the shared state.

use super::read::{read_bytes_into, ReadError};
use super::{lock, Next, Outcome, PhaseStream, Prepared, Shared, State, Work};
use crate::server::auth::human;
use crate::server::client::Core;
use crate::server::fragment::FragmentBody;
use crate::server::request::Req;
use crate::server::settings::MAX_FRAGMENT_TEXT;
use crate::server::LogType;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

/// The preparing thread: picks the next fragment, reads it from the log file and builds
/// its body while the previous one is on the wire, and hands it to the posting thread.
pub(super) fn prepare_loop(shared: &Shared, core: &Core) {
    let interval = core.settings.output_post_interval;
    let max = core.settings.fragment_size;
    // The bytes of the fragment being prepared; reused, at most `max` of them.
    let mut read = Vec::new();
    loop {
        let (work, buf) = {
            let mut state = lock(&shared.state);
            loop {
                if state.stopping || !shared.alive.load(Ordering::SeqCst) {
                    return;
                }
                let now = Instant::now();
                match next(&mut state, now, interval, max, shared.depth) {
                    Next::Work(work) => {
                        let buf = state.buffer();
                        break (work, buf);
                    }
                    Next::Until(at) => {
                        state = shared
                            .wake
                            .wait_timeout(state, at.saturating_duration_since(now))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    Next::Blocked => {
                        state = shared
                            .wake
                            .wait(state)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                    Next::Idle => {
                        // Nothing flows: give the buffers back to the system.
                        read = Vec::new();
                        state.spare.clear();
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
        let prepared = prepare(work, &mut read, buf, max);
        let mut state = lock(&shared.state);
        let state = &mut *state;
        let Some(job) = state.jobs.get_mut(&prepared.work.job_id) else {
            state.recycle(prepared.body.into_buffer());
            continue;
        };
        let current = job.epoch == prepared.work.epoch && !job.detaching;
        let p = job.phases.get_mut(prepared.work.index).filter(|_| current);
        let Some(p) = p.filter(|_| prepared.consumed > 0 || prepared.skip) else {
            if current {
                // Only the start of a character so far: wait for more bytes.
                if let Some(p) = job.phases.get_mut(prepared.work.index) {
                    p.held_at = Some(prepared.work.end);
                }
            }
            job.outstanding = job.outstanding.saturating_sub(1);
            state.recycle(prepared.body.into_buffer());
            shared.progress.notify_all();
            continue;
        };
        p.queued = prepared.work.start + prepared.consumed;
        if !prepared.skip {
            job.next_number += 1;
        }
        state.ready.push_back(prepared);
        shared.post.notify_one();
    }
}

/// The posting thread: sends the prepared fragments one after the other, on one
/// connection, and records what the server made of each.
pub(super) fn post_loop(shared: &Shared, core: &Core) {
    let backoff = core.settings.retry.backoff();
    loop {
        let prepared = {
            let mut state = lock(&shared.state);
            loop {
                if state.stopping || !shared.alive.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(prepared) = state.ready.pop_front() {
                    break prepared;
                }
                state = shared
                    .post
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        // The preparing thread may go on with the next fragment.
        shared.wake.notify_one();
        let mut state = lock(&shared.state);
        let continues = state
            .jobs
            .get(&prepared.work.job_id)
            .is_some_and(|job| !job.detaching && job.continues(&prepared.work));
        if !continues {
            // Prepared ahead of a fragment that did not go through: it is prepared again.
            let job_id = prepared.work.job_id.clone();
            if let Some(job) = state.jobs.get_mut(&job_id) {
                job.outstanding = job.outstanding.saturating_sub(1);
                if job.epoch == prepared.work.epoch && !job.detaching {
                    // Every outcome that moves the start or the number voids what was
                    // prepared behind it (`rewind`): this is a safety net, not a path.
                    debug_assert!(
                        false,
                        "output fragment {} of job {job_id} does not continue what the server holds",
                        prepared.work.number
                    );
                    log::error!(
                        "output fragment {} of job {job_id} does not continue what the server \
                         holds (a bug); it is prepared again",
                        prepared.work.number
                    );
                    state.rewind(&job_id);
                }
            }
            state.recycle(prepared.body.into_buffer());
            drop(state);
            shared.progress.notify_all();
            shared.wake.notify_one();
            continue;
        }
        drop(state);
        let work = prepared.work;
        let (outcome, buf) = if prepared.skip {
            (
                Outcome::Skipped(prepared.consumed),
                prepared.body.into_buffer(),
            )
        } else {
            deliver(core, &work, prepared.consumed, prepared.body)
        };
        let mut state = lock(&shared.state);
        let wait = state.jobs.get(&work.job_id).map_or(Duration::ZERO, |job| {
            backoff.delay(job.failures.saturating_add(1))
        });
        apply(&mut state, &work, outcome, wait);
        state.recycle(buf);
        state.report_backlog();
        drop(state);
        shared.progress.notify_all();
        shared.wake.notify_one();
    }
}

/// Picks the next fragment to prepare, or says when to look again.
fn next(state: &mut State, now: Instant, interval: Duration, max: usize, depth: u32) -> Next {
    if !state.ready.is_empty() {
        // One fragment waits for the wire already.
        return Next::Blocked;
    }
    let mut earliest: Option<Instant> = None;
    let mut blocked = false;
    for (job_id, job) in state.jobs.iter_mut() {
        if job.detaching {
            continue;
        }
        if job.outstanding >= depth {
            blocked = true;
            continue;
        }
        let Some(index) = job.phases.iter().position(PhaseStream::unqueued) else {
            continue;
        };
        let later_phase_started = index + 1 < job.phases.len();
        let p = &job.phases[index];
        let finished = p.finished || later_phase_started;
        if !finished && p.held_at == Some(p.known) {
            continue;
        }
        let full = p.known - p.queued >= max as u64;
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
        job.outstanding += 1;
        job.last_post = Some(now);
        return Next::Work(Work {
            job_id: job_id.clone(),
            epoch: job.epoch,
            index,
            phase: p.phase,
            path: p.path.clone(),
            start: p.queued,
            end: p.known,
            finished,
            number: job.next_number,
        });
    }
    match earliest {
        Some(at) => Next::Until(at),
        None if blocked => Next::Blocked,
        None => Next::Idle,
    }
}

/// Reads one fragment from its log and builds its body in `buf` (`read` holds the bytes
/// meanwhile): at most `max` bytes of the log, fewer when their escaped text would exceed
/// [`MAX_FRAGMENT_TEXT`]. `consumed` 0 without `skip`: only the start of a character so far.
fn prepare(work: Work, read: &mut Vec<u8>, buf: Vec<u8>, max: usize) -> Prepared {
    let mut body = FragmentBody::new(buf);
    match read_bytes_into(read, &work.path, work.start, work.end, max, work.finished) {
        Ok((len, _)) => {
            let consumed = body.push_bytes_within(&read[..len], MAX_FRAGMENT_TEXT);
            Prepared {
                consumed: consumed as u64,
                body,
                skip: false,
                work,
            }
        }
        Err(ReadError::Incomplete) => Prepared {
            work,
            consumed: 0,
            body,
            skip: false,
        },
        Err(ReadError::Unreadable(why)) => {
            log::error!(
                "live output of {} of job {}: {why}; bytes {}..{} of it are not sent",
                work.phase,
                work.job_id,
                work.start,
                work.end
            );
            Prepared {
                consumed: work.end - work.start,
                body,
                skip: true,
                work,
            }
        }
    }
}

/// Sends one prepared fragment (one attempt; the streamer paces the retries) and gives
/// its buffer back.
fn deliver(core: &Core, work: &Work, consumed: u64, body: FragmentBody) -> (Outcome, Vec<u8>) {
    let req = core
        .fragment_request(&work.job_id, LogType::Output, work.number, work.phase, body)
        .attempts(1);
    let outcome = match post(core, &req) {
        Posted::Accepted => Outcome::Sent(consumed),
        Posted::Refused(why) => {
            log::error!(
                "output fragment {} of job {} ({consumed} bytes of {}) was refused and is \
                 skipped: {why}",
                work.number,
                work.job_id,
                work.phase
            );
            Outcome::Skipped(consumed)
        }
        Posted::Failed(why) => Outcome::Failed(why),
    };
    (outcome, req.into_buffer().unwrap_or_default())
}

/// Records what became of a fragment; `wait` is the back-off should it have failed. A
/// fragment that did not go through as numbered voids those prepared after it.
fn apply(state: &mut State, work: &Work, outcome: Outcome, wait: Duration) {
    let Some(job) = state.jobs.get_mut(&work.job_id) else {
        return;
    };
    job.outstanding = job.outstanding.saturating_sub(1);
    let Some(p) = job.phases.get_mut(work.index) else {
        return;
    };
    let now = Instant::now();
    match outcome {
        Outcome::Sent(n) => {
            p.sent = work.start + n;
            // Preparing goes on from here even if what it had prepared was voided meanwhile.
            p.queued = p.queued.max(p.sent);
            job.next_fragment += 1;
            job.next_number = job.next_number.max(job.next_fragment);
            if job.failures > 0 {
                log::info!(
                    "live output of job {} is delivered again, after {} failed attempt(s)",
                    work.job_id,
                    job.failures
                );
            }
            job.failures = 0;
            job.retry_at = None;
        }
        Outcome::Skipped(n) => {
            p.sent = work.start + n;
            p.queued = p.queued.max(p.sent);
            // No number was used: what was prepared after it is numbered one too far.
            if job.next_number != job.next_fragment {
                state.rewind(&work.job_id);
            }
        }
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
            state.rewind(&work.job_id);
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
