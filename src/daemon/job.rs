//! Running one job the server handed out: its run directory and journal, its attachments,
//! the lifecycle, then back to `waiting` (or the hold or restart asked for during it, or a
//! health check the job calls for); and whether `execution_basedir` has room for a job.

use super::delivery::loose_job_id;
use super::run::Daemon;
use super::states::{DaemonEvent, DaemonState};
use crate::executor::{AgentRequest, PhaseExecutor};
use crate::job::JobSpec;
use crate::journal::Journal;
use crate::lifecycle::{run_to_completion, AbortReason, Job, Plan};
use crate::outcome::OutcomeFile;
use crate::process::StopKind;
use crate::run_job::prepare_rundir;
use crate::server::Server;
use serde_json::json;
use std::fs;
use std::path::Path;

impl Daemon {
    /// Runs one job the server handed out. Never fails: whatever goes wrong is reported to
    /// the server when it can be, and the run directory is spooled when it cannot.
    pub(super) fn run_server_job(&mut self, body: &[u8]) {
        let Some(job_id) = loose_job_id(body) else {
            let saved = self.config.logging_basedir.join(format!(
                "unusable-job-{}.json",
                crate::time::now_iso().replace([':', '+', '.'], "-")
            ));
            let _ = fs::write(&saved, body);
            log::error!(
                "the server sent a job without a usable job_id; there is no job to report to (body saved as {})",
                saved.display()
            );
            return;
        };
        if let Some(metrics) = crate::metrics::get() {
            metrics.job_taken();
        }
        self.fire(DaemonEvent::JobTaken, &job_id);
        self.server.attach(&job_id);
        // testflinger.json first, exactly as received, then the journal, before any other
        // request: an agent that dies from here on leaves a job a restart can finish.
        let (rundir, outcome_file) = match prepare_rundir(&self.config, &job_id, body) {
            Ok(prepared) => prepared,
            Err(err) => {
                self.post_agent(json!({"job_id": job_id}));
                log::error!("job {job_id}: {err}");
                let body = json!({
                    "status": {"setup": crate::process::AGENT_FAILURE_EXIT_CODE},
                    "job_state": "complete",
                });
                if let Err(err) = self.server.post_result(&job_id, &body) {
                    log::warn!("job {job_id}: could not close the job: {err}");
                }
                self.back_to_waiting(None);
                return;
            }
        };
        let mut journal = Journal::taken(&job_id, crate::time::now_iso());
        // A failure is logged; the executor's next write finds it again and ends the job.
        let _ = crate::executor::save_journal(&mut journal, &self.server, &rundir);
        self.post_agent(json!({"job_id": job_id}));
        let mut spec = match JobSpec::from_json(body) {
            Ok(spec) => spec,
            Err(err) => {
                let message = format!("the agent cannot run this job: {err}");
                log::error!("job {job_id}: {message}");
                self.close_unrunnable(&job_id, &rundir, outcome_file, &message, journal);
                self.back_to_waiting(None);
                return;
            }
        };
        log::info!("job {job_id}: starting in {}", rundir.display());
        // A cancellation seen during the previous job was that job's.
        self.stop.clear(StopKind::Cancel);
        let unrunnable = if spec.attachments_complete() {
            match self.fetch_attachments(&job_id, &rundir) {
                Ok(()) => {
                    spec.drop_attachment_lists();
                    None
                }
                Err(message) => {
                    log::error!("job {job_id}: {message}");
                    Some(message)
                }
            }
        } else {
            None
        };
        let server: &dyn Server = &self.server;
        let mut executor = PhaseExecutor::new(
            &self.config,
            &spec,
            rundir.clone(),
            outcome_file,
            server,
            self.stop.clone(),
        )
        .with_journal(journal);
        if let Some(message) = unrunnable {
            executor.refuse_job(message);
        }
        executor.job_started();
        let plan = Plan::for_job(&self.config, &spec);
        let done = run_to_completion(Job::new(job_id.as_str(), plan, executor));
        let (outcome, mut executor) = done.finish();
        executor.job_finished(&outcome);
        let deferred = executor.deferred.clone();
        let journal = executor.take_journal();
        let statuses = executor.outcome_body();
        let cancelled = matches!(outcome.abort, Some(AbortReason::Cancelled { .. }))
            || executor.cancelled_after_phases();
        drop(executor);
        log::info!("job {job_id}: finished ({})", outcome.end_detail());
        let check = self.count_provision(&statuses);
        // Exit 46 with a health check: the check decides, not an administrator. Until it
        // has, the agent's own `offline` (posted during the job) stands: a stop during the
        // check leaves it, and the next start checks again.
        let deferred = match deferred {
            Some(request)
                if check.is_some()
                    && !self.stopping()
                    && self.is_own_hold(&request.state, &request.comment) =>
            {
                self.held = Some(request);
                None
            }
            other => other,
        };
        self.finish_job(&job_id, &rundir, cancelled, journal, statuses);
        self.back_to_waiting_or_check(deferred.as_ref(), check);
    }

    /// After a job: clear the job id, then carry out a request deferred during the job
    /// (offline, maintenance, restart), or go back to `waiting`.
    pub(super) fn back_to_waiting(&mut self, deferred: Option<&AgentRequest>) {
        let event = match deferred {
            _ if self.machine.state() == DaemonState::Draining => DaemonEvent::Drained,
            Some(request) if request.state == "restart" => DaemonEvent::RestartAsked,
            Some(request) => Self::hold_of(&request.state).0,
            None => DaemonEvent::JobDone,
        };
        self.fire(event, "");
        // No command runs now: reap what the job's escaped processes left as zombies.
        crate::process::reap_orphans();
        self.post_agent(json!({"job_id": ""}));
        match deferred {
            Some(request) if request.state == "restart" => {
                self.post_restart(&request.comment);
                self.restart_after_job = true;
            }
            Some(request) => {
                self.post_agent(json!({"state": request.state, "comment": request.comment}));
                self.held = Some(request.clone());
            }
            // When stopping, `run` posts `waiting` on its way out.
            None if !self.stopping() => {
                self.post_agent(json!({"state": "waiting", "comment": ""}));
            }
            None => {}
        }
    }

    fn fetch_attachments(&self, job_id: &str, rundir: &Path) -> Result<(), String> {
        let archive = rundir.join(".attachments.tar.gz");
        self.server
            .download_attachments(job_id, &archive)
            .map_err(|err| format!("downloading the attachments failed: {err}"))?;
        let unpacked = crate::attachments::unpack(&archive, &rundir.join("attachments"))
            .map_err(|err| format!("the attachments archive was refused: {err}"));
        let _ = fs::remove_file(&archive);
        unpacked
    }

    /// A job the agent cannot run at all: the reason goes into `setup.log` and the live
    /// output, setup is recorded as failed (100), and the report follows the normal path.
    fn close_unrunnable(
        &mut self,
        job_id: &str,
        rundir: &Path,
        mut outcome: OutcomeFile,
        message: &str,
        journal: Journal,
    ) {
        crate::executor::record_refusal(
            &self.server,
            job_id,
            rundir,
            &mut outcome,
            crate::phase::Phase::Setup,
            message,
        );
        let statuses = outcome.body();
        self.finish_job(job_id, rundir, false, Some(journal), statuses);
    }

    /// Whether `execution_basedir` can take a job (see [`probe_room`]). A job taken without
    /// room would only fail at once; instead the job waits on the server until there is
    /// room again. Said once each way in the log.
    pub(super) fn room_for_a_job(&mut self) -> bool {
        match probe_room(&self.config.execution_basedir) {
            Ok(()) => {
                if let Some(problem) = self.no_room.take() {
                    log::info!("execution_basedir has room again ({problem} before); taking jobs");
                }
                true
            }
            Err(err) => {
                if self.no_room.is_none() {
                    log::error!(
                        "execution_basedir {} cannot take a job ({err}); not taking jobs until it can",
                        self.config.execution_basedir.display()
                    );
                }
                self.no_room = Some(err.to_string());
                false
            }
        }
    }
}

/// The free space [`Daemon::room_for_a_job`] asks for: enough for the first files and log
/// lines of a job. (A full disk later in the job is handled where the write fails.)
const ROOM_FOR_A_JOB: u64 = 64 * 1024;

/// Whether `dir` can take a job: writable for this process, on a filesystem mounted
/// read-write with [`ROOM_FOR_A_JOB`] free for it. Two system calls, nothing written: the
/// check runs every cycle of an idle agent.
fn probe_room(dir: &Path) -> std::io::Result<()> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let stats = statvfs(dir).map_err(std::io::Error::from)?;
    if stats.flags().contains(FsFlags::ST_RDONLY) {
        return Err(std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem));
    }
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).map_err(std::io::Error::from)?;
    let free = crate::outcome::free_bytes(&stats);
    if free < ROOM_FOR_A_JOB {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("{free} bytes free, a job needs at least {ROOM_FOR_A_JOB}"),
        ));
    }
    Ok(())
}
