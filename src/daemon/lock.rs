//! One agent per `agent_id` on a host: an exclusive lock on
//! `<execution_basedir>/.testflinger-agent-<agent_id>.lock`, taken before the agent does
//! anything else. The lock is the kernel's (`flock`), so it dies with the process: a
//! SIGKILLed or OOM-killed agent leaves no stale lock behind, and the next one starts at
//! once. The file holds the owner's pid, for the message a second copy prints.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another agent with agent_id {agent_id} is already running on this host{}; \
         lock file {path}",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Held {
        agent_id: String,
        path: PathBuf,
        holder: Option<u32>,
    },
    #[error("cannot lock {path} (config key execution_basedir): {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; released when dropped or when the process dies.
#[derive(Debug)]
pub struct AgentLock {
    _file: File,
    path: PathBuf,
}

impl AgentLock {
    /// Takes the lock for `agent_id` in `dir`, without waiting.
    pub fn acquire(dir: &Path, agent_id: &str) -> Result<AgentLock, LockError> {
        let path = dir.join(format!(".testflinger-agent-{agent_id}.lock"));
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    agent_id: agent_id.to_owned(),
                    path,
                    holder: text.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(err)) => return Err(io(err)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(AgentLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether an agent holds the lock of `agent_id` in `dir` now, without taking it or
/// creating anything: `Some(pid)` when one does (`pid` as it wrote it, if readable),
/// `None` when none does (for `check-config`).
pub fn holder(dir: &Path, agent_id: &str) -> std::io::Result<Option<Option<u32>>> {
    let path = dir.join(format!(".testflinger-agent-{agent_id}.lock"));
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Ok(Some(text.trim().parse().ok()))
        }
        Err(TryLockError::Error(err)) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_dropped_lock_frees_the_id() {
        let dir = std::env::temp_dir().join(format!("tf-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let first = AgentLock::acquire(&dir, "dut-1").expect("first lock");
        // flock locks belong to the open file description: a second open in the same
        // process conflicts like another process would.
        match AgentLock::acquire(&dir, "dut-1") {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        let other_id = AgentLock::acquire(&dir, "dut-2").expect("another id is independent");
        drop(first);
        let again = AgentLock::acquire(&dir, "dut-1").expect("free once dropped");
        assert!(again.path().ends_with(".testflinger-agent-dut-1.lock"));
        assert_eq!(
            holder(&dir, "dut-1").expect("readable"),
            Some(Some(std::process::id()))
        );
        assert_eq!(holder(&dir, "dut-3").expect("no file"), None);
        drop((again, other_id));
        assert_eq!(holder(&dir, "dut-1").expect("readable"), None, "released");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
