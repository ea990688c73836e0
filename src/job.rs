//! The job document (PROTOCOL §4): parsed once from the server's JSON or a person's YAML.

use crate::config::Config;
use crate::phase::Phase;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A job as the agent runs it.
#[derive(Clone, Debug)]
pub struct JobSpec {
    job_id: String,
    document: Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot read job file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("job: {0}")]
    Invalid(String),
}

impl JobSpec {
    pub fn load(_path: &Path) -> Result<JobSpec, JobError> {
        Err(JobError::Invalid("job parser being written".into()))
    }
    pub fn job_id(&self) -> &str {
        &self.job_id
    }
    pub fn document(&self) -> &Map<String, Value> {
        &self.document
    }
    /// The bytes to write to `testflinger.json`.
    pub fn document_json(&self) -> Vec<u8> {
        Vec::new()
    }
    pub fn phase_data(&self, phase: Phase) -> Option<&Value> {
        self.document.get(phase.data_key()?)
    }
    pub fn global_timeout(&self, _config: &Config) -> Duration {
        Duration::from_secs(14400)
    }
    pub fn output_timeout(&self, _config: &Config) -> Duration {
        Duration::from_secs(900)
    }
    pub fn secrets(&self, _phase: Phase) -> Vec<(String, String)> {
        Vec::new()
    }
}
