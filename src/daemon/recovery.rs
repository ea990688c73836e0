//! Crash recovery at start-up, before any job is taken: for each run directory a dead
//! agent left in `execution_basedir`, the job journal says where the job was; what is left
//! of its phase is killed, its cleanup runs (at most twice in all, however often the agent
//! dies), the outcome records the interrupted phase, and the directory goes to the spool,
//! whose normal delivery sends the output not yet sent, the artifacts and the outcome.
//!
//! Everything here is local: a server that is down delays only the report.

use super::spool::{self, save_pending, Leave};
use crate::config::Config;
use crate::executor::{AgentRequest, PhaseExecutor};
use crate::job::JobSpec;
use crate::journal::{self, Journal, JournalError, Why};
use crate::lifecycle::{Job, PhaseRecord, PhaseResult, PhaseStatus, Plan, TRANSITIONS};
use crate::outcome::{self, OutcomeFile};
use crate::phase::Phase;
use crate::process::{StopSignal, KILLED_EXIT_CODE};
use crate::server::http::{PendingOutput, PendingPhase};
use crate::server::local::LocalServer;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

/// How many times cleanup may be started for one job, counting the dead agent's attempt:
/// a cleanup the agent died in is run once more (the death was most likely the agent's,
/// not the cleanup's: a supervisor stop, the OOM killer, a power cut), but a cleanup that
/// was running both times the agent died may be what kills it, so it is not run a third
/// time.
pub const MAX_CLEANUP_ATTEMPTS: u32 = 2;

/// Recovers every run directory in `execution_basedir`, oldest first, then spools it.
/// Returns the request to take the device offline when a recovered cleanup exited 46: no
/// one else has seen that exit (recovery is local), so the daemon posts it and is held
/// (PROTOCOL §5.4).
pub fn recover_interrupted(config: &Config, stop: &StopSignal) -> Option<AgentRequest> {
    let mut offline = None;
    spool::recover_interrupted(&config.execution_basedir, &config.results_basedir, |dir| {
        match journal::read(dir) {
            Ok(journal) if journal.local => {
                log::warn!(
                    "{}: job {} was run by `run-job` (pid {}), not taken from the server: left as it is (neither recovered nor reported; remove it when done with it)",
                    dir.display(),
                    journal.job_id,
                    journal.agent_pid
                );
                return Leave::InPlace;
            }
            Ok(journal) if journal.finished => log::info!(
                "{}: job {} had finished when its agent stopped; reporting it",
                dir.display(),
                journal.job_id
            ),
            Ok(journal) => {
                if let Some(request) = recover_job(config, stop, dir, journal) {
                    offline = Some(request);
                }
            }
            Err(JournalError::Missing(_)) => log::warn!(
                "{} has no job journal (left by an older agent?): its results so far are reported as they are, its cleanup did not run",
                dir.display()
            ),
            Err(err) => log::error!(
                "{}: the job journal cannot be used ({err}); the run directory is reported as it is, its cleanup did not run",
                dir.display()
            ),
        }
        Leave::ToSpool
    });
    offline
}

/// What recovery does with a job its agent died during, decided from the journal alone
/// by [`begin_recovery`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryStart {
    /// The phase the agent died in; `None` when it died between phases.
    pub interrupted: Option<Phase>,
    /// How many times cleanup had been started before this recovery.
    pub cleanup_attempts: u32,
    /// Cleanup had run: only the outcome is left to finalise.
    pub already_cleaned: bool,
    /// The interrupted phase is recorded with exit code 247.
    pub interrupted_status: bool,
    /// Cleanup runs (once more): fewer than [`MAX_CLEANUP_ATTEMPTS`] starts so far.
    pub run_cleanup: bool,
    /// The phase the job is deemed aborted in: the interrupted one, or the next it would
    /// have run.
    pub abort_phase: Phase,
    /// The phases that ended (the interrupted one with 247 among them), for the recovered
    /// job's cleanup.
    pub records: Vec<PhaseRecord>,
}

/// The start of a job's recovery, as a pure function of its journal (the exhaustive
/// lifecycle check drives it on every path): decides what [`RecoveryStart`] says and
/// records it in the journal at `at`: the interrupted phase's 247, the move to `Aborted`
/// and, when cleanup is not run again, to `Cleaned` with 247. Nothing is killed or run.
pub fn begin_recovery(journal: &mut Journal, at: &str) -> RecoveryStart {
    let interrupted = journal.phase.as_deref().and_then(Phase::from_name);
    let attempts = journal.cleanup_attempts;
    let run_cleanup = attempts < MAX_CLEANUP_ATTEMPTS;
    let already_cleaned = journal.state == "Cleaned";
    let interrupted_status =
        !already_cleaned && interrupted.is_some_and(|p| p != Phase::Cleanup || !run_cleanup);
    // The phase the job is deemed aborted in: the interrupted one, or the next it would
    // have run.
    let abort_phase = interrupted.unwrap_or_else(|| next_phase(&journal.state));
    let mut start = RecoveryStart {
        interrupted,
        cleanup_attempts: attempts,
        already_cleaned,
        interrupted_status,
        run_cleanup: run_cleanup && !already_cleaned,
        abort_phase,
        records: Vec::new(),
    };
    if already_cleaned {
        return start;
    }
    if let (true, Some(phase)) = (interrupted_status, interrupted) {
        journal.set_status(phase.name(), KILLED_EXIT_CODE);
    }
    journal.transition(
        at.to_owned(),
        "Aborted",
        Some(abort_phase.name()),
        Why::CrashRecovery,
        interrupted_status.then_some(KILLED_EXIT_CODE),
    );
    if !run_cleanup {
        journal.transition(
            at.to_owned(),
            "Cleaned",
            Some(Phase::Cleanup.name()),
            Why::CrashRecovery,
            Some(KILLED_EXIT_CODE),
        );
        return start;
    }
    start.records = journal
        .statuses
        .iter()
        .filter_map(|s| {
            Some(PhaseRecord {
                phase: Phase::from_name(&s.phase)?,
                status: PhaseStatus::Ran(PhaseResult::exited(s.exit_code)),
            })
        })
        .collect();
    start
}

/// The end of a job's recovery: the outcome is final. Returns the job's final state:
/// `cancelled` when the trail shows the job was cancelled (a cancelled job stays
/// cancelled, also when its agent died afterwards), `complete` otherwise.
pub fn conclude_recovery(journal: &mut Journal) -> &'static str {
    journal.finished = true;
    let cancelled = journal
        .trail
        .iter()
        .any(|entry| entry.why == Why::Cancel && entry.to == "Aborted");
    if cancelled {
        "cancelled"
    } else {
        "complete"
    }
}

/// Ends one job its agent died during: kill, interrupted status, cleanup, final outcome,
/// record of the output left to send. Returns the request to take the device offline when
/// the cleanup it ran exited 46.
fn recover_job(
    config: &Config,
    stop: &StopSignal,
    dir: &Path,
    mut journal: Journal,
) -> Option<AgentRequest> {
    let job_id = journal.job_id.clone();
    let interrupted = journal.phase.as_deref().and_then(Phase::from_name);
    let where_ = interrupted.map_or_else(
        || format!("in state {}, between phases", journal.state),
        |phase| format!("during {phase}"),
    );
    log::warn!(
        "recovering job {job_id}: its agent (pid {}) died {where_}",
        journal.agent_pid
    );
    // The phases whose end (and serial log) the dead agent recorded.
    let ended: Vec<String> = journal.statuses.iter().map(|s| s.phase.clone()).collect();

    // 1. Whatever is left of the phase.
    let mut killed = 0;
    if let Some(token) = journal.token.clone() {
        let done = crate::process::kill_leftovers(&token, journal.pgid, config.grace_period());
        killed = done.killed;
        log::warn!(
            "recovering job {job_id}: killed {} leftover process(es) of {} (pgid {}, {} of them still in it){}",
            done.killed,
            interrupted.map_or("the phase", Phase::name),
            journal.pgid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
            done.in_group,
            if done.needed_sigkill { ", SIGKILL needed" } else { "" }
        );
    }

    // 2. The interrupted phase's status and cleanup (or why not).
    let start = begin_recovery(&mut journal, &crate::time::now_iso());
    let offline = if start.already_cleaned {
        // Cleanup had run; the agent died before the outcome was final.
        log::info!("recovering job {job_id}: cleanup had already run");
        None
    } else {
        run_recovery_cleanup(config, stop, dir, &mut journal, &start, killed)
    };

    // 3. The final outcome, and what is left to send of the output.
    let final_state = conclude_recovery(&mut journal);
    if let Err(err) = OutcomeFile::finalize(dir, final_state) {
        log::error!(
            "recovering job {job_id}: cannot finalise {}: {err}",
            outcome::OUTCOME_FILE
        );
    }
    let pending = pending_output(dir, &journal, &ended);
    if !pending.is_empty() {
        if let Err(err) = save_pending(dir, &pending) {
            log::error!("recovering job {job_id}: cannot record the output left to send: {err}");
        }
    }
    if let Err(err) = journal.save(dir) {
        log::error!("recovering job {job_id}: cannot write the job journal: {err}");
    }
    crate::trails::keep(config, &journal);
    log::info!("recovering job {job_id}: done ({final_state}); the report goes through the spool");
    offline
}

/// Records what [`begin_recovery`] decided for the interrupted phase (its log line and status) and
/// runs cleanup (or records why not). Returns the executor's offline request when cleanup
/// exited 46.
fn run_recovery_cleanup(
    config: &Config,
    stop: &StopSignal,
    dir: &Path,
    journal: &mut Journal,
    start: &RecoveryStart,
    killed: usize,
) -> Option<AgentRequest> {
    let job_id = journal.job_id.clone();
    let attempts = start.cleanup_attempts;
    let mut outcome = OutcomeFile::open(dir);
    let pid = journal.agent_pid;
    if let Some(phase) = start.interrupted {
        let what = format!(
            "the agent (pid {pid}) died during the {phase} phase; on restart it killed {killed} leftover process(es) of it"
        );
        let line = if phase != Phase::Cleanup {
            format!("\nERROR: {what} and ended the phase with exit code {KILLED_EXIT_CODE}; cleanup runs next.\n")
        } else if start.run_cleanup {
            format!(
                "\nERROR: {what} and runs cleanup once more (attempt {}).\n",
                attempts + 1
            )
        } else {
            format!(
                "\nERROR: {what}; cleanup was started {attempts} times and the agent died each time, so it is not run again (exit code {KILLED_EXIT_CODE}).\n"
            )
        };
        append_line(dir, phase, &line);
        if start.interrupted_status {
            if let Err(err) = outcome.set_status(phase, KILLED_EXIT_CODE) {
                log::error!("recovering job {job_id}: cannot write the outcome: {err}");
            }
        }
    }
    if !start.run_cleanup {
        log::error!(
            "recovering job {job_id}: cleanup was started {attempts} times and the agent died each time; not running it again"
        );
        return None;
    }
    let spec = fs::read(dir.join(outcome::JOB_FILE))
        .map_err(|err| err.to_string())
        .and_then(|bytes| JobSpec::from_json(&bytes).map_err(|err| err.to_string()));
    let spec = match spec {
        Ok(spec) => spec,
        Err(err) => {
            log::error!(
                "recovering job {job_id}: cannot read its {} ({err}); cleanup cannot run",
                outcome::JOB_FILE
            );
            return None;
        }
    };
    log::warn!(
        "recovering job {job_id}: running cleanup (attempt {})",
        attempts + 1
    );
    let server = LocalServer::quiet();
    let executor = PhaseExecutor::new(
        config,
        &spec,
        dir.to_path_buf(),
        outcome,
        &server,
        stop.clone(),
    )
    .with_journal(journal.clone());
    let job = Job::recovered(
        job_id.as_str(),
        Plan::for_job(config, &spec),
        executor,
        start.records.clone(),
        start.abort_phase,
    );
    let (done, mut executor) = job.cleanup().finish();
    if let Some(updated) = executor.take_journal() {
        *journal = updated;
    }
    let cleanup = done
        .records
        .iter()
        .find(|r| r.phase == Phase::Cleanup)
        .and_then(PhaseRecord::exit_code);
    match cleanup {
        Some(code) => log::info!("recovering job {job_id}: cleanup exited {code}"),
        None => log::info!("recovering job {job_id}: no cleanup command; skipped"),
    }
    // Exit 46 made the executor ask for the device to go offline; its post went to the
    // local server, so the daemon carries it to the real one.
    executor
        .deferred
        .take()
        .filter(|request| request.state == "offline")
}

/// The phase that follows `state` on the forward path (cleanup after the last one).
fn next_phase(state: &str) -> Phase {
    TRANSITIONS
        .iter()
        .find(|t| t.from == state && t.kind == crate::lifecycle::EdgeKind::Forward)
        .and_then(|t| Phase::from_name(t.method))
        .unwrap_or(Phase::Cleanup)
}

/// Appends the agent's line to `<phase>.log` (created if needed).
fn append_line(dir: &Path, phase: Phase, text: &str) {
    let path = dir.join(format!("{phase}.log"));
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(text.as_bytes()));
    if let Err(err) = written {
        log::error!("cannot write {}: {err}", path.display());
    }
}

/// The live output left to send: each phase log from the bytes the server had accepted at
/// the dead agent's last journal write (0 for a log it had not streamed), numbered from the
/// fragment number it had reached; serial logs the dead agent had not delivered, and those
/// of the phases that had not ended (the interrupted one, recovery's cleanup).
fn pending_output(dir: &Path, journal: &Journal, ended: &[String]) -> PendingOutput {
    let progress = &journal.output;
    let mut pending = PendingOutput {
        next_fragment: progress.next_fragment,
        phases: Vec::new(),
        next_serial_fragment: progress.next_serial_fragment,
        serial: progress
            .serial_pending
            .iter()
            .map(|p| PendingPhase {
                phase: p.phase.clone(),
                log_file: p.log_file.clone(),
                sent: p.sent,
            })
            .collect(),
    };
    for phase in Phase::ALL {
        let log_file = format!("{phase}.log");
        let Ok(meta) = fs::metadata(dir.join(&log_file)) else {
            continue;
        };
        let sent = progress
            .logs
            .iter()
            .find(|l| l.phase == phase.name() && l.log_file == log_file)
            .map_or(0, |l| l.sent);
        if meta.len() > sent {
            pending.phases.push(PendingPhase {
                phase: phase.name().to_owned(),
                log_file,
                sent,
            });
        }
        let serial_file = format!("{phase}-serial.log");
        let listed = pending.serial.iter().any(|p| p.log_file == serial_file);
        if !listed && !ended.iter().any(|e| e == phase.name()) && dir.join(&serial_file).is_file() {
            pending.serial.push(PendingPhase {
                phase: phase.name().to_owned(),
                log_file: serial_file,
                sent: 0,
            });
        }
    }
    pending
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_phase_follows_the_table() {
        assert_eq!(next_phase("Polled"), Phase::Setup);
        assert_eq!(next_phase("FirmwareUpdated"), Phase::Test);
        assert_eq!(next_phase("Reserved"), Phase::Cleanup);
        assert_eq!(next_phase("Aborted"), Phase::Cleanup);
        assert_eq!(next_phase("garbage"), Phase::Cleanup);
    }

    #[test]
    fn pending_output_resumes_from_the_journal() {
        let tmp = crate::testing::tempdir("recovery-pending");
        let dir = tmp.path().to_path_buf();
        fs::write(dir.join("setup.log"), b"0123456789").expect("write");
        fs::write(dir.join("provision.log"), b"abc").expect("write");
        fs::write(dir.join("test.log"), b"xyz").expect("write");
        fs::write(dir.join("test-serial.log"), b"serial").expect("write");
        fs::write(dir.join("setup-serial.log"), b"serial").expect("write");
        let mut journal = Journal::taken("job", "t".into());
        journal.output.next_fragment = 4;
        journal.output.logs = vec![
            journal::LogProgress {
                phase: "setup".into(),
                log_file: "setup.log".into(),
                sent: 10,
            },
            journal::LogProgress {
                phase: "provision".into(),
                log_file: "provision.log".into(),
                sent: 1,
            },
        ];
        let pending = pending_output(&dir, &journal, &["setup".into(), "provision".into()]);
        assert_eq!(pending.next_fragment, 4);
        let phases: Vec<_> = pending
            .phases
            .iter()
            .map(|p| (p.phase.as_str(), p.sent))
            .collect();
        assert_eq!(phases, [("provision", 1), ("test", 0)]);
        let serial: Vec<_> = pending.serial.iter().map(|p| p.log_file.as_str()).collect();
        assert_eq!(
            serial,
            ["test-serial.log"],
            "setup's serial log was delivered"
        );
    }
}
