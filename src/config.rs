//! The agent's YAML config file (PROTOCOL §11): every key of the archived and the current
//! Python agent, their types and defaults, plus this agent's own tuning keys.

use crate::phase::Phase;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The effective configuration, defaults filled in.
#[derive(Clone, Debug)]
pub struct Config {
    pub agent_id: String,
    pub server_address: String,
    pub job_queues: Vec<String>,
    pub polling_interval: u64,
    pub execution_basedir: PathBuf,
    pub logging_basedir: PathBuf,
    pub results_basedir: PathBuf,
    pub logging_level: log::LevelFilter,
    pub logging_quiet: bool,
    pub provision_type: Option<String>,
    pub global_timeout: Option<u64>,
    pub output_timeout: Option<u64>,
    pub identifier: Option<String>,
    pub location: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when a command is stopped.
    pub termination_grace_period: u64,
}

/// A config file that cannot be used, with the key and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_yaml(&text)
    }

    pub fn from_yaml(_text: &str) -> Result<Config, ConfigError> {
        Err(ConfigError::Invalid("config parser being written".into()))
    }

    /// The command configured for `phase`, `None` when missing or empty.
    pub fn command(&self, _phase: Phase) -> Option<&str> {
        None
    }

    /// Variables exported to every phase command: each string-valued key, by its name.
    pub fn command_env(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.termination_grace_period)
    }
}
