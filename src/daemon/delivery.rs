//! Delivery of a finished job's report: the end of a job (final state, output drained,
//! the run directory moved to the spool), the report sent from the spool (unsent live
//! output, artifacts, then the outcome), and the spool retried every cycle, oldest first,
//! across restarts.

use super::run::Daemon;
use super::spool::{self, save_pending, PENDING_OUTPUT_FILE};
use super::states::{DaemonEvent, DaemonState};
use crate::artifacts;
use crate::journal::Journal;
use crate::outcome::{self, OutcomeFile};
use crate::process::StopKind;
use crate::server::http::{HttpServer, PendingOutput};
use crate::server::{Server, ServerError};
use serde_json::{json, Map, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the end of a job waits for the live output to reach the server before the run
/// directory goes to the spool with the rest.
const OUTPUT_DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// How long an empty spool is trusted to stay empty while the agent itself puts nothing
/// into it (only the agent spools reports; this covers one moved back into
/// `results_basedir` by hand).
pub(super) const SPOOL_RELIST: Duration = Duration::from_secs(3600);

impl Daemon {
    /// The end of a job: the final state goes into the outcome file, live output is given a
    /// bounded time to drain, then the report is delivered or the run directory spooled.
    /// `statuses` is the outcome as the job kept it in memory (`{"status": {...}}`): when
    /// the file cannot be written (disk full), the report is sent from it instead.
    pub(super) fn finish_job(
        &mut self,
        job_id: &str,
        rundir: &Path,
        cancelled: bool,
        journal: Option<Journal>,
        statuses: Value,
    ) {
        if self.stopping() && self.machine.state() == DaemonState::Busy {
            self.fire(DaemonEvent::Stop, job_id);
        }
        let final_state = if cancelled { "cancelled" } else { "complete" };
        let mut unwritten = None;
        let mut journal = journal;
        match OutcomeFile::finalize(rundir, final_state) {
            Ok(()) => {
                // The outcome is final: a restart from here on only reports the job.
                if let Some(journal) = &mut journal {
                    journal.finished = true;
                    let _ = crate::executor::save_journal(journal, &self.server, rundir);
                }
            }
            Err(err) => {
                log::error!(
                    "job {job_id}: cannot finalise {}: {err}; the report is sent from memory",
                    outcome::OUTCOME_FILE
                );
                let mut body = statuses;
                body["job_state"] = json!(final_state);
                unwritten = Some(body);
            }
        }
        if let Some(journal) = &journal {
            crate::trails::keep(&self.config, journal);
        }
        let killed = self.stop.is_requested(StopKind::KillNow);
        if !killed && !self.server.drain(job_id, OUTPUT_DRAIN_LIMIT) {
            log::warn!(
                "job {job_id}: live output not fully delivered yet; it goes with the report"
            );
        }
        // Always detach: the streamer forgets the job, and what is left (if anything) is
        // recorded in the run directory, which may now move to the spool.
        let pending = self.server.detach(job_id);
        if !pending.is_empty() {
            if let Err(err) = save_pending(rundir, &pending) {
                log::error!("job {job_id}: cannot record unsent output: {err}");
            }
        }
        // Into the spool first, then report from there: whatever happens from now on (a
        // second signal, a crash, the server refusing), the results wait in the spool.
        // An outcome that could not be written is posted now or never: it is not on disk.
        let spooled = match (self.spool(job_id, rundir), &unwritten) {
            (Some(spooled), _) => spooled,
            (None, Some(_)) => rundir.to_path_buf(),
            (None, None) => return,
        };
        if killed {
            return;
        }
        let delivered = deliver_with(&self.server, &spooled, unwritten);
        self.count_spool();
        match delivered {
            Ok(()) => log::info!("job {job_id}: reported"),
            Err(err) => log::warn!(
                "job {job_id}: report not delivered yet, kept in {} for the next cycle: {err}",
                spooled.display()
            ),
        }
    }

    /// Moves a finished job's run directory into the spool; `None` when it cannot (it then
    /// stays in `execution_basedir`, and is spooled when the agent next starts).
    fn spool(&mut self, job_id: &str, rundir: &Path) -> Option<PathBuf> {
        let target = spool::unique_path(self.config.results_basedir.join(job_id));
        // Whatever the move does, the spool is listed again at the next cycle.
        self.spool_empty_since = None;
        match spool::move_dir(rundir, &target) {
            Ok(()) => {
                self.count_spool();
                Some(target)
            }
            Err(err) => {
                log::error!(
                    "job {job_id}: cannot move {} to the spool {}: {err}; it stays where it is until the agent restarts",
                    rundir.display(),
                    target.display()
                );
                None
            }
        }
    }

    /// Publishes how many reports wait in the spool.
    fn count_spool(&self) {
        publish_spooled(spool::job_dirs(&self.config.results_basedir).len());
    }

    /// Retries every spooled report, oldest first; keeps what still fails, and publishes
    /// how many are left. An idle agent's spool is empty: once a listing found it so, it
    /// is not listed again until the agent spools a report (or [`SPOOL_RELIST`] passes).
    pub(super) fn retry_spool(&mut self) {
        if self
            .spool_empty_since
            .is_some_and(|at| at.elapsed() < SPOOL_RELIST)
        {
            return;
        }
        let dirs = spool::job_dirs(&self.config.results_basedir);
        let mut left = dirs.len();
        for dir in dirs {
            if self.stopping() {
                break;
            }
            match deliver(&self.server, &dir) {
                Ok(()) => {
                    left -= 1;
                    log::info!("spooled report {} delivered", dir.display());
                }
                Err(DeliverError::Server(err)) => {
                    log::info!("spooled report {} kept for later: {err}", dir.display());
                    // The server is unreachable: the others would fail the same way.
                    if err.is_retryable() {
                        break;
                    }
                }
                Err(err) => {
                    let name = dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let aside =
                        spool::unique_path(dir.with_file_name(format!(".undeliverable-{name}")));
                    log::error!(
                        "spooled report {} cannot be delivered ({err}); moved to {}",
                        dir.display(),
                        aside.display()
                    );
                    if fs::rename(&dir, &aside).is_ok() {
                        left -= 1;
                    }
                }
            }
        }
        publish_spooled(left);
        self.spool_empty_since = (left == 0).then(Instant::now);
    }
}

/// The spooled-jobs gauge.
fn publish_spooled(count: usize) {
    if let Some(metrics) = crate::metrics::get() {
        metrics.set_spooled_jobs(count as u64);
    }
}

/// Why a report could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("{0}")]
    Local(String),
}

/// Delivers the report of one finished job from its run directory: unsent live output,
/// the artifacts, then the outcome; deletes each piece once the server took it, and the
/// directory at the end. A failure leaves what is not delivered in place for a retry.
pub fn deliver(server: &HttpServer, rundir: &Path) -> Result<(), DeliverError> {
    deliver_with(server, rundir, None)
}

/// [`deliver`], with the final outcome body given instead of read from the outcome file
/// (which could not be written). When the report does not go through, the body is written
/// to the outcome file after all (the disk may have room again by now), so that the spooled
/// report carries it; if even that fails, the log says so.
fn deliver_with(
    server: &HttpServer,
    rundir: &Path,
    outcome_body: Option<Value>,
) -> Result<(), DeliverError> {
    let delivered = deliver_from(server, rundir, outcome_body.as_ref());
    if let (Err(_), Some(body)) = (&delivered, &outcome_body) {
        let path = rundir.join(outcome::OUTCOME_FILE);
        let written = serde_json::to_vec(body)
            .map_err(std::io::Error::other)
            .and_then(|bytes| outcome::write_atomic(&path, &bytes));
        if let Err(err) = written {
            log::error!(
                "the final outcome {} cannot be kept for a later report ({err}); the spooled report may carry older statuses: {body}",
                path.display()
            );
        }
    }
    delivered
}

fn deliver_from(
    server: &HttpServer,
    rundir: &Path,
    outcome_body: Option<&Value>,
) -> Result<(), DeliverError> {
    let job_file = rundir.join(outcome::JOB_FILE);
    let raw = fs::read(&job_file)
        .map_err(|err| DeliverError::Local(format!("cannot read {}: {err}", job_file.display())))?;
    let job_id = loose_job_id(&raw).ok_or_else(|| {
        DeliverError::Local(format!("{} has no usable job_id", job_file.display()))
    })?;
    let pending_path = rundir.join(PENDING_OUTPUT_FILE);
    if pending_path.exists() {
        let mut pending: PendingOutput = fs::read(&pending_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| {
                DeliverError::Local(format!("{} is unreadable", pending_path.display()))
            })?;
        if let Err(err) = server.send_pending_resumable(&job_id, rundir, &mut pending) {
            // Keep what was accepted, so a retry (even after a restart) resends nothing twice.
            if let Err(save) = save_pending(rundir, &pending) {
                log::error!("job {job_id}: cannot record output progress: {save}");
            }
            return Err(err.into());
        }
        remove_file(&pending_path)?;
    }
    deliver_artifacts(server, &job_id, rundir)?;
    let outcome_path = rundir.join(outcome::OUTCOME_FILE);
    if let Some(body) = outcome_body {
        server.post_result(&job_id, body)?;
        // The stale file on disk (if any) must not be sent again by a later retry.
        if outcome_path.exists() {
            remove_file(&outcome_path)?;
        }
    } else if outcome_path.exists() {
        let mut body: Map<String, Value> = fs::read(&outcome_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        // A report spooled before its final state was written (or by the Python agent,
        // whose outcome may still carry the legacy output and serial keys).
        body.entry("job_state").or_insert_with(|| json!("complete"));
        body.remove("output");
        body.remove("serial");
        server.post_result(&job_id, &Value::Object(body))?;
        remove_file(&outcome_path)?;
    }
    fs::remove_dir_all(rundir)
        .map_err(|err| DeliverError::Local(format!("cannot remove {}: {err}", rundir.display())))
}

/// Uploads `artifacts/` when it holds anything. Only an unreachable server stops the
/// report (to retry later): an archive the agent cannot build or the server refuses for
/// good is logged and left out, so the outcome still goes.
fn deliver_artifacts(server: &HttpServer, job_id: &str, rundir: &Path) -> Result<(), DeliverError> {
    let archive = rundir.join(".artifacts.tar.gz");
    let packed = match artifacts::pack(rundir, &archive) {
        Ok(packed) => packed,
        Err(err) => {
            log::error!("job {job_id}: artifacts left out of the report: {err}");
            let _ = fs::remove_file(&archive);
            return Ok(());
        }
    };
    if !packed {
        return Ok(());
    }
    match server.upload_artifacts(job_id, &archive) {
        Ok(()) => {}
        Err(err) if err.is_retryable() => return Err(err.into()),
        Err(err) => log::error!("job {job_id}: the server refused the artifacts, left out: {err}"),
    }
    let _ = fs::remove_file(&archive);
    if let Err(err) = fs::remove_dir_all(rundir.join(artifacts::ARTIFACTS_DIR)) {
        log::warn!("job {job_id}: cannot remove the uploaded artifacts: {err}");
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), DeliverError> {
    fs::remove_file(path)
        .map_err(|err| DeliverError::Local(format!("cannot remove {}: {err}", path.display())))
}

/// The `job_id` of a job document, if it has a usable one, without validating the rest.
pub(super) fn loose_job_id(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let id = value.get("job_id")?.as_str()?;
    crate::job::check_job_id(id).ok()?;
    Some(id.to_owned())
}
