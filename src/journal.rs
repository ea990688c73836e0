//! The durable job journal `<rundir>/.agent-journal.json`: where a job is (lifecycle state,
//! running phase, its process group and phase token, statuses so far, cleanup attempts,
//! live-output progress) and the trail of its transitions, written durably at every
//! transition so that an agent restarted after its own death can finish the job.
//!
//! A leaf module: serde types, the durable write and a read that turns any damaged file
//! into a [`JournalError`], never a panic.

use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The journal's file name inside a run directory.
pub const JOURNAL_FILE: &str = ".agent-journal.json";
/// The format version this build writes and reads.
pub const JOURNAL_VERSION: u32 = 1;

/// Why a transition of the trail happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// The job was taken from the server, or given to `run-job` (the first entry).
    Taken,
    /// The phase command exited on its own (`exit_code` says how).
    Exit,
    /// The phase was skipped (no command or no phase data).
    Skipped,
    /// The phase command died of a signal the agent did not send.
    Signal,
    /// The agent ended the phase: global timeout.
    GlobalTimeout,
    /// The agent ended the phase: no output for the output timeout.
    OutputTimeout,
    /// The job was cancelled on the server.
    Cancel,
    /// The agent was stopping.
    Shutdown,
    /// The agent could not run the phase (or the job) at all.
    AgentError,
    /// The agent could not record the job (disk full, directory unwritable).
    StorageFailed,
    /// The agent died during the job; a restarted agent ended it.
    CrashRecovery,
    /// A device health check started (the first entry of a check's trail).
    CheckStarted,
}

/// One transition of the job, in the order they happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrailEntry {
    /// UTC time, ISO 8601.
    pub at: String,
    /// The state before (an `AnyJob` state name; `""` for the first entry).
    pub from: String,
    /// The state after.
    pub to: String,
    /// The phase this transition ran (or was about to run), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    pub why: Why,
    /// The phase's exit code, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// How the phase's command ended, when one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandEnd>,
}

/// How a phase command's processes ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandEnd {
    pub how: Ending,
    /// Processes that had left the command's group (`setsid`, double fork) and were ended.
    #[serde(default)]
    pub escapees: u64,
    /// Processes still running (or holding the output) after the shell exited, killed.
    #[serde(default)]
    pub stragglers: u64,
}

impl CommandEnd {
    /// How the command `done` ended, for its transition in a trail (a phase's or a health
    /// check's).
    pub fn of(done: &crate::process::CommandOutcome) -> CommandEnd {
        use crate::process::Termination;
        let how = match done.termination {
            Termination::Exited(_) => Ending::Exited,
            Termination::Signaled(_) => Ending::Signaled,
            _ if done.needed_sigkill => Ending::SigkillNeeded,
            _ => Ending::SigtermHonoured,
        };
        CommandEnd {
            how,
            escapees: u64::try_from(done.escapees_killed + done.escapees_terminated)
                .unwrap_or(u64::MAX),
            stragglers: u64::try_from(done.stragglers_killed).unwrap_or(u64::MAX),
        }
    }
}

/// The last signal a phase command's tree needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// It exited on its own.
    Exited,
    /// It died of a signal the agent did not send.
    Signaled,
    /// The agent stopped it and SIGTERM was enough.
    SigtermHonoured,
    /// The agent stopped it and SIGKILL was needed.
    SigkillNeeded,
}

impl Ending {
    pub fn describe(self) -> &'static str {
        match self {
            Ending::Exited => "exited",
            Ending::Signaled => "killed by a signal",
            Ending::SigtermHonoured => "SIGTERM honoured",
            Ending::SigkillNeeded => "SIGKILL needed",
        }
    }
}

impl std::fmt::Display for CommandEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.how.describe())?;
        if self.escapees > 0 {
            write!(f, ", {} escapee(s) ended", self.escapees)?;
        }
        if self.stragglers > 0 {
            write!(f, ", {} background process(es) killed", self.stragglers)?;
        }
        Ok(())
    }
}

impl Why {
    /// The word the trail table shows.
    pub fn describe(self) -> &'static str {
        match self {
            Why::Taken => "taken",
            Why::Exit => "exit",
            Why::Skipped => "skipped",
            Why::Signal => "signal",
            Why::GlobalTimeout => "global timeout",
            Why::OutputTimeout => "output timeout",
            Why::Cancel => "cancel",
            Why::Shutdown => "shutdown",
            Why::AgentError => "agent error",
            Why::StorageFailed => "cannot record",
            Why::CrashRecovery => "crash recovery",
            Why::CheckStarted => "check started",
        }
    }
}

/// One phase's exit code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseExit {
    pub phase: String,
    pub exit_code: i32,
}

/// How far one log file's live output had reached the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogProgress {
    /// The Testflinger phase name.
    pub phase: String,
    /// The file's name in the run directory, e.g. `test.log`.
    pub log_file: String,
    /// Bytes of the file the server accepted.
    pub sent: u64,
}

/// The live-output streamer's progress when the journal was written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputProgress {
    /// The job's next `output` fragment number.
    pub next_fragment: u64,
    /// Every phase log the streamer knew, with the bytes accepted.
    pub logs: Vec<LogProgress>,
    /// The job's next `serial` fragment number.
    pub next_serial_fragment: u64,
    /// Serial logs not (fully) delivered yet, in order.
    pub serial_pending: Vec<LogProgress>,
}

/// The content of the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub version: u32,
    pub job_id: String,
    /// The pid of the agent that ran the job.
    pub agent_pid: u32,
    /// The lifecycle state, as named in the transition table (`Polled` … `Cleaned`).
    pub state: String,
    /// The phase running now (between its start and its end), if any.
    pub phase: Option<String>,
    /// The running phase command's process group, once it spawned (on disk from the next
    /// write after that: recovery finds the tree by the token).
    pub pgid: Option<i32>,
    /// The running phase command's `TESTFLINGER_PHASE_TOKEN`, on disk before it spawns.
    pub token: Option<String>,
    /// Exit codes of the phases that ran to their end, in order.
    pub statuses: Vec<PhaseExit>,
    /// How many times cleanup was started (incremented before it starts).
    pub cleanup_attempts: u32,
    /// The job reached `Cleaned` and its outcome file is final.
    pub finished: bool,
    /// The live output delivered so far.
    #[serde(default)]
    pub output: OutputProgress,
    pub trail: Vec<TrailEntry>,
    /// The job was run by `run-job`: no server knows it, and a daemon sharing
    /// `execution_basedir` leaves its run directory alone (neither recovered nor reported).
    /// Absent in journals written before it existed, and in the daemon's: `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// Set in the trail of a device health check (not a job): what the check came to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSummary>,
}

/// What a device health check came to, kept in its trail beside its output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSummary {
    /// What asked for it (failed provisions, exit 46, the idle interval, SIGUSR2, …).
    pub why: String,
    /// `pass`, `fail`, `timeout`, or `interrupted` (the agent stopped during the check).
    pub result: String,
    /// From the start to the last process reaped, in milliseconds.
    pub duration_ms: u64,
    /// The last non-empty line of its output (`""`: it printed none).
    pub last_line: String,
    /// Its output file, when one was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

impl Journal {
    /// The journal of a job just taken: state `Polled`, one trail entry.
    pub fn taken(job_id: &str, at: String) -> Journal {
        Journal {
            version: JOURNAL_VERSION,
            job_id: job_id.to_owned(),
            agent_pid: std::process::id(),
            state: "Polled".to_owned(),
            phase: None,
            pgid: None,
            token: None,
            statuses: Vec::new(),
            cleanup_attempts: 0,
            finished: false,
            output: OutputProgress::default(),
            local: false,
            check: None,
            trail: vec![TrailEntry {
                at,
                from: String::new(),
                to: "Polled".to_owned(),
                phase: None,
                why: Why::Taken,
                exit_code: None,
                command: None,
            }],
        }
    }

    /// The exit code recorded for `phase`, if it ran to its end.
    pub fn status(&self, phase: &str) -> Option<i32> {
        self.statuses
            .iter()
            .find(|s| s.phase == phase)
            .map(|s| s.exit_code)
    }

    /// Records `phase`'s exit code (replacing an earlier one).
    pub fn set_status(&mut self, phase: &str, exit_code: i32) {
        match self.statuses.iter_mut().find(|s| s.phase == phase) {
            Some(entry) => entry.exit_code = exit_code,
            None => self.statuses.push(PhaseExit {
                phase: phase.to_owned(),
                exit_code,
            }),
        }
    }

    /// Moves to `to`, appending the transition to the trail; the running phase is over.
    pub fn transition(
        &mut self,
        at: String,
        to: &str,
        phase: Option<&str>,
        why: Why,
        exit_code: Option<i32>,
    ) {
        self.trail.push(TrailEntry {
            at,
            from: std::mem::take(&mut self.state),
            to: to.to_owned(),
            phase: phase.map(str::to_owned),
            why,
            exit_code,
            command: None,
        });
        self.state = to.to_owned();
        self.phase = None;
        self.pgid = None;
        self.token = None;
    }

    /// The journal as bytes (compact JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a journal is plain data and always serialises")
    }

    /// Parses a journal; damaged, foreign or other-version content is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Journal, JournalError> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let version: Version =
            serde_json::from_slice(bytes).map_err(|err| JournalError::Parse(err.to_string()))?;
        if version.version != JOURNAL_VERSION {
            return Err(JournalError::Version {
                found: version.version,
            });
        }
        serde_json::from_slice(bytes).map_err(|err| JournalError::Parse(err.to_string()))
    }

    /// Writes the journal durably into `rundir`.
    pub fn save(&self, rundir: &Path) -> io::Result<()> {
        write_durable(&rundir.join(JOURNAL_FILE), &self.to_bytes())
    }

    /// Records the phase command about to start, its phase and token, in [`LIVE_FILE`]
    /// beside the journal: whole (temporary file and rename) but not fsynced, so it costs
    /// tens of microseconds instead of a durable write. Durability is not needed: the tree
    /// it finds can only outlive an agent whose kernel lived on (a SIGKILL, the OOM killer),
    /// and then the page cache holds the file; after a power cut there is no tree to find,
    /// and a damaged file is ignored. [`read`] takes it into the journal while no transition
    /// followed it. Does nothing without a running phase and a token.
    pub fn save_live(&self, rundir: &Path) -> io::Result<()> {
        let (Some(phase), Some(token)) = (&self.phase, &self.token) else {
            return Ok(());
        };
        let live = Live {
            job_id: self.job_id.clone(),
            trail_len: self.trail.len(),
            phase: phase.clone(),
            token: token.clone(),
        };
        let bytes = serde_json::to_vec(&live).expect("plain data always serialises");
        crate::outcome::write_atomic(&rundir.join(LIVE_FILE), &bytes)
    }

    /// Takes in the phase and token of `live` when it was written after the journal's last
    /// transition (a stale one, from an earlier phase, has a shorter trail).
    fn merge_live(&mut self, live: Live) {
        if live.job_id == self.job_id
            && live.trail_len == self.trail.len()
            && self.token.is_none()
            && self.phase.as_ref().is_none_or(|phase| *phase == live.phase)
        {
            self.phase = Some(live.phase);
            self.token = Some(live.token);
        }
    }
}

/// The running phase command's token, beside the journal (see [`Journal::save_live`]).
pub const LIVE_FILE: &str = ".agent-journal-live.json";

#[derive(Debug, Serialize, Deserialize)]
struct Live {
    job_id: String,
    /// The journal's trail length when the command started.
    trail_len: usize,
    phase: String,
    token: String,
}

/// How the command of the trail's last transition ended.
impl Journal {
    pub fn annotate_last(&mut self, command: CommandEnd) {
        if let Some(last) = self.trail.last_mut() {
            last.command = Some(command);
        }
    }
}

/// Reads a journal from a run directory (or a spooled one), or from a kept trail file.
pub fn read_any(path: &Path) -> Result<Journal, JournalError> {
    if path.is_dir() {
        return read(path);
    }
    let bytes = fs::read(path).map_err(|source| JournalError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Journal::from_bytes(&bytes)
}

/// Why a journal could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("no journal {JOURNAL_FILE} in {0}")]
    Missing(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("not a journal (truncated or damaged): {0}")]
    Parse(String),
    #[error("journal version {found}, this agent reads version {JOURNAL_VERSION}")]
    Version { found: u32 },
}

/// Reads the journal of `rundir`.
pub fn read(rundir: &Path) -> Result<Journal, JournalError> {
    let path = rundir.join(JOURNAL_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(JournalError::Missing(rundir.to_path_buf()))
        }
        Err(source) => return Err(JournalError::Read { path, source }),
    };
    let mut journal = Journal::from_bytes(&bytes)?;
    // The live file is best-effort: missing or damaged, the journal alone is what is known.
    if let Some(live) = fs::read(rundir.join(LIVE_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Live>(&bytes).ok())
    {
        journal.merge_live(live);
    }
    Ok(journal)
}

/// Writes `data` to `path` so that after a crash or a power cut the file holds either the
/// old content or the new one, whole: a temporary file beside it, written and fsynced,
/// renamed over `path`, then the directory fsynced so the rename itself is on disk.
pub fn write_durable(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(data)?;
        file.sync_all()
    });
    if let Err(err) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    if let Err(err) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_file_gives_the_running_command_until_the_next_transition() {
        let tmp = crate::testing::tempdir("journal-live");
        let dir = tmp.path().to_path_buf();
        let mut journal = Journal::taken("job-1", "t0".into());
        journal.save(&dir).expect("saved");
        journal.phase = Some("setup".into());
        journal.token = Some("tok-1".into());
        journal.save_live(&dir).expect("live");
        let read_back = read(&dir).expect("reads");
        assert_eq!(read_back.phase.as_deref(), Some("setup"));
        assert_eq!(read_back.token.as_deref(), Some("tok-1"));
        // The phase ended: the journal's next write makes the live file stale.
        journal.transition("t1".into(), "Setup", Some("setup"), Why::Exit, Some(0));
        journal.save(&dir).expect("saved");
        let read_back = read(&dir).expect("reads");
        assert_eq!((read_back.phase, read_back.token), (None, None));
        // Damaged or another job's: ignored.
        fs::write(dir.join(LIVE_FILE), b"{garbage").expect("write");
        assert!(read(&dir).expect("reads").token.is_none());
        let mut other = Journal::taken("job-2", "t0".into());
        other.trail = journal.trail.clone();
        other.phase = Some("provision".into());
        other.token = Some("tok-2".into());
        other.save_live(&dir).expect("live");
        assert!(read(&dir).expect("reads").token.is_none());
    }

    fn sample() -> Journal {
        let mut journal = Journal::taken("job-1", "2026-01-01T00:00:00+00:00".into());
        journal.transition("t1".into(), "Setup", Some("setup"), Why::Exit, Some(0));
        journal.set_status("setup", 0);
        journal.phase = Some("provision".into());
        journal.pgid = Some(4242);
        journal.token = Some("abcdef".into());
        journal.output.next_fragment = 3;
        journal.output.logs.push(LogProgress {
            phase: "setup".into(),
            log_file: "setup.log".into(),
            sent: 120,
        });
        journal
    }

    #[test]
    fn round_trip() {
        let tmp = crate::testing::tempdir("journal-round");
        let dir = tmp.path().to_path_buf();
        let journal = sample();
        journal.save(&dir).expect("save");
        assert_eq!(read(&dir).expect("read back"), journal);
        assert_eq!(journal.trail[1].from, "Polled");
        assert_eq!(journal.state, "Setup");
    }

    #[test]
    fn durable_write_leaves_no_temp_file() {
        let tmp = crate::testing::tempdir("journal-durable");
        let dir = tmp.path().to_path_buf();
        let path = dir.join("file.json");
        write_durable(&path, b"one").expect("write");
        write_durable(&path, b"two").expect("overwrite");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("file.json")]);
    }

    #[test]
    fn damaged_journals_are_errors() {
        let bytes = sample().to_bytes();
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                matches!(
                    Journal::from_bytes(&bytes[..cut]),
                    Err(JournalError::Parse(_))
                ),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            Journal::from_bytes(b"\xff\x00garbage"),
            Err(JournalError::Parse(_))
        ));
        assert!(matches!(
            Journal::from_bytes(br#"{"version":99,"job_id":"x"}"#),
            Err(JournalError::Version { found: 99 })
        ));
        assert!(matches!(
            Journal::from_bytes(br#"{"version":1,"job_id":"x"}"#),
            Err(JournalError::Parse(_))
        ));
        let tmp = crate::testing::tempdir("journal-missing");
        let dir = tmp.path().to_path_buf();
        assert!(matches!(read(&dir), Err(JournalError::Missing(_))));
    }
}
