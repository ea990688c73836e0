//! The job journal as the executor keeps it: what each step of a job records, and the
//! durable write after each (the trail a crash leaves, read by recovery and `explain`).

use crate::journal::{Journal, Why};
use crate::lifecycle::{AbortReason, PhaseEnd, PhaseRecord, PhaseStatus};
use crate::phase::{Phase, SkipReason};
use crate::server::Server;
use std::path::Path;

/// Records the live output's progress in `journal` and writes it durably into `rundir`.
/// A failure is logged and returned: during a job it ends the job (a restart after a
/// crash would not know where the job was).
pub fn save_journal(
    journal: &mut Journal,
    server: &dyn Server,
    rundir: &Path,
) -> std::io::Result<()> {
    if let Some(progress) = server.output_progress(&journal.job_id) {
        journal.output = progress;
    }
    journal.save(rundir).inspect_err(|err| {
        log::error!(
            "job {}: cannot write the job journal {} in {}: {err}",
            journal.job_id,
            crate::journal::JOURNAL_FILE,
            rundir.display()
        );
    })
}

// What the journal records at each step of a job, as pure functions of the journal: the
// executor writes the result durably after each, and the exhaustive lifecycle check
// (tests/it/lifecycle_paths.rs) drives the same functions from a scripted runner, so the
// journal a crash leaves behind on any path is the one these write.

/// A phase is about to start: it is the phase running now and, for cleanup, one more start
/// is counted (on disk before cleanup starts: however often the agent dies, a restart knows
/// how many times cleanup was started). A skipped phase starts nothing and changes nothing.
/// Returns whether the journal changed.
pub fn journal_phase_starting(
    journal: &mut Journal,
    phase: Phase,
    skip: Option<SkipReason>,
) -> bool {
    if skip.is_some() {
        return false;
    }
    journal.phase = Some(phase.name().to_owned());
    if phase == Phase::Cleanup {
        journal.cleanup_attempts += 1;
    }
    true
}

/// The phase's command has started: its process group and phase token, for a restart to
/// kill what is left of it (the token is on disk already: it is written just before the
/// command spawns; the group goes with the next write).
pub fn journal_command_spawned(journal: &mut Journal, pgid: i32, token: &str) {
    journal.pgid = Some(pgid);
    journal.token = Some(token.to_owned());
}

/// A phase ended (or was skipped): its exit code and the transition it took, at `at`.
pub fn journal_phase_finished(
    journal: &mut Journal,
    at: String,
    record: &PhaseRecord,
    abort: Option<&AbortReason>,
) {
    let phase = record.phase;
    let to = state_after(phase, abort.is_some());
    let (why, exit_code) = match record.status {
        PhaseStatus::Skipped(_) => (Why::Skipped, None),
        PhaseStatus::Ran(result) => (why_of(result.end), Some(result.exit_code)),
    };
    if let Some(code) = exit_code {
        journal.set_status(phase.name(), code);
    }
    journal.transition(at, to, Some(phase.name()), why, exit_code);
}

/// A stop seen before a phase ended the forward path, at `at`.
pub fn journal_stopped_before(journal: &mut Journal, at: String, reason: &AbortReason) {
    let why = match reason {
        AbortReason::Cancelled { .. } => Why::Cancel,
        AbortReason::Shutdown { .. } => Why::Shutdown,
        AbortReason::StorageFailed { .. } => Why::StorageFailed,
        _ => Why::AgentError,
    };
    journal.transition(at, "Aborted", Some(reason.phase().name()), why, None);
}

/// The lifecycle state after `phase` ended (as named in [`crate::lifecycle::TRANSITIONS`]).
fn state_after(phase: Phase, aborted: bool) -> &'static str {
    use crate::lifecycle::{EdgeKind, TRANSITIONS};
    let kind = if phase == Phase::Cleanup {
        EdgeKind::Cleanup
    } else if aborted {
        EdgeKind::Abort
    } else {
        EdgeKind::Forward
    };
    TRANSITIONS
        .iter()
        .find(|t| t.kind == kind && (kind == EdgeKind::Cleanup || t.method == phase.name()))
        .map_or("Aborted", |t| t.to)
}

fn why_of(end: PhaseEnd) -> Why {
    match end {
        PhaseEnd::Exited => Why::Exit,
        PhaseEnd::Signaled => Why::Signal,
        PhaseEnd::GlobalTimeout => Why::GlobalTimeout,
        PhaseEnd::OutputTimeout => Why::OutputTimeout,
        PhaseEnd::Cancelled => Why::Cancel,
        PhaseEnd::Shutdown => Why::Shutdown,
        PhaseEnd::AgentError => Why::AgentError,
        PhaseEnd::StorageFailed => Why::StorageFailed,
    }
}
