//! The agent's log file, rotated at local midnight and pruned to the newest
//! [`BACKUP_COUNT`] files (the rules are in the [`logging`](super) module doc).

use super::{LogError, BACKUP_COUNT, LOG_FILE, RETRY_AFTER};
use crate::time::{local_time, next_local_midnight};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::{Console, Format, Logger};
    use crate::time::{from_unix_secs, unix_secs, LocalTime};
    use log::{Level, LevelFilter, Log, Record};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Mutex;

    /// A scratch directory removed on drop (its `TempDir`), even when the test fails.
    struct Scratch(tempfile::TempDir);

    impl Scratch {
        fn new(name: &str) -> Self {
            Scratch(crate::testing::tempdir(&format!("logging-{name}")))
        }

        fn log(&self) -> PathBuf {
            self.0.path().join(LOG_FILE)
        }

        fn rotated(&self, date: &str) -> PathBuf {
            self.0.path().join(format!("{LOG_FILE}.{date}"))
        }

        fn names(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(self.0.path())
                .expect("the scratch dir lists")
                .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
                .collect();
            names.sort();
            names
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
            std::fs::write(dir.0.path().join(name), "keep me").expect("writable");
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
            assert_eq!(read(&dir.0.path().join(name)), "keep me");
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
        std::fs::rename(dir.log(), dir.0.path().join("moved")).expect("renames");
        log.reopen(noon(1)).expect("reopens");
        assert_eq!(log.rollover_at(), next_local_midnight(noon(1)));
        log.write_line(noon(1), b"after\n");
        assert_eq!(read(&dir.0.path().join("moved")), "before logrotate\n");
        assert_eq!(read(&dir.log()), "after\n");
        assert_eq!(dir.names(), vec!["moved".to_string(), LOG_FILE.to_string()]);
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
