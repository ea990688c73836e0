//! The job document (PROTOCOL §4): parsed once from the server's JSON or a person's YAML,
//! checked where the agent relies on it, and kept byte for byte for `testflinger.json`.
//!
//! Checks, each failing with the field's name: the top level is a mapping; `job_id` is a
//! safe directory name (it becomes `<execution_basedir>/<job_id>`); `global_timeout` and
//! `output_timeout` are non-negative integers; every `<phase>_data` is a mapping or null;
//! `test_data.test_cmds` is a string or a list of strings; each `<phase>_data.secrets` maps
//! environment variable names to strings; `job_queue`, `parent_job_id`,
//! `job_status_webhook` and `attachments_status` are strings when set. A `null` counts as
//! absent everywhere. Everything else is passed through untouched.

use crate::config::{describe, Config, DEFAULT_GLOBAL_TIMEOUT, DEFAULT_OUTPUT_TIMEOUT};
use crate::phase::Phase;
use crate::yaml::{self, YamlError};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest job id accepted, in bytes.
pub const MAX_JOB_ID_LEN: usize = 128;

/// The `<phase>_data` keys, in phase order.
const DATA_KEYS: [&str; 5] = [
    "provision_data",
    "firmware_update_data",
    "test_data",
    "allocate_data",
    "reserve_data",
];

/// The data sections whose `attachments` list the agent unpacks (PROTOCOL §7).
const ATTACHMENT_PHASES: [Phase; 3] = [Phase::Provision, Phase::FirmwareUpdate, Phase::Test];

/// A job as the agent runs it.
#[derive(Clone, Debug)]
pub struct JobSpec {
    job_id: String,
    document: Map<String, Value>,
    /// What `testflinger.json` holds: the server's bytes, or the person's document as JSON.
    json: Vec<u8>,
}

/// A job definition the agent cannot run, naming the field and what was wrong with it.
/// Every variant but `Read` and `RandomId` is the job definition's fault.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot read job file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("job file {path}: {error}")]
    InFile {
        path: PathBuf,
        #[source]
        error: Box<JobError>,
    },
    #[error("job definition is empty")]
    Empty,
    #[error("job is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("job is not valid YAML: {0}")]
    Yaml(#[from] YamlError),
    #[error("job definition is not UTF-8 text: {0}")]
    NotText(#[source] std::str::Utf8Error),
    #[error("job must be a mapping (a JSON object), found {found}")]
    NotAMapping { found: String },
    #[error("job has no job_id (every job from the server has one)")]
    MissingJobId,
    #[error("job_id {id:?} cannot be used as a directory name: {reason}")]
    UnsafeJobId { id: String, reason: &'static str },
    #[error("job field {field}: expected {expected}, found {found}")]
    WrongType {
        /// The field, with the path inside it for nested values (`test_data.test_cmds[2]`).
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error(
        "job field {field}: secret name {name:?} is not an environment variable name \
         (letters, digits and `_`, not starting with a digit)"
    )]
    BadSecretName { field: String, name: String },
    #[error("cannot get random bytes from the system to make a job id: {0}")]
    RandomId(#[source] getrandom::Error),
}

impl JobSpec {
    /// Reads a job file: JSON when its first non-whitespace byte is `{`, YAML otherwise.
    /// A JSON job with a `job_id` is kept byte for byte, like a server job; a JSON or YAML
    /// job without one is treated as written by a person and gets a fresh id.
    pub fn load(path: &Path) -> Result<JobSpec, JobError> {
        let bytes = std::fs::read(path).map_err(|source| JobError::Read {
            path: path.to_owned(),
            source,
        })?;
        let in_file = |error| JobError::InFile {
            path: path.to_owned(),
            error: Box::new(error),
        };
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => Err(in_file(JobError::Empty)),
            Some(b'{') => {
                let document = parse_json_object(&bytes).map_err(in_file)?;
                if document.get("job_id").is_some_and(|v| !v.is_null()) {
                    JobSpec::from_json(&bytes).map_err(in_file)
                } else {
                    JobSpec::from_person(document).map_err(in_file)
                }
            }
            Some(_) => {
                let text =
                    std::str::from_utf8(&bytes).map_err(|e| in_file(JobError::NotText(e)))?;
                JobSpec::from_yaml(text).map_err(in_file)
            }
        }
    }

    /// A job as the server sends it: a JSON object with a `job_id`. `document_json()` is
    /// exactly `bytes`.
    pub fn from_json(bytes: &[u8]) -> Result<JobSpec, JobError> {
        let document = parse_json_object(bytes)?;
        let job_id = match document.get("job_id") {
            None | Some(Value::Null) => return Err(JobError::MissingJobId),
            Some(Value::String(id)) => id.clone(),
            Some(other) => return Err(wrong("job_id", "a string", other)),
        };
        check_job_id(&job_id)?;
        check_document(&document)?;
        Ok(JobSpec {
            job_id,
            document,
            json: bytes.to_vec(),
        })
    }

    /// A job as a person writes it for `run-job`. Without a `job_id` it gets a fresh random
    /// UUID (version 4), and `document_json()` is the document as JSON with that id first.
    pub fn from_yaml(text: &str) -> Result<JobSpec, JobError> {
        if text.trim().is_empty() {
            return Err(JobError::Empty);
        }
        match yaml::parse(text)? {
            Value::Object(document) => JobSpec::from_person(document),
            other => Err(JobError::NotAMapping {
                found: describe(&other),
            }),
        }
    }

    fn from_person(mut document: Map<String, Value>) -> Result<JobSpec, JobError> {
        let job_id = match document.get("job_id") {
            None | Some(Value::Null) => {
                let id = random_uuid()?;
                let mut with_id = Map::new();
                with_id.insert("job_id".to_owned(), Value::String(id.clone()));
                document.remove("job_id");
                with_id.extend(document);
                document = with_id;
                id
            }
            Some(Value::String(id)) => id.clone(),
            Some(other) => return Err(wrong("job_id", "a string", other)),
        };
        check_job_id(&job_id)?;
        check_document(&document)?;
        let json = serde_json::to_vec_pretty(&document).map_err(JobError::Json)?;
        Ok(JobSpec {
            job_id,
            document,
            json,
        })
    }

    /// The job id: safe as one directory name.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The whole document as parsed (after [`JobSpec::drop_attachment_lists`], without them).
    pub fn document(&self) -> &Map<String, Value> {
        &self.document
    }

    /// The bytes to write to `testflinger.json`: exactly what the server sent.
    pub fn document_json(&self) -> Vec<u8> {
        self.json.clone()
    }

    /// The job's `<phase>_data`, for the phases that have data (not setup or cleanup).
    pub fn phase_data(&self, phase: Phase) -> Option<&Value> {
        self.document.get(phase.data_key()?)
    }

    /// `job_queue`, when set.
    pub fn job_queue(&self) -> Option<&str> {
        self.text("job_queue")
    }

    /// `parent_job_id`, set on the sub-jobs of a multi-device job.
    pub fn parent_job_id(&self) -> Option<&str> {
        self.text("parent_job_id")
    }

    /// `job_status_webhook`, when set: the job then gets status events.
    pub fn job_status_webhook(&self) -> Option<&str> {
        self.text("job_status_webhook")
    }

    /// Whether the server says the job's attachments are ready to download.
    pub fn attachments_complete(&self) -> bool {
        self.text("attachments_status") == Some("complete")
    }

    /// `test_data.test_cmds` as one script: a list is joined with newlines.
    pub fn test_cmds(&self) -> Option<String> {
        match self.phase_data(Phase::Test)?.get("test_cmds")? {
            Value::String(s) => Some(s.clone()),
            Value::Array(items) => Some(
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            _ => None,
        }
    }

    /// The global timeout of every phase but reserve (PROTOCOL §5.6): the smaller of the
    /// job's `global_timeout` (default 14400 s) and the config's (default 14400 s).
    pub fn global_timeout(&self, config: &Config) -> Duration {
        self.timeout(
            "global_timeout",
            config.global_timeout,
            DEFAULT_GLOBAL_TIMEOUT,
        )
    }

    /// The output timeout of the test phase (PROTOCOL §5.6): the smaller of the job's
    /// `output_timeout` (default 900 s) and the config's (default 900 s).
    pub fn output_timeout(&self, config: &Config) -> Duration {
        self.timeout(
            "output_timeout",
            config.output_timeout,
            DEFAULT_OUTPUT_TIMEOUT,
        )
    }

    fn timeout(&self, field: &str, config: Option<u64>, default: u64) -> Duration {
        let job = self.document.get(field).and_then(Value::as_u64);
        Duration::from_secs(job.unwrap_or(default).min(config.unwrap_or(default)))
    }

    /// The secrets of `phase` (`<phase>_data.secrets`), name and value, in document order.
    /// Names and values were checked when the job was parsed.
    pub fn secrets(&self, phase: Phase) -> Vec<(String, String)> {
        self.phase_data(phase)
            .and_then(|data| data.get("secrets"))
            .and_then(Value::as_object)
            .map(|secrets| {
                secrets
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// After the attachments are unpacked (PROTOCOL §7): removes the `attachments` list from
    /// `provision_data`, `firmware_update_data` and `test_data`, and removes a section left
    /// empty, so its phase is skipped. `document_json()` keeps the original.
    pub fn drop_attachment_lists(&mut self) {
        for phase in ATTACHMENT_PHASES {
            let Some(key) = phase.data_key() else {
                continue;
            };
            let Some(Value::Object(data)) = self.document.get_mut(key) else {
                continue;
            };
            if data.remove("attachments").is_some() && data.is_empty() {
                self.document.remove(key);
            }
        }
    }

    fn text(&self, field: &str) -> Option<&str> {
        self.document.get(field).and_then(Value::as_str)
    }
}

fn parse_json_object(bytes: &[u8]) -> Result<Map<String, Value>, JobError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(JobError::Empty);
    }
    match serde_json::from_slice(bytes).map_err(JobError::Json)? {
        Value::Object(document) => Ok(document),
        other => Err(JobError::NotAMapping {
            found: describe(&other),
        }),
    }
}

fn wrong(field: impl Into<String>, expected: &'static str, found: &Value) -> JobError {
    JobError::WrongType {
        field: field.into(),
        expected,
        found: describe(found),
    }
}

/// The secret values of `phase` (`<phase>_data.secrets`) in a stored job document (the
/// bytes of `testflinger.json`), read loosely: whatever is a string there, even when the
/// rest of the document would not pass [`JobSpec::from_json`]. For masking what is sent
/// from a run directory after its job ended; nothing when it is not JSON.
pub fn secret_values(document: &[u8], phase: Phase) -> Vec<String> {
    let Ok(Value::Object(document)) = serde_json::from_slice::<Value>(document) else {
        return Vec::new();
    };
    phase
        .data_key()
        .and_then(|key| document.get(key))
        .and_then(|data| data.get("secrets"))
        .and_then(Value::as_object)
        .map(|secrets| {
            secrets
                .values()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Refuses ids that are not one plain directory name: empty, longer than
/// [`MAX_JOB_ID_LEN`] bytes, holding anything but ASCII letters, digits, `-`, `_` and `.`, or
/// starting with `.` (so never `.`, `..` or a hidden name).
pub fn check_job_id(id: &str) -> Result<(), JobError> {
    let unsafe_id = |reason| JobError::UnsafeJobId {
        id: id.chars().take(MAX_JOB_ID_LEN + 8).collect(),
        reason,
    };
    if id.is_empty() {
        return Err(unsafe_id("it is empty"));
    }
    if id.len() > MAX_JOB_ID_LEN {
        return Err(unsafe_id("it is longer than 128 bytes"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(unsafe_id(
            "only ASCII letters, digits, `-`, `_` and `.` are allowed",
        ));
    }
    if id.starts_with('.') {
        return Err(unsafe_id("it starts with `.`"));
    }
    Ok(())
}

/// Checks the fields the agent relies on (see the module docs).
fn check_document(document: &Map<String, Value>) -> Result<(), JobError> {
    let present = |field: &str| document.get(field).filter(|v| !v.is_null());
    for field in ["global_timeout", "output_timeout"] {
        if let Some(value) = present(field) {
            if value.as_u64().is_none() {
                return Err(wrong(field, "a whole number of seconds, 0 or more", value));
            }
        }
    }
    for field in [
        "job_queue",
        "parent_job_id",
        "job_status_webhook",
        "attachments_status",
    ] {
        if let Some(value) = present(field) {
            if !value.is_string() {
                return Err(wrong(field, "a string", value));
            }
        }
    }
    for field in DATA_KEYS {
        let Some(value) = present(field) else {
            continue;
        };
        let Value::Object(data) = value else {
            return Err(wrong(field, "a mapping or null", value));
        };
        if let Some(secrets) = data.get("secrets").filter(|v| !v.is_null()) {
            check_secrets(&format!("{field}.secrets"), secrets)?;
        }
        if field == "test_data" {
            if let Some(cmds) = data.get("test_cmds").filter(|v| !v.is_null()) {
                check_test_cmds(cmds)?;
            }
        }
    }
    Ok(())
}

fn check_test_cmds(cmds: &Value) -> Result<(), JobError> {
    const FIELD: &str = "test_data.test_cmds";
    match cmds {
        Value::String(_) => Ok(()),
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                if !item.is_string() {
                    return Err(wrong(format!("{FIELD}[{}]", index + 1), "a string", item));
                }
            }
            Ok(())
        }
        other => Err(wrong(FIELD, "a string or a list of strings", other)),
    }
}

fn check_secrets(field: &str, secrets: &Value) -> Result<(), JobError> {
    let Value::Object(map) = secrets else {
        return Err(wrong(field, "a mapping of names to strings", secrets));
    };
    for (name, value) in map {
        if !is_env_name(name) {
            return Err(JobError::BadSecretName {
                field: field.to_owned(),
                name: name.clone(),
            });
        }
        if !value.is_string() {
            return Err(wrong(format!("{field}.{name}"), "a string", value));
        }
    }
    Ok(())
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A random UUID, version 4, from 16 bytes of the system's random source, as 8-4-4-4-12
/// lower-case hex.
fn random_uuid() -> Result<String, JobError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(JobError::RandomId)?;
    Ok(format_uuid_v4(bytes))
}

fn format_uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SERVER_JOB: &str = r#"{
  "job_id": "2bac1457-7d5e-4b8f-9f6a-15f23f69fd39",
  "job_queue": "rpi4b",
  "name": "nightly smoke",
  "tags": ["nightly"],
  "global_timeout": 28800,
  "output_timeout": 3600,
  "job_priority": 10,
  "exclude_agents": [],
  "job_status_webhook": "https://hooks.example.com/tf",
  "provision_data": {"url": "https://example.com/image.img.xz"},
  "firmware_update_data": {"version": "latest", "ignore_failure": false},
  "test_data": {
    "test_cmds": "ssh ubuntu@$DEVICE_IP uname -a",
    "attachments": [{"agent": "data/config.json"}],
    "test_username": "ubuntu",
    "secrets": {"API_TOKEN": "resolved-secret-value"}
  },
  "allocate_data": {"allocate": true},
  "reserve_data": {"ssh_keys": ["lp:someone"], "timeout": 9000},
  "attachments_status": "complete",
  "client_id": "alice",
  "started_at": "2026-01-05T10:00:00+00:00Z"
}"#;

    fn config(extra: &str) -> Config {
        Config::from_yaml(&format!(
            "agent_id: a\nserver_address: http://x\njob_queues: [q]\n{extra}"
        ))
        .expect("valid config")
    }

    fn json_error(text: &str) -> String {
        match JobSpec::from_json(text.as_bytes()) {
            Ok(job) => panic!("accepted {text}: {job:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn yaml_error(text: &str) -> String {
        match JobSpec::from_yaml(text) {
            Ok(job) => panic!("accepted {text}: {job:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn is_uuid_v4(id: &str) -> bool {
        let parts: Vec<&str> = id.split('-').collect();
        parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
            && parts.iter().all(|p| {
                p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
            && parts[2].starts_with('4')
            && parts[3].starts_with(['8', '9', 'a', 'b'])
    }

    #[test]
    fn server_job_is_kept_byte_for_byte() {
        let job = JobSpec::from_json(SERVER_JOB.as_bytes()).expect("server job");
        assert_eq!(job.job_id(), "2bac1457-7d5e-4b8f-9f6a-15f23f69fd39");
        assert_eq!(job.document_json(), SERVER_JOB.as_bytes());
        assert_eq!(job.job_queue(), Some("rpi4b"));
        assert_eq!(job.parent_job_id(), None);
        assert_eq!(
            job.job_status_webhook(),
            Some("https://hooks.example.com/tf")
        );
        assert!(job.attachments_complete());
        assert_eq!(
            job.test_cmds().as_deref(),
            Some("ssh ubuntu@$DEVICE_IP uname -a")
        );
        assert_eq!(
            job.secrets(Phase::Test),
            [("API_TOKEN".to_owned(), "resolved-secret-value".to_owned())]
        );
        assert!(job.secrets(Phase::Provision).is_empty());
        assert!(job.secrets(Phase::Setup).is_empty());
        assert_eq!(
            job.phase_data(Phase::Reserve),
            Some(&json!({"ssh_keys": ["lp:someone"], "timeout": 9000}))
        );
        assert_eq!(job.phase_data(Phase::Setup), None);
    }

    #[test]
    fn attachment_lists_are_dropped_and_empty_sections_removed() {
        let mut job = JobSpec::from_json(
            br#"{"job_id": "j1", "provision_data": {"attachments": [{"agent": "a"}]},
                 "test_data": {"test_cmds": "x", "attachments": [{"agent": "b"}]}}"#,
        )
        .expect("job");
        let original = job.document_json();
        job.drop_attachment_lists();
        assert_eq!(job.phase_data(Phase::Provision), None);
        assert_eq!(
            job.phase_data(Phase::Test),
            Some(&json!({"test_cmds": "x"}))
        );
        assert_eq!(job.document_json(), original);
    }

    #[test]
    fn timeouts_take_the_smaller_of_job_and_config() {
        let job = |g: &str, o: &str| {
            let mut fields = vec![r#""job_id": "j""#.to_owned()];
            if !g.is_empty() {
                fields.push(format!(r#""global_timeout": {g}"#));
            }
            if !o.is_empty() {
                fields.push(format!(r#""output_timeout": {o}"#));
            }
            JobSpec::from_json(format!("{{{}}}", fields.join(",")).as_bytes()).expect("job")
        };
        let none = config("");
        let capped = config("global_timeout: 3600\noutput_timeout: 60\n");
        let s = Duration::from_secs;
        // Neither set: the defaults.
        assert_eq!(job("", "").global_timeout(&none), s(14400));
        assert_eq!(job("", "").output_timeout(&none), s(900));
        // The job shortens, never extends; the default caps the job without a config value.
        assert_eq!(job("28800", "3600").global_timeout(&none), s(14400));
        assert_eq!(job("28800", "3600").output_timeout(&none), s(900));
        assert_eq!(job("100", "10").global_timeout(&none), s(100));
        assert_eq!(job("100", "10").output_timeout(&none), s(10));
        // The config caps.
        assert_eq!(job("", "").global_timeout(&capped), s(3600));
        assert_eq!(job("", "").output_timeout(&capped), s(60));
        assert_eq!(job("7200", "120").global_timeout(&capped), s(3600));
        assert_eq!(job("600", "30").global_timeout(&capped), s(600));
        assert_eq!(job("600", "30").output_timeout(&capped), s(30));
        // A config above the default raises the cap to what the job asks.
        let generous = config("global_timeout: 43200\n");
        assert_eq!(job("28800", "").global_timeout(&generous), s(28800));
        assert_eq!(job("", "").global_timeout(&generous), s(14400));
        assert_eq!(job("null", "null").output_timeout(&none), s(900));
    }

    #[test]
    fn yaml_without_job_id_gets_a_uuid() {
        let job = JobSpec::from_yaml(
            "job_queue: rpi4\ntest_data:\n  test_cmds:\n    - echo one\n    - echo two\n",
        )
        .expect("person's job");
        assert!(is_uuid_v4(job.job_id()), "{}", job.job_id());
        assert_eq!(job.test_cmds().as_deref(), Some("echo one\necho two"));
        let written: Value = serde_json::from_slice(&job.document_json()).expect("JSON");
        assert_eq!(written["job_id"], json!(job.job_id()));
        assert_eq!(written["job_queue"], json!("rpi4"));
        assert_eq!(
            job.document().keys().next().map(String::as_str),
            Some("job_id")
        );
        let other = JobSpec::from_yaml("test_data: {test_cmds: x}\n").expect("job");
        assert_ne!(other.job_id(), job.job_id());
        let null_id = JobSpec::from_yaml("job_id: ~\n").expect("job");
        assert!(is_uuid_v4(null_id.job_id()));
    }

    #[test]
    fn yaml_with_job_id_keeps_it_and_job_queue_is_optional() {
        let job = JobSpec::from_yaml("job_id: my-job.1\ntest_data: {test_cmds: x}\n").expect("job");
        assert_eq!(job.job_id(), "my-job.1");
        assert_eq!(job.job_queue(), None);
    }

    #[test]
    fn uuid_format_sets_version_and_variant() {
        assert_eq!(
            format_uuid_v4([0; 16]),
            "00000000-0000-4000-8000-000000000000"
        );
        assert_eq!(
            format_uuid_v4([0xff; 16]),
            "ffffffff-ffff-4fff-bfff-ffffffffffff"
        );
        assert!(is_uuid_v4(&random_uuid().expect("urandom")));
    }

    #[test]
    fn unsafe_job_ids_are_refused() {
        let long = "a".repeat(129);
        for id in [
            "../x",
            "/abs",
            "a/b",
            "",
            ".",
            "..",
            ".hidden",
            "a b",
            "a\\b",
            "é",
            "a\u{0}b",
            long.as_str(),
        ] {
            let text = json!({"job_id": id}).to_string();
            let e = json_error(&text);
            assert!(e.starts_with("job_id "), "{id:?}: {e}");
            let e = yaml_error(&format!("job_id: {}\n", json!(id)));
            assert!(e.starts_with("job_id "), "{id:?}: {e}");
        }
        assert!(check_job_id(&"a".repeat(128)).is_ok());
        assert!(check_job_id("2bac1457-7d5e-4b8f-9f6a-15f23f69fd39").is_ok());
        assert!(check_job_id("a.b_c-D").is_ok());
        assert_eq!(
            json_error(r#"{"job_id": "../x"}"#),
            "job_id \"../x\" cannot be used as a directory name: only ASCII letters, digits, `-`, `_` and `.` are allowed"
        );
    }

    #[test]
    fn server_jobs_need_a_string_job_id() {
        assert_eq!(
            json_error(r#"{"job_queue": "q"}"#),
            "job has no job_id (every job from the server has one)"
        );
        assert_eq!(
            json_error(r#"{"job_id": null}"#),
            "job has no job_id (every job from the server has one)"
        );
        assert_eq!(
            json_error(r#"{"job_id": 5}"#),
            "job field job_id: expected a string, found the integer 5"
        );
        assert_eq!(
            yaml_error("job_id: [a]\n"),
            "job field job_id: expected a string, found a list"
        );
    }

    #[test]
    fn malformed_and_empty_input() {
        assert_eq!(json_error(""), "job definition is empty");
        assert_eq!(json_error(" \n"), "job definition is empty");
        assert_eq!(yaml_error(""), "job definition is empty");
        assert_eq!(yaml_error("\n\t \n"), "job definition is empty");
        let e = json_error(r#"{"job_id": "a", "#);
        assert!(
            e.starts_with("job is not valid JSON: ") && e.contains("line 1"),
            "{e}"
        );
        let e = json_error("{\"job_id\": \"a\"} trailing");
        assert!(e.starts_with("job is not valid JSON: "), "{e}");
        assert_eq!(
            json_error("[1, 2]"),
            "job must be a mapping (a JSON object), found a list"
        );
        assert_eq!(
            json_error("\"text\""),
            "job must be a mapping (a JSON object), found the string \"text\""
        );
        let e = yaml_error("test_data: [unclosed\n");
        assert!(
            e.starts_with("job is not valid YAML: ") && e.contains("line"),
            "{e}"
        );
        assert_eq!(
            yaml_error("- a\n"),
            "job must be a mapping (a JSON object), found a list"
        );
        assert_eq!(
            yaml_error("# only a comment\n"),
            "job must be a mapping (a JSON object), found null"
        );
        let e = yaml_error("1: x\n");
        assert!(e.contains("mapping keys must be strings"), "{e}");
    }

    #[test]
    fn wrong_field_types_are_named() {
        for (fields, message) in [
            (r#""global_timeout": "8h""#, "job field global_timeout: expected a whole number of seconds, 0 or more, found the string \"8h\""),
            (r#""output_timeout": -1"#, "job field output_timeout: expected a whole number of seconds, 0 or more, found the integer -1"),
            (r#""global_timeout": 1.5"#, "job field global_timeout: expected a whole number of seconds, 0 or more, found the number 1.5"),
            (r#""provision_data": "url""#, "job field provision_data: expected a mapping or null, found the string \"url\""),
            (r#""firmware_update_data": []"#, "job field firmware_update_data: expected a mapping or null, found a list"),
            (r#""test_data": 3"#, "job field test_data: expected a mapping or null, found the integer 3"),
            (r#""allocate_data": true"#, "job field allocate_data: expected a mapping or null, found the boolean true"),
            (r#""reserve_data": "x""#, "job field reserve_data: expected a mapping or null, found the string \"x\""),
            (r#""test_data": {"test_cmds": 5}"#, "job field test_data.test_cmds: expected a string or a list of strings, found the integer 5"),
            (r#""test_data": {"test_cmds": ["a", {"b": 1}]}"#, "job field test_data.test_cmds[2]: expected a string, found a mapping"),
            (r#""test_data": {"secrets": ["A"]}"#, "job field test_data.secrets: expected a mapping of names to strings, found a list"),
            (r#""test_data": {"secrets": {"A": 1}}"#, "job field test_data.secrets.A: expected a string, found the integer 1"),
            (r#""test_data": {"secrets": {"1A": "x"}}"#, "job field test_data.secrets: secret name \"1A\" is not an environment variable name (letters, digits and `_`, not starting with a digit)"),
            (r#""test_data": {"secrets": {"A-B": "x"}}"#, "job field test_data.secrets: secret name \"A-B\" is not an environment variable name (letters, digits and `_`, not starting with a digit)"),
            (r#""test_data": {"secrets": {"": "x"}}"#, "job field test_data.secrets: secret name \"\" is not an environment variable name (letters, digits and `_`, not starting with a digit)"),
            (r#""job_queue": 3"#, "job field job_queue: expected a string, found the integer 3"),
            (r#""parent_job_id": []"#, "job field parent_job_id: expected a string, found a list"),
            (r#""job_status_webhook": false"#, "job field job_status_webhook: expected a string, found the boolean false"),
            (r#""attachments_status": {}"#, "job field attachments_status: expected a string, found a mapping"),
        ] {
            assert_eq!(json_error(&format!(r#"{{"job_id": "j", {fields}}}"#)), message, "{fields}");
        }
    }

    #[test]
    fn nulls_count_as_absent() {
        let job = JobSpec::from_json(
            br#"{"job_id": "j", "provision_data": null, "job_status_webhook": null,
                 "parent_job_id": null, "global_timeout": null,
                 "test_data": {"test_cmds": null, "secrets": null}}"#,
        )
        .expect("nulls");
        assert_eq!(job.job_status_webhook(), None);
        assert_eq!(job.parent_job_id(), None);
        assert_eq!(job.test_cmds(), None);
        assert!(job.secrets(Phase::Test).is_empty());
        assert!(!job.attachments_complete());
    }

    #[test]
    fn secrets_keep_document_order_and_empty_values() {
        let job = JobSpec::from_json(
            br#"{"job_id": "j", "test_data": {"secrets": {"B_1": "", "_a": "v", "Z": "z"}}}"#,
        )
        .expect("job");
        let names: Vec<String> = job
            .secrets(Phase::Test)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["B_1", "_a", "Z"]);
    }

    #[test]
    fn load_picks_json_or_yaml_by_first_byte() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let write = |name: &str, body: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, body).expect("write");
            path
        };
        let server = write("server.json", format!("\n  {SERVER_JOB}").as_bytes());
        let job = JobSpec::load(&server).expect("server job");
        assert_eq!(job.document_json(), format!("\n  {SERVER_JOB}").as_bytes());
        let person_json = write("person.json", br#"{"test_data": {"test_cmds": "x"}}"#);
        let job = JobSpec::load(&person_json).expect("json without id");
        assert!(is_uuid_v4(job.job_id()));
        let person_yaml = write(
            "person.yaml",
            b"job_id: from-yaml\ntest_data: {test_cmds: x}\n",
        );
        assert_eq!(
            JobSpec::load(&person_yaml).expect("yaml").job_id(),
            "from-yaml"
        );
        let empty = write("empty.yaml", b"  \n\n");
        let e = JobSpec::load(&empty).expect_err("empty").to_string();
        assert!(
            e.contains("empty.yaml") && e.ends_with("job definition is empty"),
            "{e}"
        );
        let binary = write("binary.yaml", b"\xff\xfe\x00");
        let e = JobSpec::load(&binary).expect_err("binary").to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        let bad = write("bad.json", b"{\"job_id\": ");
        let e = JobSpec::load(&bad).expect_err("bad json").to_string();
        assert!(
            e.contains("bad.json") && e.contains("not valid JSON"),
            "{e}"
        );
        let missing = dir.join("missing.json");
        let e = JobSpec::load(&missing).expect_err("missing").to_string();
        assert!(e.contains("missing.json"), "{e}");
    }

    #[test]
    fn secret_values_are_read_loosely_from_the_stored_document() {
        let doc = br#"{"job_id": "not checked here", "test_data": {"secrets": {"A": "x1", "B": 2, "C": ""}},
                      "provision_data": {"secrets": ["y"]}}"#;
        assert_eq!(secret_values(doc, Phase::Test), ["x1", ""]);
        assert!(secret_values(doc, Phase::Provision).is_empty());
        assert!(secret_values(doc, Phase::Setup).is_empty());
        assert!(secret_values(b"not json", Phase::Test).is_empty());
    }
}
