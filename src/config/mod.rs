//! The agent's YAML config file (PROTOCOL §11): every key of the archived and the current
//! Python agent, their types and defaults, plus this agent's own tuning keys.
//!
//! Each key is one row of the `config_keys!` table, which generates the [`Key`] enum (how
//! code names a key, so a misspelt key does not compile), the [`Config`] field and [`KEYS`].
//! `KEYS` drives validation, the defaults, the effective config printed by
//! `testflinger-agent check-config`, the variables exported to phase commands and the
//! reference table in `docs/configuration.md` ([`reference_table_markdown`]). A config file that
//! the Python agent accepts loads here unchanged, with these deliberate differences: values
//! inside `job_queues`, `advertised_queues` and `advertised_images` must be strings (the
//! server refuses anything else), agent ids that cannot be a path or URL segment are
//! refused, and `advertised_images` in the list-of-one-key-maps shape is turned into the
//! map shape the server accepts.
//!
//! One concept per file: `keys.rs` is the table of keys (adding a key is adding a row
//! there), `schema.rs` what a row holds and the `config_keys!` macro that expands it,
//! `field.rs` how each typed field is read, `validate.rs` how each value is checked,
//! `reference.rs` the Markdown tables generated from the table, and this file loading a
//! file into a [`Config`] and what the rest of the agent asks of it.

mod field;
mod keys;
mod reference;
mod schema;
#[cfg(test)]
mod tests;
mod validate;

pub use keys::{
    key_spec, Config, Key, LogFormat, DEFAULT_GLOBAL_TIMEOUT, DEFAULT_OUTPUT_TIMEOUT, KEYS,
};
pub use reference::{migration_table_markdown, reference_table_markdown};
pub use schema::{
    DefaultValue, KeySpec, KeyType, Origin, DEFAULT_SYSLOG_FACILITY, MAX_SECONDS, SYSLOG_FACILITIES,
};
pub(crate) use validate::describe;
pub use validate::python_level;

use crate::phase::Phase;
use crate::yaml::{self, YamlError};
use schema::DefaultValue::Required;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use validate::{check_value, closest_key};
// The unit tests (tests.rs) also take these names from here, through `use super::*`.
#[cfg(test)]
use {schema::KeyType::*, std::collections::BTreeMap, validate::edit_distance};

/// A config file that cannot be used, naming the key, what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {error}")]
    InFile {
        path: PathBuf,
        #[source]
        error: Box<ConfigError>,
    },
    #[error("config is not valid YAML: {0}")]
    Yaml(#[from] YamlError),
    #[error("config must be a mapping of keys to values, found {found}")]
    NotAMapping { found: String },
    #[error("unknown config key {key}{}", suggestion.map(|s| format!(" (did you mean {s}?)")).unwrap_or_default())]
    UnknownKey {
        key: String,
        suggestion: Option<&'static str>,
    },
    #[error("config key {key} is required but missing")]
    Missing { key: &'static str },
    #[error("config key {key}: expected {expected}, found {found}")]
    WrongType {
        /// The key, with the path inside it for nested values (`advertised_images.rpi4`).
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("config key {key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_yaml(&text).map_err(|error| ConfigError::InFile {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    /// Parses and validates config text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let document = yaml::parse(text)?;
        let Value::Object(file) = document else {
            return Err(ConfigError::NotAMapping {
                found: describe(&document),
            });
        };
        Config::from_map(file)
    }

    fn from_map(file: Map<String, Value>) -> Result<Config, ConfigError> {
        if let Some(unknown) = file.keys().find(|k| key_spec(k).is_none()) {
            return Err(ConfigError::UnknownKey {
                key: unknown.clone(),
                suggestion: closest_key(unknown),
            });
        }
        let mut effective = Map::new();
        let mut warnings = Vec::new();
        for spec in KEYS {
            let value = match file.get(spec.name) {
                Some(v) if !v.is_null() => Some(check_value(spec, v, &mut warnings)?),
                _ => match spec.default {
                    Required => return Err(ConfigError::Missing { key: spec.name }),
                    default => default.to_value(),
                },
            };
            if let Some(value) = value {
                effective.insert(spec.name.to_owned(), value);
            }
        }
        Config::from_effective(effective, warnings)
    }

    /// The command configured for `phase`, `None` when missing, empty or only whitespace.
    pub fn command(&self, phase: Phase) -> Option<&str> {
        self.value(Key::command_of(phase))
            .and_then(Value::as_str)
            .filter(|c| !c.trim().is_empty())
    }

    /// Variables exported to every phase command (PROTOCOL §6.3): each string-valued key of
    /// the effective config, defaults included (so the unset `*_command` keys are exported
    /// as empty strings), under its own lower-case name, in [`KEYS`] order. Keys whose value
    /// is not a string are not exported.
    pub fn command_env(&self) -> Vec<(String, String)> {
        self.effective
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect()
    }

    /// Sets `token_file` from the command line (it is then exported to phase commands).
    pub fn set_token_file(&mut self, path: &Path) {
        let text = path.to_string_lossy().into_owned();
        self.token_file = Some(text.clone());
        self.set_effective(Key::TokenFile, Value::String(text));
    }

    /// Sets `metrics_endpoint_port` from the command line.
    pub fn set_metrics_endpoint_port(&mut self, port: u16) {
        self.metrics_endpoint_port = Some(port);
        self.set_effective(Key::MetricsEndpointPort, Value::from(port));
    }

    /// Inserts a key into the effective map, keeping [`KEYS`] order.
    fn set_effective(&mut self, key: Key, value: Value) {
        self.effective.insert(key.name().to_owned(), value);
        let mut ordered = Map::new();
        for spec in KEYS {
            if let Some(v) = self.effective.remove(spec.name) {
                ordered.insert(spec.name.to_owned(), v);
            }
        }
        self.effective = ordered;
    }

    /// The effective value of `key`, as a JSON value (`None` for an absent optional key):
    /// what the server is sent for the keys posted as they are.
    ///
    /// ```
    /// use testflinger_agent::config::{Config, Key};
    /// let config = Config::from_yaml("agent_id: a\nserver_address: http://x\njob_queues: [q]\n")
    ///     .expect("a valid config");
    /// assert_eq!(config.value(Key::PollingInterval).and_then(|v| v.as_u64()), Some(10));
    /// ```
    ///
    /// A misspelt key does not compile (the same lines, one letter short):
    ///
    /// ```compile_fail
    /// use testflinger_agent::config::{Config, Key};
    /// let config = Config::from_yaml("agent_id: a\nserver_address: http://x\njob_queues: [q]\n")
    ///     .expect("a valid config");
    /// assert_eq!(config.value(Key::PolingInterval).and_then(|v| v.as_u64()), Some(10));
    /// ```
    pub fn value(&self, key: Key) -> Option<&Value> {
        self.effective.get(key.name())
    }

    /// The effective value of the key named `name` (`None` for an absent optional key or
    /// a name that is not a key); code that knows the key uses [`Config::value`].
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.effective.get(name)
    }

    /// The effective config as YAML, defaults filled in, in [`KEYS`] order; absent optional
    /// keys are left out. Loading this text gives the same config.
    pub fn effective_yaml(&self) -> String {
        yaml::to_string(&Value::Object(self.effective.clone()))
    }

    /// Time between SIGTERM and SIGKILL when a command is stopped.
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.termination_grace_period)
    }

    /// How long cleanup may still run once the agent is stopping.
    pub fn shutdown_cleanup_budget(&self) -> Duration {
        Duration::from_secs(self.shutdown_cleanup_timeout)
    }

    /// Time to wait between polls for a job.
    pub fn polling_period(&self) -> Duration {
        Duration::from_secs(self.polling_interval)
    }

    /// Time to wait for background processes holding a finished command's output.
    pub fn straggler_wait(&self) -> Duration {
        Duration::from_millis(self.straggler_wait_ms)
    }

    /// Time between cancellation checks while a command runs.
    pub fn cancel_check_period(&self) -> Duration {
        Duration::from_secs(self.cancel_check_interval)
    }

    /// Time between posts of live output.
    pub fn output_post_period(&self) -> Duration {
        Duration::from_secs(self.output_post_interval)
    }
}
