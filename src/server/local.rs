//! The server of `run-job`: live output goes to the terminal, everything else is a no-op
//! (the run directory already holds every file the job produced).

use super::{Server, ServerError};
use crate::phase::Phase;
use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Writes live output to standard output and accepts every report.
#[derive(Debug, Default)]
pub struct LocalServer {
    /// Live output is dropped, not printed (the log files have it): crash recovery in the
    /// daemon, whose standard output is its own log, and `run-job` with standard output on
    /// `/dev/null`.
    quiet: bool,
    /// Whether a command without secrets writes its log itself, standard output then
    /// following the log (`run-job`); not in crash recovery, which keeps the pipe.
    follows_log: bool,
    /// How far standard output has the phase's log.
    printed: Mutex<Printed>,
}

/// The log standard output follows, and up to which byte it has it.
#[derive(Debug, Default)]
struct Printed {
    log: PathBuf,
    len: u64,
}

impl LocalServer {
    /// Prints live output, unless standard output is `/dev/null` (nothing would read it:
    /// the log files have every byte). A command without secrets writes its log itself;
    /// what it wrote is copied from the log to standard output.
    pub fn new() -> LocalServer {
        LocalServer {
            quiet: stdout_is_dev_null(),
            follows_log: true,
            printed: Mutex::default(),
        }
    }

    /// A local server that prints nothing, and whose commands write through the pipe.
    pub fn quiet() -> LocalServer {
        LocalServer {
            quiet: true,
            ..LocalServer::default()
        }
    }

    /// Whether something reads standard output as it comes (a terminal, a pipe, a socket),
    /// so that output a command writes into its log itself should reach it soon: not
    /// `/dev/null`, not a regular file.
    pub fn has_live_reader(&self) -> bool {
        !self.quiet
            && std::fs::metadata("/proc/self/fd/1")
                .is_ok_and(|meta| !meta.file_type().is_file() && !meta.file_type().is_dir())
    }

    /// Copies `log` from where standard output left it up to `len` (direct capture: the
    /// command wrote those bytes itself). A closed or full terminal must not stop the job:
    /// the log has every byte.
    fn copy_from_log(&self, log: &Path, len: u64) {
        let mut printed = self
            .printed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if printed.log != log {
            // A new phase: its log starts with what was handed over as chunks (the banner).
            printed.log = log.to_path_buf();
            printed.len = 0;
        }
        if len <= printed.len {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = out.flush();
        let copied = File::open(log).and_then(|file| copy_range(&file, printed.len, len, &mut out));
        match copied {
            Ok(()) => printed.len = len,
            Err(err) => {
                log::debug!("cannot copy {} to standard output: {err}", log.display());
                // Not again for the same bytes.
                printed.len = len;
            }
        }
    }
}

/// Copies `file`'s bytes `from..to` to `out`: in the kernel (`sendfile`, from the page
/// cache to a terminal, pipe or file) where standard output takes it, else through a buffer.
fn copy_range(
    file: &File,
    from: u64,
    to: u64,
    out: &mut std::io::StdoutLock<'_>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let too_far = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let mut offset = libc::off_t::try_from(from).map_err(|_| too_far())?;
    let end = libc::off_t::try_from(to).map_err(|_| too_far())?;
    let stdout = std::io::stdout().as_raw_fd();
    while offset < end {
        let count = usize::try_from(end - offset).map_or(1 << 30, |n| n.min(1 << 30));
        // SAFETY: sendfile reads one descriptor and writes another; the only memory it
        // touches is `offset`, a local it advances.
        let sent = unsafe { libc::sendfile(stdout, file.as_raw_fd(), &mut offset, count) };
        if sent == 0 {
            // The file is shorter than it was said to be.
            return Ok(());
        }
        if sent > 0 {
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => wait_writable(stdout),
            Some(libc::EINVAL | libc::ENOSYS) => {
                // Standard output does not take sendfile: read and write.
                let mut buf = vec![0u8; 64 * 1024];
                let mut at = u64::try_from(offset).map_err(|_| too_far())?;
                while at < to {
                    let want = usize::try_from(to - at).map_or(buf.len(), |n| n.min(buf.len()));
                    let n = file.read_at(&mut buf[..want], at)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n])?;
                    at += n as u64;
                }
                return out.flush();
            }
            _ => return Err(err),
        }
    }
    Ok(())
}

/// Blocks until `fd` can be written (standard output left non-blocking by someone else).
fn wait_writable(fd: i32) {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd, a local.
    unsafe {
        libc::poll(&mut pollfd, 1, 1000);
    }
}

impl Server for LocalServer {
    fn post_result(&self, _job_id: &str, _body: &Value) -> Result<(), ServerError> {
        Ok(())
    }

    fn job_state(&self, _job_id: &str) -> Result<Option<String>, ServerError> {
        Ok(None)
    }

    fn post_agent_state(&self, _state: &str, _comment: &str) -> Result<(), ServerError> {
        Ok(())
    }

    fn output(&self, _job_id: &str, _phase: Phase, chunk: &[u8], log: &Path, len: u64) {
        if self.quiet {
            return;
        }
        if chunk.is_empty() {
            // The command (or a write that failed part-way) put the bytes in the log.
            self.copy_from_log(log, len);
            return;
        }
        {
            let mut printed = self
                .printed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if printed.log != log {
                printed.log = log.to_path_buf();
            }
            printed.len = len;
        }
        // A closed or full terminal must not stop the job: the log file has every byte.
        let _ = std::io::stdout().lock().write_all(chunk);
    }

    fn reads_output_back(&self) -> bool {
        self.follows_log
    }

    fn finish_output(&self, _job_id: &str, _phase: Phase) {
        if self.quiet {
            return;
        }
        let _ = std::io::stdout().lock().flush();
    }

    fn post_serial_log(
        &self,
        _job_id: &str,
        _phase: Phase,
        _path: &Path,
    ) -> Result<(), ServerError> {
        Ok(())
    }

    fn post_provision_log(
        &self,
        _job_id: &str,
        _code: i32,
        _detail: &str,
    ) -> Result<(), ServerError> {
        Ok(())
    }

    fn post_events(&self, _job_id: &str, _body: &Value) -> Result<(), ServerError> {
        Ok(())
    }

    fn upload_artifacts(&self, _job_id: &str, _tarball: &Path) -> Result<(), ServerError> {
        Ok(())
    }

    fn agent_state(&self) -> Option<(String, String)> {
        None
    }

    fn releases_allocations(&self) -> bool {
        false
    }
}

/// Whether this process's standard output is `/dev/null`.
fn stdout_is_dev_null() -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match (
        std::fs::metadata("/proc/self/fd/1"),
        std::fs::metadata("/dev/null"),
    ) {
        (Ok(out), Ok(null)) => out.file_type().is_char_device() && out.rdev() == null.rdev(),
        _ => false,
    }
}
