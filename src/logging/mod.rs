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

mod format;
mod rotate;
mod syslog;

pub use format::{
    format_line, journal_line, parse_journal_stream, stderr_is_journal, syslog_priority, Format,
    JOURNAL_STREAM_VAR,
};
pub use rotate::RotatingFile;

use log::{LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::path::PathBuf;
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
