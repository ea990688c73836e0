//! The result files of a run directory: `testflinger-outcome.json` (the cumulative phase
//! statuses), `device-connector-error.json` and `device-info.json` (PROTOCOL §6.5).

use crate::phase::Phase;
use serde_json::{json, Map, Value};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub const JOB_FILE: &str = "testflinger.json";
pub const OUTCOME_FILE: &str = "testflinger-outcome.json";
pub const CONNECTOR_ERROR_FILE: &str = "device-connector-error.json";
pub const DEVICE_INFO_FILE: &str = "device-info.json";

/// `testflinger-outcome.json`: `{"status": {"<phase>": <exit code>, ...}}`, rewritten
/// atomically after each phase that ran.
#[derive(Debug)]
pub struct OutcomeFile {
    path: PathBuf,
    status: Map<String, Value>,
}

impl OutcomeFile {
    /// Creates the file as `{}` in `rundir` (job start).
    pub fn create(rundir: &Path) -> io::Result<OutcomeFile> {
        let path = rundir.join(OUTCOME_FILE);
        write_atomic(&path, b"{}")?;
        Ok(OutcomeFile {
            path,
            status: Map::new(),
        })
    }

    /// The file already in `rundir`, with the statuses it holds (crash recovery); a missing
    /// or unreadable file starts empty.
    pub fn open(rundir: &Path) -> OutcomeFile {
        let path = rundir.join(OUTCOME_FILE);
        let status = fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .and_then(|body| body.get("status").and_then(Value::as_object).cloned())
            .unwrap_or_default();
        OutcomeFile { path, status }
    }

    /// Records `phase`'s exit code and rewrites the file.
    pub fn set_status(&mut self, phase: Phase, exit_code: i32) -> io::Result<()> {
        self.status
            .insert(phase.name().to_owned(), json!(exit_code));
        let body = serde_json::to_vec(&self.body()).map_err(io::Error::other)?;
        write_atomic(&self.path, &body)
    }

    /// Adds the final `job_state` to the file in `rundir`, making it the body of the final
    /// report: `{"status": {...}, "job_state": "complete"}`.
    pub fn finalize(rundir: &Path, job_state: &str) -> io::Result<()> {
        let path = rundir.join(OUTCOME_FILE);
        let mut body: Map<String, Value> = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Map::new(),
            Err(err) => return Err(err),
        };
        body.insert("job_state".to_owned(), json!(job_state));
        let bytes = serde_json::to_vec(&body).map_err(io::Error::other)?;
        write_atomic(&path, &bytes)
    }

    /// The body posted to the server: `{"status": {...}}`.
    pub fn body(&self) -> Value {
        json!({ "status": self.status })
    }
}

/// Bytes this process may still write on the file system `stats` describes: root may use
/// the blocks reserved for it, others only the available ones.
pub fn free_bytes(stats: &nix::sys::statvfs::Statvfs) -> u64 {
    let blocks = if nix::unistd::geteuid().is_root() {
        stats.blocks_free()
    } else {
        stats.blocks_available()
    };
    blocks.saturating_mul(stats.fragment_size())
}

/// Whether the file system holding `file` has a block left for this process (`true` when
/// it cannot be asked).
pub fn has_room(file: &fs::File) -> bool {
    nix::sys::statvfs::fstatvfs(file).map_or(true, |stats| free_bytes(&stats) > 0)
}

/// Writes `data` to `path` through a temporary file and a rename, so a reader (or a crash)
/// never sees half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = fs::write(&tmp, data).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        // A full disk must not keep the half-written copy either.
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Empties `device-connector-error.json` at job start.
pub fn reset_connector_error(rundir: &Path) -> io::Result<()> {
    fs::write(rundir.join(CONNECTOR_ERROR_FILE), b"")
}

/// The failure detail for `phase` from `device-connector-error.json`: `name: message` or
/// `name: message caused by cause`, `""` when there is none.
///
/// Connectors append one JSON object per failure, so the file may hold several objects
/// back to back; the last one that describes `phase` wins. Anything unparsable is ignored.
pub fn connector_error_detail(rundir: &Path, phase: Phase) -> String {
    match read_connector_file(&rundir.join(CONNECTOR_ERROR_FILE)) {
        Some(text) => parse_connector_error(&text, phase),
        None => String::new(),
    }
}

/// The most the agent reads of a file a device connector wrote (`device-info.json`,
/// `device-connector-error.json`): a server record holds 16 MiB at most, and the agent's
/// memory stays small whatever a connector leaves behind.
pub const CONNECTOR_FILE_LIMIT: u64 = 4 << 20;

/// A connector's file, `None` when it is absent, unreadable or over
/// [`CONNECTOR_FILE_LIMIT`] (said in the log).
fn read_connector_file(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = fs::File::open(path).ok()?;
    let mut text = Vec::new();
    if let Err(err) = file.take(CONNECTOR_FILE_LIMIT + 1).read_to_end(&mut text) {
        log::warn!("cannot read {}: {err}", path.display());
        return None;
    }
    if text.len() as u64 > CONNECTOR_FILE_LIMIT {
        log::warn!(
            "{} is over {} MiB; ignored",
            path.display(),
            CONNECTOR_FILE_LIMIT >> 20
        );
        return None;
    }
    Some(text)
}

/// [`connector_error_detail`] of the file's content `text`.
pub fn parse_connector_error(text: &[u8], phase: Phase) -> String {
    let key = format!("{phase}_exception_info");
    let mut detail = String::new();
    for value in serde_json::Deserializer::from_slice(text).into_iter::<Value>() {
        let Ok(value) = value else { break };
        let Some(info) = value.get(&key) else {
            continue;
        };
        let field = |name: &str| info.get(name).and_then(Value::as_str).unwrap_or("");
        detail = format!(
            "{}: {}",
            field("exception_name"),
            field("exception_message")
        );
        let cause = field("exception_cause");
        if !cause.is_empty() {
            detail.push_str(" caused by ");
            detail.push_str(cause);
        }
    }
    detail
}

/// The content of `device-info.json` when the connector wrote a JSON object there.
pub fn read_device_info(rundir: &Path) -> Option<Value> {
    let text = read_connector_file(&rundir.join(DEVICE_INFO_FILE))?;
    let info = parse_device_info(&text);
    if info.is_none() {
        log::warn!(
            "{} in {} is not a JSON object; not posted",
            DEVICE_INFO_FILE,
            rundir.display()
        );
    }
    info
}

/// The content `text` of `device-info.json` when it is a JSON object.
pub fn parse_device_info(text: &[u8]) -> Option<Value> {
    match serde_json::from_slice::<Value>(text) {
        Ok(value @ Value::Object(_)) => Some(value),
        Ok(_) | Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_cumulative_and_in_phase_order() {
        let tmp = crate::testing::tempdir("outcome-status");
        let dir = tmp.path();
        let mut outcome = OutcomeFile::create(dir).expect("create");
        assert_eq!(
            fs::read_to_string(dir.join(OUTCOME_FILE)).expect("read"),
            "{}"
        );
        outcome.set_status(Phase::Setup, 0).expect("write");
        outcome.set_status(Phase::Test, 1).expect("write");
        let text = fs::read_to_string(dir.join(OUTCOME_FILE)).expect("read");
        assert_eq!(text, r#"{"status":{"setup":0,"test":1}}"#);
    }

    #[test]
    fn connector_files_over_the_limit_are_ignored_not_read_whole() {
        let tmp = crate::testing::tempdir("outcome-limit");
        let dir = tmp.path();
        let info = format!(
            r#"{{"device_ip": "10.0.0.1", "pad": "{}"}}"#,
            "x".repeat(1000)
        );
        fs::write(dir.join(DEVICE_INFO_FILE), &info).expect("write");
        assert!(read_device_info(dir).is_some(), "a normal file is read");
        // Sparse: the size is there without the disk space.
        let big = fs::File::create(dir.join(DEVICE_INFO_FILE)).expect("create");
        big.set_len(CONNECTOR_FILE_LIMIT + 1).expect("set_len");
        assert_eq!(read_device_info(dir), None);
        let error = fs::File::create(dir.join(CONNECTOR_ERROR_FILE)).expect("create");
        error.set_len(CONNECTOR_FILE_LIMIT + 1).expect("set_len");
        assert_eq!(connector_error_detail(dir, Phase::Provision), "");
    }

    #[test]
    fn connector_errors_concatenated_and_garbage() {
        let tmp = crate::testing::tempdir("outcome-conn");
        let dir = tmp.path();
        let path = dir.join(CONNECTOR_ERROR_FILE);
        fs::write(&path, "").expect("write");
        assert_eq!(connector_error_detail(dir, Phase::Provision), "");
        fs::write(
            &path,
            r#"{"provision_exception_info": {"exception_name": "ProvisioningError", "exception_message": "no boot", "exception_cause": "timeout"}}{"test_exception_info": {"exception_name": "E", "exception_message": "m"}}"#,
        )
        .expect("write");
        assert_eq!(
            connector_error_detail(dir, Phase::Provision),
            "ProvisioningError: no boot caused by timeout"
        );
        assert_eq!(connector_error_detail(dir, Phase::Test), "E: m");
        fs::write(&path, b"\xff{not json").expect("write");
        assert_eq!(connector_error_detail(dir, Phase::Test), "");
    }
}
