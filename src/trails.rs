//! The trails of finished jobs, kept as `<logging_basedir>/trails/<job_id>.json` for
//! `testflinger-agent explain`: the daemon keeps one after each job's report (its run
//! directory is then gone), `run-job` after each local job. The oldest beyond
//! `audit_trails_kept` go.
//!
//! A leaf module beside [`crate::journal`] (a kept trail is a copy of the job's journal):
//! the daemon and `run-job` keep trails here, and `explain` lists them.

use crate::config::Config;
use crate::journal::Journal;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where the trails are kept, under `logging_basedir`.
pub const TRAILS_DIR: &str = "trails";

/// The trails directory of an agent whose log is in `logging_basedir`.
pub fn dir(logging_basedir: &Path) -> PathBuf {
    logging_basedir.join(TRAILS_DIR)
}

/// The trails directory of an agent whose config does not set `logging_basedir`.
pub fn default_dir() -> PathBuf {
    let base = match crate::config::key_spec("logging_basedir").map(|spec| spec.default) {
        Some(crate::config::DefaultValue::Text(base)) => base,
        // The key table gives logging_basedir a path as its default.
        _ => "/tmp/testflinger/logs",
    };
    dir(Path::new(base))
}

/// Keeps a finished job's trail under the config's `logging_basedir` for `explain` (the
/// oldest beyond `audit_trails_kept` go); a failure is logged, the job is not affected.
pub fn keep(config: &Config, journal: &Journal) {
    let dir = dir(&config.logging_basedir);
    let kept = usize::try_from(config.audit_trails_kept).unwrap_or(usize::MAX);
    if let Err(err) = keep_in(journal, &dir, kept) {
        log::warn!(
            "job {}: its trail is not kept in {}: {err}",
            journal.job_id,
            dir.display()
        );
    }
}

/// Keeps a copy of a finished job's journal (its trail) as `<dir>/<job_id>.json`, and
/// removes the oldest copies beyond `kept` (0 keeps none). Not fsynced: an audit copy.
pub fn keep_in(journal: &Journal, dir: &Path, kept: usize) -> io::Result<()> {
    if kept == 0 {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    fs::write(
        dir.join(format!("{}.json", journal.job_id)),
        journal.to_bytes(),
    )?;
    let trails = list(dir)?;
    for trail in trails.iter().skip(kept) {
        fs::remove_file(&trail.path)?;
    }
    Ok(())
}

/// One kept trail file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptTrail {
    pub path: PathBuf,
    pub modified: SystemTime,
}

impl KeptTrail {
    /// The job the trail is of (the file's name without `.json`).
    pub fn job_id(&self) -> String {
        self.path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// The trail files (`*.json`) in `dir`, newest first; a directory that does not exist
/// holds none.
pub fn list(dir: &Path) -> io::Result<Vec<KeptTrail>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut trails: Vec<KeptTrail> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "json"))
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|entry| {
            Some(KeptTrail {
                modified: entry.metadata().ok()?.modified().ok()?,
                path: entry.path(),
            })
        })
        .collect();
    trails.sort_by(|a, b| (b.modified, &b.path).cmp(&(a.modified, &a.path)));
    Ok(trails)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{read_any, JournalError, Why};

    fn sample(job_id: &str) -> Journal {
        let mut journal = Journal::taken(job_id, "2026-01-01T00:00:00+00:00".into());
        journal.transition("t1".into(), "Setup", Some("setup"), Why::Exit, Some(0));
        journal
    }

    /// Gives `<dir>/<job_id>.json` a distinct modification time, whatever the
    /// filesystem's resolution.
    fn age(dir: &Path, job_id: &str, secs: u64) {
        let file = fs::File::options()
            .write(true)
            .open(dir.join(format!("{job_id}.json")))
            .expect("open");
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .expect("mtime");
    }

    #[test]
    fn kept_trails_are_pruned_oldest_first_and_read_back() {
        let tmp = crate::testing::tempdir("trails-keep");
        let dir = tmp.path().to_path_buf();
        for i in 0..5 {
            keep_in(&sample(&format!("job-{i}")), &dir, 3).expect("kept");
            age(&dir, &format!("job-{i}"), 1000 + i);
        }
        let mut names: Vec<String> = fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["job-2.json", "job-3.json", "job-4.json"]);
        let back = read_any(&dir.join("job-4.json")).expect("a kept trail reads back");
        assert_eq!(back.job_id, "job-4");
        assert_eq!(back.trail, sample("job-4").trail);
        keep_in(&sample("x"), &dir.join("none"), 0).expect("0 keeps none");
        assert!(!dir.join("none").exists());
        assert!(matches!(
            read_any(&dir.join("missing.json")),
            Err(JournalError::Read { .. })
        ));
    }

    #[test]
    fn the_list_is_newest_first_and_holds_only_trail_files() {
        let tmp = crate::testing::tempdir("trails-list");
        let dir = tmp.path().to_path_buf();
        assert_eq!(list(&dir.join("absent")).expect("absent is empty"), []);
        for (job_id, secs) in [("old", 10), ("new", 30), ("mid", 20)] {
            keep_in(&sample(job_id), &dir, 10).expect("kept");
            age(&dir, job_id, secs);
        }
        fs::write(dir.join("notes.txt"), "not a trail").expect("write");
        fs::create_dir(dir.join("sub.json")).expect("a directory is not a trail");
        let ids: Vec<String> = list(&dir)
            .expect("listed")
            .iter()
            .map(KeptTrail::job_id)
            .collect();
        assert_eq!(ids, ["new", "mid", "old"]);
    }

    #[test]
    fn the_default_directory_is_under_the_default_logging_basedir() {
        let config = Config::from_yaml("agent_id: a\nserver_address: x\njob_queues: [q]\n")
            .expect("a minimal config");
        assert_eq!(default_dir(), dir(&config.logging_basedir));
    }
}
