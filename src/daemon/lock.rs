//! One agent per `agent_id` on a host: an exclusive lock on
//! `<execution_basedir>/.testflinger-agent-<agent_id>.lock`, taken before the agent does
//! anything else. The lock is the kernel's (`flock`), so it dies with the process: a
//! SIGKILLed or OOM-killed agent leaves no stale lock behind, and the next one starts at
//! once. The file holds the owner's pid, for the message a second copy prints.
//!
//! The holder a second copy names comes from the kernel first: `/proc/locks` lists each
//! `flock` with the pid that took it and the locked file's device and inode. That answers
//! even when two agents start at the same instant and the first has taken the lock but not
//! yet written its pid; the pid in the file is the fallback (no `/proc`, or a holder in
//! another pid namespace, which `/proc/locks` shows as pid 0). Nothing here waits.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
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
                return Err(LockError::Held {
                    agent_id: agent_id.to_owned(),
                    path,
                    holder: holder_pid(&mut file),
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
        Err(TryLockError::WouldBlock) => Ok(Some(holder_pid(&mut file))),
        Err(TryLockError::Error(err)) => Err(err),
    }
}

/// The pid of the process holding `file`'s lock (which the caller failed to take): the
/// kernel's record in `/proc/locks`, else the pid the holder wrote into the file, else
/// `None` (a holder that has locked and not yet written, with no `/proc` to ask).
fn holder_pid(file: &mut File) -> Option<u32> {
    let from_kernel = file.metadata().ok().and_then(|meta| {
        let text = std::fs::read_to_string("/proc/locks").ok()?;
        let dev = meta.dev();
        flock_holder(
            &text,
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev),
            meta.ino(),
        )
    });
    from_kernel.or_else(|| {
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        text.trim().parse().ok()
    })
}

/// The pid of a process holding a `flock` on the file with device `major:minor` and inode
/// `ino`, read from the text of `/proc/locks`: lines such as
/// `3: FLOCK  ADVISORY  WRITE 4242 fe:00:5349808 0 EOF` (device numbers in hex, inode in
/// decimal). Waiters (`3: -> FLOCK ...`) and locks of other kinds are skipped, as is pid 0
/// (a holder outside this pid namespace); an exclusive holder is preferred to a shared one.
pub(crate) fn flock_holder(locks: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    let mut shared = None;
    for line in locks.lines() {
        let mut fields = line.split_whitespace().skip(1);
        if fields.next() != Some("FLOCK") {
            continue;
        }
        let (Some(_advisory), Some(access), Some(pid), Some(place)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let mut parts = place.split(':');
        let (Some(maj), Some(min), Some(inode), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let same_file = u64::from_str_radix(maj, 16) == Ok(major)
            && u64::from_str_radix(min, 16) == Ok(minor)
            && inode.parse::<u64>() == Ok(ino);
        let Some(pid) = pid.parse::<u32>().ok().filter(|pid| *pid > 0) else {
            continue;
        };
        if !same_file {
            continue;
        }
        if access == "WRITE" {
            return Some(pid);
        }
        shared.get_or_insert(pid);
    }
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_dropped_lock_frees_the_id() {
        let tmp = crate::testing::tempdir("lock");
        let dir = tmp.path().to_path_buf();
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
    }

    /// Two agents starting at once: the first has the lock but has not written its pid yet.
    /// The second must still name it, from the kernel's record.
    #[test]
    fn a_holder_that_has_not_written_its_pid_is_named_from_the_kernel() {
        let tmp = crate::testing::tempdir("lock-early");
        let dir = tmp.path().to_path_buf();
        let path = dir.join(".testflinger-agent-dut-early.lock");
        let early = File::create(&path).expect("create the lock file");
        early.try_lock().expect("the test takes the lock first");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0, "no pid");
        let err = AgentLock::acquire(&dir, "dut-early").expect_err("the test holds the lock");
        let message = err.to_string();
        assert!(
            message.contains(&format!("(pid {})", std::process::id())),
            "{message}"
        );
        match err {
            LockError::Held { holder, .. } => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        assert_eq!(
            holder(&dir, "dut-early").expect("readable"),
            Some(Some(std::process::id()))
        );
        drop(early);
    }

    #[test]
    fn proc_locks_lines_are_matched_by_device_and_inode() {
        let locks = "\
1: POSIX  ADVISORY  WRITE 111 fe:00:77 0 EOF
2: FLOCK  ADVISORY  READ 222 fe:00:77 0 EOF
3: FLOCK  ADVISORY  WRITE 333 fe:01:77 0 EOF
4: FLOCK  ADVISORY  WRITE 0 fe:00:77 0 EOF
4: -> FLOCK  ADVISORY  WRITE 555 fe:00:77 0 EOF
5: FLOCK  ADVISORY  WRITE 444 fe:00:77 0 EOF
6: FLOCK  ADVISORY  WRITE 666 103:0a:88 0 EOF
garbage
7: FLOCK ADVISORY WRITE notapid fe:00:77 0 EOF
8: FLOCK ADVISORY WRITE 9 fe:00:77:1 0 EOF
";
        assert_eq!(
            flock_holder(locks, 0xfe, 0, 77),
            Some(444),
            "exclusive first"
        );
        assert_eq!(flock_holder(locks, 0xfe, 1, 77), Some(333), "minor differs");
        assert_eq!(
            flock_holder(locks, 0x103, 0x0a, 88),
            Some(666),
            "hex device"
        );
        assert_eq!(flock_holder(locks, 0xfe, 0, 78), None, "no such inode");
        let shared = "2: FLOCK  ADVISORY  READ 222 fe:00:77 0 EOF\n";
        assert_eq!(flock_holder(shared, 0xfe, 0, 77), Some(222));
        assert_eq!(flock_holder("", 0xfe, 0, 77), None);
    }
}
