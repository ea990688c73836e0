//! The trails of finished jobs, kept under `logging_basedir` for `testflinger-agent
//! explain` after their run directories are reported and gone.

use crate::config::Config;
use crate::journal::Journal;

/// Keeps a finished job's trail under `logging_basedir` for `explain` (the oldest beyond
/// `audit_trails_kept` go); a failure is logged, the job is not affected.
pub fn keep_trail(config: &Config, journal: &Journal) {
    let dir = config.logging_basedir.join(crate::journal::TRAILS_DIR);
    let keep = usize::try_from(config.audit_trails_kept).unwrap_or(usize::MAX);
    if let Err(err) = crate::journal::keep_trail(journal, &dir, keep) {
        log::warn!(
            "job {}: its trail is not kept in {}: {err}",
            journal.job_id,
            dir.display()
        );
    }
}
