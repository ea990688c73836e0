//! The server of `run-job`: live output goes to the terminal, everything else is a no-op
//! (the run directory already holds every file the job produced).

use super::{Server, ServerError};
use crate::phase::Phase;
use serde_json::Value;
use std::io::Write;
use std::path::Path;

/// Writes live output to standard output and accepts every report.
#[derive(Debug, Default)]
pub struct LocalServer {
    /// Live output is dropped, not printed (the log files have it): crash recovery in the
    /// daemon, whose standard output is its own log.
    quiet: bool,
}

impl LocalServer {
    /// Prints live output, unless standard output is `/dev/null` (nothing would read it:
    /// the log files have every byte).
    pub fn new() -> LocalServer {
        LocalServer {
            quiet: stdout_is_dev_null(),
        }
    }

    /// A local server that prints nothing.
    pub fn quiet() -> LocalServer {
        LocalServer { quiet: true }
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

    fn output(&self, _job_id: &str, _phase: Phase, chunk: &[u8], _log: &Path, _len: u64) {
        if self.quiet {
            return;
        }
        // A closed or full terminal must not stop the job: the log file has every byte.
        let _ = std::io::stdout().lock().write_all(chunk);
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
