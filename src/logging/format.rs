//! The layout of a log line: the agent's own and the Python agent's, and the journald
//! form (a `<priority>` prefix, no timestamp) used when systemd reads stderr.

use crate::time::{local_time, log_stamp_at};
use log::{Level, Record};
use std::fs::File;
use std::time::SystemTime;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::from_unix_secs;
    use std::time::Duration;

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
}
