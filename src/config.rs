//! The agent's YAML config file (PROTOCOL §11): every key of the archived and the current
//! Python agent, their types and defaults, plus this agent's own tuning keys.
//!
//! Each key is one row of the `config_keys!` table, which generates the [`Key`] enum (how
//! code names a key, so a misspelt key does not compile), the [`Config`] field and [`KEYS`].
//! `KEYS` drives validation, the defaults, the effective config printed by
//! `testflinger-agent check-config`, the variables exported to phase commands and the
//! reference table in `README.md` ([`reference_table_markdown`]). A config file that
//! the Python agent accepts loads here unchanged, with these deliberate differences: values
//! inside `job_queues`, `advertised_queues` and `advertised_images` must be strings (the
//! server refuses anything else), agent ids that cannot be a path or URL segment are
//! refused, and `advertised_images` in the list-of-one-key-maps shape is turned into the
//! map shape the server accepts.

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
    /// The key as a value the compiler checks; `key.name() == name`.
    pub key: Key,
    pub name: &'static str,
    pub kind: KeyType,
    pub default: DefaultValue,
    pub origin: Origin,
    /// The smallest accepted value, for the whole-number kinds.
    pub min: u64,
    /// One line for the reference table.
    pub meaning: &'static str,
}

/// Defines every config key from one row each; the rows are the invocation below.
///
/// A row reads `field: Type = Variant { kind, default, origin, [min,] [read,] meaning }`:
/// `field` is the key's name in the file and its [`Config`] field, `Type` that field's type
/// (a plain type when the key is required or has a default, an `Option` when it may be
/// absent), `Variant` the key's name in the [`Key`] enum. `kind`, `default` and `origin` are
/// a [`KeyType`], a [`DefaultValue`] and an [`Origin`]; `min` (the smallest whole number
/// accepted) is 0 when left out; `meaning` is the reference table's line. `read` names a
/// function that turns the checked value into `Type` where [`Field`] alone cannot (it also
/// sees the warnings); most rows leave it out.
///
/// From the rows it generates: the [`Key`] enum (code names a key by a value the compiler
/// checks, never by a string), [`KEYS`] (which drives validation, the defaults, the
/// effective config and the reference tables), the [`Config`] struct with one field per key
/// (documented with the key's meaning), and `Config::from_effective`, which fills each field
/// from the checked, defaulted values.
macro_rules! config_keys {
    ($(
        $field:ident: $ty:ty = $variant:ident {
            kind: $kind:expr,
            default: $default:expr,
            origin: $origin:expr,
            $(min: $min:expr,)?
            $(read: $read:expr,)?
            meaning: $meaning:literal $(,)?
        }
    ),* $(,)?) => {
        /// A config key, named by a value the compiler checks; its spec is [`Key::spec`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Key {
            $(
                #[doc = concat!("`", stringify!($field), "`: ", $meaning)]
                $variant,
            )*
        }

        impl Key {
            /// Every key, in [`KEYS`] order.
            pub const ALL: &'static [Key] = &[$(Key::$variant),*];

            /// The key's name, as the config file spells it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Key::$variant => stringify!($field),)*
                }
            }
        }

        /// Every key the config file may hold, in the order `check-config` prints them.
        pub const KEYS: &[KeySpec] = &[$(
            KeySpec {
                key: Key::$variant,
                name: stringify!($field),
                kind: $kind,
                default: $default,
                origin: $origin,
                min: config_keys!(@min $($min)?),
                meaning: $meaning,
            },
        )*];

        /// The effective configuration, defaults filled in: one field per key of [`KEYS`],
        /// named as the key.
        #[derive(Clone, Debug)]
        pub struct Config {
            $(
                #[doc = $meaning]
                pub $field: $ty,
            )*
            /// Problems that did not stop the load (such as an unknown `logging_level`),
            /// for the caller to log once logging is set up.
            pub warnings: Vec<String>,
            /// Every key with its effective value, in [`KEYS`] order; absent optional keys
            /// left out.
            effective: Map<String, Value>,
        }

        impl Config {
            /// Fills the typed fields from the checked, defaulted map, in [`KEYS`] order.
            fn from_effective(
                effective: Map<String, Value>,
                mut warnings: Vec<String>,
            ) -> Result<Config, ConfigError> {
                Ok(Config {
                    $(
                        $field: config_keys!(@read $ty $(, $read)?)(
                            Key::$variant,
                            effective.get(stringify!($field)),
                            &mut warnings,
                        )?,
                    )*
                    warnings,
                    effective,
                })
            }
        }
    };
    (@min) => { 0 };
    (@min $min:expr) => { $min };
    (@read $ty:ty) => { <$ty as Field>::read };
    (@read $ty:ty, $read:expr) => { $read };
}

/// Default of the job's global timeout and of the cap when the config has none (PROTOCOL §5.6).
pub const DEFAULT_GLOBAL_TIMEOUT: u64 = 14400;
/// Default of the job's output timeout and of the cap when the config has none (PROTOCOL §5.6).
pub const DEFAULT_OUTPUT_TIMEOUT: u64 = 900;

use DefaultValue::{Absent, Bool as DBool, Int, Required, Text as DText};
use KeyType::*;
use Origin::*;

// The config keys, one row each, in the order `check-config` prints them; see
// `config_keys!` above for what a row holds and what it generates. To add a key, add a row.
config_keys! {
    agent_id: String = AgentId {
        kind: AgentId, default: Required, origin: BothPython,
        meaning: "Agent name on the server, in URLs and in paths: no `/`, whitespace, control characters, `?`, `#` or `%`, not `.` or `..`",
    },
    server_address: String = ServerAddress {
        kind: Text, default: Required, origin: BothPython,
        meaning: "Base URL of the Testflinger server; `http://` is prepended when it does not start with `http`",
    },
    job_queues: Vec<String> = JobQueues {
        kind: TextList, default: Required, origin: BothPython,
        read: read_job_queues,
        meaning: "Queues this agent takes jobs from",
    },
    polling_interval: u64 = PollingInterval {
        kind: Seconds, default: Int(10), origin: BothPython,
        meaning: "Seconds to wait between polls for a job",
    },
    execution_basedir: PathBuf = ExecutionBasedir {
        kind: Text, default: DText("/tmp/testflinger/run"), origin: BothPython,
        meaning: "Parent of the run directories, `<execution_basedir>/<job_id>`",
    },
    logging_basedir: PathBuf = LoggingBasedir {
        kind: Text, default: DText("/tmp/testflinger/logs"), origin: BothPython,
        meaning: "Directory of the agent's own log",
    },
    results_basedir: PathBuf = ResultsBasedir {
        kind: Text, default: DText("/tmp/testflinger/results"), origin: BothPython,
        meaning: "Spool of results the server has not accepted yet",
    },
    logging_level: log::LevelFilter = LoggingLevel {
        kind: LogLevel, default: DText("INFO"), origin: BothPython,
        read: read_logging_level,
        meaning: "Python log level name (DEBUG, INFO, WARNING, ERROR, CRITICAL, NOTSET), any case; an unknown name means INFO, with a warning",
    },
    logging_quiet: bool = LoggingQuiet {
        kind: KeyType::Bool, default: DBool(false), origin: BothPython,
        meaning: "Log to the log file only, not to the console",
    },
    setup_command: String = SetupCommand {
        kind: Text, default: DText(""), origin: BothPython,
        meaning: "Shell command of the setup phase; empty skips the phase",
    },
    provision_command: String = ProvisionCommand {
        kind: Text, default: DText(""), origin: BothPython,
        meaning: "Shell command of the provision phase; empty skips the phase",
    },
    firmware_update_command: String = FirmwareUpdateCommand {
        kind: Text, default: DText(""), origin: CurrentPython,
        meaning: "Shell command of the firmware_update phase; empty skips the phase",
    },
    test_command: String = TestCommand {
        kind: Text, default: DText(""), origin: BothPython,
        meaning: "Shell command of the test phase; empty skips the phase",
    },
    allocate_command: String = AllocateCommand {
        kind: Text, default: DText(""), origin: BothPython,
        meaning: "Shell command of the allocate phase; empty skips the phase",
    },
    reserve_command: String = ReserveCommand {
        kind: Text, default: DText(""), origin: BothPython,
        meaning: "Shell command of the reserve phase; empty skips the phase",
    },
    cleanup_command: String = CleanupCommand {
        kind: Text, default: DText(""), origin: BothPython,
        meaning: "Shell command of the cleanup phase; empty skips the phase",
    },
    provision_type: Option<String> = ProvisionType {
        kind: Text, default: Absent(""), origin: BothPython,
        meaning: "Device connector type; posted to the server and exported to phase commands",
    },
    global_timeout: Option<u64> = GlobalTimeout {
        kind: Seconds, default: Absent("14400 used"), origin: BothPython, min: 1,
        meaning: "Cap in seconds on a job's `global_timeout`, which applies to every phase but reserve",
    },
    output_timeout: Option<u64> = OutputTimeout {
        kind: Seconds, default: Absent("900 used"), origin: BothPython, min: 1,
        meaning: "Cap in seconds on a job's `output_timeout`, which applies to the test phase",
    },
    advertised_queues: Option<BTreeMap<String, String>> = AdvertisedQueues {
        kind: TextMap, default: Absent(""), origin: BothPython,
        meaning: "Public queue names and their descriptions, posted to the server",
    },
    advertised_images: Option<BTreeMap<String, BTreeMap<String, String>>> = AdvertisedImages {
        kind: ImageMap, default: Absent(""), origin: BothPython,
        meaning: "Per queue, image names and their provision data (a string), posted to the server; a list of one-key maps per queue is accepted and turned into a map (the server refuses the list shape)",
    },
    identifier: Option<String> = Identifier {
        kind: Text, default: Absent(""), origin: CurrentPython,
        meaning: "Posted with the agent data; the `identifier` label of `phase_duration_seconds` (`\"\"` when absent)",
    },
    location: Option<String> = Location {
        kind: Text, default: Absent("`\"\"` posted"), origin: CurrentPython,
        meaning: "Posted with the agent data",
    },
    output_bytes: u64 = OutputBytes {
        kind: Count, default: Int(10_485_760), origin: CurrentPython,
        meaning: "Accepted for compatibility and unused: output is never truncated",
    },
    links: Option<BTreeMap<String, String>> = Links {
        kind: TextMap, default: Absent(""), origin: Compat,
        meaning: "Accepted and unused; the Python agent's schema refuses it",
    },
    control_host: Option<BTreeMap<String, String>> = ControlHost {
        kind: TextMap, default: Absent(""), origin: Compat,
        meaning: "Accepted and unused; the Python agent's schema refuses it",
    },
    token_file: Option<String> = TokenFile {
        kind: Text, default: Absent(""), origin: PythonCli,
        meaning: "Refresh-token file; normally given on the command line, which wins; exported to phase commands",
    },
    metrics_endpoint_port: Option<u16> = MetricsEndpointPort {
        kind: Port, default: Absent("no endpoint"), origin: ThisAgent,
        meaning: "Port of the Prometheus endpoint (`/metrics`, `/health`); the Python agent takes it only as `-p`/`--metrics_port`, and the command line wins",
    },
    metrics_endpoint_address: Option<String> = MetricsEndpointAddress {
        kind: Text, default: Absent("all interfaces"), origin: ThisAgent,
        meaning: "Address the metrics endpoint binds to, such as `127.0.0.1` or `::`",
    },
    logging_format: LogFormat = LoggingFormat {
        kind: Choice(&["agent", "python"]), default: DText("agent"), origin: ThisAgent,
        meaning: "Layout of the agent's log lines: `agent` (UTC timestamp, level, message) or `python` (the Python agent's `[YY-MM-DD HH:MM:SS]   LEVEL: (file:line)| message`, local time)",
    },
    logging_syslog: Option<String> = LoggingSyslog {
        kind: Syslog, default: DBool(false), origin: ThisAgent,
        meaning: "Also send the agent's log to syslog: `true` (facility `daemon`) or a facility, `user`, `daemon`, `local0` to `local7`; when the socket is absent the agent warns once and logs to stderr and the file",
    },
    logging_syslog_socket: PathBuf = LoggingSyslogSocket {
        kind: Text, default: DText("/dev/log"), origin: ThisAgent,
        meaning: "The syslog daemon's Unix socket, for `logging_syslog`",
    },
    termination_grace_period: u64 = TerminationGracePeriod {
        kind: Seconds, default: Int(10), origin: ThisAgent,
        meaning: "Seconds between SIGTERM and SIGKILL when a phase command's process group is stopped",
    },
    shutdown_cleanup_timeout: u64 = ShutdownCleanupTimeout {
        kind: Seconds, default: Int(300), origin: ThisAgent,
        meaning: "When the agent is stopping (SIGTERM/SIGINT), the longest the cleanup phase may still run, counted from the stop or from the start of cleanup, whichever is later; then it is ended like a timeout. A supervisor's stop timeout must exceed `termination_grace_period` + this + 10 s",
    },
    straggler_wait_ms: u64 = StragglerWaitMs {
        kind: Milliseconds, default: Int(2000), origin: ThisAgent,
        meaning: "Milliseconds to wait, once a phase command has exited, for background processes still holding its output before they are killed",
    },
    cancel_check_interval: u64 = CancelCheckInterval {
        kind: Seconds, default: Int(10), origin: ThisAgent, min: 1,
        meaning: "Seconds between checks for a cancelled job while a phase command runs",
    },
    output_post_interval: u64 = OutputPostInterval {
        kind: Seconds, default: Int(1), origin: ThisAgent, min: 1,
        meaning: "Seconds between posts of a phase's live output to the server",
    },
    audit_trails_kept: u64 = AuditTrailsKept {
        kind: Count, default: Int(100), origin: ThisAgent,
        meaning: "How many finished jobs' trails (their journals: every transition with its time and cause) stay in `<logging_basedir>/trails/` for `testflinger-agent explain`; the oldest go first, 0 keeps none",
    },
    oom_score_adj: i32 = OomScoreAdj {
        kind: OomScore, default: Int(500), origin: ThisAgent,
        meaning: "`oom_score_adj` given to every phase command (and inherited by what it starts), so that when memory runs out the kernel kills the job before the agent; raising it above the agent's own value needs no privilege, lowering it below needs root (CAP_SYS_RESOURCE), and a value the kernel refuses is ignored",
    },
}

impl Key {
    /// The key's spec in [`KEYS`].
    pub fn spec(self) -> &'static KeySpec {
        // `config_keys!` writes the variants and the rows of KEYS in the same order, so a
        // variant's discriminant is its row's index.
        &KEYS[self as usize]
    }

    /// The key holding `phase`'s command, e.g. [`Key::TestCommand`].
    pub fn command_of(phase: Phase) -> Key {
        match phase {
            Phase::Setup => Key::SetupCommand,
            Phase::Provision => Key::ProvisionCommand,
            Phase::FirmwareUpdate => Key::FirmwareUpdateCommand,
            Phase::Test => Key::TestCommand,
            Phase::Allocate => Key::AllocateCommand,
            Phase::Reserve => Key::ReserveCommand,
            Phase::Cleanup => Key::CleanupCommand,
        }
    }
}

/// The layout of the agent's log lines (`logging_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// UTC timestamp, level, message.
    Agent,
    /// The Python agent's layout, in local time.
    Python,
}

/// A type a key's checked value can be read as: the payload of a [`Field`].
trait FromValue: Sized {
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
trait Field: Sized {
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
fn read_job_queues(
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
fn read_logging_level(
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

/// The Markdown reference table of every config key, generated from [`KEYS`]. README.md
/// holds a copy between `<!-- config-table:start -->` and `<!-- config-table:end -->`;
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
    fn readme_holds_the_generated_table() {
        const START: &str = "<!-- config-table:start -->";
        const END: &str = "<!-- config-table:end -->";
        let fix = "regenerate it with `cargo run -- check-config --reference-table` and paste the \
                   output between the markers";
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        let readme = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}; it must hold the config key table: {fix}",
                path.display()
            )
        });
        let start = readme
            .find(START)
            .unwrap_or_else(|| panic!("{} has no `{START}` line: {fix}", path.display()));
        let end = readme[start..]
            .find(END)
            .map(|i| start + i)
            .unwrap_or_else(|| {
                panic!(
                    "{} has no `{END}` line after `{START}`: {fix}",
                    path.display()
                )
            });
        let inside = readme[start + START.len()..end].trim_matches('\n');
        assert!(
            inside == reference_table_markdown().trim_end(),
            "the config key table in {} differs from config::KEYS: {fix}",
            path.display()
        );
    }

    #[test]
    fn each_key_is_its_row() {
        assert_eq!(Key::ALL.len(), KEYS.len());
        for (key, spec) in Key::ALL.iter().zip(KEYS) {
            assert_eq!(spec.key, *key, "{}", spec.name);
            assert_eq!(key.name(), spec.name);
            assert_eq!(key.spec().key, *key, "{}", spec.name);
            assert_eq!(key_spec(key.name()).map(|s| s.key), Some(*key));
        }
        for phase in Phase::ALL {
            assert_eq!(
                Key::command_of(phase).name(),
                phase.command_key(),
                "{phase}"
            );
        }
    }

    #[test]
    fn typed_fields_hold_the_effective_values() {
        let c = load(&format!(
            "{MINIMAL}logging_format: Python\nlinks: {{a: b}}\ncontrol_host: {{h: p}}\n"
        ));
        assert_eq!(c.logging_format, LogFormat::Python);
        assert_eq!(load(MINIMAL).logging_format, LogFormat::Agent);
        assert_eq!(c.links, Some(BTreeMap::from([("a".into(), "b".into())])));
        assert_eq!(
            c.control_host,
            Some(BTreeMap::from([("h".into(), "p".into())]))
        );
        assert_eq!(load(MINIMAL).links, None);
        let c = load(PYTHON_EXAMPLE);
        for phase in Phase::ALL {
            assert_eq!(
                c.value(Key::command_of(phase)).and_then(Value::as_str),
                c.command(phase),
                "{phase}"
            );
        }
        assert_eq!(c.test_command, c.command(Phase::Test).expect("set"));
        assert_eq!(c.cleanup_command, "echo Consider removing containers here");
        assert_eq!(
            c.value(Key::AdvertisedQueues),
            Some(&json!({"rpi4": "Raspberry Pi 4 Model B, 4 GiB"}))
        );
        assert_eq!(c.value(Key::Links), None);
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
