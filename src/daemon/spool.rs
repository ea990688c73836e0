//! The spool of reports the server has not accepted yet (`results_basedir`): moving a run
//! directory into it (also across filesystems), finding what to retry in age order, and
//! recovering the run directories a crashed agent left behind.

use crate::server::http::PendingOutput;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The name of the file, inside a run directory, that says what live output is left to send.
pub const PENDING_OUTPUT_FILE: &str = ".agent-pending-output.json";

/// Records in `rundir` what live output is left to send (read back by the report's delivery).
pub fn save_pending(rundir: &Path, pending: &PendingOutput) -> io::Result<()> {
    let bytes = serde_json::to_vec(pending).map_err(io::Error::other)?;
    crate::outcome::write_atomic(&rundir.join(PENDING_OUTPUT_FILE), &bytes)
}

/// Moves the directory `from` to `to`: a rename, or across filesystems a copy into a
/// hidden directory beside `to`, a rename into place, then removing `from`. Symlinks are
/// copied as links.
pub fn move_dir(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(err) if err.kind() == io::ErrorKind::CrossesDevices => {
            let name = to
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let staging = unique_path(to.with_file_name(format!(".incoming-{name}")));
            let copied = copy_tree(from, &staging).and_then(|()| fs::rename(&staging, to));
            if let Err(err) = copied {
                let _ = fs::remove_dir_all(&staging);
                return Err(err);
            }
            fs::remove_dir_all(from)
        }
        other => other,
    }
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &target)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `path`, or `path.1`, `path.2`… for the first name that is free.
pub fn unique_path(path: PathBuf) -> PathBuf {
    if !path.exists() {
        return path;
    }
    (1..)
        .map(|n| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        })
        .find(|p| !p.exists())
        .expect("some numbered name is free")
}

/// The job directories in `dir` (hidden ones left out), oldest job first: a job's age is
/// that of its `testflinger.json`, written when it started and never changed.
pub fn job_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            let path = e.path();
            let age = fs::metadata(path.join(crate::outcome::JOB_FILE))
                .or_else(|_| e.metadata())
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (age, path)
        })
        .collect();
    dirs.sort();
    dirs.into_iter().map(|(_, path)| path).collect()
}

/// What becomes of a run directory found at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// Moved to the spool, to be reported.
    ToSpool,
    /// Left where it is: not a job of this agent's server (`run-job`'s).
    InPlace,
}

/// Run directories left in `execution_basedir` by an agent that died during a job (crash,
/// SIGKILL, power loss): `finish` ends each one (crash recovery), then it goes to the
/// spool, to be reported, unless `finish` returns [`Leave::InPlace`].
pub fn recover_interrupted(
    execution_basedir: &Path,
    spool: &Path,
    mut finish: impl FnMut(&Path) -> Leave,
) {
    for dir in job_dirs(execution_basedir) {
        if !dir.join(crate::outcome::JOB_FILE).is_file() {
            continue;
        }
        if finish(&dir) == Leave::InPlace {
            continue;
        }
        let Some(name) = dir.file_name() else {
            continue;
        };
        let target = unique_path(spool.join(name));
        match move_dir(&dir, &target) {
            Ok(()) => log::warn!(
                "{} was left by an agent that stopped during the job; spooled as {} to be reported",
                dir.display(),
                target.display()
            ),
            Err(err) => log::error!("cannot spool the interrupted job {}: {err}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_tree_keeps_files_and_links() {
        let tmp = crate::testing::tempdir("spool");
        let base = tmp.path().to_path_buf();
        let from = base.join("from");
        fs::create_dir_all(from.join("sub")).expect("mkdir");
        fs::write(from.join("sub/a.log"), b"\xffbytes").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", from.join("link")).expect("symlink");
        copy_tree(&from, &base.join("to")).expect("copy");
        assert_eq!(
            fs::read(base.join("to/sub/a.log")).expect("read"),
            b"\xffbytes"
        );
        assert_eq!(
            fs::read_link(base.join("to/link")).expect("a link"),
            PathBuf::from("/etc/passwd")
        );
    }

    #[test]
    fn interrupted_jobs_are_spooled_oldest_first() {
        let tmp = crate::testing::tempdir("recover");
        let base = tmp.path().to_path_buf();
        let (run, spool) = (base.join("run"), base.join("results"));
        for name in ["job-a", "job-b"] {
            fs::create_dir_all(run.join(name)).expect("mkdir");
            fs::write(run.join(name).join(crate::outcome::JOB_FILE), b"{}").expect("write");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        fs::create_dir_all(run.join("not-a-job")).expect("mkdir");
        fs::create_dir_all(&spool).expect("mkdir");
        fs::create_dir_all(run.join("local")).expect("mkdir");
        fs::write(run.join("local").join(crate::outcome::JOB_FILE), b"{}").expect("write");
        recover_interrupted(&run, &spool, |dir| {
            if dir.ends_with("local") {
                Leave::InPlace
            } else {
                Leave::ToSpool
            }
        });
        let names: Vec<_> = job_dirs(&spool)
            .iter()
            .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(names, [Some("job-a".to_owned()), Some("job-b".to_owned())]);
        assert!(run.join("not-a-job").exists(), "only job directories move");
        assert!(
            run.join("local").exists(),
            "a directory left in place stays"
        );
    }
}
