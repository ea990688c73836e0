//! The config keys: one row of the `config_keys!` table each (what a row holds is
//! documented on the macro, in `schema.rs`), the [`Key`] helpers and the typed values
//! only one key has.

use super::field::{read_job_queues, read_logging_level};
use super::schema::config_keys;
use super::schema::DefaultValue::{Absent, Bool as DBool, Int, Required, Text as DText};
use super::schema::KeySpec;
use super::schema::KeyType::{self, *};
use super::schema::Origin::*;
use crate::phase::Phase;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Default of the job's global timeout and of the cap when the config has none (PROTOCOL §5.6).
pub const DEFAULT_GLOBAL_TIMEOUT: u64 = 14400;
/// Default of the job's output timeout and of the cap when the config has none (PROTOCOL §5.6).
pub const DEFAULT_OUTPUT_TIMEOUT: u64 = 900;

// The config keys, one row each, in the order `check-config` prints them; `config_keys!`
// in schema.rs says what a row holds and what it generates. To add a key, add a row: its
// Config field, its Key variant, its validation (by `kind`), its default and its line of the
// reference tables follow from the row. Give the field an `Option` type when the key may be
// absent; name a `read` function only when reading the value needs more than its type.
// Then paste `cargo run -- check-config --reference-table` into docs/configuration.md and run
// `UPDATE_GENERATED=1 cargo test --test it docs::` (docs/migrating.md's table).
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
        meaning: "Seconds between posts of a phase's live output to the server while less than a whole fragment (1 MiB) waits; whole fragments go out one after the other",
    },
    audit_trails_kept: u64 = AuditTrailsKept {
        kind: Count, default: Int(100), origin: ThisAgent,
        meaning: "How many finished jobs' trails (their journals: every transition with its time and cause) stay in `<logging_basedir>/trails/` for `testflinger-agent explain`; the oldest go first, 0 keeps none",
    },
    oom_score_adj: i32 = OomScoreAdj {
        kind: OomScore, default: Int(500), origin: ThisAgent,
        meaning: "`oom_score_adj` given to every phase command (and inherited by what it starts), so that when memory runs out the kernel kills the job before the agent; raising it above the agent's own value needs no privilege, lowering it below needs root (CAP_SYS_RESOURCE), and a value the kernel refuses is ignored",
    },
    healthcheck_command: Option<String> = HealthcheckCommand {
        kind: Text, default: Absent("no health check"), origin: ThisAgent,
        meaning: "Shell command that checks the device outside any job (run like a phase command; exit 0 means healthy); when it fails the agent holds itself in `maintenance` until it passes. Absent: no check, and exit 46 leaves the agent `offline` as the Python agent does",
    },
    healthcheck_timeout: u64 = HealthcheckTimeout {
        kind: Seconds, default: Int(1800), origin: ThisAgent, min: 1,
        meaning: "Seconds a health check may run before it is killed (with its process tree) and counts as failed",
    },
    healthcheck_after_failures: u64 = HealthcheckAfterFailures {
        kind: Count, default: Int(3), origin: ThisAgent,
        meaning: "Run the health check after this many jobs in a row whose provision phase failed; 0: never for this reason",
    },
    healthcheck_interval: u64 = HealthcheckInterval {
        kind: Seconds, default: Int(0), origin: ThisAgent,
        meaning: "Run the health check every this many seconds while the agent is idle; 0: never",
    },
    healthcheck_retry_interval: u64 = HealthcheckRetryInterval {
        kind: Seconds, default: Int(600), origin: ThisAgent, min: 1,
        meaning: "Seconds before a failed health check runs again; doubles after each failure, up to an hour (or this value, when larger)",
    },
    healthcheck_on_start: bool = HealthcheckOnStart {
        kind: KeyType::Bool, default: DBool(false), origin: ThisAgent,
        meaning: "Run the health check when the agent starts, before it takes a job",
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

/// The spec of `name`, if it is a config key.
pub fn key_spec(name: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.name == name)
}
