//! Reading the job state before a phase: through `/status` where the server has it; on a
//! server whose state reads return every log, the read for skipped phases is made early
//! (when the last command ends, beside its output's tail) or left for after cleanup, so
//! that a `cancelled` is never overwritten unread (docs/operating.md, "Reading the job
//! state").

use super::PhaseExecutor;
use crate::lifecycle::StopCause;
use crate::phase::Phase;
use crate::process::StopKind;
use crate::server::PendingState;

/// How the job state is read for the skipped phases left before cleanup. Past `Each`, it
/// is read again after cleanup, for the final state.
pub(super) enum SkippedRead {
    /// Before each phase, as usual.
    Each,
    /// Started when the command of a phase after which only skipped phases are left
    /// ended: it runs while that phase's output is delivered, so the server rebuilds the
    /// logs stored so far instead of all of them. Not answered yet.
    Started(PendingState),
    /// That early read answered (not cancelled): it stands for the skipped phases.
    ReadEarly,
    /// No read covers the skipped phases (the server was found to lack `/status` only
    /// during the last phase): their `job_state` is not posted either, since it could
    /// overwrite a `cancelled` the agent has not read.
    Unread,
}

impl SkippedRead {
    /// Whether the state is read after cleanup.
    pub(super) fn read_after_cleanup(&self) -> bool {
        matches!(self, SkippedRead::ReadEarly | SkippedRead::Unread)
    }
}

impl PhaseExecutor<'_> {
    /// Whether the job was found cancelled only after its cleanup (see
    /// [`SkippedRead::read_after_cleanup`]): its final state is `cancelled` all the same.
    pub fn cancelled_after_phases(&self) -> bool {
        self.cancelled_after_phases
    }

    /// Whether every forward phase from `next` to reserve is skipped.
    fn only_skipped_phases_from(&self, next: Phase) -> bool {
        let plan = crate::lifecycle::Plan::for_job(self.config, self.spec);
        Phase::ALL
            .iter()
            .filter(|p| **p >= next && **p != Phase::Cleanup)
            .all(|p| plan.skip(*p).is_some())
    }

    /// Whether at least one forward phase comes after `phase` and all of them (up to
    /// reserve) are skipped.
    pub(super) fn only_skipped_phases_after(&self, phase: Phase) -> bool {
        let plan = crate::lifecycle::Plan::for_job(self.config, self.spec);
        let mut after = Phase::ALL
            .iter()
            .filter(|p| **p > phase && **p != Phase::Cleanup)
            .peekable();
        after.peek().is_some() && after.all(|p| plan.skip(*p).is_some())
    }

    /// Reads the job state before `next`: `Some(Cancelled)` when the server says it was.
    fn judge_state(
        &mut self,
        answer: Result<Option<String>, crate::server::ServerError>,
        next: Phase,
    ) -> Option<StopCause> {
        match answer {
            Ok(Some(state)) if state == "cancelled" => {
                log::info!(
                    "job {}: cancelled on the server before {next}",
                    self.spec.job_id()
                );
                self.stop.request(StopKind::Cancel);
                Some(StopCause::Cancelled)
            }
            Ok(_) => None,
            Err(err) => {
                log::warn!(
                    "job {}: cannot read the job state before {next} (carrying on): {err}",
                    self.spec.job_id()
                );
                None
            }
        }
    }

    /// The job state before `next`, once the local stop requests are answered: the early
    /// read's answer, none for skipped phases whose read was left for after cleanup, or a
    /// read now. `Some(Cancelled)` when the server says the job was cancelled.
    pub(super) fn read_state_before(&mut self, next: Phase) -> Option<StopCause> {
        match std::mem::replace(&mut self.skipped_read, SkippedRead::Each) {
            SkippedRead::Started(read) => {
                // Started when the last phase's command ended: the state as of then, read
                // while that phase's output was still being delivered.
                log::info!(
                    "job {}: {next} and the phases after it are skipped; the job state read when the last command ended stands for them, and it is read again after cleanup (this server returns every log with it)",
                    self.spec.job_id()
                );
                self.skipped_read = SkippedRead::ReadEarly;
                return self.judge_state(read.wait(), next);
            }
            SkippedRead::Each => {}
            done @ (SkippedRead::ReadEarly | SkippedRead::Unread) => {
                self.skipped_read = done;
                return None;
            }
        }
        if self.server.state_reads_are_costly() && self.only_skipped_phases_from(next) {
            // Reading the state here would make the server rebuild every log of the job
            // (a second or more after a large test phase), for phases that do nothing.
            log::info!(
                "job {}: {next} and the phases after it are skipped; the job state is read after cleanup (this server returns every log with it)",
                self.spec.job_id()
            );
            self.skipped_read = SkippedRead::Unread;
            return None;
        }
        let answer = self.server.job_state(self.spec.job_id());
        self.judge_state(answer, next)
    }
}
