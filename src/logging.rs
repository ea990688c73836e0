//! The agent's own log (through the `log` crate): to stderr unless `logging_quiet`, and to
//! `<logging_basedir>/testflinger-agent.log`, rotated at local midnight as the Python agent
//! rotates it (`TimedRotatingFileHandler(when="midnight", backupCount=6)`).
//!
//! Rotation rules:
//! - The file's period starts when it is opened: at its last modification time when it
//!   already exists (so a file last written yesterday is rotated by the first line written
//!   today, as Python does), or now. The period ends at the next local midnight.
//! - The first line written after the end of the period first renames the file to
//!   `testflinger-agent.log.YYYY-MM-DD`, the local date the period started on, and opens a
//!   new one. Only the 6 newest such files are kept; other files are never touched.
//! - A dated file that already exists (the clock went back, or the file was copied back)
//!   is not replaced, unlike in Python: the lines are appended to it, so none is lost.
//! - Rotation happens under the same lock as writing, so no line is lost, duplicated or
//!   torn across it. When it fails (a rename or an open error, a full disk), the agent
//!   keeps writing to the file it has, says so once on stderr, and tries again at the next
//!   midnight.
//! - [`reopen`] (SIGHUP, for hosts that also run logrotate) reopens the path; the period
//!   then starts again from the reopened file.
//!
//! `logging_format: python` gives the Python agent's layout, in local time:
//! `[YY-MM-DD HH:MM:SS]    INFO: (file.rs:123)| message`.

use crate::time::{self, HostZone, Zone};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// The log file's name inside `logging_basedir`.
pub const LOG_FILE: &str = "testflinger-agent.log";
/// How many rotated files are kept (Python's `backupCount`).
pub const KEPT_ROTATIONS: usize = 6;

/// How the agent's log is set up (config keys logging_level, logging_quiet,
/// logging_basedir, logging_format).
#[derive(Clone, Debug)]
pub struct LogSettings {
    pub level: LevelFilter,
    pub quiet: bool,
    pub dir: PathBuf,
    pub python_format: bool,
}

struct Logger {
    level: LevelFilter,
    console: bool,
    python_format: bool,
    file: Mutex<RotatingFile>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the logger. Fails when the log directory or file cannot be created; calling it
/// twice keeps the first logger.
pub fn init(settings: &LogSettings) -> io::Result<PathBuf> {
    std::fs::create_dir_all(&settings.dir)?;
    let file = RotatingFile::open(&settings.dir, Box::new(HostZone))?;
    let path = file.path.clone();
    let logger = LOGGER.get_or_init(|| Logger {
        level: settings.level,
        console: !settings.quiet,
        python_format: settings.python_format,
        file: Mutex::new(file),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(settings.level);
    }
    Ok(path)
}

/// Reopens the log file (after logrotate moved it; the daemon calls this on SIGHUP).
pub fn reopen() {
    if let Some(logger) = LOGGER.get() {
        let mut file = logger.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(err) = file.reopen() {
            eprintln!("cannot reopen {}: {err}", file.path.display());
        }
    }
}

/// The log file with its midnight rotation. The clock is passed to [`RotatingFile::write`],
/// so tests cross midnights without waiting.
pub struct RotatingFile {
    dir: PathBuf,
    path: PathBuf,
    zone: Box<dyn Zone>,
    file: Option<File>,
    /// The local date the current period started on, and when it ends.
    period_date: String,
    period_end: SystemTime,
    /// A rotation failed and was reported; quiet until one works again.
    failing: bool,
}

impl RotatingFile {
    /// Opens (appending) `<dir>/testflinger-agent.log`.
    pub fn open(dir: &Path, zone: Box<dyn Zone>) -> io::Result<RotatingFile> {
        let path = dir.join(LOG_FILE);
        let mut rotating = RotatingFile {
            dir: dir.to_owned(),
            path,
            zone,
            file: None,
            period_date: String::new(),
            period_end: SystemTime::UNIX_EPOCH,
            failing: false,
        };
        rotating.reopen()?;
        Ok(rotating)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let started = file
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| SystemTime::now());
        self.start_period(started);
        self.file = Some(file);
        Ok(())
    }

    fn start_period(&mut self, at: SystemTime) {
        self.period_date = time::local(self.zone.as_ref(), at).date();
        self.period_end = time::next_local_midnight(self.zone.as_ref(), at);
    }

    /// Writes one whole line at `now`, rotating first when a local midnight has passed.
    /// Errors are swallowed: a full disk must not stop the agent (stderr still has it).
    pub fn write(&mut self, now: SystemTime, line: &[u8]) {
        if now >= self.period_end {
            self.rotate(now);
        }
        if let Some(file) = self.file.as_mut() {
            let _ = file.write_all(line);
        }
    }

    fn rotate(&mut self, now: SystemTime) {
        match self.try_rotate() {
            Ok(()) => self.failing = false,
            Err(err) => {
                if !self.failing {
                    eprintln!(
                        "testflinger-agent: cannot rotate {} (still writing to it): {err}",
                        self.path.display()
                    );
                }
                self.failing = true;
            }
        }
        // After a failure the old file goes on until the next midnight.
        let date = time::local(self.zone.as_ref(), now).date();
        self.period_end = time::next_local_midnight(self.zone.as_ref(), now);
        self.period_date = date;
    }

    fn try_rotate(&mut self) -> io::Result<()> {
        let dated = self.dir.join(format!("{LOG_FILE}.{}", self.period_date));
        if dated.exists() {
            // Never replace an older file of the same date: add to it.
            let mut target = OpenOptions::new().append(true).open(&dated)?;
            let mut current = File::open(&self.path)?;
            io::copy(&mut current, &mut target)?;
            target.sync_data()?;
            let fresh = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&self.path)?;
            drop(fresh);
        } else {
            std::fs::rename(&self.path, &dated)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.file = Some(file);
        self.prune();
        Ok(())
    }

    /// Deletes the rotated files beyond the newest [`KEPT_ROTATIONS`].
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let prefix = format!("{LOG_FILE}.");
        let mut dated: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.strip_prefix(&prefix).is_some_and(is_iso_date))
            .collect();
        dated.sort();
        let excess = dated.len().saturating_sub(KEPT_ROTATIONS);
        for name in &dated[..excess] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    fn flush(&mut self) {
        if let Some(file) = self.file.as_mut() {
            let _ = file.flush();
        }
    }
}

/// `YYYY-MM-DD`, digits where digits belong.
fn is_iso_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// One log line in the agent's layout: UTC timestamp, level, message.
fn agent_line(record: &Record<'_>) -> String {
    format!(
        "{} {:<5} {}\n",
        time::log_stamp(),
        record.level(),
        record.args()
    )
}

/// One log line in the Python agent's layout
/// (`[%(asctime)s] %(levelname)+7.7s: (%(filename)s:%(lineno)d)| %(message)s`).
fn python_line(zone: &dyn Zone, now: SystemTime, record: &Record<'_>) -> String {
    let level = match record.level() {
        Level::Error => "ERROR",
        Level::Warn => "WARNING",
        Level::Info => "INFO",
        Level::Debug | Level::Trace => "DEBUG",
    };
    let file = record
        .file()
        .and_then(|f| Path::new(f).file_name())
        .and_then(|f| f.to_str())
        .unwrap_or("?");
    format!(
        "[{}] {:>7.7}: ({}:{})| {}\n",
        time::local(zone, now).python_stamp(),
        level,
        file,
        record.line().unwrap_or(0),
        record.args()
    )
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = SystemTime::now();
        let line = if self.python_format {
            python_line(&HostZone, now, record)
        } else {
            agent_line(record)
        };
        if self.console {
            let _ = io::stderr().lock().write_all(line.as_bytes());
        }
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write(now, line.as_bytes());
    }

    fn flush(&self) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::FixedZone;
    use std::time::{Duration, UNIX_EPOCH};

    /// 2026-01-05 00:00:00 UTC.
    const JAN_5: u64 = 1_767_571_200;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tf-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// A fresh log file whose period starts at `start` (its mtime).
    fn log_file(dir: &Path, start: SystemTime, zone: i64) -> RotatingFile {
        let path = dir.join(LOG_FILE);
        let file = File::create(&path).expect("create log");
        file.set_modified(start).expect("set mtime");
        drop(file);
        RotatingFile::open(dir, Box::new(FixedZone(zone))).expect("open log")
    }

    #[test]
    fn a_midnight_rotates_to_the_dated_name_losing_nothing() {
        let dir = scratch("midnight");
        // UTC+2: local midnight of Jan 6 is Jan 5 22:00 UTC.
        let mut log = log_file(&dir, at(JAN_5 + 3600), 7200);
        log.write(at(JAN_5 + 20 * 3600), b"before 1\n");
        log.write(at(JAN_5 + 22 * 3600 - 1), b"before 2\n");
        log.write(at(JAN_5 + 22 * 3600), b"after 1\n");
        log.write(at(JAN_5 + 23 * 3600), b"after 2\n");
        assert_eq!(
            read(&dir.join("testflinger-agent.log.2026-01-05")),
            "before 1\nbefore 2\n"
        );
        assert_eq!(read(&dir.join(LOG_FILE)), "after 1\nafter 2\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn at_most_six_rotated_files_are_kept_and_others_are_untouched() {
        let dir = scratch("keep");
        std::fs::write(dir.join("unrelated.txt"), "x").expect("write");
        std::fs::write(dir.join("testflinger-agent.log.old"), "x").expect("write");
        let mut log = log_file(&dir, at(JAN_5), 0);
        for day in 0..9 {
            log.write(
                at(JAN_5 + day * 86_400 + 60),
                format!("day {day}\n").as_bytes(),
            );
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "testflinger-agent.log",
                "testflinger-agent.log.2026-01-07",
                "testflinger-agent.log.2026-01-08",
                "testflinger-agent.log.2026-01-09",
                "testflinger-agent.log.2026-01-10",
                "testflinger-agent.log.2026-01-11",
                "testflinger-agent.log.2026-01-12",
                "testflinger-agent.log.old",
                "unrelated.txt",
            ]
        );
        assert_eq!(
            read(&dir.join("testflinger-agent.log.2026-01-12")),
            "day 7\n"
        );
        assert_eq!(read(&dir.join(LOG_FILE)), "day 8\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_last_written_on_an_earlier_day_is_rotated_under_that_day() {
        let dir = scratch("mtime");
        let path = dir.join(LOG_FILE);
        std::fs::write(&path, "from three days ago\n").expect("write");
        File::options()
            .write(true)
            .open(&path)
            .expect("open")
            .set_modified(at(JAN_5 + 12 * 3600))
            .expect("mtime");
        let mut log = RotatingFile::open(&dir, Box::new(FixedZone(0))).expect("open");
        log.write(at(JAN_5 + 3 * 86_400 + 5), b"today\n");
        assert_eq!(
            read(&dir.join("testflinger-agent.log.2026-01-05")),
            "from three days ago\n"
        );
        assert_eq!(read(&path), "today\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_existing_dated_file_is_added_to_not_replaced() {
        let dir = scratch("collide");
        std::fs::write(dir.join("testflinger-agent.log.2026-01-05"), "earlier\n").expect("w");
        let mut log = log_file(&dir, at(JAN_5 + 60), 0);
        log.write(at(JAN_5 + 120), b"later\n");
        log.write(at(JAN_5 + 86_400 + 1), b"next day\n");
        assert_eq!(
            read(&dir.join("testflinger-agent.log.2026-01-05")),
            "earlier\nlater\n"
        );
        assert_eq!(read(&dir.join(LOG_FILE)), "next day\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_rotation_keeps_writing_and_retries_the_next_midnight() {
        let dir = scratch("fail");
        let mut log = log_file(&dir, at(JAN_5 + 60), 0);
        log.write(at(JAN_5 + 120), b"one\n");
        // The rename target is a directory that is not empty: the rename fails, and so does
        // appending to it.
        let blocker = dir.join("testflinger-agent.log.2026-01-05");
        std::fs::create_dir(&blocker).expect("mkdir");
        std::fs::write(blocker.join("x"), "x").expect("write");
        log.write(at(JAN_5 + 86_400 + 1), b"two\n");
        assert_eq!(read(&dir.join(LOG_FILE)), "one\ntwo\n", "still written");
        log.write(at(JAN_5 + 2 * 86_400 + 1), b"three\n");
        assert_eq!(
            read(&dir.join("testflinger-agent.log.2026-01-06")),
            "one\ntwo\n"
        );
        assert_eq!(read(&dir.join(LOG_FILE)), "three\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_from_many_threads_across_a_midnight_are_each_written_once_whole() {
        let dir = scratch("threads");
        let log = Mutex::new(log_file(&dir, at(JAN_5), 0));
        let clock = std::sync::atomic::AtomicU64::new(JAN_5 + 86_000);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (log, clock) = (&log, &clock);
                scope.spawn(move || {
                    for i in 0..500 {
                        let now = clock.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let line = format!("thread {t} line {i} {}\n", "x".repeat(100));
                        log.lock().expect("lock").write(at(now), line.as_bytes());
                    }
                });
            }
        });
        let text = read(&dir.join("testflinger-agent.log.2026-01-05")) + &read(&dir.join(LOG_FILE));
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2000);
        lines.sort_unstable();
        lines.dedup();
        assert_eq!(lines.len(), 2000, "no line twice");
        assert!(
            lines.iter().all(|l| l.ends_with(&"x".repeat(100))),
            "no torn line"
        );
        assert!(
            !read(&dir.join(LOG_FILE)).is_empty(),
            "some lines after midnight"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn python_layout_pads_and_cuts_the_level_and_names_the_file() {
        let now = at(JAN_5 + 14 * 3600 + 2 * 60 + 11);
        let zone = FixedZone(3600);
        let line = |level: Level, file: Option<&'static str>, line: Option<u32>| {
            python_line(
                &zone,
                now,
                &Record::builder()
                    .level(level)
                    .file(file)
                    .line(line)
                    .args(format_args!("the message"))
                    .build(),
            )
        };
        assert_eq!(
            line(Level::Info, Some("src/daemon/run.rs"), Some(147)),
            "[26-01-05 15:02:11]    INFO: (run.rs:147)| the message\n"
        );
        assert_eq!(
            line(Level::Warn, Some("src/x.rs"), Some(1)),
            "[26-01-05 15:02:11] WARNING: (x.rs:1)| the message\n"
        );
        assert_eq!(
            line(Level::Error, Some("a.rs"), Some(2)),
            "[26-01-05 15:02:11]   ERROR: (a.rs:2)| the message\n"
        );
        assert_eq!(
            line(Level::Trace, None, None),
            "[26-01-05 15:02:11]   DEBUG: (?:0)| the message\n"
        );
    }

    #[test]
    fn iso_dates_only() {
        assert!(is_iso_date("2026-01-05"));
        assert!(!is_iso_date("2026-01-5"));
        assert!(!is_iso_date("old"));
        assert!(!is_iso_date("2026_01_05"));
    }
}
