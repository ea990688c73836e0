//! The agent's own log (through the `log` crate): to stderr unless `logging_quiet`, and to
//! `<logging_basedir>/testflinger-agent.log`, which [`reopen`] reopens after a logrotate.

use crate::time::log_stamp;
use log::{LevelFilter, Log, Metadata, Record};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The log file's name inside `logging_basedir`.
pub const LOG_FILE: &str = "testflinger-agent.log";

struct Logger {
    level: LevelFilter,
    console: bool,
    path: PathBuf,
    file: Mutex<Option<File>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the logger. Fails when the log directory or file cannot be created; calling it
/// twice keeps the first logger.
pub fn init(level: LevelFilter, quiet: bool, dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(LOG_FILE);
    let file = open(&path)?;
    let logger = LOGGER.get_or_init(|| Logger {
        level,
        console: !quiet,
        path: path.clone(),
        file: Mutex::new(Some(file)),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
    Ok(path)
}

/// Reopens the log file (after logrotate moved it; the daemon calls this on SIGHUP).
pub fn reopen() {
    if let Some(logger) = LOGGER.get() {
        let reopened = open(&logger.path);
        let mut slot = logger.file.lock().unwrap_or_else(|e| e.into_inner());
        match reopened {
            Ok(file) => *slot = Some(file),
            Err(err) => eprintln!("cannot reopen {}: {err}", logger.path.display()),
        }
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!("{} {:<5} {}\n", log_stamp(), record.level(), record.args());
        if self.console {
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
        let mut slot = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = slot.as_mut() {
            // A full disk must not stop the agent; stderr still has the line.
            let _ = file.write_all(line.as_bytes());
        }
    }

    fn flush(&self) {
        let mut slot = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = slot.as_mut() {
            let _ = file.flush();
        }
    }
}
