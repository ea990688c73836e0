//! Finds a phase's processes in `/proc`: members of its process group and any process
//! whose environment carries the phase token. Pure reading and parsing, no signals.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable that marks every process a phase starts.
pub(crate) const TOKEN_VAR: &str = "TESTFLINGER_PHASE_TOKEN";

/// The fields of `/proc/PID/stat` the sweep needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: i32,
    /// One-letter state: `R`, `S`, `D`, `Z` (zombie), `T`, `X`...
    pub state: u8,
    pub ppid: i32,
    pub pgrp: i32,
    /// The kernel's flags word (field 9).
    pub flags: u64,
    /// Start time in clock ticks since boot.
    pub starttime: u64,
    /// A hash of the command name (field 2): it changes when the process execs, which the
    /// pid and start time do not show.
    pub comm: u64,
}

/// `PF_EXITING` in the flags word: the process is inside `exit()`.
const PF_EXITING: u64 = 0x4;

impl ProcStat {
    /// Whether the process is still running code: not a zombie, not already gone, and not
    /// on its way out (it has closed its files in `exit()`, so it no longer holds the
    /// output, but has not become a zombie yet).
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, b'Z' | b'X' | b'x') && self.flags & PF_EXITING == 0
    }
}

/// Parses the content of `/proc/PID/stat`. The command name (field 2) may contain spaces
/// and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &[u8]) -> Option<ProcStat> {
    let open = text.iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')')?;
    let pid = parse_num(text.get(..open)?.trim_ascii())?;
    let name = text.get(open + 1..close)?;
    let rest = text.get(close + 1..)?;
    // Fields after the name, numbered from 3 (state) as in proc(5).
    let mut fields = rest.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let state = *fields.next()?.first()?;
    let ppid = parse_num(fields.next()?)?;
    let pgrp = parse_num(fields.next()?)?;
    // Fields 6..=8 are not needed; field 9 is flags, field 22 starttime.
    let flags = parse_num(fields.nth(9 - 6)?)?;
    let starttime = parse_num(fields.nth(22 - 10)?)?;
    Some(ProcStat {
        pid: i32::try_from(pid).ok()?,
        state,
        ppid: i32::try_from(ppid).ok()?,
        pgrp: i32::try_from(pgrp).ok()?,
        flags: u64::try_from(flags).ok()?,
        starttime: u64::try_from(starttime).ok()?,
        comm: name_hash(name),
    })
}

/// FNV-1a of a command name: enough to tell that a process exec'd another program.
fn name_hash(name: &[u8]) -> u64 {
    name.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn parse_num(field: &[u8]) -> Option<i64> {
    std::str::from_utf8(field).ok()?.trim().parse().ok()
}

/// The exact environment entry `TESTFLINGER_PHASE_TOKEN=<token>`.
pub(crate) fn token_entry(token: &str) -> Vec<u8> {
    format!("{TOKEN_VAR}={token}").into_bytes()
}

/// Whether a NUL-separated environment block contains exactly `entry`.
pub(crate) fn environ_has(environ: &[u8], entry: &[u8]) -> bool {
    environ.split(|&b| b == 0).any(|e| e == entry)
}

/// Reads one process's stat; `None` when it is gone or unreadable.
pub(crate) fn read_stat(pid: i32, buf: &mut Vec<u8>) -> Option<ProcStat> {
    // One read() is enough for the whole line (the name is at most 64 bytes) and is what
    // makes a scan of /proc cheap; a longer line falls back to reading to the end.
    let mut file = File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut line = [0u8; 1024];
    let n = file.read(&mut line).ok()?;
    if n < line.len() {
        return parse_stat(&line[..n]);
    }
    buf.clear();
    buf.extend_from_slice(&line);
    file.read_to_end(buf).ok()?;
    parse_stat(buf)
}

fn read_into(path: &str, buf: &mut Vec<u8>) -> Option<()> {
    buf.clear();
    File::open(path).ok()?.read_to_end(buf).ok()?;
    Some(())
}

/// Set by [`claim_orphans`].
static ORPHANS_ARE_THE_PHASES: AtomicBool = AtomicBool::new(false);

/// Declares that this process runs one command at a time and starts no other child: every
/// orphan it adopts as subreaper belongs to the running phase, so the sweep kills those
/// too, even when they dropped the phase token from their environment (`env -i`, `sudo`)
/// and left the group. For the daemon and `run-job`; never for a process that runs
/// commands concurrently (such as the test harness).
pub fn claim_orphans() {
    ORPHANS_ARE_THE_PHASES.store(true, Ordering::Relaxed);
}

/// What the sweep looks for.
#[derive(Clone, Debug)]
pub(crate) struct PhaseMarks<'a> {
    /// The process group (= the leader's pid).
    pub pgid: i32,
    /// `TESTFLINGER_PHASE_TOKEN=<token>`.
    pub token_entry: &'a [u8],
    /// Processes that started before this tick cannot belong to the phase.
    pub min_starttime: u64,
    /// `(pid, starttime)` of processes already known to be the phase's (seen alive with
    /// the token earlier): an exited process shows an empty environment, so zombies are
    /// matched by pid, and by start time so that a reused pid never matches.
    pub known: &'a [(i32, u64)],
    /// The agent's own pid, never a candidate.
    pub own_pid: i32,
    /// Only look at the group, not the environments (cheaper).
    pub group_only: bool,
}

/// Scans `/proc` and returns every process (alive or zombie) that belongs to the phase.
pub(crate) fn scan(marks: &PhaseMarks<'_>) -> Vec<ProcStat> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    let mut buf = Vec::with_capacity(512);
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == marks.own_pid {
            continue;
        }
        let Some(stat) = read_stat(pid, &mut buf) else {
            continue;
        };
        if stat.pgrp == marks.pgid || marks.known.contains(&(pid, stat.starttime)) {
            found.push(stat);
            continue;
        }
        if marks.group_only || !stat.is_alive() || stat.starttime < marks.min_starttime {
            continue;
        }
        let tagged = read_into(&format!("/proc/{pid}/environ"), &mut buf).is_some()
            && environ_has(&buf, marks.token_entry);
        // An orphan the agent adopted (as subreaper) after the phase started, when the
        // agent runs nothing else: found even if it cleared its environment.
        let adopted = stat.ppid == marks.own_pid && ORPHANS_ARE_THE_PHASES.load(Ordering::Relaxed);
        if tagged || adopted {
            found.push(stat);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_name() {
        let line = b"4242 (my (weird) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615\n";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(
            stat,
            ProcStat {
                pid: 4242,
                state: b'S',
                ppid: 17,
                pgrp: 4242,
                flags: 4194560,
                starttime: 987654,
                comm: name_hash(b"my (weird) name"),
            }
        );
        assert!(stat.is_alive());
    }

    #[test]
    fn a_process_inside_exit_is_not_alive() {
        // flags 4194564 = 4194560 | PF_EXITING: files closed, not a zombie yet.
        let line =
            b"4243 (sh) R 17 4242 4242 0 -1 4194564 100 0 0 0 1 2 0 0 20 0 1 0 987655 1000 10\n";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat.flags & PF_EXITING, PF_EXITING);
        assert!(!stat.is_alive());
    }

    #[test]
    fn zombie_is_not_alive() {
        let line = b"7 (sh) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0 0\n";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat.state, b'Z');
        assert!(!stat.is_alive());
    }

    #[test]
    fn truncated_stat_is_rejected() {
        assert_eq!(parse_stat(b"12 (x) S 1 12"), None);
        assert_eq!(parse_stat(b""), None);
        assert_eq!(
            parse_stat(b"abc (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"),
            None
        );
    }

    #[test]
    fn own_stat_parses() {
        let mut buf = Vec::new();
        let stat = read_stat(std::process::id() as i32, &mut buf).expect("own stat");
        assert_eq!(stat.pid, std::process::id() as i32);
        assert!(stat.is_alive());
    }

    #[test]
    fn environ_match_is_exact() {
        let entry = token_entry("abc");
        assert!(environ_has(
            b"A=1\0TESTFLINGER_PHASE_TOKEN=abc\0B=2\0",
            &entry
        ));
        assert!(environ_has(b"TESTFLINGER_PHASE_TOKEN=abc", &entry));
        assert!(!environ_has(b"TESTFLINGER_PHASE_TOKEN=abcd\0", &entry));
        assert!(!environ_has(b"XTESTFLINGER_PHASE_TOKEN=abc\0", &entry));
        assert!(!environ_has(b"", &entry));
    }
}
