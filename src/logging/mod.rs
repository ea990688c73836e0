//! The agent's own log (through the `log` crate): to stderr unless `logging_quiet`, and to
//! `<logging_basedir>/testflinger-agent.log`, rotated at local midnight as the Python agent's
//! `TimedRotatingFileHandler(when="midnight", backupCount=6)` rotates it.
//!
//! Rotation rules ([`RotatingFile`]):
//! - **When.** A file's period begins when it is opened: at the file's mtime if it already
//!   exists (so a log last written yesterday belongs to yesterday), else now. The period ends
//!   at the next local midnight (the host's zone, `TZ` honoured; a DST day lasts 23 or 25
//!   hours). Rotation happens when a line is about to be written after that, never on a timer,
//!   under the same lock as the writes, so no line is lost, duplicated or split across files.
//! - **Naming.** The file is renamed `testflinger-agent.log.YYYY-MM-DD`, the local date on
//!   which its period began (the day whose lines it holds, as Python names it), and a new
//!   `testflinger-agent.log` is opened. A log left untouched for several days is named after
//!   the day it was last written.
//! - **Kept.** After each rotation only the [`BACKUP_COUNT`] (6) newest files named exactly
//!   `testflinger-agent.log.YYYY-MM-DD` are kept (by date in the name); older ones are
//!   deleted. Nothing else in the directory is touched.
//! - **Collision.** If `testflinger-agent.log.YYYY-MM-DD` already exists (two periods that
//!   began on the same date, e.g. after the clock went back), Python deletes the older file.
//!   This agent loses nothing instead: the current file's lines are appended to the existing
//!   dated file (which then holds that date's lines in the order they were written) and the
//!   current file is emptied in place. The name stays Python's, so tools that expect it, and
//!   the count of kept files, are unchanged.
//! - **Errors.** A rotation that fails (rename, open, copy, disk full, a directory in the way)
//!   is undone as far as possible and never stops the agent: lines keep going to the file
//!   already open (and to stderr), one warning goes to stderr per run of failures, and the
//!   rotation is tried again [`RETRY_AFTER`] later. A failure to write a line is ignored
//!   (stderr still has it).
//! - **SIGHUP.** [`reopen`] reopens the path (for hosts that also run logrotate); the new
//!   file's period begins at its mtime, or now when logrotate moved the old one away.
//!
//! Line layouts ([`Format`]): `agent` (the default), `2026-01-05 10:00:00.123Z INFO  message`
//! in UTC; `python` (config `logging_format: python`), the Python agent's
//! `[%y-%m-%d %H:%M:%S] %(levelname)+7.7s: (%(filename)s:%(lineno)d)| %(message)s` in local
//! time, e.g. `[25-11-30 14:02:11]    INFO: (run.rs:147)| message`. Both outputs get the same
//! line, except under journald.
//!
//! **Under journald** (systemd set `JOURNAL_STREAM` to the `device:inode` of the agent's
//! stderr, as `systemd.exec(5)` describes) the journal stamps each line itself, so stderr
//! lines lose their timestamp and start with the `sd-daemon(3)` priority prefix instead:
//! `<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace, on every line of a
//! multi-line message, e.g. `<6>INFO  job 7: starting`. The log file keeps its layout.
//!
//! **Syslog** (config `logging_syslog`): every line also goes, as RFC 3164 with the
//! message alone, to the syslog socket (`logging_syslog_socket`, `/dev/log` by default)
//! through the `syslog` crate, which stays in [`syslog`]. A socket that is absent at start-up
//! is one warning, and the agent goes on with stderr and the file.

mod syslog;

use crate::time::{local_time, log_stamp_at, next_local_midnight};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

/// The log file's name inside `logging_basedir`.
pub const LOG_FILE: &str = "testflinger-agent.log";

/// How many rotated files are kept (Python's `backupCount`).
pub const BACKUP_COUNT: usize = 6;

/// How long after a failed rotation the next attempt is made.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

/// What went wrong opening or rotating the agent log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot create the log directory {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the log file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot rename {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot append {from} to the existing {to}: {source}")]
    Merge {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot delete the old log {path}: {source}")]
    Prune {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the agent's log is set up (config keys `logging_level`, `logging_quiet`,
/// `logging_basedir`, `logging_format`, `logging_syslog`, `logging_syslog_socket`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub level: LevelFilter,
    pub quiet: bool,
    pub dir: PathBuf,
    pub python_format: bool,
    /// Also to syslog, when set.
    pub syslog: Option<SyslogSettings>,
}

/// Where syslog lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogSettings {
    /// The facility's name: `user`, `daemon`, `local0` to `local7`.
    pub facility: String,
    /// The syslog daemon's datagram (or stream) socket.
    pub socket: PathBuf,
}

/// The variable systemd sets to the `device:inode` of the stream its journal reads.
pub const JOURNAL_STREAM_VAR: &str = "JOURNAL_STREAM";

/// The layout of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `2026-01-05 10:00:00.123Z INFO  message` (UTC).
    Agent,
    /// `[25-11-30 14:02:11]    INFO: (run.rs:147)| message` (local time), as Python's agent.
    Python,
}

/// `record` as one line (with its newline) in `format`, stamped `at`.
pub fn format_line(format: Format, at: SystemTime, record: &Record<'_>) -> String {
    match format {
        Format::Agent => format!("{} {}\n", log_stamp_at(at), unstamped(format, record)),
        Format::Python => format!(
            "[{}] {}\n",
            local_time(at).python_stamp(),
            unstamped(format, record)
        ),
    }
}

/// `record` in `format` without its timestamp and newline.
fn unstamped(format: Format, record: &Record<'_>) -> String {
    match format {
        Format::Agent => format!("{:<5} {}", record.level(), record.args()),
        Format::Python => {
            let file = record
                .file()
                .map_or("?", |f| f.rsplit_once('/').map_or(f, |(_, base)| base));
            format!(
                "{}: ({}:{})| {}",
                python_level(record.level()),
                file,
                record.line().unwrap_or(0),
                record.args()
            )
        }
    }
}

/// The syslog priority (severity) of `level`: error 3, warning 4, info 6, debug and trace 7.
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// `record` as stderr lines for journald: no timestamp (the journal has its own), every
/// line opened by its `<priority>` prefix.
pub fn journal_line(format: Format, record: &Record<'_>) -> String {
    let prefix = format!("<{}>", syslog_priority(record.level()));
    let body = unstamped(format, record);
    // Python's right-aligned level name would open the line with spaces.
    let body = body.trim_start();
    let mut out = String::with_capacity(body.len() + prefix.len() + 1);
    for line in body.split('\n') {
        out.push_str(&prefix);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Whether `JOURNAL_STREAM` (`device:inode`, decimal) names the agent's stderr: then
/// systemd connected stderr to the journal. A stderr redirected elsewhere by a wrapper
/// does not match, and keeps the timestamps.
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(wanted) = std::env::var(JOURNAL_STREAM_VAR)
        .ok()
        .as_deref()
        .and_then(parse_journal_stream)
    else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    File::from(fd)
        .metadata()
        .is_ok_and(|m| (m.dev(), m.ino()) == wanted)
}

/// `device:inode` as systemd writes it.
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Python's level name for `level` in `%(levelname)+7.7s`.
fn python_level(level: Level) -> String {
    fit7(match level {
        Level::Error => "ERROR",
        Level::Warn => "WARNING",
        Level::Info => "INFO",
        Level::Debug | Level::Trace => "DEBUG",
    })
}

/// `%+7.7s`: cut at 7 characters, then right-aligned in 7 columns.
fn fit7(name: &str) -> String {
    let cut: String = name.chars().take(7).collect();
    format!("{cut:>7}")
}

/// A log file that rotates itself at local midnight (the rules are in the module doc). The
/// caller passes the time of every write, so tests cross midnight without waiting.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    /// When the current period ends (the local midnight after it began).
    rollover_at: SystemTime,
    /// After a failed rotation, the earliest moment of the next attempt.
    retry_at: Option<SystemTime>,
    /// A warning was printed for the current run of failures.
    warned: bool,
    /// Warnings printed so far (the tests' window on "warn once").
    warnings: usize,
}

impl RotatingFile {
    /// Opens (or creates) `path` for appending; its period begins at its mtime when it
    /// exists, else at `now`.
    pub fn open(path: &Path, now: SystemTime) -> Result<Self, LogError> {
        let (file, rollover_at) = open_period(path, now)?;
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            rollover_at,
            retry_at: None,
            warned: false,
            warnings: 0,
        })
    }

    /// The path written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the current period ends.
    pub fn rollover_at(&self) -> SystemTime {
        self.rollover_at
    }

    /// How many rotation warnings went to stderr.
    pub fn warnings(&self) -> usize {
        self.warnings
    }

    /// Writes `line` at `now`, rotating first when the period has ended. Never fails: a
    /// rotation error is warned about and writing goes on in the current file.
    pub fn write_line(&mut self, now: SystemTime, line: &[u8]) {
        if now >= self.rollover_at && self.retry_at.is_none_or(|at| now >= at) {
            self.rotate(now);
        }
        // A full disk must not stop the agent; stderr still has the line.
        let _ = self.file.write_all(line);
    }

    /// Reopens the path (after logrotate moved it); the period starts again from the
    /// reopened file's mtime, or `now` when it had to be created. On error the current file
    /// stays in use.
    pub fn reopen(&mut self, now: SystemTime) -> Result<(), LogError> {
        let (file, rollover_at) = open_period(&self.path, now)?;
        self.file = file;
        self.rollover_at = rollover_at;
        self.retry_at = None;
        self.warned = false;
        Ok(())
    }

    /// Flushes the file (a no-op for `File`, kept for the `Log` contract).
    pub fn flush(&mut self) {
        let _ = self.file.flush();
    }

    fn rotate(&mut self, now: SystemTime) {
        let result = self.move_aside().and_then(|()| {
            self.rollover_at = next_local_midnight(now);
            self.retry_at = None;
            self.prune()
        });
        match result {
            Ok(()) => self.warned = false,
            Err(err) => {
                if self.rollover_at <= now {
                    // The file was not moved: try again later, keep writing here.
                    self.retry_at = now.checked_add(RETRY_AFTER);
                }
                if !self.warned {
                    self.warned = true;
                    self.warnings += 1;
                    eprintln!(
                        "testflinger-agent: agent log rotation: {err}; still writing to {}",
                        self.path.display()
                    );
                }
            }
        }
    }

    /// The name the current file takes: the local date its period began.
    fn rotated_path(&self) -> PathBuf {
        let began = self
            .rollover_at
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(self.rollover_at);
        let mut name = self.file_name();
        name.push('.');
        name.push_str(&local_time(began).date_string());
        self.path.with_file_name(name)
    }

    fn file_name(&self) -> String {
        self.path.file_name().map_or_else(
            || LOG_FILE.to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// Moves the current file's lines to the dated name and leaves an empty current file.
    fn move_aside(&mut self) -> Result<(), LogError> {
        let target = self.rotated_path();
        if std::fs::symlink_metadata(&target).is_ok() {
            return self.merge_into(&target);
        }
        std::fs::rename(&self.path, &target).map_err(|source| LogError::Rename {
            from: self.path.clone(),
            to: target.clone(),
            source,
        })?;
        match open_log(&self.path) {
            Ok(file) => {
                self.file = file;
                Ok(())
            }
            Err(source) => {
                // Put the file back; if that fails too, the open handle still writes to it.
                let _ = std::fs::rename(&target, &self.path);
                Err(LogError::Open {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// The collision rule: append the current file to `target`, then empty the current file.
    /// On failure `target` is cut back to its old length, so no line ends up in both.
    fn merge_into(&self, target: &Path) -> Result<(), LogError> {
        let fail = |source| LogError::Merge {
            from: self.path.clone(),
            to: target.to_path_buf(),
            source,
        };
        let mut dst = OpenOptions::new().append(true).open(target).map_err(fail)?;
        let before = dst.metadata().map_err(fail)?.len();
        let copied = (&self.file)
            .seek(SeekFrom::Start(0))
            .and_then(|_| std::io::copy(&mut &self.file, &mut dst))
            .and_then(|_| dst.sync_data())
            .and_then(|()| self.file.set_len(0));
        if let Err(err) = copied {
            let _ = dst.set_len(before);
            return Err(fail(err));
        }
        Ok(())
    }

    /// Deletes all but the newest [`BACKUP_COUNT`] `<name>.YYYY-MM-DD` files.
    fn prune(&self) -> Result<(), LogError> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let prefix = format!("{}.", self.file_name());
        let entries = std::fs::read_dir(dir).map_err(|source| LogError::Prune {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut dated: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.strip_prefix(&prefix).is_some_and(is_date))
            .collect();
        if dated.len() <= BACKUP_COUNT {
            return Ok(());
        }
        dated.sort();
        let excess = dated.len() - BACKUP_COUNT;
        for name in &dated[..excess] {
            let path = dir.join(name);
            std::fs::remove_file(&path).map_err(|source| LogError::Prune { path, source })?;
        }
        Ok(())
    }
}

/// `YYYY-MM-DD`, digits only.
fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

fn open_log(path: &Path) -> std::io::Result<File> {
    // Read as well as append: the collision rule copies the file's lines out of this handle.
    OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .open(path)
}

/// Opens `path` and works out when its period ends.
fn open_period(path: &Path, now: SystemTime) -> Result<(File, SystemTime), LogError> {
    let began = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(now);
    let file = open_log(path).map_err(|source| LogError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((file, next_local_midnight(began)))
}

/// Where and how stderr lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Console {
    /// `logging_quiet`: none.
    Off,
    /// The same line as the file.
    Plain,
    /// journald: [`journal_line`].
    Journal,
}

struct Logger {
    level: LevelFilter,
    console: Console,
    format: Format,
    clock: fn() -> SystemTime,
    file: Mutex<RotatingFile>,
    syslog: Option<Mutex<syslog::Sink>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the logger and returns the log file's path. Fails when the log directory or file
/// cannot be created; calling it twice keeps the first logger.
pub fn init(settings: &LogSettings) -> Result<PathBuf, LogError> {
    std::fs::create_dir_all(&settings.dir).map_err(|source| LogError::CreateDir {
        dir: settings.dir.clone(),
        source,
    })?;
    let path = settings.dir.join(LOG_FILE);
    let file = RotatingFile::open(&path, SystemTime::now())?;
    let mut syslog_problem = None;
    let logger = LOGGER.get_or_init(|| Logger {
        level: settings.level,
        console: if settings.quiet {
            Console::Off
        } else if stderr_is_journal() {
            Console::Journal
        } else {
            Console::Plain
        },
        format: if settings.python_format {
            Format::Python
        } else {
            Format::Agent
        },
        clock: SystemTime::now,
        file: Mutex::new(file),
        syslog: settings.syslog.as_ref().and_then(|s| {
            match syslog::Sink::connect(&s.facility, &s.socket) {
                Ok(sink) => Some(Mutex::new(sink)),
                Err(err) => {
                    syslog_problem = Some(err);
                    None
                }
            }
        }),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(settings.level);
    }
    if let Some(problem) = syslog_problem {
        log::warn!(
            "{problem}; logging to stderr and the log file only (config key logging_syslog)"
        );
    }
    Ok(path)
}

/// Reopens the log file (after logrotate moved it; the daemon calls this on SIGHUP).
pub fn reopen() {
    if let Some(logger) = LOGGER.get() {
        let mut file = logger.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(err) = file.reopen((logger.clock)()) {
            eprintln!("testflinger-agent: {err}");
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = {
            // The time is read under the lock, so lines reach the file in time order and a
            // line stamped before midnight never lands in the next day's file.
            let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
            let now = (self.clock)();
            let line = format_line(self.format, now, record);
            file.write_line(now, line.as_bytes());
            line
        };
        match self.console {
            Console::Off => {}
            Console::Plain => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Console::Journal => {
                let line = journal_line(self.format, record);
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
        if let Some(sink) = &self.syslog {
            let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
            sink.send(record.level(), &record.args().to_string(), (self.clock)());
        }
    }

    fn flush(&self) {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{from_unix_secs, unix_secs, LocalTime};
    use std::sync::atomic::{AtomicI64, Ordering};

    /// A scratch directory removed on drop, even when the test fails.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "tf-logging-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("the temp dir is writable");
            Scratch(dir)
        }

        fn log(&self) -> PathBuf {
            self.0.join(LOG_FILE)
        }

        fn rotated(&self, date: &str) -> PathBuf {
            self.0.join(format!("{LOG_FILE}.{date}"))
        }

        fn names(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&self.0)
                .expect("the scratch dir lists")
                .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn date_of(at: SystemTime) -> String {
        local_time(at).date_string()
    }

    /// A local noon some days after a fixed date, in this host's zone.
    fn noon(day: i64) -> SystemTime {
        let base = from_unix_secs(1_767_607_200 + day * 86_400); // 2026-01-05T10:00Z
        let midnight = next_local_midnight(base);
        midnight + Duration::from_secs(12 * 3600)
    }

    #[test]
    fn rotates_at_local_midnight() {
        let dir = Scratch::new("midnight");
        let start = noon(0);
        let mut log = RotatingFile::open(&dir.log(), start).expect("opens");
        let midnight = log.rollover_at();
        assert_eq!(midnight, next_local_midnight(start));
        let before = midnight - Duration::from_millis(1);
        log.write_line(start, b"one\n");
        log.write_line(before, b"two\n");
        log.write_line(midnight, b"three\n");
        log.write_line(midnight + Duration::from_secs(3600), b"four\n");
        let old = dir.rotated(&date_of(start));
        assert_eq!(read(&old), "one\ntwo\n");
        assert_eq!(read(&dir.log()), "three\nfour\n");
        assert_eq!(dir.names().len(), 2, "{:?}", dir.names());
        assert_eq!(log.rollover_at(), next_local_midnight(midnight));
        assert_eq!(log.warnings(), 0);
    }

    #[test]
    fn keeps_the_six_newest() {
        let dir = Scratch::new("keep");
        let unrelated = [
            format!("{LOG_FILE}.2001-01-01.gz"),
            format!("{LOG_FILE}.old"),
            "other.log.2001-01-01".to_string(),
            format!("{LOG_FILE}.2001-1-01"),
        ];
        for name in &unrelated {
            std::fs::write(dir.0.join(name), "keep me").expect("writable");
        }
        // A directory with a rotated file's name is not a rotated file either.
        let lookalike = dir.rotated("2000-01-01");
        std::fs::create_dir(&lookalike).expect("writable");
        let mut log = RotatingFile::open(&dir.log(), noon(0)).expect("opens");
        let mut dates = Vec::new();
        for day in 0..=8 {
            dates.push(date_of(noon(day)));
            log.write_line(noon(day), format!("day {day}\n").as_bytes());
        }
        // Eight midnights: days 0..=7 were rotated, day 8 is current.
        let kept: Vec<String> = dates[2..8]
            .iter()
            .map(|d| format!("{LOG_FILE}.{d}"))
            .collect();
        let mut expected: Vec<String> = unrelated.to_vec();
        expected.extend(kept.iter().cloned());
        expected.push(LOG_FILE.to_string());
        expected.push(format!("{LOG_FILE}.2000-01-01"));
        expected.sort();
        assert_eq!(dir.names(), expected);
        for name in &unrelated {
            assert_eq!(read(&dir.0.join(name)), "keep me");
        }
        for (day, date) in dates.iter().enumerate().take(8).skip(2) {
            assert_eq!(read(&dir.rotated(date)), format!("day {day}\n"));
        }
        assert_eq!(read(&dir.log()), "day 8\n");
        assert!(lookalike.is_dir());
        assert_eq!(log.warnings(), 0);
    }

    #[test]
    fn an_old_log_at_start_up_rotates_under_its_own_date() {
        let dir = Scratch::new("startup");
        std::fs::write(dir.log(), "from an earlier day\n").expect("writable");
        let earlier = noon(0) - Duration::from_secs(3 * 86_400);
        File::options()
            .write(true)
            .open(dir.log())
            .and_then(|f| f.set_modified(earlier))
            .expect("sets the mtime");
        let today = noon(0);
        let mut log = RotatingFile::open(&dir.log(), today).expect("opens");
        assert_eq!(log.rollover_at(), next_local_midnight(earlier));
        log.write_line(today, b"today\n");
        assert_eq!(
            read(&dir.rotated(&date_of(earlier))),
            "from an earlier day\n"
        );
        assert_eq!(read(&dir.log()), "today\n");
        assert_eq!(log.rollover_at(), next_local_midnight(today));
    }

    #[test]
    fn a_taken_name_gets_the_lines_appended() {
        let dir = Scratch::new("collision");
        let day = noon(0);
        std::fs::write(dir.rotated(&date_of(day)), "rotated earlier\n").expect("writable");
        let mut log = RotatingFile::open(&dir.log(), day).expect("opens");
        log.write_line(day, b"later the same day\n");
        log.write_line(noon(1), b"next day\n");
        assert_eq!(
            read(&dir.rotated(&date_of(day))),
            "rotated earlier\nlater the same day\n"
        );
        assert_eq!(read(&dir.log()), "next day\n");
        assert_eq!(log.warnings(), 0);
    }

    #[test]
    fn a_failed_rotation_keeps_writing_and_retries() {
        let dir = Scratch::new("failure");
        let day = noon(0);
        // A directory where the rotated file should go: neither rename nor append can work.
        let blocker = dir.rotated(&date_of(day));
        std::fs::create_dir(&blocker).expect("writable");
        std::fs::write(blocker.join("inside"), "untouched").expect("writable");
        let mut log = RotatingFile::open(&dir.log(), day).expect("opens");
        log.write_line(day, b"a\n");
        let next = log.rollover_at();
        log.write_line(next, b"b\n");
        log.write_line(next + Duration::from_secs(1), b"c\n");
        log.write_line(next + RETRY_AFTER, b"d\n");
        assert_eq!(read(&dir.log()), "a\nb\nc\nd\n");
        assert_eq!(log.warnings(), 1, "one warning for a run of failures");
        assert_eq!(read(&blocker.join("inside")), "untouched");
        // Once the way is clear, the next retry rotates every line written so far.
        std::fs::remove_dir_all(&blocker).expect("removable");
        let retry = next + RETRY_AFTER * 2;
        log.write_line(retry - Duration::from_secs(1), b"e\n");
        log.write_line(retry, b"f\n");
        assert_eq!(read(&blocker), "a\nb\nc\nd\ne\n");
        assert_eq!(read(&dir.log()), "f\n");
        assert_eq!(log.rollover_at(), next_local_midnight(retry));
        assert_eq!(log.warnings(), 1);
    }

    #[test]
    fn reopen_starts_a_new_period() {
        let dir = Scratch::new("reopen");
        let mut log = RotatingFile::open(&dir.log(), noon(0)).expect("opens");
        log.write_line(noon(0), b"before logrotate\n");
        std::fs::rename(dir.log(), dir.0.join("moved")).expect("renames");
        log.reopen(noon(1)).expect("reopens");
        assert_eq!(log.rollover_at(), next_local_midnight(noon(1)));
        log.write_line(noon(1), b"after\n");
        assert_eq!(read(&dir.0.join("moved")), "before logrotate\n");
        assert_eq!(read(&dir.log()), "after\n");
        assert_eq!(dir.names(), vec!["moved".to_string(), LOG_FILE.to_string()]);
    }

    fn line_for(
        format: Format,
        at: SystemTime,
        level: Level,
        file: Option<&str>,
        line: Option<u32>,
    ) -> String {
        format_line(
            format,
            at,
            &Record::builder()
                .level(level)
                .file(file)
                .line(line)
                .args(format_args!("the message: {}", 42))
                .build(),
        )
    }

    #[test]
    fn python_layout() {
        let at = from_unix_secs(1_764_511_331) + Duration::from_millis(987);
        let local = local_time(at);
        let stamp = format!(
            "{:02}-{:02}-{:02} {:02}:{:02}:{:02}",
            local.year % 100,
            local.month,
            local.day,
            local.hour,
            local.minute,
            local.second
        );
        let cases = [
            (Level::Error, "  ERROR"),
            (Level::Warn, "WARNING"),
            (Level::Info, "   INFO"),
            (Level::Debug, "  DEBUG"),
            (Level::Trace, "  DEBUG"),
        ];
        for (level, name) in cases {
            let line = line_for(
                Format::Python,
                at,
                level,
                Some("src/daemon/run.rs"),
                Some(147),
            );
            let rest = line.strip_prefix('[').expect("opens with [");
            let (got_stamp, rest) = rest.split_at(17);
            assert_eq!(got_stamp, stamp, "{line}");
            let rest = rest.strip_prefix("] ").expect("] after the stamp");
            let (got_level, rest) = rest.split_at(7);
            assert_eq!(got_level, name, "{line}");
            let rest = rest.strip_prefix(": (").expect(": ( after the level");
            let (place, rest) = rest.split_once(")| ").expect(")| after the place");
            assert_eq!(place, "run.rs:147", "{line}");
            assert_eq!(rest, "the message: 42\n", "{line}");
        }
        let unknown = line_for(Format::Python, at, Level::Info, None, None);
        assert!(
            unknown.ends_with("   INFO: (?:0)| the message: 42\n"),
            "{unknown}"
        );
        assert_eq!(fit7("CRITICAL"), "CRITICA");
        assert_eq!(fit7("X"), "      X");
    }

    #[test]
    fn agent_layout_is_unchanged() {
        let at = from_unix_secs(1_767_607_200) + Duration::from_millis(123);
        let line = line_for(Format::Agent, at, Level::Warn, Some("x.rs"), Some(1));
        assert_eq!(line, "2026-01-05 10:00:00.123Z WARN  the message: 42\n");
        let line = line_for(Format::Agent, at, Level::Error, None, None);
        assert_eq!(line, "2026-01-05 10:00:00.123Z ERROR the message: 42\n");
    }

    #[test]
    fn journal_lines_have_a_priority_and_no_stamp() {
        let record = |level| {
            journal_line(
                Format::Agent,
                &Record::builder()
                    .level(level)
                    .args(format_args!("first\nsecond"))
                    .build(),
            )
        };
        assert_eq!(record(Level::Error), "<3>ERROR first\n<3>second\n");
        assert_eq!(record(Level::Warn), "<4>WARN  first\n<4>second\n");
        assert_eq!(record(Level::Info), "<6>INFO  first\n<6>second\n");
        assert_eq!(record(Level::Debug), "<7>DEBUG first\n<7>second\n");
        assert_eq!(record(Level::Trace), "<7>TRACE first\n<7>second\n");
        let python = journal_line(
            Format::Python,
            &Record::builder()
                .level(Level::Warn)
                .file(Some("src/daemon/run.rs"))
                .line(Some(9))
                .args(format_args!("careful"))
                .build(),
        );
        assert_eq!(python, "<4>WARNING: (run.rs:9)| careful\n");
        let python = journal_line(
            Format::Python,
            &Record::builder()
                .level(Level::Info)
                .args(format_args!("fine"))
                .build(),
        );
        assert_eq!(python, "<6>INFO: (?:0)| fine\n");
    }

    #[test]
    fn journal_stream_values() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream(" 0:1\n"), Some((0, 1)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("a:1"), None);
        assert_eq!(parse_journal_stream("1:-2"), None);
    }

    /// The concurrency test's clock: one millisecond later at every reading.
    static RACE_NOW_MS: AtomicI64 = AtomicI64::new(0);

    fn race_clock() -> SystemTime {
        let ms = RACE_NOW_MS.fetch_add(1, Ordering::SeqCst);
        from_unix_secs(ms.div_euclid(1000)) + Duration::from_millis(ms.rem_euclid(1000) as u64)
    }

    #[test]
    fn threads_crossing_midnight_lose_nothing() {
        const THREADS: usize = 4;
        const LINES: usize = 250;
        let dir = Scratch::new("threads");
        let start = noon(0);
        let midnight = next_local_midnight(start);
        // Half the lines before midnight, half after.
        let first_ms = unix_secs(midnight) * 1000 - (THREADS * LINES / 2) as i64;
        RACE_NOW_MS.store(first_ms, Ordering::SeqCst);
        let logger = Logger {
            level: LevelFilter::Trace,
            console: Console::Off,
            format: Format::Python,
            clock: race_clock,
            file: Mutex::new(RotatingFile::open(&dir.log(), start).expect("opens")),
            syslog: None,
        };
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let logger = &logger;
                s.spawn(move || {
                    for n in 0..LINES {
                        logger.log(
                            &Record::builder()
                                .level(Level::Info)
                                .file(Some("src/logging.rs"))
                                .line(Some(7))
                                .args(format_args!("thread {t} line {n}"))
                                .build(),
                        );
                    }
                });
            }
        });
        let old_day: LocalTime = local_time(midnight - Duration::from_secs(1));
        let new_day: LocalTime = local_time(midnight);
        let mut seen = vec![vec![0u32; LINES]; THREADS];
        let mut count = [0usize; 2];
        for (i, (path, day)) in [
            (dir.rotated(&date_of(start)), old_day),
            (dir.log(), new_day),
        ]
        .iter()
        .enumerate()
        {
            let text = read(path);
            assert!(text.ends_with('\n'));
            for line in text.lines() {
                let rest = line
                    .strip_prefix(&format!("[{}", &day.python_stamp()[..8]))
                    .unwrap_or_else(|| panic!("{line} in {} has another date", path.display()));
                let (_, message) = rest
                    .split_once("]    INFO: (logging.rs:7)| thread ")
                    .unwrap_or_else(|| panic!("torn line {line:?}"));
                let (t, n) = message.split_once(" line ").expect("thread and line");
                let t: usize = t.parse().expect("a thread number");
                let n: usize = n.parse().expect("a line number");
                seen[t][n] += 1;
                count[i] += 1;
            }
        }
        assert!(
            seen.iter().flatten().all(|&c| c == 1),
            "every line exactly once"
        );
        assert_eq!(count, [THREADS * LINES / 2, THREADS * LINES / 2]);
        assert_eq!(dir.names().len(), 2);
    }
}
