//! Where a phase's output goes while its command runs: masked, appended to
//! `<phase>.log` (or followed there, with direct capture), handed to the [`Server`] as
//! live output, and the job journal refreshed while output flows.

use super::{journal_command_spawned, save_journal};
use crate::journal::Journal;
use crate::mask::Masker;
use crate::phase::Phase;
use crate::process::OutputSink;
use crate::server::Server;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// With direct capture, how often the disk is looked at (the runner follows the log at
/// least once a second).
const ROOM_CHECK: Duration = Duration::from_millis(900);

/// How often a phase that keeps printing refreshes the journal's live-output progress, so
/// that a restart after the agent's death resends little output twice.
const JOURNAL_REFRESH: Duration = Duration::from_secs(5);

/// Where a phase's output goes: masked, appended to `<phase>.log`, handed to the server.
pub(super) struct PhaseSink<'a> {
    /// `None` when `<phase>.log` could not be opened (cleanup runs all the same).
    pub(super) file: Option<File>,
    pub(super) len: u64,
    pub(super) rundir: &'a Path,
    /// The job journal, lent for the command's run: written when it spawns, and every
    /// [`JOURNAL_REFRESH`] while output flows.
    pub(super) journal: Option<Journal>,
    pub(super) journal_saved: Instant,
    pub(super) path: &'a Path,
    pub(super) server: &'a dyn Server,
    pub(super) job_id: &'a str,
    pub(super) phase: Phase,
    pub(super) masker: Masker,
    /// Why the log could not be written, once it could not. From then on nothing more is
    /// written to it, except in cleanup, which keeps trying (its command may free the
    /// disk) and marks the hole with a line saying how many bytes are missing.
    pub(super) write_failed: Option<String>,
    /// Bytes of output not in the log since the last write that succeeded.
    pub(super) lost: u64,
    /// Why the journal could not be written during the command.
    pub(super) journal_failed: Option<String>,
    /// Whether the command may write into the log itself ([`OutputSink::direct_output`]):
    /// only when the server reads the live output back from the log (the daemon's
    /// streamer, `run-job`'s copy to standard output; not crash recovery), and not once the
    /// job could not be recorded (cleanup then marks every hole).
    pub(super) direct_allowed: bool,
    /// Whether it does: the log grows without the sink, which catches up in `follow`.
    pub(super) direct: bool,
    /// Direct capture: when the disk was last looked at, the log's length then, and
    /// whether it had grown since the look before.
    pub(super) room_checked: Instant,
    pub(super) len_at_room_check: u64,
    pub(super) grew_before_check: bool,
    /// See [`super::PhaseExecutor::with_follow_pause_max`].
    pub(super) follow_pause_max: Option<Duration>,
    /// Where masked output is built when a chunk held a secret (kept between chunks).
    pub(super) scratch: Vec<u8>,
}

impl PhaseSink<'_> {
    fn emit(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.record(data);
        if self.journal.is_some() && self.journal_saved.elapsed() >= JOURNAL_REFRESH {
            self.save_journal();
        }
    }

    /// Writes `data` to the log (see `write_failed` for what happens once that fails).
    fn record(&mut self, data: &[u8]) {
        if self.write_failed.is_some() && self.phase != Phase::Cleanup {
            return;
        }
        if self.file.is_none() {
            self.lost += data.len() as u64;
            return;
        }
        if self.lost > 0 {
            let note = format!(
                "\n[the agent could not record {} bytes of output here: {}]\n",
                self.lost,
                self.write_failed
                    .as_deref()
                    .unwrap_or("the log could not be written")
            );
            if !self.append(note.as_bytes()) {
                self.lost += data.len() as u64;
                return;
            }
            self.lost = 0;
        }
        self.append(data);
    }

    /// Appends `data` to the log and hands it to the live output; on a failure, records
    /// why (logged once) and how much of `data` is missing. Whether all of it was written.
    fn append(&mut self, data: &[u8]) -> bool {
        let Some(file) = &mut self.file else {
            self.lost += data.len() as u64;
            return false;
        };
        if let Err(err) = file.write_all(data) {
            if self.write_failed.is_none() {
                log::error!(
                    "job {}: writing {} failed: {err}",
                    self.job_id,
                    self.path.display()
                );
                self.write_failed = Some(format!("cannot write {}: {err}", self.path.display()));
            }
            // The part of `data` that reached the file is what the live output carries.
            let now = file.metadata().map_or(self.len, |meta| meta.len());
            let written = now.saturating_sub(self.len).min(data.len() as u64);
            self.lost += data.len() as u64 - written;
            if written > 0 {
                self.len = now;
                self.server
                    .output(self.job_id, self.phase, &[], self.path, self.len);
            }
            return false;
        }
        if self.direct {
            // The command writes into the same file: its order is the file's.
            self.catch_up();
            return true;
        }
        self.len += data.len() as u64;
        self.server
            .output(self.job_id, self.phase, data, self.path, self.len);
        true
    }

    /// Direct capture: tells the live output (which reads the log back) how long the log
    /// is now. When it grew: when it was last written.
    fn catch_up(&mut self) -> Option<std::time::SystemTime> {
        let meta = self.file.as_ref().and_then(|f| f.metadata().ok())?;
        if meta.len() <= self.len {
            return None;
        }
        self.len = meta.len();
        self.server
            .output(self.job_id, self.phase, &[], self.path, self.len);
        Some(
            meta.modified()
                .unwrap_or_else(|_| std::time::SystemTime::now()),
        )
    }

    /// Direct capture: a write the command makes into a full disk fails without the agent
    /// seeing it. Output that was flowing and stopped while the file system has no block
    /// left for the agent is taken as output that can no longer be recorded.
    fn check_room(&mut self) {
        self.room_checked = Instant::now();
        let grew = self.len != self.len_at_room_check;
        let was_flowing = std::mem::replace(&mut self.grew_before_check, grew);
        self.len_at_room_check = self.len;
        if grew || !was_flowing || self.write_failed.is_some() {
            return;
        }
        let Some(file) = &self.file else { return };
        if crate::outcome::has_room(file) {
            return;
        }
        let err = std::io::Error::from_raw_os_error(libc::ENOSPC);
        log::error!(
            "job {}: the {} command's output stopped and {} has no room left: {err}",
            self.job_id,
            self.phase,
            self.path.display()
        );
        self.write_failed = Some(format!("cannot write {}: {err}", self.path.display()));
    }

    fn save_journal(&mut self) {
        if let Some(journal) = &mut self.journal {
            if let Err(err) = save_journal(journal, self.server, self.rundir) {
                self.journal_failed
                    .get_or_insert_with(|| format!("cannot write the job journal: {err}"));
            }
            self.journal_saved = Instant::now();
        }
    }

    /// Flushes what the masker held back and tells the server the phase's output is done.
    pub(super) fn finish(&mut self) {
        let rest = self.masker.finish();
        self.emit(&rest);
        self.server.finish_output(self.job_id, self.phase);
    }
}

impl OutputSink for PhaseSink<'_> {
    fn spawning(&mut self, token: &str) {
        if let Some(journal) = &mut self.journal {
            journal.token = Some(token.to_owned());
            if let Err(err) = journal.save_live(self.rundir) {
                log::error!(
                    "job {}: cannot write {} in {}: {err}",
                    self.job_id,
                    crate::journal::LIVE_FILE,
                    self.rundir.display()
                );
                self.journal_failed
                    .get_or_insert_with(|| format!("cannot write the job journal: {err}"));
            }
        }
    }

    /// The group id goes to disk with the next journal write (the refresh while output
    /// flows, or the phase's end): recovery finds the tree by the token, already on disk.
    fn spawned(&mut self, pgid: i32, token: &str) {
        if let Some(journal) = &mut self.journal {
            journal_command_spawned(journal, pgid, token);
        }
    }

    fn direct_output(&mut self) -> Option<File> {
        if !self.direct_allowed
            || !self.masker.is_empty()
            || self.write_failed.is_some()
            || self.file.is_none()
        {
            return None;
        }
        // A description of the command's own: the runner watches for its last close.
        let file = OpenOptions::new().append(true).open(self.path).ok()?;
        self.direct = true;
        self.catch_up();
        self.len_at_room_check = self.len;
        Some(file)
    }

    fn follow(&mut self) -> Option<std::time::SystemTime> {
        let grew = self.catch_up();
        if self.room_checked.elapsed() >= ROOM_CHECK {
            self.check_room();
        }
        if grew.is_some()
            && self.journal.is_some()
            && self.journal_saved.elapsed() >= JOURNAL_REFRESH
        {
            self.save_journal();
        }
        grew
    }

    fn follow_pause_max(&self) -> Option<Duration> {
        self.follow_pause_max
    }

    fn unrecordable(&self) -> bool {
        // Cleanup is never stopped for this: it must put the device back.
        self.phase != Phase::Cleanup
            && (self.write_failed.is_some() || self.journal_failed.is_some())
    }

    fn output(&mut self, chunk: &[u8]) {
        if self.masker.is_empty() {
            self.emit(chunk);
        } else {
            // No copy of the chunk where no secret is in it (the common case).
            let mut scratch = std::mem::take(&mut self.scratch);
            let masked = self.masker.mask_borrowed(chunk, &mut scratch);
            self.emit(masked);
            self.scratch = scratch;
        }
    }
}
