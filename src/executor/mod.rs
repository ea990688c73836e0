//! The real [`PhaseRunner`]: for each phase it posts the job and agent state, prints the
//! banner, runs the command through [`crate::process`], writes `<phase>.log`, streams the
//! output to the [`Server`], watches for cancellation, records the exit status in
//! `testflinger-outcome.json` and emits the job's events (PROTOCOL §6).

mod allocate;
mod events;
mod journal;
mod metrics;
mod sink;
mod state;
use state::SkippedRead;

use crate::config::Config;
use crate::job::JobSpec;
use crate::journal::{CommandEnd, Journal};
use crate::lifecycle::{
    AbortReason, JobOutcome, PhaseEnd, PhaseRecord, PhaseResult, PhaseRunner, PhaseStatus,
    StopCause, RECOVERY_FAILED_EXIT_CODE,
};
use crate::mask::Masker;
use crate::outcome::{self, OutcomeFile};
use crate::phase::{Phase, SkipReason};
use crate::process::{self, CommandSpec, OutputSink, StopKind, StopSignal, Termination};
use crate::server::Server;
use events::Events;
pub use journal::{
    journal_command_spawned, journal_phase_finished, journal_phase_starting,
    journal_stopped_before, save_journal,
};
use metrics::{record_escapees, record_kill, PhaseMetrics};
use serde_json::{json, Value};
use sink::PhaseSink;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where the exit-46 offline marker goes (the archived agent's convention, PROTOCOL §9.5).
pub const MARKER_DIR: &str = "/tmp";

/// Runs the phases of one job in its run directory.
pub struct PhaseExecutor<'a> {
    config: &'a Config,
    spec: &'a JobSpec,
    rundir: PathBuf,
    server: &'a dyn Server,
    stop: StopSignal,
    outcome: OutcomeFile,
    events: Events,
    /// Where exit 46 leaves the offline marker file (`run-job`); `None`: the server-side
    /// `offline` state alone marks the device (the daemon).
    marker_dir: Option<PathBuf>,
    /// An administrator's request (or the agent's own, after exit 46) to take the agent
    /// offline, into maintenance or to restart, seen during the job: carried out after it
    /// (PROTOCOL §9.2). Its comment is posted with each phase's agent state meanwhile.
    pub deferred: Option<AgentRequest>,
    /// Set when the agent cannot run the job: no phase but cleanup runs.
    refused: Option<String>,
    /// The job journal, written at every transition (the daemon's jobs only).
    journal: Option<Journal>,
    /// The phase metrics of this job, waiting for the `release` label they carry.
    phase_metrics: PhaseMetrics,
    /// Set when the agent could not record the job (its log, journal or outcome could not
    /// be written: disk full, a directory gone read-only). No phase but cleanup runs after
    /// it, and the phase it happened in ends with exit code 100.
    storage_failed: Option<String>,
    /// Whether the job's output already says why the job ended early (the disk may have
    /// had no room for the line when the phase ended; cleanup's output says it then).
    storage_told: bool,
    /// How the last phase command ended, for its transition in the journal's trail.
    last_command: Option<CommandEnd>,
    /// How the job state is read for the skipped phases left before cleanup, on a server
    /// whose state reads return every log (no `/status`).
    skipped_read: SkippedRead,
    /// That read after cleanup found the job cancelled.
    cancelled_after_phases: bool,
    /// With direct capture, the longest pause between two looks at a quiet log
    /// ([`OutputSink::follow_pause_max`]); `None`: the runner's own.
    follow_pause_max: Option<Duration>,
}

impl std::fmt::Debug for PhaseExecutor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhaseExecutor")
            .field("job_id", &self.spec.job_id())
            .field("rundir", &self.rundir)
            .finish_non_exhaustive()
    }
}

impl<'a> PhaseExecutor<'a> {
    /// An executor for `spec` in `rundir`, whose `testflinger-outcome.json` is `outcome`.
    pub fn new(
        config: &'a Config,
        spec: &'a JobSpec,
        rundir: PathBuf,
        outcome: OutcomeFile,
        server: &'a dyn Server,
        stop: StopSignal,
    ) -> PhaseExecutor<'a> {
        let events = Events::for_job(config, spec);
        PhaseExecutor {
            config,
            spec,
            rundir,
            server,
            stop,
            outcome,
            events,
            marker_dir: None,
            deferred: None,
            refused: None,
            journal: None,
            phase_metrics: PhaseMetrics::default(),
            storage_failed: None,
            storage_told: false,
            last_command: None,
            skipped_read: SkippedRead::Each,
            cancelled_after_phases: false,
            follow_pause_max: None,
        }
    }

    /// Keeps `journal` up to date in the run directory at every transition, and when a
    /// phase command has spawned.
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// The journal as last written, for the end of the job.
    pub fn take_journal(&mut self) -> Option<Journal> {
        self.journal.take()
    }

    /// Writes the journal (with the live output's progress) durably, if there is one.
    fn save_journal(&mut self) {
        if let Some(journal) = &mut self.journal {
            if let Err(err) = save_journal(journal, self.server, &self.rundir) {
                self.storage_failure(format!("cannot write the job journal: {err}"));
            }
        }
    }

    /// The job can no longer be recorded: said once in the log; the job goes to cleanup.
    fn storage_failure(&mut self, problem: String) {
        if self.storage_failed.is_none() {
            log::error!(
                "job {}: {problem}; the job ends (exit code 100 for the phase), cleanup still runs",
                self.spec.job_id()
            );
            self.storage_failed = Some(problem);
        }
    }

    /// The statuses of the phases that ran, as recorded in memory (the report's source when
    /// `testflinger-outcome.json` could not be written).
    pub fn outcome_body(&self) -> Value {
        self.outcome.body()
    }

    /// The agent cannot run this job (e.g. its attachments were refused): the job goes
    /// straight to cleanup, and `reason` is written to `setup.log` and the live output.
    pub fn refuse_job(&mut self, reason: String) {
        self.refused = Some(reason);
    }

    /// Exit 46 also leaves the offline marker file of the archived agent in `dir` (for
    /// `run-job`, which has no server to hold the state).
    pub fn with_offline_marker(mut self, dir: PathBuf) -> Self {
        self.marker_dir = Some(dir);
        self
    }

    /// A command that writes its log itself is looked at no less often than every `pause`
    /// while it is quiet (`run-job` with a terminal that prints what it writes).
    pub fn with_follow_pause_max(mut self, pause: Duration) -> Self {
        self.follow_pause_max = Some(pause);
        self
    }

    /// The first event of a job (`job_start`).
    pub fn job_started(&mut self) {
        let detail = format!(
            "{}/jobs/{}",
            self.config.server_address.trim_end_matches('/'),
            self.spec.job_id()
        );
        self.emit("job_start", &detail);
    }

    /// The last event of a job (`job_end`, with `normal_exit` or the event that ended it).
    pub fn job_finished(&mut self, outcome: &JobOutcome) {
        let mut end_detail = outcome.end_detail();
        if self.skipped_read.read_after_cleanup() && outcome.abort.is_none() {
            let job_id = self.spec.job_id();
            match self.server.job_state(job_id) {
                Ok(Some(state)) if state == "cancelled" => {
                    log::info!("job {job_id}: cancelled on the server after its last phase");
                    self.cancelled_after_phases = true;
                    self.emit("cancelled", "");
                    end_detail = "cancelled".to_owned();
                }
                Ok(_) => {}
                Err(err) => log::warn!(
                    "job {job_id}: cannot read the job state after cleanup (taken as not cancelled): {err}"
                ),
            }
        }
        self.emit("job_end", &end_detail);
        self.phase_metrics.flush();
    }

    fn emit(&mut self, name: &str, detail: &str) {
        if let Some(body) = self.events.push(name, detail) {
            if let Err(err) = self.server.post_events(self.spec.job_id(), &body) {
                log::warn!(
                    "job {}: event {name} not delivered: {err}",
                    self.spec.job_id()
                );
            }
        }
    }

    fn post_result(&self, body: &Value, what: &str) {
        if let Err(err) = self.server.post_result(self.spec.job_id(), body) {
            log::warn!("job {}: posting {what} failed: {err}", self.spec.job_id());
        }
    }

    fn command_spec(&self, phase: Phase, command: &str) -> CommandSpec {
        let mut env: Vec<(OsString, OsString)> = self
            .config
            .command_env()
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        env.extend(
            self.spec
                .secrets(phase)
                .into_iter()
                .map(|(k, v)| (k.into(), v.into())),
        );
        CommandSpec {
            command: command.to_owned(),
            cwd: self.rundir.clone(),
            env,
            global_timeout: phase
                .has_global_timeout()
                .then(|| self.spec.global_timeout(self.config)),
            output_timeout: phase
                .has_output_timeout()
                .then(|| self.spec.output_timeout(self.config)),
            grace_period: self.config.grace_period(),
            straggler_wait: self.config.straggler_wait(),
            honour_cancel: phase.interrupted_by_cancel(),
            honour_shutdown: phase != Phase::Cleanup,
            shutdown_budget: (phase == Phase::Cleanup)
                .then(|| self.config.shutdown_cleanup_budget()),
            oom_score_adj: Some(self.config.oom_score_adj),
        }
    }

    /// Runs the command with a watcher beside it that wakes every `cancel_check_interval`:
    /// it tells the health endpoint the agent is alive and, when the phase can be
    /// cancelled, asks the server whether it was (at most once per interval).
    fn run_command(
        &self,
        spec: &CommandSpec,
        sink: &mut PhaseSink<'_>,
    ) -> Result<process::CommandOutcome, process::ProcessError> {
        let interval = self.config.cancel_check_period();
        if interval.is_zero() {
            return process::run_command(spec, sink, &self.stop);
        }
        let check_cancel = spec.honour_cancel;
        let (done_tx, done_rx) = mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let server = self.server;
            let job_id = self.spec.job_id();
            let stop = &self.stop;
            scope.spawn(move || {
                // Wakes every `interval`, or at once when the command is done.
                while let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(interval) {
                    // The phase is being watched: the main loop is alive, only busy.
                    crate::metrics::beat();
                    if !check_cancel {
                        continue;
                    }
                    if let Ok(Some(state)) = server.job_state(job_id) {
                        if state == "cancelled" {
                            stop.request(StopKind::Cancel);
                            break;
                        }
                    }
                }
            });
            let result = process::run_command(spec, sink, stop);
            drop(done_tx);
            result
        })
    }

    fn finish_phase(&mut self, phase: Phase, result: &PhaseResult) {
        let job_id = self.spec.job_id();
        let serial = self.rundir.join(format!("{phase}-serial.log"));
        if serial.is_file() {
            if let Err(err) = self.server.post_serial_log(job_id, phase, &serial) {
                log::warn!("job {job_id}: serial log of {phase} not delivered: {err}");
            }
        }
        if let Err(err) = self.outcome.set_status(phase, result.exit_code) {
            let problem = format!(
                "cannot write {} in {}: {err}",
                outcome::OUTCOME_FILE,
                self.rundir.display()
            );
            self.storage_failure(problem);
        }
        self.post_result(&self.outcome.body(), "phase status");
        if result.exit_code == RECOVERY_FAILED_EXIT_CODE {
            self.recovery_failed(phase);
        }
        if phase == Phase::Provision {
            let detail = if result.exit_code == 0 {
                "provision_success"
            } else if result.exit_code == RECOVERY_FAILED_EXIT_CODE {
                "recovery_fail"
            } else {
                "provision_fail"
            };
            if let Err(err) = self
                .server
                .post_provision_log(job_id, result.exit_code, detail)
            {
                log::warn!("job {job_id}: provision log not delivered: {err}");
            }
        }
    }

    /// Exit 46: the device could not be recovered. Mark it offline on the server (and with
    /// the marker file, when there is one): no job is taken until an administrator says so.
    fn recovery_failed(&mut self, phase: Phase) {
        let job_id = self.spec.job_id();
        let comment = format!("{RECOVERY_OFFLINE_COMMENT_PREFIX} during job '{job_id}' execution.");
        log::error!(
            "job {job_id}: {phase} exited {RECOVERY_FAILED_EXIT_CODE} (device recovery failed); marking the device offline"
        );
        if let Some(dir) = &self.marker_dir {
            let marker = dir.join(format!(
                "TESTFLINGER-DEVICE-OFFLINE-{}",
                self.config.agent_id
            ));
            match std::fs::write(&marker, format!("{comment}\n")) {
                Ok(()) => log::info!("offline marker {} created", marker.display()),
                Err(err) => log::error!("cannot create offline marker {}: {err}", marker.display()),
            }
        }
        if let Err(err) = self.server.post_agent_state("offline", &comment) {
            log::warn!("job {job_id}: posting the offline state failed: {err}");
        }
        self.deferred = Some(AgentRequest {
            state: "offline".to_owned(),
            comment,
        });
    }
}

impl PhaseRunner for PhaseExecutor<'_> {
    fn stop_requested(&mut self, next: Phase) -> Option<StopCause> {
        if self.refused.is_some() {
            return Some(StopCause::Unrunnable);
        }
        if self.storage_failed.is_some() {
            return Some(StopCause::StorageFailed);
        }
        if self.stop.is_requested(StopKind::Shutdown) || self.stop.is_requested(StopKind::KillNow) {
            return Some(StopCause::Shutdown);
        }
        if self.stop.is_requested(StopKind::Cancel) {
            return Some(StopCause::Cancelled);
        }
        self.read_state_before(next)
    }

    fn phase_starting(&mut self, phase: Phase, skip: Option<SkipReason>) {
        crate::metrics::beat();
        if let Some(journal) = &mut self.journal {
            // Other phases reach the disk with their command's token, written just before
            // it spawns (one durable write fewer per phase); an agent that dies before that
            // leaves a job "between phases", whose command never started.
            if journal_phase_starting(journal, phase, skip) && phase == Phase::Cleanup {
                self.save_journal();
            }
        }
        if phase != Phase::Cleanup {
            // Not after a state read was left for after cleanup: unread, a `cancelled`
            // could be overwritten.
            if !matches!(self.skipped_read, SkippedRead::Unread) {
                self.post_result(&json!({ "job_state": phase.name() }), "job state");
            }
            if self.deferred.is_none() {
                // One read of the agent record per phase: a request made now would
                // otherwise be overwritten by the phase state posted next.
                self.deferred = self.server.agent_state().and_then(AgentRequest::from_state);
                if let Some(request) = &self.deferred {
                    log::info!(
                        "job {}: the agent is asked to go {} ({}); after this job",
                        self.spec.job_id(),
                        request.state,
                        request.comment
                    );
                }
            }
            let comment = self.deferred.as_ref().map_or("", |r| r.comment.as_str());
            if let Err(err) = self.server.post_agent_state(phase.name(), comment) {
                log::warn!(
                    "job {}: posting agent state failed: {err}",
                    self.spec.job_id()
                );
            }
        }
        match skip {
            Some(reason) => log::info!(
                "job {}: {phase} skipped: {}",
                self.spec.job_id(),
                reason.describe(phase)
            ),
            None => log::info!("job {}: {phase} starting", self.spec.job_id()),
        }
        self.emit(&format!("{phase}_start"), "");
    }

    fn run_phase(&mut self, phase: Phase) -> PhaseResult {
        let started = Instant::now();
        let job_id = self.spec.job_id().to_owned();
        let log_path = self.rundir.join(format!("{phase}.log"));
        let file = match OpenOptions::new().create(true).append(true).open(&log_path) {
            Ok(file) => Some(file),
            Err(err) => {
                self.storage_failure(format!("cannot open {}: {err}", log_path.display()));
                None
            }
        };
        // Cleanup runs whatever failed, recorded or not: the device must be put back.
        if self.storage_failed.is_some() && phase != Phase::Cleanup {
            let result = PhaseResult {
                end: PhaseEnd::StorageFailed,
                ..agent_failure(started)
            };
            self.finish_phase(phase, &result);
            return result;
        }
        let masker = Masker::new(self.spec.secrets(phase).into_iter().map(|(_, v)| v));
        let mut sink = PhaseSink {
            file,
            len: 0,
            rundir: &self.rundir,
            journal: self.journal.take(),
            journal_saved: Instant::now(),
            path: &log_path,
            server: self.server,
            job_id: &job_id,
            phase,
            masker,
            write_failed: None,
            lost: 0,
            journal_failed: None,
            direct_allowed: self.storage_failed.is_none() && self.server.reads_output_back(),
            direct: false,
            room_checked: Instant::now(),
            len_at_room_check: 0,
            grew_before_check: false,
            follow_pause_max: self.follow_pause_max,
            scratch: Vec::new(),
        };
        for line in banner(phase, &self.config.agent_id) {
            sink.output(line.as_bytes());
        }
        if let (Some(problem), false) = (&self.storage_failed, self.storage_told) {
            sink.output(
                format!(
                    "ERROR: the agent could not record this job ({problem}); only cleanup runs.\n"
                )
                .as_bytes(),
            );
            self.storage_told = true;
        }
        if let Some(info) = outcome::read_device_info(&self.rundir) {
            self.post_result(&info, "device info");
        }
        let Some(command) = self.config.command(phase) else {
            // The plan only runs phases that have a command.
            sink.finish();
            self.journal = sink.journal.take();
            return agent_failure(started);
        };
        let spec = self.command_spec(phase, command);
        let ran = self.run_command(&spec, &mut sink);
        if phase != Phase::Cleanup
            && ran.as_ref().is_ok_and(|done| {
                matches!(
                    done.termination,
                    Termination::Exited(_) | Termination::Signaled(_)
                )
            })
            && self.server.state_reads_are_costly()
            && self.only_skipped_phases_after(phase)
        {
            // The command has ended; its output's tail is still on its way to the server.
            // The state read the skipped phases after this one start on is made now, beside
            // that delivery, while the server has fewer of the job's logs to rebuild.
            self.skipped_read = SkippedRead::Started(self.server.start_job_state(&job_id));
        }
        self.journal = sink.journal.take();
        let unrecorded = sink.write_failed.take().or(sink.journal_failed.take());
        let result = match ran {
            Ok(done) => {
                let (end, stop_event) = match done.termination {
                    Termination::Exited(_) => (PhaseEnd::Exited, None),
                    Termination::Signaled(_) => (PhaseEnd::Signaled, None),
                    Termination::GlobalTimeout => (PhaseEnd::GlobalTimeout, Some("global_timeout")),
                    Termination::OutputTimeout => (PhaseEnd::OutputTimeout, Some("output_timeout")),
                    Termination::Cancelled => (PhaseEnd::Cancelled, Some("cancelled")),
                    Termination::Shutdown => (PhaseEnd::Shutdown, None),
                    Termination::Unrecordable => (PhaseEnd::StorageFailed, None),
                };
                record_escapees(&done);
                self.last_command = Some(CommandEnd::of(&done));
                if done.stragglers_killed > 0 {
                    log::warn!(
                        "job {job_id}: {phase} left {} background process(es) running; killed",
                        done.stragglers_killed
                    );
                }
                sink.finish();
                if let Some(event) = stop_event {
                    let detail = match end {
                        PhaseEnd::GlobalTimeout => format!(
                            "ERROR: Global timeout reached! ({}s)",
                            spec.global_timeout.unwrap_or_default().as_secs()
                        ),
                        PhaseEnd::OutputTimeout => format!(
                            "ERROR: Output timeout reached! ({}s)",
                            spec.output_timeout.unwrap_or_default().as_secs()
                        ),
                        _ => "Job cancellation was requested, exiting.".to_owned(),
                    };
                    self.emit(event, &detail);
                }
                PhaseResult {
                    exit_code: done.termination.exit_code(),
                    end,
                    duration: started.elapsed(),
                }
            }
            Err(err) => {
                log::error!("job {job_id}: {phase}: {err}");
                sink.output(
                    format!("\nERROR: the agent could not run the {phase} command: {err}\n")
                        .as_bytes(),
                );
                sink.finish();
                agent_failure(started)
            }
        };
        let result = match unrecorded {
            Some(problem) => self.unrecorded_phase(phase, result, problem),
            None => result,
        };
        let allocating = phase == Phase::Allocate
            && self.server.releases_allocations()
            && self.storage_failed.is_none();
        let result = if allocating {
            self.publish_device_info(result)
        } else {
            result
        };
        let result = if allocating && result.exit_code == 0 {
            self.hold_allocation(result, started, spec.global_timeout)
        } else {
            result
        };
        record_kill(result.end);
        self.finish_phase(phase, &result);
        result
    }

    fn phase_finished(&mut self, record: &PhaseRecord, abort: Option<&AbortReason>) {
        let phase = record.phase;
        if let Some(journal) = &mut self.journal {
            journal_phase_finished(journal, crate::time::now_iso(), record, abort);
            if let Some(end) = self.last_command.take() {
                journal.annotate_last(end);
            }
            self.save_journal();
        }
        let failed_code = match record.status {
            PhaseStatus::Ran(result) if result.exit_code != 0 => Some(result.exit_code),
            PhaseStatus::Ran(_) | PhaseStatus::Skipped(_) => None,
        };
        self.record_phase_metrics(record, failed_code);
        match failed_code {
            None => self.emit(&format!("{phase}_success"), ""),
            Some(code) => {
                let detail = outcome::connector_error_detail(&self.rundir, phase);
                let event = if code == RECOVERY_FAILED_EXIT_CODE {
                    "recovery_fail".to_owned()
                } else {
                    format!("{phase}_fail")
                };
                self.emit(&event, &detail);
            }
        }
    }

    fn stopped_before(&mut self, reason: &AbortReason) {
        if let Some(journal) = &mut self.journal {
            journal_stopped_before(journal, crate::time::now_iso(), reason);
            self.save_journal();
        }
        if let AbortReason::Cancelled { .. } = reason {
            self.emit("cancelled", "");
        }
        if let (AbortReason::Unrunnable { phase }, Some(message)) = (reason, &self.refused) {
            record_refusal(
                self.server,
                self.spec.job_id(),
                &self.rundir,
                &mut self.outcome,
                *phase,
                message,
            );
        }
        log::info!(
            "job {}: stopping before {} ({})",
            self.spec.job_id(),
            reason.phase(),
            reason.event_name()
        );
    }
}

impl PhaseExecutor<'_> {
    /// The phase's output (or the journal) could not be written while its command ran: the
    /// runner stopped the command (cleanup excepted), the phase gets exit code 100 and the
    /// job goes to cleanup. The reason is told wherever it can still be: the agent's log,
    /// the end of the phase's output (if the disk has room again) and the job's events.
    fn unrecorded_phase(
        &mut self,
        phase: Phase,
        result: PhaseResult,
        problem: String,
    ) -> PhaseResult {
        let job_id = self.spec.job_id().to_owned();
        if phase == Phase::Cleanup {
            log::error!("job {job_id}: cleanup ran to its end, but its output was not all recorded: {problem}");
            self.storage_failure(problem);
            return result;
        }
        self.storage_failure(problem.clone());
        let detail = format!("ERROR: the agent could not record the {phase} phase ({problem}); the phase was stopped and the job ends.");
        self.storage_told = append_agent_line(
            self.server,
            &job_id,
            &self.rundir,
            phase,
            &format!("\n{detail}\n"),
        );
        self.emit("agent_storage_failed", &detail);
        PhaseResult {
            exit_code: process::AGENT_FAILURE_EXIT_CODE,
            end: PhaseEnd::StorageFailed,
            duration: result.duration,
        }
    }
}

/// Records that the agent could not run a job: `message` goes into `<phase>.log` and the
/// live output, and `phase` gets exit code 100 in the outcome, which is posted.
pub fn record_refusal(
    server: &dyn Server,
    job_id: &str,
    rundir: &Path,
    outcome: &mut OutcomeFile,
    phase: Phase,
    message: &str,
) {
    append_agent_line(
        server,
        job_id,
        rundir,
        phase,
        &format!("ERROR: {message}\n"),
    );
    if let Err(err) = outcome.set_status(phase, process::AGENT_FAILURE_EXIT_CODE) {
        log::error!("job {job_id}: cannot write the outcome: {err}");
    }
    if let Err(err) = server.post_result(job_id, &outcome.body()) {
        log::warn!("job {job_id}: posting phase status failed: {err}");
    }
}

/// Appends a line of the agent's own to `<phase>.log` (created if needed) and sends it with
/// the phase's live output, as the end of that output.
/// Whether the line could be written.
fn append_agent_line(
    server: &dyn Server,
    job_id: &str,
    rundir: &Path,
    phase: Phase,
    text: &str,
) -> bool {
    let log_path = rundir.join(format!("{phase}.log"));
    let appended = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .and_then(|mut log| {
            log.write_all(text.as_bytes())?;
            log.metadata()
        });
    match appended {
        Ok(meta) => {
            server.output(job_id, phase, text.as_bytes(), &log_path, meta.len());
            server.finish_output(job_id, phase);
            true
        }
        Err(err) => {
            log::error!("job {job_id}: cannot write {}: {err}", log_path.display());
            false
        }
    }
}

fn agent_failure(started: Instant) -> PhaseResult {
    PhaseResult {
        exit_code: process::AGENT_FAILURE_EXIT_CODE,
        end: PhaseEnd::AgentError,
        duration: started.elapsed(),
    }
}

/// How the comment of the agent's own `offline` after exit 46 starts (the Python agent's
/// words): with a health check configured, the daemon recognises it as its own.
pub const RECOVERY_OFFLINE_COMMENT_PREFIX: &str = "Set to offline by agent. Recovery failed";

/// A request to change the agent's state, deferred until the running job is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRequest {
    /// `offline`, `maintenance` or `restart`.
    pub state: String,
    pub comment: String,
}

impl AgentRequest {
    /// The request behind a server-side agent state, if the state is one.
    pub fn from_state((state, comment): (String, String)) -> Option<AgentRequest> {
        matches!(state.as_str(), "offline" | "maintenance" | "restart")
            .then_some(AgentRequest { state, comment })
    }
}

/// The three banner lines printed before a phase's command.
pub fn banner(phase: Phase, agent_id: &str) -> [String; 3] {
    let text = format!("Starting testflinger {phase} phase on {agent_id}");
    let row = "*".repeat(text.chars().count() + 4);
    [
        format!("{row}\n"),
        format!("* {text} *\n"),
        format!("{row}\n"),
    ]
}
