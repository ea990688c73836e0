//! Strict request-body schemas of the Testflinger server (PROTOCOL §3), as the fake checks them.
//!
//! Mirrors the server's marshmallow schemas: unknown fields are rejected, missing required
//! fields and wrong types are reported per field with the server's messages, and errors come
//! back as the `detail.json` object of a 422 answer. Where marshmallow is lenient in ways an
//! agent should not rely on (numeric strings or floats for integers, `"yes"` for booleans),
//! the fake is stricter: an agent that passes here passes on the real server.

use crate::iso_time::parse_iso_datetime;
use serde_json::{json, Map, Value};

/// The seven phases, in order (the server's `TestPhase`).
pub const PHASES: [&str; 7] = [
    "setup",
    "provision",
    "firmware_update",
    "test",
    "allocate",
    "reserve",
    "cleanup",
];

/// The type of one field.
#[derive(Clone, Copy)]
pub enum Ty {
    Str,
    /// String of length ≥ 1.
    NonEmptyStr,
    /// JSON integer (not a float, not a bool).
    Int,
    Bool,
    /// Any JSON object.
    Dict,
    /// A JSON object or `null`.
    NullableDict,
    StrList,
    /// An ISO 8601 date-time string.
    DateTime,
    /// An absolute http(s)/ftp(s) URL with a host.
    Url,
    /// One of the listed strings.
    OneOf(&'static [&'static str]),
    /// `{"<phase>": <int>, ...}` (ResultPost.status).
    StatusMap,
    /// Integer seconds or a duration string such as `2h30m`, or null; normalised to seconds.
    Duration,
    /// List of `lp:<id>` / `gh:<id>` strings.
    SshKeys,
    /// `{"ENV_NAME": "secret/path"}`.
    Secrets,
    /// An object checked against a nested schema.
    Nested(&'static [Field]),
    /// A list of objects checked against a nested schema.
    NestedList(&'static [Field]),
}

/// One field of a schema.
#[derive(Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub ty: Ty,
    pub required: bool,
}

const fn opt(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: false,
    }
}

const fn req(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: true,
    }
}

/// `POST /v1/agents/data/<agent>` (§3.3).
pub const AGENT_IN: &[Field] = &[
    opt("identifier", Ty::Str),
    opt("job_id", Ty::Str),
    opt("location", Ty::Str),
    opt("log", Ty::StrList),
    opt("provision_type", Ty::Str),
    opt("queues", Ty::StrList),
    opt("state", Ty::Str),
    opt("comment", Ty::Str),
];

/// `POST /v1/result/<id>` (§3.9).
pub const RESULT_POST: &[Field] = &[
    opt("status", Ty::StatusMap),
    opt("device_info", Ty::Dict),
    opt("job_state", Ty::Str),
];

/// `POST /v1/result/<id>/log/<type>` (§3.11).
pub const LOG_POST: &[Field] = &[
    req("fragment_number", Ty::Int),
    req("timestamp", Ty::DateTime),
    req("phase", Ty::OneOf(&PHASES)),
    req("log_data", Ty::Str),
];

/// `POST /v1/agents/provision_logs/<agent>` (§3.14).
pub const PROVISION_LOGS_IN: &[Field] = &[
    req("job_id", Ty::Str),
    req("exit_code", Ty::Int),
    opt("detail", Ty::Str),
];

const JOB_EVENT: &[Field] = &[
    req("event_name", Ty::Str),
    req("timestamp", Ty::Str),
    opt("detail", Ty::Str),
];

/// `POST /v1/job/<id>/events` (§3.15).
pub const STATUS_UPDATE: &[Field] = &[
    opt("agent_id", Ty::Str),
    opt("job_queue", Ty::Str),
    req("job_status_webhook", Ty::Url),
    opt("events", Ty::NestedList(JOB_EVENT)),
];

/// `POST /v1/oauth2/refresh` (§3.2).
pub const REFRESH_TOKEN_IN: &[Field] = &[req("refresh_token", Ty::NonEmptyStr)];

/// `POST /v1/job/<id>/action` (§3.16).
pub const ACTION_IN: &[Field] = &[req("action", Ty::OneOf(&["cancel"]))];

const ATTACHMENT: &[Field] = &[req("agent", Ty::Str), opt("device", Ty::Str)];

const TEST_DATA: &[Field] = &[
    opt("test_cmds", Ty::Str),
    opt("attachments", Ty::NestedList(ATTACHMENT)),
    opt("test_username", Ty::Str),
    opt("test_password", Ty::Str),
    opt("secrets", Ty::Secrets),
];

const RESERVE_DATA: &[Field] = &[opt("ssh_keys", Ty::SshKeys), opt("timeout", Ty::Duration)];

/// `POST /v1/job` (§3.16, §4). `provision_data`, `firmware_update_data` and `allocate_data`
/// are only checked to be objects (the server's per-connector provision schemas are not
/// reproduced).
pub const JOB: &[Field] = &[
    opt("job_id", Ty::Str),
    opt("parent_job_id", Ty::Str),
    opt("name", Ty::Str),
    opt("tags", Ty::StrList),
    req("job_queue", Ty::NonEmptyStr),
    opt("global_timeout", Ty::Int),
    opt("output_timeout", Ty::Int),
    opt("allocation_timeout", Ty::Int),
    opt("provision_data", Ty::NullableDict),
    opt("firmware_update_data", Ty::Dict),
    opt("test_data", Ty::Nested(TEST_DATA)),
    opt("allocate_data", Ty::Dict),
    opt("reserve_data", Ty::Nested(RESERVE_DATA)),
    opt("job_status_webhook", Ty::Str),
    opt("job_priority", Ty::Int),
    opt("exclude_agents", Ty::StrList),
    opt("debug", Ty::Bool),
];

fn msg(text: &str) -> Value {
    json!([text])
}

/// Checks `body` against `fields`; returns the (normalised) object or the per-field errors.
pub fn validate(body: &Value, fields: &[Field]) -> Result<Map<String, Value>, Map<String, Value>> {
    let Some(object) = body.as_object() else {
        let mut errors = Map::new();
        errors.insert("_schema".into(), msg("Invalid input type."));
        return Err(errors);
    };
    let mut errors = Map::new();
    let mut out = Map::new();
    for (key, value) in object {
        match fields.iter().find(|f| f.name == key) {
            None => {
                errors.insert(key.clone(), msg("Unknown field."));
            }
            Some(field) => match check(field.ty, value) {
                Ok(v) => {
                    out.insert(key.clone(), v);
                }
                Err(e) => {
                    errors.insert(key.clone(), e);
                }
            },
        }
    }
    for field in fields.iter().filter(|f| f.required) {
        if !object.contains_key(field.name) {
            errors.insert(field.name.into(), msg("Missing data for required field."));
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn is_int(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

fn check(ty: Ty, value: &Value) -> Result<Value, Value> {
    let nullable = matches!(ty, Ty::NullableDict | Ty::Duration);
    if value.is_null() {
        return if nullable {
            Ok(Value::Null)
        } else {
            Err(msg("Field may not be null."))
        };
    }
    match ty {
        Ty::Str => value
            .is_string()
            .then(|| value.clone())
            .ok_or_else(|| msg("Not a valid string.")),
        Ty::NonEmptyStr => match value.as_str() {
            None => Err(msg("Not a valid string.")),
            Some("") => Err(msg("Shorter than minimum length 1.")),
            Some(_) => Ok(value.clone()),
        },
        Ty::Int => is_int(value)
            .then(|| value.clone())
            .ok_or_else(|| msg("Not a valid integer.")),
        Ty::Bool => value
            .is_boolean()
            .then(|| value.clone())
            .ok_or_else(|| msg("Not a valid boolean.")),
        Ty::Dict | Ty::NullableDict => value
            .is_object()
            .then(|| value.clone())
            .ok_or_else(|| msg("Not a valid mapping type.")),
        Ty::StrList => check_list(value, |item| {
            item.is_string()
                .then(|| item.clone())
                .ok_or_else(|| msg("Not a valid string."))
        }),
        Ty::DateTime => match value.as_str() {
            Some(s) if parse_iso_datetime(s).is_some() => Ok(value.clone()),
            _ => Err(msg("Not a valid datetime.")),
        },
        Ty::Url => match value.as_str() {
            Some(s) if is_valid_url(s) => Ok(value.clone()),
            _ => Err(msg("Not a valid URL.")),
        },
        Ty::OneOf(choices) => match value.as_str() {
            Some(s) if choices.contains(&s) => Ok(value.clone()),
            Some(_) => Err(msg(&format!("Must be one of: {}.", choices.join(", ")))),
            None => Err(msg("Not a valid string.")),
        },
        Ty::StatusMap => {
            let Some(map) = value.as_object() else {
                return Err(msg("Not a valid mapping type."));
            };
            let mut errors = Map::new();
            for (phase, code) in map {
                let mut e = Map::new();
                if !PHASES.contains(&phase.as_str()) {
                    e.insert(
                        "key".into(),
                        msg(&format!("Must be one of: {}.", PHASES.join(", "))),
                    );
                }
                if !is_int(code) {
                    e.insert("value".into(), msg("Not a valid integer."));
                }
                if !e.is_empty() {
                    errors.insert(phase.clone(), Value::Object(e));
                }
            }
            if errors.is_empty() {
                Ok(value.clone())
            } else {
                Err(Value::Object(errors))
            }
        }
        Ty::Duration => parse_duration(value)
            .map(Value::from)
            .ok_or_else(|| msg("Invalid duration format.")),
        Ty::SshKeys => check_list(value, |item| match item.as_str() {
            Some(s) if is_ssh_key_id(s) => Ok(item.clone()),
            Some(_) => Err(msg("String does not match expected pattern.")),
            None => Err(msg("Not a valid string.")),
        }),
        Ty::Secrets => {
            let Some(map) = value.as_object() else {
                return Err(msg("Not a valid mapping type."));
            };
            let mut errors = Map::new();
            for (name, path) in map {
                let mut e = Map::new();
                if !is_env_name(name) {
                    e.insert("key".into(), msg("String does not match expected pattern."));
                }
                match path.as_str() {
                    Some(p) if is_secret_path(p) => {}
                    Some(_) => {
                        e.insert(
                            "value".into(),
                            msg("String does not match expected pattern."),
                        );
                    }
                    None => {
                        e.insert("value".into(), msg("Not a valid string."));
                    }
                }
                if !e.is_empty() {
                    errors.insert(name.clone(), Value::Object(e));
                }
            }
            if errors.is_empty() {
                Ok(value.clone())
            } else {
                Err(Value::Object(errors))
            }
        }
        Ty::Nested(fields) => validate(value, fields)
            .map(Value::Object)
            .map_err(Value::Object),
        Ty::NestedList(fields) => check_list(value, |item| {
            validate(item, fields)
                .map(Value::Object)
                .map_err(Value::Object)
        }),
    }
}

fn check_list(
    value: &Value,
    each: impl Fn(&Value) -> Result<Value, Value>,
) -> Result<Value, Value> {
    let Some(items) = value.as_array() else {
        return Err(msg("Not a valid list."));
    };
    let mut errors = Map::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match each(item) {
            Ok(v) => out.push(v),
            Err(e) => {
                errors.insert(i.to_string(), e);
            }
        }
    }
    if errors.is_empty() {
        Ok(Value::Array(out))
    } else {
        Err(Value::Object(errors))
    }
}

/// `^[a-zA-Z_][a-zA-Z0-9_]*$`
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `^[a-zA-Z0-9_/-]+$`
fn is_secret_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/' || c == '-')
}

/// `^(lp|gh):(\S+)$`
fn is_ssh_key_id(s: &str) -> bool {
    let rest = s.strip_prefix("lp:").or_else(|| s.strip_prefix("gh:"));
    rest.is_some_and(|r| !r.is_empty() && !r.chars().any(char::is_whitespace))
}

/// `scheme://host[:port][/...]` with scheme http, https, ftp or ftps and a host that is
/// `localhost`, an IP literal or a dotted name.
pub fn is_valid_url(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    if !["http", "https", "ftp", "ftps"].contains(&scheme.to_ascii_lowercase().as_str()) {
        return false;
    }
    if s.chars().any(char::is_whitespace) {
        return false;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        return v6.contains(']');
    } else {
        match host_port.rsplit_once(':') {
            Some((h, port)) => {
                if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
                    return false;
                }
                h
            }
            None => host_port,
        }
    };
    !host.is_empty()
        && (host.eq_ignore_ascii_case("localhost") || host.contains('.'))
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
}

/// Scheme and `host[:port]` of a URL, lower-cased scheme (for the webhook origin check).
pub fn url_origin(s: &str) -> Option<(String, String)> {
    let (scheme, rest) = s.split_once("://")?;
    let netloc = rest.split(['/', '?', '#']).next().unwrap_or("");
    Some((scheme.to_ascii_lowercase(), netloc.to_string()))
}

/// Integer seconds, or a string of `<n><unit>` groups (`s`/`sec`, `m`/`min`, `h`/`hour`,
/// `d`/`day`, plurals allowed), like the server's duration parser.
pub fn parse_duration(value: &Value) -> Option<i64> {
    if let Some(n) = value.as_i64() {
        return (n >= 0).then_some(n);
    }
    let text = value.as_str()?.trim().to_ascii_lowercase();
    if text.is_empty() || text.starts_with('-') {
        return None;
    }
    if let Ok(n) = text.parse::<i64>() {
        return Some(n);
    }
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let mut total: i64 = 0;
    let mut rest = compact.as_str();
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits_end == 0 {
            return None;
        }
        let number: i64 = rest[..digits_end].parse().ok()?;
        rest = &rest[digits_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let multiplier = match &rest[..unit_end] {
            "s" | "sec" | "secs" => 1,
            "m" | "min" | "mins" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            _ => return None,
        };
        total = total.checked_add(number.checked_mul(multiplier)?)?;
        rest = &rest[unit_end..];
    }
    Some(total)
}

/// Python's `uuid.UUID(text)` acceptance: `urn:` and `uuid:` removed, surrounding braces
/// stripped, every hyphen removed, then exactly 32 hex digits. (Python's `int()` would also
/// take `_`, `+` and whitespace; the fake does not.)
pub fn is_valid_uuid(text: &str) -> bool {
    let hex = text.replace("urn:", "").replace("uuid:", "");
    let hex = hex.trim_matches(|c| c == '{' || c == '}').replace('-', "");
    hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}
