//! Checking each value of a config file against its key's spec, with messages that name
//! the key, what was expected and what was found; and the suggestion for an unknown key.

use super::schema::KeyType::*;
use super::schema::{KeySpec, KeyType, DEFAULT_SYSLOG_FACILITY, MAX_SECONDS, SYSLOG_FACILITIES};
use super::{ConfigError, Key, KEYS};
use serde_json::{Map, Value};

/// Checks one non-null value against its key's spec and returns the value to keep.
pub(super) fn check_value(
    spec: &KeySpec,
    value: &Value,
    warnings: &mut Vec<String>,
) -> Result<Value, ConfigError> {
    let wrong = |found: &Value| ConfigError::WrongType {
        key: spec.name.to_owned(),
        expected: spec.kind.expected(),
        found: describe(found),
    };
    let invalid = |reason: String| ConfigError::Invalid {
        key: spec.name.to_owned(),
        reason,
    };
    match spec.kind {
        Choice(words) => {
            let s = value.as_str().ok_or_else(|| wrong(value))?;
            let lower = s.to_ascii_lowercase();
            if words.contains(&lower.as_str()) {
                Ok(Value::String(lower))
            } else {
                Err(invalid(format!(
                    "must be one of {}, found {s:?}",
                    words.join(", ")
                )))
            }
        }
        Text | LogLevel => {
            let s = value.as_str().ok_or_else(|| wrong(value))?;
            if spec.key == Key::ServerAddress && s.trim().is_empty() {
                return Err(invalid("must not be empty".to_owned()));
            }
            Ok(value.clone())
        }
        AgentId => {
            let s = value.as_str().ok_or_else(|| wrong(value))?;
            check_agent_id(s).map_err(invalid)?;
            Ok(value.clone())
        }
        Seconds | Milliseconds | Count | Port => {
            let n = whole_number(value).ok_or_else(|| wrong(value))?;
            // Durations are capped at a year: beyond that a value is a typo, and adding it
            // to a clock would overflow.
            let limit = match spec.kind {
                Port => 65_535,
                Seconds => i128::from(MAX_SECONDS),
                Milliseconds => i128::from(MAX_SECONDS) * 1000,
                _ => i128::from(u64::MAX),
            };
            if n < i128::from(spec.min) || n > limit {
                let range = match (spec.min, spec.kind) {
                    (_, Port) => "from 0 to 65535".to_owned(),
                    (min, Seconds | Milliseconds) => format!("from {min} to {limit}"),
                    (0, _) => "0 or more".to_owned(),
                    (min, _) => format!("{min} or more"),
                };
                return Err(invalid(format!("must be {range}, found {n}")));
            }
            Ok(value.clone())
        }
        OomScore => {
            let n = whole_number(value).ok_or_else(|| wrong(value))?;
            if !(-1000..=1000).contains(&n) {
                return Err(invalid(format!("must be from -1000 to 1000, found {n}")));
            }
            Ok(value.clone())
        }
        KeyType::Bool => match value {
            Value::Bool(_) => Ok(value.clone()),
            Value::String(s) => yaml11_bool(s).map(Value::Bool).ok_or_else(|| wrong(value)),
            _ => Err(wrong(value)),
        },
        TextList => {
            let items = value.as_array().ok_or_else(|| wrong(value))?;
            for (index, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s) if !s.is_empty() => {}
                    Some(_) => {
                        return Err(invalid(format!("item {} is an empty string", index + 1)))
                    }
                    None => {
                        return Err(ConfigError::WrongType {
                            key: format!("{}[{}]", spec.name, index + 1),
                            expected: "a string",
                            found: describe(item),
                        })
                    }
                }
            }
            Ok(value.clone())
        }
        TextMap => {
            let map = value.as_object().ok_or_else(|| wrong(value))?;
            check_string_values(spec.name, map)?;
            Ok(value.clone())
        }
        ImageMap => normalise_images(spec, value, warnings),
        Syslog => {
            let on = match value {
                Value::Bool(b) => Some(*b),
                Value::String(s) => yaml11_bool(s),
                _ => return Err(wrong(value)),
            };
            match on {
                Some(false) => Ok(Value::Bool(false)),
                Some(true) => Ok(Value::String(DEFAULT_SYSLOG_FACILITY.to_owned())),
                None => {
                    let s = value.as_str().unwrap_or_default();
                    let lower = s.to_ascii_lowercase();
                    if SYSLOG_FACILITIES.contains(&lower.as_str()) {
                        Ok(Value::String(lower))
                    } else {
                        Err(invalid(format!(
                            "must be true, false or one of {}, found {s:?}",
                            SYSLOG_FACILITIES.join(", ")
                        )))
                    }
                }
            }
        }
    }
}

/// An integer of any sign, or `None` for anything else (floats included).
fn whole_number(value: &Value) -> Option<i128> {
    let n = value.as_number()?;
    n.as_u64()
        .map(i128::from)
        .or_else(|| n.as_i64().map(i128::from))
}

/// YAML 1.1 spellings PyYAML reads as booleans, which YAML 1.2 reads as strings.
fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => Some(true),
        "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn check_string_values(path: &str, map: &Map<String, Value>) -> Result<(), ConfigError> {
    for (k, v) in map {
        if !v.is_string() {
            return Err(ConfigError::WrongType {
                key: format!("{path}.{k}"),
                expected: "a string",
                found: describe(v),
            });
        }
    }
    Ok(())
}

/// Checks `advertised_images` and turns each queue's list of one-key maps (the shape in
/// the Python agent's README) into one map, the shape the server accepts.
fn normalise_images(
    spec: &KeySpec,
    value: &Value,
    warnings: &mut Vec<String>,
) -> Result<Value, ConfigError> {
    let queues = value.as_object().ok_or_else(|| ConfigError::WrongType {
        key: spec.name.to_owned(),
        expected: spec.kind.expected(),
        found: describe(value),
    })?;
    let mut normalised = Map::new();
    for (queue, images) in queues {
        let path = format!("{}.{queue}", spec.name);
        let map = match images {
            Value::Object(map) => map.clone(),
            Value::Array(items) => {
                let mut merged = Map::new();
                for (index, item) in items.iter().enumerate() {
                    let Value::Object(entry) = item else {
                        return Err(ConfigError::WrongType {
                            key: format!("{path}[{}]", index + 1),
                            expected: "a mapping of an image name to a string",
                            found: describe(item),
                        });
                    };
                    for (image, data) in entry {
                        if merged.insert(image.clone(), data.clone()).is_some() {
                            warnings.push(format!(
                                "config key {path}: image {image:?} is listed twice; the last one is used"
                            ));
                        }
                    }
                }
                merged
            }
            other => {
                return Err(ConfigError::WrongType {
                    key: path,
                    expected: "a mapping of image names to strings",
                    found: describe(other),
                })
            }
        };
        check_string_values(&path, &map)?;
        normalised.insert(queue.clone(), Value::Object(map));
    }
    Ok(Value::Object(normalised))
}

/// Why `id` cannot be an agent id, if it cannot: it becomes a path segment and a URL path
/// segment (inserted without escaping).
fn check_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if id == "." || id == ".." {
        return Err(format!("must not be {id:?}: it is used as a path segment"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '%'))
    {
        return Err(format!(
            "{id:?} contains {c:?}; an agent id is used as a path segment and in URLs, so it \
             must not contain `/`, whitespace, control characters, `?`, `#` or `%`"
        ));
    }
    Ok(())
}

/// The `log` filter for a Python level name (case-insensitive), `None` if unknown.
/// Python's NOTSET on the root logger lets every record through, hence `Trace`.
pub fn python_level(name: &str) -> Option<log::LevelFilter> {
    use log::LevelFilter as L;
    Some(match name.trim().to_ascii_uppercase().as_str() {
        "NOTSET" => L::Trace,
        "DEBUG" => L::Debug,
        "INFO" => L::Info,
        "WARNING" | "WARN" => L::Warn,
        "ERROR" | "CRITICAL" | "FATAL" => L::Error,
        _ => return None,
    })
}

/// A short description of a value for error messages: `the string "ten"`, `a list`, ….
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) if n.is_f64() => format!("the number {n}"),
        Value::Number(n) => format!("the integer {n}"),
        Value::String(s) => {
            let shown: String = s.chars().take(60).collect();
            let ellipsis = if shown.len() < s.len() { "…" } else { "" };
            format!("the string {shown:?}{ellipsis}")
        }
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}

/// The known key closest to `unknown`, when it is close enough to be a likely typo.
pub(super) fn closest_key(unknown: &str) -> Option<&'static str> {
    let lower = unknown.to_ascii_lowercase();
    KEYS.iter()
        .map(|k| (edit_distance(&lower, k.name), k.name))
        .filter(|(d, name)| *d <= (name.len() / 4).clamp(1, 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name)
}

/// Levenshtein distance over chars.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}
