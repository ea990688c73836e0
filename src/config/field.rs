//! Reading a [`Config`] field from its key's checked, defaulted value: the [`Field`]
//! trait, by the field's type, and the readers of the keys that warn.

use super::validate::python_level;
#[cfg(doc)]
use super::Config;
use super::{ConfigError, Key, LogFormat};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A type a key's checked value can be read as: the payload of a [`Field`].
pub(super) trait FromValue: Sized {
    /// The value as this type; `None` when it does not have this shape (which a checked
    /// value of the right key never lacks).
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for String {
    fn from_value(value: &Value) -> Option<Self> {
        value.as_str().map(str::to_owned)
    }
}

impl FromValue for PathBuf {
    fn from_value(value: &Value) -> Option<Self> {
        value.as_str().map(PathBuf::from)
    }
}

impl FromValue for bool {
    fn from_value(value: &Value) -> Option<Self> {
        value.as_bool()
    }
}

impl FromValue for u64 {
    fn from_value(value: &Value) -> Option<Self> {
        value.as_u64()
    }
}

impl FromValue for u16 {
    fn from_value(value: &Value) -> Option<Self> {
        value.as_u64().and_then(|n| u16::try_from(n).ok())
    }
}

impl FromValue for i32 {
    fn from_value(value: &Value) -> Option<Self> {
        value.as_i64().and_then(|n| i32::try_from(n).ok())
    }
}

impl FromValue for LogFormat {
    fn from_value(value: &Value) -> Option<Self> {
        Some(match value.as_str() {
            Some("python") => LogFormat::Python,
            _ => LogFormat::Agent,
        })
    }
}

/// A list keeps the items of the right shape.
impl<T: FromValue> FromValue for Vec<T> {
    fn from_value(value: &Value) -> Option<Self> {
        Some(value.as_array()?.iter().filter_map(T::from_value).collect())
    }
}

/// A mapping keeps the entries whose value has the right shape.
impl<T: FromValue> FromValue for BTreeMap<String, T> {
    fn from_value(value: &Value) -> Option<Self> {
        let map = value.as_object()?;
        Some(
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), T::from_value(v)?)))
                .collect(),
        )
    }
}

/// The type of a [`Config`] field, read from its key's checked, defaulted value.
pub(super) trait Field: Sized {
    fn read(
        key: Key,
        value: Option<&Value>,
        warnings: &mut Vec<String>,
    ) -> Result<Self, ConfigError>;
}

/// A plain type: the key is required or has a default, so it always has a value.
impl<T: FromValue> Field for T {
    fn read(key: Key, value: Option<&Value>, _: &mut Vec<String>) -> Result<Self, ConfigError> {
        value
            .and_then(T::from_value)
            .ok_or(ConfigError::Missing { key: key.name() })
    }
}

/// An `Option`: `None` when the key is absent.
impl<T: FromValue> Field for Option<T> {
    fn read(_: Key, value: Option<&Value>, _: &mut Vec<String>) -> Result<Self, ConfigError> {
        Ok(value.and_then(T::from_value))
    }
}

/// `job_queues`, with a warning when the list is empty.
pub(super) fn read_job_queues(
    key: Key,
    value: Option<&Value>,
    warnings: &mut Vec<String>,
) -> Result<Vec<String>, ConfigError> {
    let queues = Vec::<String>::read(key, value, warnings)?;
    if queues.is_empty() {
        warnings.push(format!(
            "config key {} is an empty list: the agent will never get a job",
            key.name()
        ));
    }
    Ok(queues)
}

/// `logging_level`: a Python level name; an unknown one means INFO, with a warning.
pub(super) fn read_logging_level(
    key: Key,
    value: Option<&Value>,
    warnings: &mut Vec<String>,
) -> Result<log::LevelFilter, ConfigError> {
    let name = value.and_then(Value::as_str).unwrap_or_default();
    Ok(python_level(name).unwrap_or_else(|| {
        warnings.push(format!(
            "config key {}: unknown level {name:?}, using INFO \
             (known: DEBUG, INFO, WARNING, WARN, ERROR, CRITICAL, FATAL, NOTSET)",
            key.name()
        ));
        log::LevelFilter::Info
    }))
}
