//! `testflinger-agent run-job`: one job, run locally with no server, end to end.

use crate::config::Config;
use crate::executor::{save_journal, PhaseExecutor, MARKER_DIR};
use crate::job::JobSpec;
use crate::journal::Journal;
use crate::lifecycle::{run_to_completion, Job, JobOutcome, PhaseStatus, Plan};
use crate::outcome::{self, OutcomeFile};
use crate::phase::Phase;
use crate::process::StopSignal;
use crate::server::local::LocalServer;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// With a terminal (or a pipe) on standard output, how long at most a command's output,
/// written into its log by the command itself, waits to be copied there after a quiet spell
/// (a look at the log's length: next to nothing).
const LIVE_FOLLOW_PAUSE_MAX: Duration = Duration::from_millis(100);

/// Why a job could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RunJobError {
    #[error(
        "cannot create the execution directory {path} (config key execution_basedir): {source}"
    )]
    Basedir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("run directory {path} already exists: remove it or give the job another job_id")]
    RundirExists { path: PathBuf },
    #[error("cannot prepare run directory {path}: {source}")]
    Rundir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
}

/// A finished local job: where it ran and what happened.
#[derive(Debug)]
pub struct LocalRun {
    pub rundir: PathBuf,
    pub outcome: JobOutcome,
}

/// Creates `<execution_basedir>/<job_id>` and writes the files a job starts with:
/// `testflinger.json` holding `document` (owner-only: it may hold secrets),
/// `testflinger-outcome.json` as `{}` and an empty `device-connector-error.json`.
/// `job_id` must have passed [`crate::job::check_job_id`].
pub fn prepare_rundir(
    config: &Config,
    job_id: &str,
    document: &[u8],
) -> Result<(PathBuf, OutcomeFile), RunJobError> {
    let base = &config.execution_basedir;
    fs::create_dir_all(base).map_err(|source| RunJobError::Basedir {
        path: base.clone(),
        source,
    })?;
    let rundir = base.join(job_id);
    match fs::create_dir(&rundir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            return Err(RunJobError::RundirExists { path: rundir })
        }
        Err(source) => {
            return Err(RunJobError::Rundir {
                path: rundir,
                source,
            })
        }
    }
    match write_job_files(&rundir, document) {
        Ok(outcome) => Ok((rundir, outcome)),
        Err(source) => Err(RunJobError::Rundir {
            path: rundir,
            source,
        }),
    }
}

fn write_job_files(rundir: &Path, document: &[u8]) -> io::Result<OutcomeFile> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(rundir.join(outcome::JOB_FILE))?;
    file.write_all(document)?;
    let outcome = OutcomeFile::create(rundir)?;
    outcome::reset_connector_error(rundir)?;
    Ok(outcome)
}

/// Runs `spec` locally: output to standard output, files in the run directory, and the
/// job's trail (its journal) there and under `<logging_basedir>/trails/`, as the daemon
/// keeps them, for `explain`.
pub fn run_local(
    config: &Config,
    spec: &JobSpec,
    stop: StopSignal,
) -> Result<LocalRun, RunJobError> {
    crate::process::become_subreaper()?;
    crate::process::claim_orphans();
    let (rundir, outcome_file) = prepare_rundir(config, spec.job_id(), &spec.document_json())?;
    log::info!("job {}: running in {}", spec.job_id(), rundir.display());
    // A command without secrets writes its log itself, and standard output follows the log.
    let server = LocalServer::new();
    // The same trail as the daemon's jobs, for `explain`: the journal in the run directory,
    // written at every transition. A failure is logged; the executor's next write finds it
    // again and ends the job.
    let mut journal = Journal::taken(spec.job_id(), crate::time::now_iso());
    journal.local = true;
    let _ = save_journal(&mut journal, &server, &rundir);
    let mut executor =
        PhaseExecutor::new(config, spec, rundir.clone(), outcome_file, &server, stop)
            .with_offline_marker(PathBuf::from(MARKER_DIR))
            .with_journal(journal);
    if server.has_live_reader() {
        // Someone watches the output: a quiet command's next line shows within this.
        executor = executor.with_follow_pause_max(LIVE_FOLLOW_PAUSE_MAX);
    }
    executor.job_started();
    let plan = Plan::for_job(config, spec);
    let done = run_to_completion(Job::new(spec.job_id(), plan, executor));
    let (outcome, mut executor) = done.finish();
    executor.job_finished(&outcome);
    if let Some(mut journal) = executor.take_journal() {
        // Finished, for `explain`. Marked local, the directory is left alone by a daemon
        // sharing execution_basedir, finished or not.
        journal.finished = true;
        let _ = save_journal(&mut journal, &server, &rundir);
        crate::trails::keep(config, &journal);
    }
    crate::process::reap_orphans();
    Ok(LocalRun { rundir, outcome })
}

/// The per-phase summary table printed at the end of `run-job`.
pub fn summary(run: &LocalRun) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\n{:<16} {:<8} {:>5} {:>10}  {}\n",
        "phase", "result", "exit", "duration", "how it ended"
    ));
    for phase in Phase::ALL {
        let record = run.outcome.records.iter().find(|r| r.phase == phase);
        let line = match record.map(|r| r.status) {
            Some(PhaseStatus::Ran(result)) => format!(
                "{:<16} {:<8} {:>5} {:>9.3}s  {}",
                phase.name(),
                "ran",
                result.exit_code,
                result.duration.as_secs_f64(),
                result.end.describe()
            ),
            Some(PhaseStatus::Skipped(reason)) => format!(
                "{:<16} {:<8} {:>5} {:>10}  {}",
                phase.name(),
                "skipped",
                "-",
                "-",
                reason.describe(phase)
            ),
            None => format!(
                "{:<16} {:<8} {:>5} {:>10}  {}",
                phase.name(),
                "not run",
                "-",
                "-",
                run.outcome
                    .abort
                    .map(|a| format!("job ended by {} in {}", a.event_name(), a.phase()))
                    .unwrap_or_default()
            ),
        };
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let verdict = if run.outcome.succeeded() {
        "job succeeded".to_owned()
    } else {
        match run.outcome.abort {
            Some(reason) => format!("job failed: {} in {}", reason.event_name(), reason.phase()),
            None => "job failed: a phase exited non-zero".to_owned(),
        }
    };
    out.push_str(&format!(
        "\n{verdict}\nrun directory: {dir}\nthe job's path: testflinger-agent explain {dir}\n",
        dir = run.rundir.display()
    ));
    out
}
