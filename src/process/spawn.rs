//! The runner's first stage: the shell started in a process group of its own, with its
//! output connected ([`Capture`]), the phase token that marks its processes, and the
//! `oom_score_adj` written in the child between fork and exec.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nix::libc;
use nix::unistd::Pid;

use super::capture::Capture;
use super::group::ProcessGroupGuard;
use super::sweep::TOKEN_VAR;
use super::{CommandSpec, OutputSink, ProcessError};

/// A command just started: the stage after [`spawn`] owns these.
pub(super) struct Spawned {
    /// Owns the process group from here to the reap.
    pub guard: ProcessGroupGuard,
    /// The runner's end of the output.
    pub capture: Capture,
    /// The shell's pid, which is the group id.
    pub leader: Pid,
    /// When the shell was started.
    pub start: Instant,
}

/// Starts `/bin/sh -c spec.command` in `spec.cwd`, in a new process group, stdin from
/// `/dev/null`, stdout and stderr on the output [`Capture::open`] chose, with the agent's
/// environment plus `spec.env` plus the phase token. The sink hears of the token before
/// the fork ([`OutputSink::spawning`]) and of the group after it ([`OutputSink::spawned`]).
///
/// Once this returns, the agent holds no copy of the command's end of the output: only
/// the command's tree does, so the output's close means that no process holds it.
pub(super) fn spawn(
    spec: &CommandSpec,
    sink: &mut dyn OutputSink,
) -> Result<Spawned, ProcessError> {
    let token = new_token();
    let spawn_error = |source| ProcessError::Spawn {
        cwd: spec.cwd.clone(),
        source,
    };
    let (capture, out_write, err_write) = Capture::open(sink, spawn_error)?;

    let leader_pid = {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&spec.command)
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(out_write)
            .stderr(err_write)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env(TOKEN_VAR, &token)
            .process_group(0);
        if let Some(oom) = spec.oom_score_adj.map(OomScoreAdj::new) {
            // SAFETY: the hook runs between fork and exec and only makes async-signal-safe
            // calls (open, write, close) on a buffer formatted before the fork; it allocates
            // nothing and takes no lock.
            unsafe {
                cmd.pre_exec(move || {
                    oom.apply();
                    Ok(())
                });
            }
        }
        sink.spawning(&token);
        // std's Child neither kills nor waits on drop; the guard owns the process from here.
        cmd.spawn().map_err(spawn_error)?.id()
        // `cmd` drops here, closing the agent's copies of the pipe's write end (or of the
        // command's own description of the log file).
    };
    let start = Instant::now();
    let leader = Pid::from_raw(i32::try_from(leader_pid).expect("a Linux pid fits in i32"));
    let guard = ProcessGroupGuard::new(leader, &token);
    sink.spawned(leader.as_raw(), &token);
    log::debug!("command started: pgid {leader}, cwd {}", spec.cwd.display());
    Ok(Spawned {
        guard,
        capture,
        leader,
        start,
    })
}

/// A fresh 128-bit hex token, unique per command.
fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 16];
    let random = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        use std::hash::{BuildHasher, Hasher};
        let state = std::collections::hash_map::RandomState::new();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = state.build_hasher();
            h.write_u32(std::process::id());
            h.write_u128(nanos);
            h.write_u64(count);
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value to write to `/proc/self/oom_score_adj` in the child, formatted before the
/// fork so that the child only calls `open`, `write` and `close` (async-signal-safe).
#[derive(Clone, Copy)]
struct OomScoreAdj {
    text: [u8; 12],
    len: usize,
}

impl OomScoreAdj {
    fn new(value: i32) -> OomScoreAdj {
        let digits = value.to_string();
        let mut text = [0u8; 12];
        // An i32 has at most 11 characters ("-2147483648").
        let len = digits.len().min(text.len());
        text[..len].copy_from_slice(&digits.as_bytes()[..len]);
        OomScoreAdj { text, len }
    }

    /// Runs in the child between fork and exec: no allocation, no lock, errors ignored (a
    /// sandbox without a writable `/proc`, or a value refused without privilege, must not
    /// stop the command).
    fn apply(&self) {
        const PATH: &std::ffi::CStr = c"/proc/self/oom_score_adj";
        // SAFETY: open, write and close are async-signal-safe; the path is a static C
        // string and the buffer lives in this closure's captured copy.
        unsafe {
            let fd = libc::open(PATH.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                let _ = libc::write(fd, self.text.as_ptr().cast(), self.len);
                let _ = libc::close(fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_score_adj_is_formatted_before_the_fork() {
        for (value, text) in [
            (500, "500"),
            (-1000, "-1000"),
            (0, "0"),
            (i32::MIN, "-2147483648"),
        ] {
            let adj = OomScoreAdj::new(value);
            assert_eq!(&adj.text[..adj.len], text.as_bytes());
        }
    }
}
