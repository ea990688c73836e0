//! The agent's YAML config file (PROTOCOL §11): every key of the archived and the current
//! Python agent, their types and defaults, plus this agent's own tuning keys.
//!
//! One table, [`KEYS`], drives everything: validation, the defaults, the effective config
//! printed by `testflinger-agent check-config`, the variables exported to phase commands
//! and the reference table in `docs/configuration.md` ([`reference_table_markdown`]). A
//! config file that the Python agent accepts loads here unchanged, with these deliberate
//! differences: values inside `job_queues`, `advertised_queues` and `advertised_images`
//! must be strings (the server refuses anything else), agent ids that cannot be a path or
//! URL segment are refused, and `advertised_images` in the list-of-one-key-maps shape is
//! turned into the map shape the server accepts.

use crate::phase::Phase;
use crate::yaml::{self, YamlError};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a config key holds, which decides how its value is checked and described.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// Any string.
    Text,
    /// The agent's name: a string usable as one path segment and one URL path segment.
    AgentId,
    /// A non-negative whole number of seconds.
    Seconds,
    /// A non-negative whole number of milliseconds.
    Milliseconds,
    /// A non-negative whole number.
    Count,
    /// A TCP port number, 0 to 65535.
    Port,
    /// `true` or `false` (YAML 1.1 `yes`/`no`/`on`/`off` too, as PyYAML reads them).
    Bool,
    /// A Python log level name, any case.
    LogLevel,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
    /// A list of non-empty strings.
    TextList,
    /// A mapping of strings to strings.
    TextMap,
    /// A mapping of queue names to mappings of image names to provision data strings.
    ImageMap,
    /// An `oom_score_adj` value: a whole number from -1000 to 1000.
    OomScore,
    /// `false`, `true` (the `daemon` facility) or a syslog facility name
    /// ([`SYSLOG_FACILITIES`]); kept as `false` or the facility's name.
    Syslog,
}

/// The syslog facilities `logging_syslog` accepts.
pub const SYSLOG_FACILITIES: &[&str] = &[
    "user", "daemon", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
    "local7",
];

/// The facility `logging_syslog: true` means.
pub const DEFAULT_SYSLOG_FACILITY: &str = "daemon";

impl KeyType {
    /// The short type shown in the reference table.
    pub fn table_name(self) -> &'static str {
        match self {
            KeyType::Text => "string",
            KeyType::AgentId => "string (path segment)",
            KeyType::Seconds => "int (s)",
            KeyType::Milliseconds => "int (ms)",
            KeyType::Count => "int",
            KeyType::Port => "int (port)",
            KeyType::Bool => "bool",
            KeyType::LogLevel => "string (log level)",
            KeyType::Choice(_) => "string (choice)",
            KeyType::TextList => "list of strings",
            KeyType::TextMap => "map string→string",
            KeyType::ImageMap => "map queue→map image→string",
            KeyType::OomScore => "int (-1000 to 1000)",
            KeyType::Syslog => "bool or string (facility)",
        }
    }

    /// What an error message says was expected.
    pub fn expected(self) -> &'static str {
        match self {
            KeyType::Text | KeyType::AgentId => "a string",
            KeyType::Seconds => "a whole number of seconds",
            KeyType::Milliseconds => "a whole number of milliseconds",
            KeyType::Count => "a whole number",
            KeyType::Port => "a port number (0 to 65535)",
            KeyType::Bool => "true or false",
            KeyType::LogLevel => "a log level name such as INFO",
            KeyType::Choice(_) => "a string",
            KeyType::TextList => "a list of strings",
            KeyType::TextMap => "a mapping of strings to strings",
            KeyType::ImageMap => "a mapping of queue names to mappings of image names to strings",
            KeyType::OomScore => "a whole number from -1000 to 1000",
            KeyType::Syslog => "true, false or a syslog facility (user, daemon, local0 to local7)",
        }
    }
}

/// The longest duration a key may give, in seconds (a year).
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// The value a key takes when the file does not set it (or sets it to `null`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultValue {
    /// The file must set it.
    Required,
    /// Absent from the effective config; the text says what absence means ("" for nothing).
    Absent(&'static str),
    Text(&'static str),
    Int(u64),
    Bool(bool),
}

impl DefaultValue {
    fn to_value(self) -> Option<Value> {
        match self {
            DefaultValue::Required | DefaultValue::Absent(_) => None,
            DefaultValue::Text(s) => Some(Value::String(s.to_owned())),
            DefaultValue::Int(n) => Some(Value::from(n)),
            DefaultValue::Bool(b) => Some(Value::Bool(b)),
        }
    }

    fn table_text(self) -> String {
        match self {
            DefaultValue::Required => "required".to_owned(),
            DefaultValue::Absent("") => "absent".to_owned(),
            DefaultValue::Absent(note) => format!("absent ({note})"),
            DefaultValue::Text("") => "`\"\"`".to_owned(),
            DefaultValue::Text(s) => format!("`{s}`"),
            DefaultValue::Int(n) => format!("`{n}`"),
            DefaultValue::Bool(b) => format!("`{b}`"),
        }
    }
}

/// Which agent knows a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The archived (2024-01) and the current Python agent.
    BothPython,
    /// The current Python agent only.
    CurrentPython,
    /// Set from the current Python agent's command line; accepted in the file too.
    PythonCli,
    /// This agent's own key.
    ThisAgent,
    /// Named in older Testflinger documents; today's Python agent refuses it.
    Compat,
}

impl Origin {
    fn table_text(self) -> &'static str {
        match self {
            Origin::BothPython => "both Python agents",
            Origin::CurrentPython => "current Python agent",
            Origin::PythonCli => "Python agent's command line",
            Origin::ThisAgent => "this agent",
            Origin::Compat => "older Testflinger docs",
        }
    }
}

/// One config key: its name, type, default, origin and meaning.
#[derive(Clone, Copy, Debug)]
pub struct KeySpec {
    pub name: &'static str,
    pub kind: KeyType,
    pub default: DefaultValue,
    pub origin: Origin,
    /// The smallest accepted value, for the whole-number kinds.
    pub min: u64,
    /// One line for the reference table.
    pub meaning: &'static str,
}

const fn key(
    name: &'static str,
    kind: KeyType,
    default: DefaultValue,
    origin: Origin,
    meaning: &'static str,
) -> KeySpec {
    KeySpec {
        name,
        kind,
        default,
        origin,
        min: 0,
        meaning,
    }
}

const fn at_least_one(spec: KeySpec) -> KeySpec {
    KeySpec { min: 1, ..spec }
}

/// Default of the job's global timeout and of the cap when the config has none (PROTOCOL §5.6).
pub const DEFAULT_GLOBAL_TIMEOUT: u64 = 14400;
/// Default of the job's output timeout and of the cap when the config has none (PROTOCOL §5.6).
pub const DEFAULT_OUTPUT_TIMEOUT: u64 = 900;

use DefaultValue::{Absent, Bool as DBool, Int, Required, Text as DText};
use KeyType::*;
use Origin::*;

/// Every key the config file may hold, in the order `check-config` prints them.
#[rustfmt::skip]
pub const KEYS: &[KeySpec] = &[
    key("agent_id", AgentId, Required, BothPython,
        "Agent name on the server, in URLs and in paths: no `/`, whitespace, control characters, `?`, `#` or `%`, not `.` or `..`"),
    key("server_address", Text, Required, BothPython,
        "Base URL of the Testflinger server; `http://` is prepended when it does not start with `http`"),
    key("job_queues", TextList, Required, BothPython,
        "Queues this agent takes jobs from"),
    key("polling_interval", Seconds, Int(10), BothPython,
        "Seconds to wait between polls for a job"),
    key("execution_basedir", Text, DText("/tmp/testflinger/run"), BothPython,
        "Parent of the run directories, `<execution_basedir>/<job_id>`"),
    key("logging_basedir", Text, DText("/tmp/testflinger/logs"), BothPython,
        "Directory of the agent's own log"),
    key("results_basedir", Text, DText("/tmp/testflinger/results"), BothPython,
        "Spool of results the server has not accepted yet"),
    key("logging_level", LogLevel, DText("INFO"), BothPython,
        "Python log level name (DEBUG, INFO, WARNING, ERROR, CRITICAL, NOTSET), any case; an unknown name means INFO, with a warning"),
    key("logging_quiet", KeyType::Bool, DBool(false), BothPython,
        "Log to the log file only, not to the console"),
    key("setup_command", Text, DText(""), BothPython,
        "Shell command of the setup phase; empty skips the phase"),
    key("provision_command", Text, DText(""), BothPython,
        "Shell command of the provision phase; empty skips the phase"),
    key("firmware_update_command", Text, DText(""), CurrentPython,
        "Shell command of the firmware_update phase; empty skips the phase"),
    key("test_command", Text, DText(""), BothPython,
        "Shell command of the test phase; empty skips the phase"),
    key("allocate_command", Text, DText(""), BothPython,
        "Shell command of the allocate phase; empty skips the phase"),
    key("reserve_command", Text, DText(""), BothPython,
        "Shell command of the reserve phase; empty skips the phase"),
    key("cleanup_command", Text, DText(""), BothPython,
        "Shell command of the cleanup phase; empty skips the phase"),
    key("provision_type", Text, Absent(""), BothPython,
        "Device connector type; posted to the server and exported to phase commands"),
    at_least_one(key("global_timeout", Seconds, Absent("14400 used"), BothPython,
        "Cap in seconds on a job's `global_timeout`, which applies to every phase but reserve")),
    at_least_one(key("output_timeout", Seconds, Absent("900 used"), BothPython,
        "Cap in seconds on a job's `output_timeout`, which applies to the test phase")),
    key("advertised_queues", TextMap, Absent(""), BothPython,
        "Public queue names and their descriptions, posted to the server"),
    key("advertised_images", ImageMap, Absent(""), BothPython,
        "Per queue, image names and their provision data (a string), posted to the server; a list of one-key maps per queue is accepted and turned into a map (the server refuses the list shape)"),
    key("identifier", Text, Absent(""), CurrentPython,
        "Posted with the agent data; the `identifier` label of `phase_duration_seconds` (`\"\"` when absent)"),
    key("location", Text, Absent("`\"\"` posted"), CurrentPython,
        "Posted with the agent data"),
    key("output_bytes", Count, Int(10_485_760), CurrentPython,
        "Accepted for compatibility and unused: output is never truncated"),
    key("links", TextMap, Absent(""), Compat,
        "Accepted and unused; the Python agent's schema refuses it"),
    key("control_host", TextMap, Absent(""), Compat,
        "Accepted and unused; the Python agent's schema refuses it"),
    key("token_file", Text, Absent(""), PythonCli,
        "Refresh-token file; normally given on the command line, which wins; exported to phase commands"),
    key("metrics_endpoint_port", Port, Absent("no endpoint"), ThisAgent,
        "Port of the Prometheus endpoint (`/metrics`, `/health`); the Python agent takes it only as `-p`/`--metrics_port`, and the command line wins"),
    key("metrics_endpoint_address", Text, Absent("all interfaces"), ThisAgent,
        "Address the metrics endpoint binds to, such as `127.0.0.1` or `::`"),
    key("logging_format", Choice(&["agent", "python"]), DText("agent"), ThisAgent,
        "Layout of the agent's log lines: `agent` (UTC timestamp, level, message) or `python` (the Python agent's `[YY-MM-DD HH:MM:SS]   LEVEL: (file:line)| message`, local time)"),
    key("logging_syslog", Syslog, DBool(false), ThisAgent,
        "Also send the agent's log to syslog: `true` (facility `daemon`) or a facility, `user`, `daemon`, `local0` to `local7`; when the socket is absent the agent warns once and logs to stderr and the file"),
    key("logging_syslog_socket", Text, DText("/dev/log"), ThisAgent,
        "The syslog daemon's Unix socket, for `logging_syslog`"),
    key("termination_grace_period", Seconds, Int(10), ThisAgent,
        "Seconds between SIGTERM and SIGKILL when a phase command's process group is stopped"),
    key("shutdown_cleanup_timeout", Seconds, Int(300), ThisAgent,
        "When the agent is stopping (SIGTERM/SIGINT), the longest the cleanup phase may still run, counted from the stop or from the start of cleanup, whichever is later; then it is ended like a timeout. A supervisor's stop timeout must exceed `termination_grace_period` + this + 10 s"),
    key("straggler_wait_ms", Milliseconds, Int(2000), ThisAgent,
        "Milliseconds to wait, once a phase command has exited, for background processes still holding its output before they are killed"),
    at_least_one(key("cancel_check_interval", Seconds, Int(10), ThisAgent,
        "Seconds between checks for a cancelled job while a phase command runs")),
    at_least_one(key("output_post_interval", Seconds, Int(1), ThisAgent,
        "Seconds between posts of a phase's live output to the server")),
    key("audit_trails_kept", Count, Int(100), ThisAgent,
        "How many finished jobs' trails (their journals: every transition with its time and cause) stay in `<logging_basedir>/trails/` for `testflinger-agent explain`; the oldest go first, 0 keeps none"),
    key("oom_score_adj", OomScore, Int(500), ThisAgent,
        "`oom_score_adj` given to every phase command (and inherited by what it starts), so that when memory runs out the kernel kills the job before the agent; raising it above the agent's own value needs no privilege, lowering it below needs root (CAP_SYS_RESOURCE), and a value the kernel refuses is ignored"),
    key("healthcheck_command", Text, Absent("no health check"), ThisAgent,
        "Shell command that checks the device outside any job (run like a phase command; exit 0 means healthy); when it fails the agent holds itself in `maintenance` until it passes. Absent: no check, and exit 46 leaves the agent `offline` as the Python agent does"),
    at_least_one(key("healthcheck_timeout", Seconds, Int(1800), ThisAgent,
        "Seconds a health check may run before it is killed (with its process tree) and counts as failed")),
    key("healthcheck_after_failures", Count, Int(3), ThisAgent,
        "Run the health check after this many jobs in a row whose provision phase failed; 0: never for this reason"),
    key("healthcheck_interval", Seconds, Int(0), ThisAgent,
        "Run the health check every this many seconds while the agent is idle; 0: never"),
    at_least_one(key("healthcheck_retry_interval", Seconds, Int(600), ThisAgent,
        "Seconds before a failed health check runs again; doubles after each failure, up to an hour (or this value, when larger)")),
    key("healthcheck_on_start", KeyType::Bool, DBool(false), ThisAgent,
        "Run the health check when the agent starts, before it takes a job"),
];

/// The spec of `name`, if it is a config key.
pub fn key_spec(name: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.name == name)
}

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

/// The effective configuration, defaults filled in.
#[derive(Clone, Debug)]
pub struct Config {
    pub agent_id: String,
    pub server_address: String,
    pub job_queues: Vec<String>,
    /// Seconds between polls.
    pub polling_interval: u64,
    pub execution_basedir: PathBuf,
    pub logging_basedir: PathBuf,
    pub results_basedir: PathBuf,
    pub logging_level: log::LevelFilter,
    pub logging_quiet: bool,
    pub provision_type: Option<String>,
    /// The config's cap on the job's global timeout, in seconds, when set.
    pub global_timeout: Option<u64>,
    /// The config's cap on the job's output timeout, in seconds, when set.
    pub output_timeout: Option<u64>,
    pub advertised_queues: Option<BTreeMap<String, String>>,
    /// Always in the map shape, whatever shape the file used.
    pub advertised_images: Option<BTreeMap<String, BTreeMap<String, String>>>,
    pub identifier: Option<String>,
    pub location: Option<String>,
    /// Accepted and unused.
    pub output_bytes: u64,
    pub token_file: Option<String>,
    pub metrics_endpoint_port: Option<u16>,
    /// Where the metrics endpoint binds; `None` means all interfaces.
    pub metrics_endpoint_address: Option<String>,
    /// The Python agent's log line layout instead of ours.
    pub logging_python_format: bool,
    /// The syslog facility the log also goes to (`logging_syslog`), when on.
    pub logging_syslog: Option<String>,
    /// The syslog socket (`logging_syslog_socket`).
    pub logging_syslog_socket: PathBuf,
    /// Seconds between SIGTERM and SIGKILL when a command is stopped.
    pub termination_grace_period: u64,
    /// Milliseconds to wait for background processes holding a finished command's output.
    pub straggler_wait_ms: u64,
    /// Seconds cleanup may still run once the agent is stopping.
    pub shutdown_cleanup_timeout: u64,
    /// Seconds between cancellation checks while a command runs.
    pub cancel_check_interval: u64,
    /// Seconds between posts of live output.
    pub output_post_interval: u64,
    /// `oom_score_adj` of phase commands, -1000 to 1000.
    pub oom_score_adj: i32,
    /// How many finished jobs' trails stay under `logging_basedir/trails`.
    pub audit_trails_kept: u64,
    /// Problems that did not stop the load (such as an unknown `logging_level`), for the
    /// caller to log once logging is set up.
    pub warnings: Vec<String>,
    /// Every key with its effective value, in [`KEYS`] order; absent optional keys left out.
    effective: Map<String, Value>,
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

    /// Fills the typed fields from the checked, defaulted map.
    fn from_effective(
        effective: Map<String, Value>,
        mut warnings: Vec<String>,
    ) -> Result<Config, ConfigError> {
        let text = |name: &str| {
            effective
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let int = |name: &str| effective.get(name).and_then(Value::as_u64);
        let required_text =
            |name: &'static str| text(name).ok_or(ConfigError::Missing { key: name });
        let defaulted_int =
            |name: &'static str| int(name).ok_or(ConfigError::Missing { key: name });
        let path = |name: &'static str| required_text(name).map(PathBuf::from);

        let job_queues: Vec<String> = effective
            .get("job_queues")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if job_queues.is_empty() {
            warnings.push(
                "config key job_queues is an empty list: the agent will never get a job".to_owned(),
            );
        }
        let level_name = text("logging_level").unwrap_or_default();
        let logging_level = python_level(&level_name).unwrap_or_else(|| {
            warnings.push(format!(
                "config key logging_level: unknown level {level_name:?}, using INFO \
                 (known: DEBUG, INFO, WARNING, WARN, ERROR, CRITICAL, FATAL, NOTSET)"
            ));
            log::LevelFilter::Info
        });
        let string_map = |name: &str| {
            effective.get(name).and_then(Value::as_object).map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        let advertised_images = effective
            .get("advertised_images")
            .and_then(Value::as_object)
            .map(|queues| {
                queues
                    .iter()
                    .map(|(queue, images)| {
                        let images = images
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                                    .collect()
                            })
                            .unwrap_or_default();
                        (queue.clone(), images)
                    })
                    .collect()
            });

        Ok(Config {
            agent_id: required_text("agent_id")?,
            server_address: required_text("server_address")?,
            job_queues,
            polling_interval: defaulted_int("polling_interval")?,
            execution_basedir: path("execution_basedir")?,
            logging_basedir: path("logging_basedir")?,
            results_basedir: path("results_basedir")?,
            logging_level,
            logging_quiet: effective
                .get("logging_quiet")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            provision_type: text("provision_type"),
            global_timeout: int("global_timeout"),
            output_timeout: int("output_timeout"),
            advertised_queues: string_map("advertised_queues"),
            advertised_images,
            identifier: text("identifier"),
            location: text("location"),
            output_bytes: defaulted_int("output_bytes")?,
            token_file: text("token_file"),
            metrics_endpoint_port: int("metrics_endpoint_port").and_then(|p| u16::try_from(p).ok()),
            metrics_endpoint_address: text("metrics_endpoint_address"),
            logging_python_format: text("logging_format").as_deref() == Some("python"),
            logging_syslog: text("logging_syslog"),
            logging_syslog_socket: path("logging_syslog_socket")?,
            termination_grace_period: defaulted_int("termination_grace_period")?,
            straggler_wait_ms: defaulted_int("straggler_wait_ms")?,
            shutdown_cleanup_timeout: defaulted_int("shutdown_cleanup_timeout")?,
            cancel_check_interval: defaulted_int("cancel_check_interval")?,
            output_post_interval: defaulted_int("output_post_interval")?,
            audit_trails_kept: defaulted_int("audit_trails_kept")?,
            oom_score_adj: effective
                .get("oom_score_adj")
                .and_then(Value::as_i64)
                .and_then(|n| i32::try_from(n).ok())
                .ok_or(ConfigError::Missing {
                    key: "oom_score_adj",
                })?,
            warnings,
            effective,
        })
    }

    /// The command configured for `phase`, `None` when missing, empty or only whitespace.
    pub fn command(&self, phase: Phase) -> Option<&str> {
        self.effective
            .get(phase.command_key())
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
        self.set_effective("token_file", Value::String(text));
    }

    /// Sets `metrics_endpoint_port` from the command line.
    pub fn set_metrics_endpoint_port(&mut self, port: u16) {
        self.metrics_endpoint_port = Some(port);
        self.set_effective("metrics_endpoint_port", Value::from(port));
    }

    /// Inserts a key into the effective map, keeping [`KEYS`] order.
    fn set_effective(&mut self, name: &str, value: Value) {
        self.effective.insert(name.to_owned(), value);
        let mut ordered = Map::new();
        for spec in KEYS {
            if let Some(v) = self.effective.remove(spec.name) {
                ordered.insert(spec.name.to_owned(), v);
            }
        }
        self.effective = ordered;
    }

    /// The effective value of a key, as a JSON value (`None` for an absent optional key).
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

/// Checks one non-null value against its key's spec and returns the value to keep.
fn check_value(
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
            if spec.name == "server_address" && s.trim().is_empty() {
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
fn closest_key(unknown: &str) -> Option<&'static str> {
    let lower = unknown.to_ascii_lowercase();
    KEYS.iter()
        .map(|k| (edit_distance(&lower, k.name), k.name))
        .filter(|(d, name)| *d <= (name.len() / 4).clamp(1, 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
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

/// The Markdown reference table of every config key, generated from [`KEYS`].
/// `docs/configuration.md` holds a copy between `<!-- config-table:start -->` and `<!-- config-table:end -->`;
/// `testflinger-agent check-config --reference-table` prints it.
pub fn reference_table_markdown() -> String {
    let mut out =
        String::from("| Key | Type | Default | From | Meaning |\n|---|---|---|---|---|\n");
    for spec in KEYS {
        let min = if spec.min > 0 {
            format!(" (at least {})", spec.min)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {}{} |\n",
            spec.name,
            spec.kind.table_name(),
            spec.default.table_text(),
            spec.origin.table_text(),
            spec.meaning.replace('|', "\\|"),
            min,
        ));
    }
    out
}

/// The config keys as a migration from the Python agent sees them, generated from [`KEYS`]:
/// which keys it knows, which are new here, and each default. `docs/migrating.md` holds a
/// copy between `<!-- migration-table:start -->` and `<!-- migration-table:end -->`.
pub fn migration_table_markdown() -> String {
    let mut out = String::from("| Key | In the Python agent | Here, by default |\n|---|---|---|\n");
    for spec in KEYS {
        let python = match spec.origin {
            Origin::BothPython => "the same key, in both versions",
            Origin::CurrentPython => "the same key, in the current version",
            Origin::PythonCli => "set from `--token-file`, which still wins",
            Origin::Compat => {
                "refused by its schema (older documents name it); accepted and unused here"
            }
            Origin::ThisAgent => "absent: new here",
        };
        out.push_str(&format!(
            "| `{}` | {python} | {} |\n",
            spec.name,
            spec.default.table_text()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const MINIMAL: &str =
        "agent_id: rpi4-001\nserver_address: https://testflinger.example.com\njob_queues: [rpi4]\n";

    /// A config like the Python agent's documented example, with every key either agent
    /// knows, including `advertised_images` in the list shape of the Python README.
    const PYTHON_EXAMPLE: &str = r#"
agent_id: rpi4-001
identifier: lab2-rack3-rpi4-001
location: Lab 2, rack 3
polling_interval: 10
server_address: https://testflinger.example.com
execution_basedir: /home/ubuntu/testflinger/rpi4-001/run
logging_basedir: /home/ubuntu/testflinger/rpi4-001/logs
results_basedir: /home/ubuntu/testflinger/rpi4-001/results
logging_level: WARNING
logging_quiet: False
job_queues:
    - rpi4
    - rpi4-001
advertised_queues:
    rpi4: Raspberry Pi 4 Model B, 4 GiB
advertised_images:
    rpi4:
        - core22: "url: http://cdimage.example.com/core22.img.xz"
        - jammy: "url: http://cdimage.example.com/jammy.img.xz"
global_timeout: 43200
output_timeout: 8000
setup_command: echo Nothing needed for setup
provision_command: testflinger-device-connector muxpi provision -c /path/to/default.yaml testflinger.json
firmware_update_command: echo Updating device firmware to the latest version
allocate_command: testflinger-device-connector muxpi allocate -c /path/to/default.yaml testflinger.json
# You may want to run test_command in a container for a clean environment
test_command: testflinger-device-connector muxpi test -c /path/to/default.yaml testflinger.json
reserve_command: testflinger-device-connector muxpi reserve -c /path/to/default.yaml testflinger.json
cleanup_command: echo Consider removing containers here
provision_type: muxpi
output_bytes: 10485760
"#;

    fn load(text: &str) -> Config {
        Config::from_yaml(text).unwrap_or_else(|e| panic!("{text}\n→ {e}"))
    }

    fn error(text: &str) -> String {
        match Config::from_yaml(text) {
            Ok(c) => panic!("accepted:\n{text}\n{c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn python_example_loads_unchanged() {
        let c = load(PYTHON_EXAMPLE);
        assert_eq!(c.agent_id, "rpi4-001");
        assert_eq!(c.identifier.as_deref(), Some("lab2-rack3-rpi4-001"));
        assert_eq!(c.location.as_deref(), Some("Lab 2, rack 3"));
        assert_eq!(c.job_queues, ["rpi4", "rpi4-001"]);
        assert_eq!(c.logging_level, log::LevelFilter::Warn);
        assert!(!c.logging_quiet);
        assert_eq!(c.global_timeout, Some(43200));
        assert_eq!(c.output_timeout, Some(8000));
        assert_eq!(c.provision_type.as_deref(), Some("muxpi"));
        assert_eq!(
            c.execution_basedir,
            Path::new("/home/ubuntu/testflinger/rpi4-001/run")
        );
        let queues = c.advertised_queues.as_ref().expect("advertised_queues");
        assert_eq!(queues["rpi4"], "Raspberry Pi 4 Model B, 4 GiB");
        let images = &c.advertised_images.as_ref().expect("advertised_images")["rpi4"];
        assert_eq!(images.len(), 2);
        assert_eq!(
            images["core22"],
            "url: http://cdimage.example.com/core22.img.xz"
        );
        assert_eq!(
            c.get("advertised_images"),
            Some(&json!({"rpi4": {
            "core22": "url: http://cdimage.example.com/core22.img.xz",
            "jammy": "url: http://cdimage.example.com/jammy.img.xz"}}))
        );
        for phase in Phase::ALL {
            assert!(c.command(phase).is_some(), "{phase}");
        }
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn map_shaped_images_load_too() {
        let c = load(&format!(
            "{MINIMAL}advertised_images:\n  rpi4:\n    core22: 'url: x'\n"
        ));
        assert_eq!(
            c.advertised_images.expect("images")["rpi4"]["core22"],
            "url: x"
        );
    }

    #[test]
    fn every_default() {
        let c = load(MINIMAL);
        assert_eq!(c.polling_interval, 10);
        assert_eq!(c.execution_basedir, Path::new("/tmp/testflinger/run"));
        assert_eq!(c.logging_basedir, Path::new("/tmp/testflinger/logs"));
        assert_eq!(c.results_basedir, Path::new("/tmp/testflinger/results"));
        assert_eq!(c.logging_level, log::LevelFilter::Info);
        assert!(!c.logging_quiet);
        for phase in Phase::ALL {
            assert_eq!(c.command(phase), None, "{phase}");
            assert_eq!(c.get(phase.command_key()), Some(&json!("")));
        }
        assert_eq!(c.provision_type, None);
        assert_eq!(c.global_timeout, None);
        assert_eq!(c.output_timeout, None);
        assert_eq!(c.advertised_queues, None);
        assert_eq!(c.advertised_images, None);
        assert_eq!(c.identifier, None);
        assert_eq!(c.location, None);
        assert_eq!(c.output_bytes, 10_485_760);
        assert_eq!(c.token_file, None);
        assert_eq!(c.metrics_endpoint_port, None);
        assert_eq!(c.grace_period(), Duration::from_secs(10));
        assert_eq!(c.straggler_wait(), Duration::from_millis(2000));
        assert_eq!(c.cancel_check_period(), Duration::from_secs(10));
        assert_eq!(c.output_post_period(), Duration::from_secs(1));
        assert_eq!(c.polling_period(), Duration::from_secs(10));
        assert_eq!(c.oom_score_adj, 500);
        assert!(
            c.effective_yaml().contains("\noom_score_adj: 500\n"),
            "{}",
            c.effective_yaml()
        );
        // The table's defaults are what the config holds.
        for spec in KEYS {
            if let Some(default) = spec.default.to_value() {
                assert_eq!(c.get(spec.name), Some(&default), "{}", spec.name);
            } else if spec.default != Required {
                assert_eq!(c.get(spec.name), None, "{}", spec.name);
            }
        }
    }

    #[test]
    fn null_means_absent_for_optional_keys() {
        let c = load(&format!(
            "{MINIMAL}polling_interval: ~\nprovision_type:\nglobal_timeout: null\n"
        ));
        assert_eq!(c.polling_interval, 10);
        assert_eq!(c.provision_type, None);
        assert_eq!(c.global_timeout, None);
    }

    #[test]
    fn tuning_keys_are_read() {
        let c = load(&format!(
            "{MINIMAL}termination_grace_period: 0\nstraggler_wait_ms: 50\ncancel_check_interval: 2\noutput_post_interval: 5\npolling_interval: 0\n"
        ));
        assert_eq!(c.grace_period(), Duration::ZERO);
        assert_eq!(c.straggler_wait(), Duration::from_millis(50));
        assert_eq!(c.cancel_check_period(), Duration::from_secs(2));
        assert_eq!(c.output_post_period(), Duration::from_secs(5));
        assert_eq!(c.polling_interval, 0);
        for value in [-1000, -5, 0, 1000] {
            let c = load(&format!("{MINIMAL}oom_score_adj: {value}\n"));
            assert_eq!(c.oom_score_adj, value);
        }
        assert_eq!(
            error(&format!("{MINIMAL}oom_score_adj: high\n")),
            "config key oom_score_adj: expected a whole number from -1000 to 1000, found the string \"high\""
        );
    }

    #[test]
    fn commands_that_are_blank_are_none() {
        let c = load(&format!(
            "{MINIMAL}setup_command: '   '\ntest_command: run-tests\n"
        ));
        assert_eq!(c.command(Phase::Setup), None);
        assert_eq!(c.command(Phase::Test), Some("run-tests"));
    }

    #[test]
    fn logging_syslog_is_off_true_or_a_facility() {
        let c = load(MINIMAL);
        assert_eq!(c.logging_syslog, None);
        assert_eq!(c.logging_syslog_socket, PathBuf::from("/dev/log"));
        assert_eq!(c.get("logging_syslog"), Some(&json!(false)));
        for (value, facility) in [
            ("true", Some("daemon")),
            ("yes", Some("daemon")),
            ("false", None),
            ("off", None),
            ("user", Some("user")),
            ("LOCAL7", Some("local7")),
            ("daemon", Some("daemon")),
        ] {
            let c = load(&format!("{MINIMAL}logging_syslog: {value}\n"));
            assert_eq!(c.logging_syslog.as_deref(), facility, "{value}");
            // What check-config prints loads to the same setting.
            let again = Config::from_yaml(&c.effective_yaml()).expect("reloads");
            assert_eq!(again.logging_syslog, c.logging_syslog, "{value}");
        }
        let c = load(&format!(
            "{MINIMAL}logging_syslog: local0\nlogging_syslog_socket: /run/log.sock\n"
        ));
        assert_eq!(c.logging_syslog_socket, PathBuf::from("/run/log.sock"));
        assert_eq!(
            error(&format!("{MINIMAL}logging_syslog: kern\n")),
            "config key logging_syslog: must be true, false or one of user, daemon, local0, \
             local1, local2, local3, local4, local5, local6, local7, found \"kern\""
        );
        assert_eq!(
            error(&format!("{MINIMAL}logging_syslog: 3\n")),
            "config key logging_syslog: expected true, false or a syslog facility (user, \
             daemon, local0 to local7), found the integer 3"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_a_suggestion() {
        let e = error(&format!("{MINIMAL}poling_interval: 5\n"));
        assert_eq!(
            e,
            "unknown config key poling_interval (did you mean polling_interval?)"
        );
        let e = error(&format!("{MINIMAL}Agent_ID: x\n"));
        assert!(e.contains("did you mean agent_id?"), "{e}");
        let e = error(&format!("{MINIMAL}frobnicate: 5\n"));
        assert_eq!(e, "unknown config key frobnicate");
    }

    #[test]
    fn wrong_types_name_key_expected_and_found() {
        for (line, message) in [
            ("polling_interval: ten", "config key polling_interval: expected a whole number of seconds, found the string \"ten\""),
            ("polling_interval: 1.5", "config key polling_interval: expected a whole number of seconds, found the number 1.5"),
            ("logging_quiet: 3", "config key logging_quiet: expected true or false, found the integer 3"),
            ("logging_quiet: maybe", "config key logging_quiet: expected true or false, found the string \"maybe\""),
            ("provision_type: [a]", "config key provision_type: expected a string, found a list"),
            ("logging_level: 10", "config key logging_level: expected a log level name such as INFO, found the integer 10"),
            ("advertised_queues: [a]", "config key advertised_queues: expected a mapping of strings to strings, found a list"),
            ("advertised_queues: {q: 1}", "config key advertised_queues.q: expected a string, found the integer 1"),
            ("advertised_images: {q: {img: {url: x}}}", "config key advertised_images.q.img: expected a string, found a mapping"),
            ("advertised_images: {q: [x]}", "config key advertised_images.q[1]: expected a mapping of an image name to a string, found the string \"x\""),
            ("advertised_images: {q: 3}", "config key advertised_images.q: expected a mapping of image names to strings, found the integer 3"),
            ("straggler_wait_ms: '5'", "config key straggler_wait_ms: expected a whole number of milliseconds, found the string \"5\""),
            ("metrics_endpoint_port: true", "config key metrics_endpoint_port: expected a port number (0 to 65535), found the boolean true"),
        ] {
            assert_eq!(error(&format!("{MINIMAL}{line}\n")), message, "{line}");
        }
        let e = error("agent_id: 12\nserver_address: http://x\njob_queues: [q]\n");
        assert_eq!(
            e,
            "config key agent_id: expected a string, found the integer 12"
        );
        let e = error("agent_id: a\nserver_address: http://x\njob_queues: q\n");
        assert_eq!(
            e,
            "config key job_queues: expected a list of strings, found the string \"q\""
        );
        let e = error("agent_id: a\nserver_address: http://x\njob_queues: [q, 5]\n");
        assert_eq!(
            e,
            "config key job_queues[2]: expected a string, found the integer 5"
        );
        let e = error("agent_id: a\nserver_address: http://x\njob_queues: [q, '']\n");
        assert_eq!(e, "config key job_queues: item 2 is an empty string");
    }

    #[test]
    fn yaml_11_booleans_are_accepted() {
        assert!(load(&format!("{MINIMAL}logging_quiet: yes\n")).logging_quiet);
        assert!(!load(&format!("{MINIMAL}logging_quiet: Off\n")).logging_quiet);
        assert!(load(&format!("{MINIMAL}logging_quiet: True\n")).logging_quiet);
    }

    #[test]
    fn out_of_range_numbers_are_refused() {
        for (line, message) in [
            (
                "polling_interval: -1",
                "config key polling_interval: must be from 0 to 31536000, found -1",
            ),
            (
                "global_timeout: 0",
                "config key global_timeout: must be from 1 to 31536000, found 0",
            ),
            (
                "output_timeout: -5",
                "config key output_timeout: must be from 1 to 31536000, found -5",
            ),
            (
                "cancel_check_interval: 0",
                "config key cancel_check_interval: must be from 1 to 31536000, found 0",
            ),
            (
                "output_post_interval: 0",
                "config key output_post_interval: must be from 1 to 31536000, found 0",
            ),
            (
                "metrics_endpoint_port: 70000",
                "config key metrics_endpoint_port: must be from 0 to 65535, found 70000",
            ),
            (
                "output_bytes: -1",
                "config key output_bytes: must be 0 or more, found -1",
            ),
            (
                "polling_interval: 31536001",
                "config key polling_interval: must be from 0 to 31536000, found 31536001",
            ),
            (
                "straggler_wait_ms: 31536000001",
                "config key straggler_wait_ms: must be from 0 to 31536000000, found 31536000001",
            ),
            (
                "oom_score_adj: 2000",
                "config key oom_score_adj: must be from -1000 to 1000, found 2000",
            ),
            (
                "oom_score_adj: -1001",
                "config key oom_score_adj: must be from -1000 to 1000, found -1001",
            ),
        ] {
            assert_eq!(error(&format!("{MINIMAL}{line}\n")), message, "{line}");
        }
    }

    #[test]
    fn missing_required_keys_are_named() {
        assert_eq!(
            error("server_address: http://x\njob_queues: [q]\n"),
            "config key agent_id is required but missing"
        );
        assert_eq!(
            error("agent_id: a\njob_queues: [q]\n"),
            "config key server_address is required but missing"
        );
        assert_eq!(
            error("agent_id: a\nserver_address: http://x\n"),
            "config key job_queues is required but missing"
        );
        assert_eq!(
            error("agent_id:\nserver_address: http://x\njob_queues: [q]\n"),
            "config key agent_id is required but missing"
        );
        assert_eq!(
            error("agent_id: a\nserver_address: ' '\njob_queues: [q]\n"),
            "config key server_address: must not be empty"
        );
    }

    #[test]
    fn not_a_mapping_or_not_yaml() {
        assert_eq!(
            error(""),
            "config must be a mapping of keys to values, found null"
        );
        assert_eq!(
            error("- a\n- b\n"),
            "config must be a mapping of keys to values, found a list"
        );
        assert_eq!(
            error("just text"),
            "config must be a mapping of keys to values, found the string \"just text\""
        );
        let e = error("agent_id: [unclosed\n");
        assert!(e.starts_with("config is not valid YAML: "), "{e}");
        assert!(e.contains("line"), "{e}");
        let e = error(&format!("{MINIMAL}1: x\n"));
        assert!(
            e.contains("mapping keys must be strings") && e.contains("line 4"),
            "{e}"
        );
    }

    #[test]
    fn unsafe_agent_ids_are_refused() {
        for id in [
            "''",
            "'.'",
            "'..'",
            "a/b",
            "'a b'",
            "\"a\\0b\"",
            "\"a\\tb\"",
            "'a?b'",
            "'a#b'",
            "'a%2F'",
        ] {
            let e = error(&format!(
                "agent_id: {id}\nserver_address: http://x\njob_queues: [q]\n"
            ));
            assert!(e.starts_with("config key agent_id: "), "{id}: {e}");
        }
        for id in ["rpi4-001", "dut_7.lab", "ÄgentÖ"] {
            load(&format!(
                "agent_id: {id}\nserver_address: http://x\njob_queues: [q]\n"
            ));
        }
    }

    #[test]
    fn logging_level_names_and_fallback() {
        for (name, level) in [
            ("debug", log::LevelFilter::Debug),
            ("INFO", log::LevelFilter::Info),
            ("Warning", log::LevelFilter::Warn),
            ("WARN", log::LevelFilter::Warn),
            ("error", log::LevelFilter::Error),
            ("CRITICAL", log::LevelFilter::Error),
            ("NOTSET", log::LevelFilter::Trace),
        ] {
            let c = load(&format!("{MINIMAL}logging_level: {name}\n"));
            assert_eq!(c.logging_level, level, "{name}");
            assert!(c.warnings.is_empty(), "{name}");
        }
        let c = load(&format!("{MINIMAL}logging_level: LOUD\n"));
        assert_eq!(c.logging_level, log::LevelFilter::Info);
        assert!(c.warnings[0].contains("logging_level") && c.warnings[0].contains("LOUD"));
    }

    #[test]
    fn empty_job_queues_load_with_a_warning() {
        let c = load("agent_id: a\nserver_address: http://x\njob_queues: []\n");
        assert!(c.job_queues.is_empty());
        assert!(c.warnings.iter().any(|w| w.contains("job_queues")));
    }

    #[test]
    fn load_names_the_file() {
        let missing = Path::new("/nonexistent/testflinger-agent.conf");
        let e = Config::load(missing).expect_err("missing file").to_string();
        assert!(e.contains("/nonexistent/testflinger-agent.conf"), "{e}");
        let dir = std::env::temp_dir().join(format!("tf-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("bad.conf");
        std::fs::write(&file, "agent_id: a\n").expect("write");
        let e = Config::load(&file).expect_err("incomplete").to_string();
        assert!(
            e.contains("bad.conf") && e.contains("server_address"),
            "{e}"
        );
        std::fs::write(&file, MINIMAL).expect("write");
        assert_eq!(Config::load(&file).expect("valid").agent_id, "rpi4-001");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn command_env_exports_string_keys_with_defaults() {
        let mut c = load(PYTHON_EXAMPLE);
        let env: BTreeMap<String, String> = c.command_env().into_iter().collect();
        assert_eq!(env["agent_id"], "rpi4-001");
        assert_eq!(env["provision_type"], "muxpi");
        assert_eq!(env["logging_level"], "WARNING");
        assert!(!env.contains_key("polling_interval"));
        assert!(!env.contains_key("job_queues"));
        assert!(!env.contains_key("logging_quiet"));
        let c2 = load(MINIMAL);
        let env2: BTreeMap<String, String> = c2.command_env().into_iter().collect();
        assert_eq!(env2["setup_command"], "");
        assert_eq!(env2["execution_basedir"], "/tmp/testflinger/run");
        assert!(!env2.contains_key("provision_type"));
        assert!(!env2.contains_key("token_file"));
        c.set_token_file(Path::new("/var/lib/testflinger-agent/refresh_token"));
        let env: BTreeMap<String, String> = c.command_env().into_iter().collect();
        assert_eq!(
            env["token_file"],
            "/var/lib/testflinger-agent/refresh_token"
        );
        c.set_metrics_endpoint_port(8000);
        assert_eq!(c.metrics_endpoint_port, Some(8000));
        assert!(!c
            .command_env()
            .iter()
            .any(|(k, _)| k == "metrics_endpoint_port"));
    }

    #[test]
    fn effective_yaml_round_trips_in_table_order() {
        let mut c = load(PYTHON_EXAMPLE);
        c.set_token_file(Path::new("/tmp/token"));
        let text = c.effective_yaml();
        let again = load(&text);
        assert_eq!(again.effective, c.effective, "{text}");
        let keys: Vec<&str> = c.effective.keys().map(String::as_str).collect();
        let table: Vec<&str> = KEYS
            .iter()
            .map(|k| k.name)
            .filter(|k| keys.contains(k))
            .collect();
        assert_eq!(keys, table);
        assert!(text.starts_with("agent_id: rpi4-001\n"), "{text}");
        assert!(text.contains("token_file: /tmp/token"), "{text}");
    }

    #[test]
    fn table_is_consistent() {
        let mut names: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KEYS.len(), "duplicate key in KEYS");
        for phase in Phase::ALL {
            assert!(key_spec(phase.command_key()).is_some(), "{phase}");
        }
        let table = reference_table_markdown();
        assert_eq!(table.lines().count(), KEYS.len() + 2);
        for spec in KEYS {
            assert!(
                table.contains(&format!("| `{}` |", spec.name)),
                "{}",
                spec.name
            );
        }
    }

    #[test]
    fn the_configuration_reference_holds_the_generated_table() {
        const START: &str = "<!-- config-table:start -->";
        const END: &str = "<!-- config-table:end -->";
        let fix = "regenerate it with `cargo run -- check-config --reference-table` and paste the \
                   output between the markers";
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
        let page = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}; it must hold the config key table: {fix}",
                path.display()
            )
        });
        let start = page
            .find(START)
            .unwrap_or_else(|| panic!("{} has no `{START}` line: {fix}", path.display()));
        let end = page[start..]
            .find(END)
            .map(|i| start + i)
            .unwrap_or_else(|| {
                panic!(
                    "{} has no `{END}` line after `{START}`: {fix}",
                    path.display()
                )
            });
        let inside = page[start + START.len()..end].trim_matches('\n');
        assert!(
            inside == reference_table_markdown().trim_end(),
            "the config key table in {} differs from config::KEYS: {fix}",
            path.display()
        );
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    proptest! {
        /// Whatever optional string and non-string keys are set, `command_env` holds exactly
        /// the string-valued keys of the effective config, with their values.
        #[test]
        fn command_env_is_exactly_the_string_keys(
            picks in proptest::collection::vec(any::<bool>(), KEYS.len()),
            text in "[a-z0-9 /._-]{0,12}",
            number in 1u64..100_000,
        ) {
            let mut doc = Map::new();
            doc.insert("agent_id".into(), json!("agent-1"));
            doc.insert("server_address".into(), json!("http://x"));
            doc.insert("job_queues".into(), json!(["q"]));
            for (spec, pick) in KEYS.iter().zip(picks) {
                if !pick || spec.default == Required {
                    continue;
                }
                let value = match spec.kind {
                    Text | LogLevel => json!(text),
                    Choice(words) => json!(words[number as usize % words.len()]),
                    Seconds | Milliseconds | Count => json!(number),
                    Port => json!(number % 65_536),
                    OomScore => json!((number % 2001) as i64 - 1000),
                    KeyType::Bool => json!(number % 2 == 0),
                    TextList => json!([text]),
                    TextMap => json!({"k": text}),
                    ImageMap => json!({"q": {"img": text}}),
                    Syslog if number % 3 == 0 => json!(number % 2 == 0),
                    Syslog => json!(SYSLOG_FACILITIES[number as usize % SYSLOG_FACILITIES.len()]),
                    AgentId => continue,
                };
                doc.insert(spec.name.to_owned(), value);
            }
            let text = yaml::to_string(&Value::Object(doc));
            let c = Config::from_yaml(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let env: BTreeMap<String, String> = c.command_env().into_iter().collect();
            let expected: BTreeMap<String, String> = KEYS
                .iter()
                .filter_map(|k| Some((k.name.to_owned(), c.get(k.name)?.as_str()?.to_owned())))
                .collect();
            prop_assert_eq!(&env, &expected);
            for spec in KEYS {
                let is_string = c.get(spec.name).is_some_and(Value::is_string);
                prop_assert_eq!(env.contains_key(spec.name), is_string, "{}", spec.name);
            }
        }
    }
}
