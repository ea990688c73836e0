//! The device health check (`healthcheck_command`): its settings, and one run of it.
//!
//! A check runs like a phase command, outside any job: `/bin/sh -c` in its own process group
//! with its own phase token, the agent's environment plus the config's string values, the
//! same kill rules ([`crate::process::run_command`]: `healthcheck_timeout` ends it like a
//! phase's global timeout, SIGTERM to the tree, `termination_grace_period`, SIGKILL; a stop of
//! the agent ends it the same way). Its output goes byte-exact to
//! `<logging_basedir>/healthchecks/<time>.log`, its trail (the journal's format, for
//! `explain`) to `<time>.trail.json` beside it (the last [`LOGS_KEPT`] checks are kept), the
//! agent log gets one summary line, and `last.json` beside the logs records the last result
//! for `check-config`. What the result means for the agent (its own `maintenance`, the retries)
//! is the daemon's business; the one-shot `testflinger-agent healthcheck` uses the same run.

use crate::config::Config;
use crate::journal::{CheckSummary, CommandEnd, Journal, Why};
use crate::process::{self, CommandSpec, OutputSink, StopSignal, Termination};
use serde_json::json;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// How many check logs stay under `<logging_basedir>/healthchecks/`; the oldest go first.
pub const LOGS_KEPT: usize = 20;
/// The folder of the check logs, under `logging_basedir`.
pub const LOG_DIR: &str = "healthchecks";
/// The last check's summary, in [`LOG_DIR`] (JSON: `at`, `result`, `duration_seconds`,
/// `exit_code`, `last_line`, `log`).
pub const LAST_FILE: &str = "last.json";
/// The longest wait between retries of a failing check, unless `healthcheck_retry_interval`
/// is longer.
pub const RETRY_CAP: Duration = Duration::from_secs(3600);
/// How often the main loop is told it is alive while a check runs (the check runs on it).
const BEAT_EVERY: Duration = Duration::from_secs(5);
/// The longest last output line kept for the summary and the server comment, in characters.
const LAST_LINE_MAX: usize = 200;

/// The health-check keys of the config, when `healthcheck_command` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    pub command: String,
    pub timeout: Duration,
    /// Jobs in a row whose provision failed before a check; 0: never for this reason.
    pub after_failures: u64,
    /// Time between checks while idle; `None`: never.
    pub interval: Option<Duration>,
    /// The first wait before a failed check runs again.
    pub retry_interval: Duration,
    pub on_start: bool,
}

impl HealthSettings {
    /// The settings, `None` when `healthcheck_command` is absent or blank.
    pub fn from_config(config: &Config) -> Option<HealthSettings> {
        let command = config
            .healthcheck_command
            .as_deref()
            .filter(|c| !c.trim().is_empty())?
            .to_owned();
        let interval = config.healthcheck_interval;
        Some(HealthSettings {
            command,
            timeout: Duration::from_secs(config.healthcheck_timeout),
            after_failures: config.healthcheck_after_failures,
            interval: (interval > 0).then(|| Duration::from_secs(interval)),
            retry_interval: Duration::from_secs(config.healthcheck_retry_interval.max(1)),
            on_start: config.healthcheck_on_start,
        })
    }

    /// The wait before retry number `failures` (1 after the first failed check): the retry
    /// interval, doubling with each failure, capped at an hour (or at the interval itself,
    /// when it is longer).
    pub fn retry_after(&self, failures: u32) -> Duration {
        let cap = RETRY_CAP.max(self.retry_interval);
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        self.retry_interval.saturating_mul(factor).min(cap)
    }
}

/// How a check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// Exit status 0.
    Pass,
    /// Any other exit, a signal, or output that could not be recorded.
    Fail,
    /// Killed at `healthcheck_timeout`.
    Timeout,
}

impl CheckResult {
    pub const ALL: [CheckResult; 3] = [CheckResult::Pass, CheckResult::Fail, CheckResult::Timeout];

    /// The name in logs, `/health`, the metrics' `result` label and `last.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Pass => "pass",
            CheckResult::Fail => "fail",
            CheckResult::Timeout => "timeout",
        }
    }
}

/// One finished check.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckReport {
    /// `None`: the agent was stopped while the check ran (no verdict on the device).
    pub result: Option<CheckResult>,
    /// When it started (ISO 8601, UTC).
    pub at: String,
    pub started: SystemTime,
    pub duration: Duration,
    /// The Testflinger exit code (247 when the agent killed it).
    pub exit_code: i32,
    /// The last non-empty line of its output, trimmed and bounded; `""` when it printed none.
    pub last_line: String,
    /// Its log file, when one could be written.
    pub log: Option<PathBuf>,
}

impl CheckReport {
    /// The comment of the agent's own `maintenance` after this check failed.
    pub fn failure_comment(&self) -> String {
        let what = match (self.result, self.last_line.as_str()) {
            (Some(CheckResult::Timeout), "") => "timed out".to_owned(),
            (Some(CheckResult::Timeout), line) => format!("timed out; {line}"),
            (_, "") => format!("exit status {}", self.exit_code),
            (_, line) => line.to_owned(),
        };
        format!("{FAILED_COMMENT_PREFIX}{}: {what}", self.at)
    }
}

/// How the comment of the agent's own `maintenance` starts: a record whose state is
/// `maintenance` and whose comment starts so was put there by this agent's health check,
/// and only a check (or an administrator) lifts it.
pub const FAILED_COMMENT_PREFIX: &str = "health check failed at ";

/// Whether a `maintenance` comment is the agent's own (see [`FAILED_COMMENT_PREFIX`]).
pub fn is_own_comment(comment: &str) -> bool {
    comment.starts_with(FAILED_COMMENT_PREFIX)
}

/// Why a check could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum HealthCheckError {
    #[error("cannot prepare the health check's directory {path}: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run the health check (config key healthcheck_command): {0}")]
    Process(#[from] crate::process::ProcessError),
}

/// Runs the check once and records it (log file, summary line, `last.json`); `why` says
/// what asked for it, for the log. The command runs in `<execution_basedir>/healthcheck`.
pub fn run_check(
    config: &Config,
    settings: &HealthSettings,
    stop: &StopSignal,
    why: &str,
) -> Result<CheckReport, HealthCheckError> {
    let cwd = config.execution_basedir.join("healthcheck");
    fs::create_dir_all(&cwd).map_err(|source| HealthCheckError::Directory {
        path: cwd.clone(),
        source,
    })?;
    let log_dir = config.logging_basedir.join(LOG_DIR);
    let started = SystemTime::now();
    let at = crate::time::iso_at(started);
    let (file, log) = match open_log(&log_dir, &at) {
        Ok((file, path)) => (Some(file), Some(path)),
        Err(err) => {
            log::error!(
                "health check: cannot open a log in {} ({err}); its output is not kept",
                log_dir.display()
            );
            (None, None)
        }
    };
    let env: Vec<(OsString, OsString)> = config
        .command_env()
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    let spec = CommandSpec {
        command: settings.command.clone(),
        cwd,
        env,
        global_timeout: Some(settings.timeout),
        output_timeout: None,
        grace_period: config.grace_period(),
        straggler_wait: config.straggler_wait(),
        honour_cancel: false,
        honour_shutdown: true,
        shutdown_budget: None,
        oom_score_adj: Some(config.oom_score_adj),
    };
    log::info!("health check starting ({why}): {}", settings.command);
    let mut sink = CheckSink {
        file,
        tail: Vec::new(),
        failed: false,
    };
    let outcome = run_beating(&spec, &mut sink, stop)?;
    let result = match outcome.termination {
        Termination::Exited(0) => Some(CheckResult::Pass),
        Termination::GlobalTimeout | Termination::OutputTimeout => Some(CheckResult::Timeout),
        Termination::Shutdown | Termination::Cancelled => None,
        Termination::Exited(_) | Termination::Signaled(_) | Termination::Unrecordable => {
            Some(CheckResult::Fail)
        }
    };
    if let Some(file) = &mut sink.file {
        let _ = file.flush();
    }
    let report = CheckReport {
        result,
        at,
        started,
        duration: outcome.duration,
        exit_code: outcome.termination.exit_code(),
        last_line: last_line(&sink.tail),
        log,
    };
    log::info!(
        "health check ({why}): {} in {:.1} s, exit status {}{}; last line {:?}; output in {}",
        result.map_or("interrupted by the agent's stop", CheckResult::as_str),
        report.duration.as_secs_f64(),
        report.exit_code,
        if outcome.needed_sigkill {
            ", SIGKILL needed"
        } else {
            ""
        },
        report.last_line,
        report
            .log
            .as_ref()
            .map_or_else(|| "no file".to_owned(), |p| p.display().to_string())
    );
    if report.result.is_some() {
        write_last(&log_dir, &report);
    }
    keep_trail(&log_dir, &report, &outcome, why);
    prune_logs(&log_dir, LOGS_KEPT);
    Ok(report)
}

/// The trail of one check, in the journal's format so that `explain` reads it like a
/// job's: a start entry and an end entry (exit code, how the command's tree ended), and
/// the check's summary. Beside the check's log as `<stem>.trail.json`.
pub fn trail_of(report: &CheckReport, outcome: &process::CommandOutcome, why: &str) -> Journal {
    let stem = report
        .log
        .as_deref()
        .and_then(log_stem)
        .unwrap_or_else(|| name_stem(&report.at));
    let mut journal = Journal::taken(&format!("healthcheck-{stem}"), report.at.clone());
    if let Some(first) = journal.trail.first_mut() {
        first.to = CHECKING.to_owned();
        first.phase = Some(TRAIL_PHASE.to_owned());
        first.why = Why::CheckStarted;
    }
    journal.state = CHECKING.to_owned();
    let (to, why_end) = match (report.result, outcome.termination) {
        (Some(CheckResult::Pass), _) => ("Passed", Why::Exit),
        (Some(CheckResult::Timeout), _) => ("TimedOut", Why::GlobalTimeout),
        (None, _) => ("Interrupted", Why::Shutdown),
        (Some(CheckResult::Fail), Termination::Signaled(_)) => ("Failed", Why::Signal),
        (Some(CheckResult::Fail), Termination::Unrecordable) => ("Failed", Why::StorageFailed),
        (Some(CheckResult::Fail), _) => ("Failed", Why::Exit),
    };
    let ended = crate::time::iso_at(report.started + report.duration);
    journal.transition(
        ended,
        to,
        Some(TRAIL_PHASE),
        why_end,
        Some(report.exit_code),
    );
    journal.annotate_last(CommandEnd::of(outcome));
    journal.set_status(TRAIL_PHASE, report.exit_code);
    journal.finished = true;
    journal.check = Some(CheckSummary {
        why: why.to_owned(),
        result: report
            .result
            .map_or(INTERRUPTED, CheckResult::as_str)
            .to_owned(),
        duration_ms: u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
        last_line: report.last_line.clone(),
        log: report.log.as_ref().map(|p| p.display().to_string()),
    });
    journal
}

/// The trail's state while the check runs.
const CHECKING: &str = "Checking";
/// The phase name a check's trail shows.
const TRAIL_PHASE: &str = "healthcheck";
/// The result a check's trail records when the agent's stop ended it.
const INTERRUPTED: &str = "interrupted";
/// How a check's trail file ends; its stem is its log's.
pub const TRAIL_SUFFIX: &str = ".trail.json";

/// Writes the check's trail beside its log; a failure is logged, the check's result stands.
fn keep_trail(dir: &Path, report: &CheckReport, outcome: &process::CommandOutcome, why: &str) {
    let journal = trail_of(report, outcome, why);
    let stem = journal
        .job_id
        .strip_prefix("healthcheck-")
        .unwrap_or(&journal.job_id)
        .to_owned();
    let path = dir.join(format!("{stem}{TRAIL_SUFFIX}"));
    if let Err(err) = fs::create_dir_all(dir).and_then(|()| fs::write(&path, journal.to_bytes())) {
        log::warn!(
            "health check: its trail is not kept in {}: {err}",
            path.display()
        );
    }
}

/// The name a check's files share, from its start time (`:` left out).
fn name_stem(at: &str) -> String {
    at.chars().filter(|c| *c != ':').collect()
}

/// The stem of a check's log file (`<stem>.log`).
fn log_stem(log: &Path) -> Option<String> {
    Some(log.file_name()?.to_str()?.strip_suffix(".log")?.to_owned())
}

/// The stem of a check's file: its log (`<stem>.log`) or its trail (`<stem>.trail.json`).
fn check_file_stem(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".log")
        .or_else(|| name.strip_suffix(TRAIL_SUFFIX))
        .map(str::to_owned)
}

/// The check trail `explain` reads for `path`, when `path` names one of the health checks'
/// files rather than a job's: their directory (its newest check, with how many it holds)
/// or a check's log (its trail beside it). `None` for any other path.
pub fn trail_for(path: &Path) -> Option<(PathBuf, usize)> {
    if path.is_dir() {
        if path.join(crate::journal::JOURNAL_FILE).exists() {
            return None;
        }
        let trails = trails_in(path);
        let count = trails.len();
        return trails.into_iter().next().map(|newest| (newest, count));
    }
    let stem = path.file_name()?.to_str()?.strip_suffix(".log")?;
    let trail = path.with_file_name(format!("{stem}{TRAIL_SUFFIX}"));
    trail.is_file().then_some((trail, 1))
}

/// The check trails kept in `dir`, newest first (their names sort by start time); none
/// when `dir` cannot be read.
pub fn trails_in(dir: &Path) -> Vec<PathBuf> {
    let mut trails: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(TRAIL_SUFFIX))
            })
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => return Vec::new(),
    };
    trails.sort();
    trails.reverse();
    trails
}

/// [`process::run_command`] with a thread beside it that beats for the main loop (a check
/// may run for `healthcheck_timeout`, longer than the health endpoint's stall limit).
fn run_beating(
    spec: &CommandSpec,
    sink: &mut CheckSink,
    stop: &StopSignal,
) -> Result<process::CommandOutcome, process::ProcessError> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(BEAT_EVERY) {
                crate::metrics::beat();
            }
        });
        let result = process::run_command(spec, sink, stop);
        drop(done_tx);
        result
    })
}

/// Where a check's output goes: its log file as it comes, and the end of it in memory for
/// the last line.
struct CheckSink {
    file: Option<File>,
    tail: Vec<u8>,
    /// A write to the file failed (logged once; the command runs on).
    failed: bool,
}

/// How much of the output's end is kept to find the last line.
const TAIL_BYTES: usize = 4096;

impl OutputSink for CheckSink {
    fn output(&mut self, chunk: &[u8]) {
        if let Some(file) = &mut self.file {
            if let Err(err) = file.write_all(chunk) {
                if !self.failed {
                    log::error!("health check: cannot write its log: {err}");
                }
                self.failed = true;
            }
        }
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 2 * TAIL_BYTES {
            self.tail.drain(..self.tail.len() - TAIL_BYTES);
        }
    }
}

/// The last non-empty line of `tail`, printable characters only, at most
/// [`LAST_LINE_MAX`] characters.
fn last_line(tail: &[u8]) -> String {
    let text = String::from_utf8_lossy(tail);
    let line = text
        .split(['\n', '\r'])
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    line.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(LAST_LINE_MAX)
        .collect()
}

/// Creates `dir` and a new log in it named after `at` (`:` left out; a suffix when two
/// checks start in the same microsecond).
fn open_log(dir: &Path, at: &str) -> std::io::Result<(File, PathBuf)> {
    fs::create_dir_all(dir)?;
    let stem = name_stem(at);
    for n in 0..100u32 {
        let name = if n == 0 {
            format!("{stem}.log")
        } else {
            format!("{stem}-{n}.log")
        };
        let path = dir.join(name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => return Ok((file, path)),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
    }
    Err(std::io::Error::other("no free log name"))
}

/// Removes the oldest checks of `dir` beyond `keep`: each check's log and its trail go
/// together (their names share a stem that sorts by time).
fn prune_logs(dir: &Path, keep: usize) {
    let files: Vec<(String, PathBuf)> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter_map(|p| Some((check_file_stem(&p)?, p)))
            .collect(),
        Err(_) => return,
    };
    let mut stems: Vec<&str> = files.iter().map(|(stem, _)| stem.as_str()).collect();
    stems.sort_unstable();
    stems.dedup();
    if stems.len() <= keep {
        return;
    }
    let old = &stems[..stems.len() - keep];
    for (_, path) in files
        .iter()
        .filter(|(stem, _)| old.contains(&stem.as_str()))
    {
        if let Err(err) = fs::remove_file(path) {
            log::warn!(
                "health check: cannot remove the old file {}: {err}",
                path.display()
            );
        }
    }
}

/// Records the last check in `dir/last.json` (written whole, then renamed).
fn write_last(dir: &Path, report: &CheckReport) {
    let body = json!({
        "at": report.at,
        "result": report.result.map(CheckResult::as_str),
        "duration_seconds": (report.duration.as_secs_f64() * 10.0).round() / 10.0,
        "exit_code": report.exit_code,
        "last_line": report.last_line,
        "log": report.log.as_ref().map(|p| p.display().to_string()),
    });
    let path = dir.join(LAST_FILE);
    if let Err(err) = crate::outcome::write_atomic(&path, body.to_string().as_bytes()) {
        log::warn!(
            "health check: cannot record it in {}: {err}",
            path.display()
        );
    }
}

/// The last check recorded under `logging_basedir`, for `check-config`: one line, `None`
/// when no check has run there (or its record cannot be read).
pub fn describe_last(logging_basedir: &Path) -> Option<String> {
    let path = logging_basedir.join(LOG_DIR).join(LAST_FILE);
    let value: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or("?");
    Some(format!(
        "last health check at {}: {} in {} s (exit status {}; last line {:?}; output in {})",
        text("at"),
        text("result"),
        value
            .get("duration_seconds")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0),
        value
            .get("exit_code")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(-1),
        text("last_line"),
        text("log"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(retry: u64) -> HealthSettings {
        HealthSettings {
            command: "true".into(),
            timeout: Duration::from_secs(1),
            after_failures: 3,
            interval: None,
            retry_interval: Duration::from_secs(retry),
            on_start: false,
        }
    }

    #[test]
    fn retries_double_up_to_an_hour() {
        let s = settings(600);
        let waits: Vec<u64> = (1..=6).map(|n| s.retry_after(n).as_secs()).collect();
        assert_eq!(waits, [600, 1200, 2400, 3600, 3600, 3600]);
        assert_eq!(settings(7200).retry_after(3).as_secs(), 7200);
        assert_eq!(settings(1).retry_after(u32::MAX).as_secs(), 3600);
    }

    #[test]
    fn the_last_line_is_the_last_non_empty_one_and_bounded() {
        assert_eq!(last_line(b"one\ntwo  \n\n\r\n"), "two");
        assert_eq!(last_line(b""), "");
        assert_eq!(last_line(b"a\x1b[0mb\n"), "a [0mb");
        assert_eq!(last_line(&[b'x'; 500]).len(), LAST_LINE_MAX);
        assert_eq!(last_line(b"\xff\xfeok\n"), "\u{fffd}\u{fffd}ok");
    }

    #[test]
    fn the_failure_comment_is_recognised_as_the_agents_own() {
        let mut report = CheckReport {
            result: Some(CheckResult::Fail),
            at: "2026-01-05T10:00:00.000000+00:00".into(),
            started: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            exit_code: 3,
            last_line: "serial console silent".into(),
            log: None,
        };
        let comment = report.failure_comment();
        assert_eq!(
            comment,
            "health check failed at 2026-01-05T10:00:00.000000+00:00: serial console silent"
        );
        assert!(is_own_comment(&comment));
        assert!(!is_own_comment("firmware rollout"));
        report.last_line.clear();
        assert!(report.failure_comment().ends_with(": exit status 3"));
        report.result = Some(CheckResult::Timeout);
        assert!(report.failure_comment().ends_with(": timed out"));
    }

    #[test]
    fn old_logs_go_first() {
        let tmp = crate::testing::tempdir("hc-prune");
        let dir = tmp.path().to_path_buf();
        for n in 0..25 {
            fs::write(dir.join(format!("2026-01-01T00{n:02}.log")), b"x").expect("write");
            // Every other check kept a trail beside its log.
            if n % 2 == 0 {
                fs::write(
                    dir.join(format!("2026-01-01T00{n:02}{TRAIL_SUFFIX}")),
                    b"{}",
                )
                .expect("write");
            }
        }
        // A trail whose log could not be written counts as a check of its own.
        fs::write(dir.join(format!("2026-01-01T0005-1{TRAIL_SUFFIX}")), b"{}").expect("write");
        fs::write(dir.join(LAST_FILE), b"{}").expect("write");
        prune_logs(&dir, LOGS_KEPT);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let logs = left.iter().filter(|n| n.ends_with(".log")).count();
        // The newest 20 checks are 05-1 (a trail alone) and 06..=24 (19 logs, 10 trails).
        assert_eq!(logs, LOGS_KEPT - 1, "{left:?}");
        assert_eq!(left.len(), 19 + 10 + 1 + 1, "{left:?}");
        assert_eq!(left[0], "2026-01-01T0005-1.trail.json");
        assert_eq!(left[1], "2026-01-01T0006.log");
        assert!(
            !left.iter().any(|n| n.starts_with("2026-01-01T0004")),
            "{left:?}"
        );
        assert_eq!(trails_in(&dir).len(), 11);
        assert!(trails_in(&dir)[0].ends_with("2026-01-01T0024.trail.json"));
        assert!(left.contains(&LAST_FILE.to_owned()));
    }
}
