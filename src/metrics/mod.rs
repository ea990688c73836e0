//! The agent's Prometheus metrics: what is counted, the process-wide instance, and `/health`.
//!
//! The names, types and labels of the first four metrics are the Python agent's (PROTOCOL
//! §14.2), so dashboards and alerts keep working; the `testflinger_agent_*` ones are this
//! agent's own. Recording is a relaxed atomic add (plus, for metrics whose labels are only
//! known at run time, a read lock on a small map, written only for a new label set): it
//! never waits for a scrape, which renders on the serving thread. The `prometheus-client`
//! crate (the Prometheus organisation's) holds the values and writes the text; its types
//! stay inside this module.
//!
//! The endpoint always serves the Prometheus text format 0.0.4 (`# TYPE jobs_total
//! counter`, no `# EOF`), which is what the Python agent serves unless a scraper asks for
//! OpenMetrics. Every scraper reads it (Prometheus 2 and 3, the Grafana agent the host
//! charm configures, promtool, curl), and the series it yields are the ones the Python
//! agent's scrapes yield (`jobs_total`, `phase_duration_seconds_bucket`, ...), so dashboards
//! need no change; OpenMetrics text would name counter families without `_total` and end
//! with `# EOF`, which a 0.0.4 reader takes for untyped samples and a comment. One visible
//! difference: bucket bounds are written the way Go clients write them (`le="60"`) where
//! Python writes `le="60.0"`; Prometheus 3 stores both as `60.0`, and `histogram_quantile`
//! merges equal bounds, so only a query naming `le="60.0"` literally on Prometheus 2 sees it.
//!
//! Submodules: `process` reads the `process_*` metrics from `/proc/self` at scrape time,
//! `health` keeps what `/health` reports, `serve` is the HTTP endpoint (`request` parses and
//! answers one scrape, `bind` resolves the address it listens on).

mod bind;
mod health;
mod process;
mod request;
mod serve;

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::{prometheus_text, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use health::{CallGuard, Health, DEFAULT_CALL_STALL, DEFAULT_STALL_LIMIT};
pub use serve::{check_port, serve, MetricsServer, HEAD_TIMEOUT, MAX_CONNECTIONS};

/// Upper bounds of the `phase_duration_seconds` buckets (the Python agent's); `+Inf` follows.
pub const PHASE_DURATION_BUCKETS: [f64; 8] =
    [60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0];

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The `result` labels of `testflinger_agent_healthcheck_runs_total`, all declared from the
/// first scrape.
pub const HEALTHCHECK_RESULTS: [&str; 3] = ["pass", "fail", "timeout"];

/// Why the agent killed a phase command (the `cause` label of
/// `testflinger_agent_phase_commands_killed_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KillCause {
    /// The phase ran past its global timeout.
    GlobalTimeout,
    /// The phase printed nothing for its output timeout.
    OutputTimeout,
    /// The job was cancelled on the server.
    Cancel,
    /// The agent was asked to stop (SIGTERM/SIGINT).
    Shutdown,
}

impl KillCause {
    /// Every cause, in label order.
    pub const ALL: [KillCause; 4] = [
        KillCause::GlobalTimeout,
        KillCause::OutputTimeout,
        KillCause::Cancel,
        KillCause::Shutdown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            KillCause::GlobalTimeout => "global_timeout",
            KillCause::OutputTimeout => "output_timeout",
            KillCause::Cancel => "cancel",
            KillCause::Shutdown => "shutdown",
        }
    }
}

/// What went wrong when starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address given for the endpoint is not an IP address nor a name that resolves.
    #[error(
        "cannot serve metrics on {address:?} port {port} (config key metrics_endpoint_address): {reason}"
    )]
    Resolve {
        address: String,
        port: u16,
        reason: String,
    },
    /// The socket could not be bound; `reason` says why and, for a port in use, by whom.
    #[error("cannot serve metrics on {address}: {reason}")]
    Bind { address: String, reason: String },
    /// The serving thread could not be started.
    #[error("cannot start the metrics thread: {0}")]
    Thread(std::io::Error),
}

type AgentLabel = [(&'static str, String); 1];
type PhaseLabels = [(&'static str, String); 2];
type DurationLabels = [(&'static str, String); 4];
type CauseLabel = [(&'static str, &'static str); 1];
type EndpointLabel = [(&'static str, &'static str); 1];
type ResultLabel = [(&'static str, &'static str); 1];

/// Every metric the agent exposes. Thread-safe: record from any thread through `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    agent_id: String,
    identifier: String,
    jobs: Counter,
    failures: Family<PhaseLabels, Counter>,
    recovery_failures: Counter,
    phase_duration: Family<DurationLabels, Histogram>,
    killed: [Counter; 4],
    escapees: Counter,
    spooled: Gauge<u64, AtomicU64>,
    backlog: Gauge<u64, AtomicU64>,
    request_failures: Family<EndpointLabel, Counter>,
    token_refreshes: Counter,
    healthcheck_runs: [Counter; 3],
    healthcheck_last_success: Gauge<f64, AtomicU64>,
    provision_failures: Gauge<u64, AtomicU64>,
    health: Health,
}

/// A registered metric whose `# HELP` and `# TYPE` lines are written from the first scrape,
/// samples or not. The registry leaves out a family with no label set yet (`failures_total`
/// before any phase failed); the Python agent's client declares every family at start-up,
/// and dashboards and `absent()` alerts rely on seeing them at once.
#[derive(Debug)]
struct Declared<M>(M);

impl<M: EncodeMetric> EncodeMetric for Declared<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

fn phase_duration_histogram() -> Histogram {
    Histogram::new(PHASE_DURATION_BUCKETS)
}

impl Metrics {
    /// All metrics at zero for the agent `agent_id`; `identifier` (config key identifier,
    /// `""` when absent) labels every `phase_duration_seconds` sample.
    pub fn new(agent_id: &str, identifier: &str) -> Metrics {
        let mut registry = Registry::default();
        let agent = || [("agent_id", agent_id.to_string())];

        let jobs_family = Family::<AgentLabel, Counter>::default();
        let jobs = jobs_family.get_or_create_owned(&agent());
        registry.register(
            "jobs",
            "Jobs this agent has taken since it started",
            Declared(jobs_family),
        );

        let failures = Family::<PhaseLabels, Counter>::default();
        registry.register(
            "failures",
            "Phases that ended with a non-zero exit status since the agent started, by phase",
            Declared(failures.clone()),
        );

        let recovery_family = Family::<AgentLabel, Counter>::default();
        let recovery_failures = recovery_family.get_or_create_owned(&agent());
        registry.register(
            "recovery_failures",
            "Phases that exited 46 (the device could not be recovered) since the agent started",
            Declared(recovery_family),
        );

        let phase_duration =
            Family::<DurationLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                phase_duration_histogram,
            );
        registry.register(
            "phase_duration_seconds",
            "How long each phase the job loop reached took, in whole seconds (0 for a skipped phase)",
            Declared(phase_duration.clone()),
        );

        let killed_family = Family::<CauseLabel, Counter>::default();
        let killed =
            KillCause::ALL.map(|c| killed_family.get_or_create_owned(&[("cause", c.as_str())]));
        registry.register(
            "testflinger_agent_phase_commands_killed",
            "Phase commands the agent killed, by cause",
            Declared(killed_family),
        );

        let escapees = Counter::default();
        registry.register(
            "testflinger_agent_escapees_killed",
            "Processes that left their phase's process group and were killed when the phase ended",
            Declared(escapees.clone()),
        );

        let spooled = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "testflinger_agent_spooled_jobs",
            "Job reports waiting in results_basedir to be sent to the server",
            Declared(spooled.clone()),
        );

        let backlog = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "testflinger_agent_output_backlog_bytes",
            "Bytes of live phase output the server has not accepted yet",
            Declared(backlog.clone()),
        );

        let request_failures = Family::<EndpointLabel, Counter>::default();
        registry.register(
            "testflinger_agent_server_request_failures",
            "Requests to the Testflinger server that failed, by kind of request",
            Declared(request_failures.clone()),
        );

        let token_refreshes = Counter::default();
        registry.register(
            "testflinger_agent_token_refreshes",
            "Access tokens obtained from the server with the refresh token",
            Declared(token_refreshes.clone()),
        );

        let runs_family = Family::<ResultLabel, Counter>::default();
        let healthcheck_runs =
            HEALTHCHECK_RESULTS.map(|r| runs_family.get_or_create_owned(&[("result", r)]));
        registry.register(
            "testflinger_agent_healthcheck_runs",
            "Device health checks (healthcheck_command) run to an end, by result: pass, fail, timeout",
            Declared(runs_family),
        );

        let healthcheck_last_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "testflinger_agent_healthcheck_last_success_timestamp_seconds",
            "When the last passing health check started, in seconds since the Unix epoch; 0 before any",
            Declared(healthcheck_last_success.clone()),
        );

        let provision_failures = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "testflinger_agent_consecutive_provision_failures",
            "Jobs in a row whose provision phase failed (0 after a provision succeeded, a health check passed or an administrator released the agent)",
            Declared(provision_failures.clone()),
        );

        let info = Family::<[(&'static str, String); 2], Gauge>::default();
        info.get_or_create(&[
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("agent_id", agent_id.to_string()),
        ])
        .set(1);
        registry.register(
            "testflinger_agent_info",
            "Always 1; the labels say which agent this is and its version",
            Declared(info),
        );

        registry.register_collector(Box::new(process::ProcessCollector::new()));

        Metrics {
            registry,
            agent_id: agent_id.to_string(),
            identifier: identifier.to_string(),
            jobs,
            failures,
            recovery_failures,
            phase_duration,
            killed,
            escapees,
            spooled,
            backlog,
            request_failures,
            token_refreshes,
            healthcheck_runs,
            healthcheck_last_success,
            provision_failures,
            health: Health::new(),
        }
    }

    /// The agent id every sample is labelled with.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// A job was taken from the server (`jobs_total`).
    pub fn job_taken(&self) {
        self.jobs.inc();
    }

    /// `phase` exited non-zero, exit 46 included (`failures_total`).
    pub fn phase_failed(&self, phase: &str) {
        self.failures
            .get_or_create(&[
                ("agent_id", self.agent_id.clone()),
                ("test_phase", phase.to_string()),
            ])
            .inc();
    }

    /// A phase exited 46: the device could not be recovered (`recovery_failures_total`).
    pub fn recovery_failed(&self) {
        self.recovery_failures.inc();
    }

    /// `phase` took `seconds` (0 when skipped); `release` is the provisioned system's label,
    /// `""` before any provision (`phase_duration_seconds`).
    pub fn phase_duration(&self, phase: &str, seconds: u64, release: &str) {
        self.phase_duration
            .get_or_create(&[
                ("agent_id", self.agent_id.clone()),
                ("test_phase", phase.to_string()),
                ("identifier", self.identifier.clone()),
                ("release", release.to_string()),
            ])
            .observe(seconds as f64);
    }

    /// The agent killed a phase command (`testflinger_agent_phase_commands_killed_total`).
    pub fn command_killed(&self, cause: KillCause) {
        let index = KillCause::ALL
            .iter()
            .position(|c| *c == cause)
            .expect("KillCause::ALL lists every cause");
        self.killed[index].inc();
    }

    /// `n` processes that had left a phase's group were killed
    /// (`testflinger_agent_escapees_killed_total`).
    pub fn escapees_killed(&self, n: u64) {
        self.escapees.inc_by(n);
    }

    /// Reports now waiting in results_basedir (`testflinger_agent_spooled_jobs`).
    pub fn set_spooled_jobs(&self, n: u64) {
        self.spooled.set(n);
    }

    /// Live-output bytes the server has not accepted yet
    /// (`testflinger_agent_output_backlog_bytes`).
    pub fn set_output_backlog_bytes(&self, n: u64) {
        self.backlog.set(n);
    }

    /// A request of kind `endpoint` ("job_poll", "result", "log", ...) to the server failed
    /// (`testflinger_agent_server_request_failures_total`).
    pub fn request_failed(&self, endpoint: &'static str) {
        self.request_failures
            .get_or_create(&[("endpoint", endpoint)])
            .inc();
    }

    /// A new access token was obtained (`testflinger_agent_token_refreshes_total`).
    pub fn token_refreshed(&self) {
        self.token_refreshes.inc();
    }

    /// A health check ended with `result`; it started at `started`, `seconds` ago
    /// (`testflinger_agent_healthcheck_runs_total`, the last-success gauge, `/health`).
    /// `result` is one of [`HEALTHCHECK_RESULTS`]; another is only shown on `/health`.
    pub fn healthcheck_ran(
        &self,
        result: &str,
        at: &str,
        started: std::time::SystemTime,
        seconds: f64,
    ) {
        if let Some(index) = HEALTHCHECK_RESULTS.iter().position(|r| *r == result) {
            self.healthcheck_runs[index].inc();
        }
        if result == "pass" {
            let secs = started
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.healthcheck_last_success.set(secs);
        }
        self.health.set_last_check(at, result, seconds);
    }

    /// Jobs in a row whose provision failed
    /// (`testflinger_agent_consecutive_provision_failures`).
    pub fn set_consecutive_provision_failures(&self, n: u64) {
        self.provision_failures.set(n);
    }

    /// What `/health` reports.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Every metric in the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]); the `process_*`
    /// metrics are read from `/proc/self` now.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(4096);
        if let Err(err) = prometheus_text::encode(&mut text, &self.registry) {
            // Writing to a String does not fail; the encoder refuses only malformed
            // registrations, which `new` does not make. Serve nothing rather than half.
            log::error!("cannot render the metrics: {err}");
            text.clear();
        }
        text
    }
}

static INSTANCE: OnceLock<Metrics> = OnceLock::new();

/// Makes `metrics` the process-wide instance that [`get`] returns. The first call wins: a
/// later call drops its argument and returns the instance already installed.
pub fn install(metrics: Metrics) -> &'static Metrics {
    INSTANCE.get_or_init(|| metrics)
}

/// The process-wide instance, `None` until [`install`] (as in `run-job` and unit tests).
pub fn get() -> Option<&'static Metrics> {
    INSTANCE.get()
}

/// Registers a request to the server as in flight with the installed instance's health
/// until the guard is dropped; `None` when none is installed (`run-job`, unit tests).
pub fn call_started(what: &str) -> Option<CallGuard<'static>> {
    get().map(|metrics| metrics.health().call_started(what))
}

/// Tells the installed instance's health that the agent's main loop is alive now; nothing
/// when none is installed (`run-job`, unit tests).
pub fn beat() {
    if let Some(metrics) = get() {
        metrics.health().beat();
    }
}

#[cfg(test)]
mod tests;
