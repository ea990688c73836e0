//! The daemon loop: the daemon set up, the polling loop of PROTOCOL §9.1 (one agent-record
//! read per cycle), holds, restarts and a server that does not answer. Start-up against the
//! server is [`super::startup`]; a job from the server is run by [`super::job`], its report
//! delivered by [`super::delivery`]; the health check is [`super::health`].

use super::states::{DaemonEvent, DaemonMachine, DaemonState};
use crate::config::{Config, Key};
use crate::executor::AgentRequest;
use crate::healthcheck::HealthSettings;
use crate::process::StopSignal;
use crate::server::http::{AgentRecord, HttpServer};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often advertised queues are re-posted to refresh their 7-day expiry.
const QUEUE_REFRESH: Duration = Duration::from_secs(3600);
/// The longest wait between cycles while the server cannot be reached.
const UNREACHABLE_BACKOFF_CAP: Duration = Duration::from_secs(180);
/// An agent record older than this is re-posted (heartbeat, PROTOCOL §9.4).
const HEARTBEAT_AGE: Duration = Duration::from_secs(86_400);
/// The agent's own `oom_score_adj` when it may lower it (as root).
const AGENT_OOM_SCORE_ADJ: i32 = -500;
/// How often, at most, the loop beats while it waits between cycles under a systemd
/// watchdog (`metrics::beat()`, which the pings follow): a quarter of `WatchdogSec`, never
/// more often than this. Without a watchdog a wait is one sleep: an idle agent wakes only
/// for its cycles.
const PAUSE_BEAT_MIN: Duration = Duration::from_millis(100);
/// The comment of a restart asked for by SIGUSR1 (the Python agent's words).
pub(super) const RESTART_SIGNAL_COMMENT: &str = "Restart signal detected from supervisor process";
/// How long the health endpoint lets the main loop go without a beat before it reports
/// it stalled: longer than the longest wait between cycles (the polling interval, or the
/// back-off while the server is unreachable) and than a watched phase's check interval.
fn stall_limit(config: &Config) -> Duration {
    crate::metrics::DEFAULT_STALL_LIMIT
        .max(config.polling_period().saturating_mul(3))
        .max(UNREACHABLE_BACKOFF_CAP.saturating_mul(3))
        .max(config.cancel_check_period().saturating_mul(3))
}

/// How long a request to the server may wait before it is logged and `/health` says
/// `stalled`: `polling_interval` or 30 s, whichever is longer.
fn call_stall_limit(config: &Config) -> Duration {
    crate::metrics::DEFAULT_CALL_STALL.max(config.polling_period())
}

/// The longest a probe of the server may wait for its answer while the server gives none,
/// and the shortest: a probe lasts at most the back-off step it belongs to, so that the
/// probes keep their cadence through a server that accepts and never answers.
const PROBE_TIMEOUT_MIN: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT_MAX: Duration = Duration::from_secs(30);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot use directory {path} (config key {key}): {source}")]
    Directory {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
    #[error(transparent)]
    Lock(#[from] super::lock::LockError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// How the daemon ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonExit {
    /// Stopped by SIGTERM/SIGINT: exit 0.
    Stopped,
    /// A restart was requested (server state or SIGUSR1): exit non-zero for the supervisor.
    Restart,
}

/// The agent's own `maintenance` after a failed health check.
#[derive(Debug)]
pub(super) struct OwnHold {
    /// Failed checks in a row.
    pub(super) failures: u32,
    /// When the check runs again.
    pub(super) retry_at: Instant,
}

/// The running daemon.
pub struct Daemon {
    pub(super) config: Config,
    pub(super) server: HttpServer,
    pub(super) stop: StopSignal,
    restart_signal: Arc<AtomicBool>,
    marker_dir: PathBuf,
    queues_posted: Option<Instant>,
    pub(super) unreachable_streak: usize,
    /// Since when the server has given no answer at all (refused, unreachable, or
    /// accepting and never answering), while it gives none: the record is then read as one
    /// probe per back-off step instead of a call with retries.
    outage: Option<Instant>,
    /// A restart was asked for during the last job: carried out before the next poll.
    pub(super) restart_after_job: bool,
    /// The `offline` or `maintenance` the server holds the agent in (an administrator's,
    /// or the agent's own after exit 46), as last seen.
    pub(super) held: Option<AgentRequest>,
    /// Why `execution_basedir` has no room for a job, while it has none (no job is taken).
    pub(super) no_room: Option<String>,
    /// When the spool was last listed and found empty, if the agent has spooled nothing
    /// since: until [`SPOOL_RELIST`](super::delivery::SPOOL_RELIST) has passed, the cycles need not list it again.
    pub(super) spool_empty_since: Option<Instant>,
    /// Where the daemon is; every change of state goes through its table.
    pub(super) machine: DaemonMachine,
    /// The device health check, when `healthcheck_command` is set.
    pub(super) health: Option<HealthSettings>,
    /// Jobs in a row whose provision failed.
    pub(super) provision_failures: u64,
    /// A health check asked for and not run yet (the reason), for the next idle moment.
    pub(super) check_due: Option<String>,
    /// SIGUSR2: a health check at the next idle moment.
    pub(super) check_signal: Arc<AtomicBool>,
    /// How many times SIGUSR2 came: each new one ends the pause under way once.
    check_asks: Arc<AtomicU64>,
    /// The count of [`Self::check_asks`] a pause last ended early for.
    check_asks_woken: AtomicU64,
    /// When the last health check ended (or the daemon started): the idle interval counts
    /// from it.
    pub(super) last_check: Instant,
    /// Held in `maintenance` by its own failed health check.
    pub(super) own_hold: Option<OwnHold>,
    /// One agent per `agent_id` on this host, for as long as this one lives.
    _lock: super::lock::AgentLock,
    /// The metrics endpoint, when a port was given; stops when the daemon is dropped.
    _metrics_server: Option<crate::metrics::MetricsServer>,
}

impl Daemon {
    /// Takes the agent's lock, checks the directories and prepares the HTTP client.
    /// Nothing is sent yet.
    pub fn new(config: Config, stop: StopSignal) -> Result<Daemon, DaemonError> {
        ensure_writable_dir(&config.execution_basedir).map_err(|source| {
            DaemonError::Directory {
                key: Key::ExecutionBasedir.name(),
                path: config.execution_basedir.clone(),
                source,
            }
        })?;
        // Before anything else: a second copy of this agent must not touch its run
        // directories, its spool or its record on the server.
        let lock = super::lock::AgentLock::acquire(&config.execution_basedir, &config.agent_id)?;
        for (key, dir) in [
            (Key::ResultsBasedir, &config.results_basedir),
            (Key::LoggingBasedir, &config.logging_basedir),
        ] {
            ensure_writable_dir(dir).map_err(|source| DaemonError::Directory {
                key: key.name(),
                path: dir.clone(),
                source,
            })?;
        }
        // Metrics are recorded whether or not they are served; the port is bound now, so
        // that a port in use stops the start before anything is posted to the server.
        let metrics = crate::metrics::install(crate::metrics::Metrics::new(
            &config.agent_id,
            config.identifier.as_deref().unwrap_or(""),
        ));
        metrics.health().set_stall_limit(stall_limit(&config));
        metrics.health().set_call_stall(call_stall_limit(&config));
        // Logs each request to the server that waits past that limit, once.
        if let Err(err) = std::thread::Builder::new()
            .name("call-watch".into())
            .spawn(move || metrics.health().watch_calls())
        {
            log::warn!(
                "cannot start the thread that reports requests the server does not answer: {err}"
            );
        }
        let metrics_server = match config.metrics_endpoint_port {
            Some(port) => {
                let served = crate::metrics::serve(
                    metrics,
                    config.metrics_endpoint_address.as_deref(),
                    port,
                )?;
                log::info!(
                    "serving metrics on {} (/metrics, /health)",
                    served.local_addr()
                );
                Some(served)
            }
            None => None,
        };
        crate::process::become_subreaper()?;
        crate::process::claim_orphans();
        // When memory runs out the kernel should take the job, never the agent that owns
        // it: phase commands start at `oom_score_adj` (500 by default), and as root the
        // agent lowers its own. Without the privilege it keeps the score it was given.
        match crate::process::set_own_oom_score_adj(AGENT_OOM_SCORE_ADJ) {
            Ok(()) => log::debug!("agent oom_score_adj set to {AGENT_OOM_SCORE_ADJ}"),
            Err(err) => log::info!(
                "the agent keeps its own oom_score_adj ({err}); phase commands start at {}",
                config.oom_score_adj
            ),
        }
        let server = HttpServer::new(crate::server::http::HttpSettings::from_config(&config));
        let restart_signal = Arc::new(AtomicBool::new(false));
        if let Err(err) =
            signal_hook::flag::register(signal_hook::consts::SIGUSR1, restart_signal.clone())
        {
            log::warn!("cannot install the SIGUSR1 handler: {err}");
        }
        let health = HealthSettings::from_config(&config);
        let check_signal = Arc::new(AtomicBool::new(false));
        let check_asks = Arc::new(AtomicU64::new(0));
        if health.is_some() {
            crate::signals::on_sigusr2(&check_signal, &check_asks, &stop);
        }
        Ok(Daemon {
            config,
            server,
            stop,
            restart_signal,
            marker_dir: PathBuf::from(crate::executor::MARKER_DIR),
            queues_posted: None,
            unreachable_streak: 0,
            outage: None,
            no_room: None,
            spool_empty_since: None,
            machine: DaemonMachine::default(),
            restart_after_job: false,
            held: None,
            health,
            provision_failures: 0,
            check_due: None,
            check_signal,
            check_asks,
            check_asks_woken: AtomicU64::new(0),
            last_check: Instant::now(),
            own_hold: None,
            _lock: lock,
            _metrics_server: metrics_server,
        })
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop.is_shutting_down()
    }

    /// Sleeps up to `period`, waking early when a stop is requested, and once for each
    /// SIGUSR2 (a health check asked for runs at the next idle moment, not after the
    /// pause); beats all along (the loop is healthy while it waits).
    pub(super) fn pause(&self, period: Duration) {
        let deadline = Instant::now() + period;
        let step = crate::notify::watchdog_timeout()
            .map_or(period, |timeout| (timeout / 4).max(PAUSE_BEAT_MIN));
        loop {
            crate::metrics::beat();
            if self.stopping() {
                break;
            }
            let asks = self.check_asks.load(Ordering::SeqCst);
            if self.check_asks_woken.swap(asks, Ordering::SeqCst) != asks {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // The stop signal's wake pipe: a stop request and SIGUSR2 both wake it.
            self.stop.wake_pipe().wait(left.min(step));
        }
        crate::metrics::beat();
    }

    /// Tells the state machine what happened: the state it enters is the one
    /// [`super::states::DAEMON_TRANSITIONS`] gives, shown on the health endpoint and logged.
    /// An event without an edge from the current state is refused (logged as an internal
    /// error) and changes nothing.
    pub(super) fn fire(&mut self, event: DaemonEvent, job_id: &str) {
        let from = self.machine.state();
        match self.machine.fire(event) {
            Ok(to) => {
                log::info!(
                    "daemon state: {} --{}--> {}",
                    from.name(),
                    event.label(),
                    to.name()
                );
                self.show_state(to.name(), job_id);
            }
            Err(refused) => log::error!("internal: {refused}; the state stays {}", from.name()),
        }
    }

    /// A hold (`offline` or `maintenance`, by the server's state or the marker file): its
    /// event, and the state it holds the daemon in.
    pub(super) fn hold_of(state: &str) -> (DaemonEvent, DaemonState) {
        if state == "maintenance" {
            (DaemonEvent::HeldMaintenance, DaemonState::Maintenance)
        } else {
            (DaemonEvent::HeldOffline, DaemonState::Offline)
        }
    }

    /// Enters the hold `state` names, unless the daemon is held so already (a hold is seen
    /// again every cycle while it lasts).
    pub(super) fn hold(&mut self, state: &str) {
        let (event, held) = Self::hold_of(state);
        if self.machine.state() != held {
            self.fire(event, "");
        }
    }

    /// The daemon state the health endpoint reports, and systemd's `STATUS=`.
    fn show_state(&self, state: &str, job_id: &str) {
        if let Some(metrics) = crate::metrics::get() {
            metrics.health().set_state(state, job_id);
            metrics.health().beat();
        }
        crate::notify::state(state, job_id);
    }

    pub(super) fn post_agent(&self, body: Value) {
        if let Err(err) = self.server.post_agent_data(&body) {
            log::warn!("posting agent data {body} failed: {err}");
        }
    }

    pub(super) fn refresh_queues(&mut self) {
        if self
            .queues_posted
            .is_some_and(|at| at.elapsed() < QUEUE_REFRESH)
        {
            return;
        }
        if let Some(queues) = self.config.value(Key::AdvertisedQueues) {
            match self.server.post_queues(queues) {
                Ok(()) => self.queues_posted = Some(Instant::now()),
                Err(err) => log::warn!("advertising queues failed: {err}"),
            }
        }
    }

    fn offline_marker(&self) -> Option<PathBuf> {
        let id = &self.config.agent_id;
        [id.clone(), id.replace('-', "")]
            .into_iter()
            .map(|name| {
                self.marker_dir
                    .join(format!("TESTFLINGER-DEVICE-OFFLINE-{name}"))
            })
            .find(|path| path.exists())
    }

    /// Runs until stopped; returns how it ended.
    pub fn run(mut self) -> DaemonExit {
        log::info!(
            "agent {} starting: server {}, queues {:?}",
            self.config.agent_id,
            self.config.server_address,
            self.config.job_queues
        );
        self.show_state("starting", "");
        self.watch();
        // Before anything is posted or polled: finish the jobs a dead agent left behind
        // (kill what is left, run their cleanup), locally, whether the server is up or not.
        let recovered_offline = super::recovery::recover_interrupted(&self.config, &self.stop);
        let exit = match self.come_up(recovered_offline) {
            Some(exit) => exit,
            None => {
                // systemd: up (it may have been said already, see `come_up`).
                crate::notify::ready();
                loop {
                    if self.stopping() {
                        break DaemonExit::Stopped;
                    }
                    if let Some(exit) = self.cycle() {
                        break exit;
                    }
                }
            }
        };
        crate::notify::stopping();
        match (exit, self.machine.state()) {
            (_, DaemonState::Stopped) => {}
            (DaemonExit::Restart, _) => self.fire(DaemonEvent::Exited, ""),
            _ => self.fire(DaemonEvent::Stop, ""),
        }
        if exit == DaemonExit::Stopped && self.held.is_none() {
            // A stop by the supervisor is a short absence, not an administrator's decision:
            // the record says `waiting`, so users' jobs still queue for this device (the
            // CLI refuses a queue whose agents are all `offline`), and the next start is not
            // held by a state the agent posted itself.
            self.post_agent(json!({"state": "waiting", "comment": ""}));
        }
        log::info!("agent {} exiting ({exit:?})", self.config.agent_id);
        exit
    }

    /// The systemd watchdog pings on the main loop's beats (see `notify`); a `WatchdogSec=`
    /// shorter than the health endpoint's stall limit may restart a healthy agent in the
    /// middle of a long upload.
    fn watch(&self) {
        let Some(metrics) = crate::metrics::get() else {
            return;
        };
        if let Some(timeout) = crate::notify::watchdog_timeout() {
            let limit = stall_limit(&self.config);
            if timeout < limit {
                log::warn!(
                    "systemd's watchdog timeout ({}s, WatchdogSec=) is shorter than the health \
                     endpoint's stall limit ({}s): the main loop may go longer than that without \
                     a beat in one call to the server (an artifact upload may take 600s), and \
                     systemd would then restart a busy agent",
                    timeout.as_secs_f64(),
                    limit.as_secs()
                );
            }
        }
        crate::notify::watch(|| metrics.health().since_last_beat());
    }

    /// One polling cycle: spool, one agent-record read, one job poll, jobs back to back.
    fn cycle(&mut self) -> Option<DaemonExit> {
        if self.restart_after_job {
            return Some(DaemonExit::Restart);
        }
        crate::metrics::beat();
        crate::notify::test_stall();
        if self.outage.is_none() {
            // While the server gives no answer, delivering the spool would only wait.
            self.retry_spool();
        }
        let tried = Instant::now();
        let record = match self.read_record() {
            Ok(Some(record)) => record,
            Ok(None) => {
                // The start-up posts were lost or refused (or the record was deleted): say
                // again who this agent is, or it never shows on the server.
                log::warn!("the server has no record of this agent (404); announcing it again");
                self.announce();
                AgentRecord::default()
            }
            Err(err) if err.is_no_answer() => {
                // An outage, or a server that accepts and never answers: polling would
                // fail the same way.
                self.no_answer(&err, tried);
                return None;
            }
            Err(err) => {
                log::warn!("could not read the agent record, treating its state as unknown: {err}");
                AgentRecord::default()
            }
        };
        self.heartbeat(&record);
        let server_state = record.state.as_deref();
        if self.own_hold.is_some() && !self.own_hold_goes_on(server_state, &record.comment) {
            return None;
        }
        // An administrator's offline or maintenance holds the agent; a restart request (the
        // server's `restart` state or SIGUSR1) waits until it is released (PROTOCOL §14.3).
        if matches!(server_state, Some("offline" | "maintenance")) {
            if self.held.is_none() {
                log::info!(
                    "agent is {} on the server ({:?}); not taking jobs{}",
                    server_state.unwrap_or_default(),
                    record.comment,
                    if self.restart_signal.load(Ordering::SeqCst) {
                        "; the restart asked for waits until it is released"
                    } else {
                        ""
                    }
                );
            }
            self.held = Some(AgentRequest {
                state: server_state.unwrap_or_default().to_owned(),
                comment: record.comment.clone(),
            });
            self.hold(server_state.unwrap_or_default());
            self.pause(self.config.polling_period());
            return None;
        }
        if let Some(hold) = self.held.take() {
            if record.state.is_some() {
                log::info!("released from {} by the server", hold.state);
                self.fire(DaemonEvent::Released, "");
            } else {
                // The record could not be read: stay held rather than guess.
                self.held = Some(hold);
                self.pause(self.config.polling_period());
                return None;
            }
        }
        let restart_asked =
            self.restart_signal.load(Ordering::SeqCst) || server_state == Some("restart");
        if restart_asked {
            let comment = if server_state == Some("restart") {
                record.comment.clone()
            } else {
                RESTART_SIGNAL_COMMENT.to_owned()
            };
            self.fire(DaemonEvent::RestartAsked, "");
            self.post_restart(&comment);
            return Some(DaemonExit::Restart);
        }
        if let Some(marker) = self.offline_marker() {
            log::info!(
                "offline marker {} exists; not taking jobs",
                marker.display()
            );
            self.hold("offline");
            self.pause(self.config.polling_period());
            return None;
        }
        if self.machine.state() == DaemonState::Offline {
            // Held by the marker file alone (a server hold returns above), now gone.
            self.fire(DaemonEvent::Released, "");
        }
        if !self.room_for_a_job() {
            self.pause(self.config.polling_period());
            return None;
        }
        // An idle moment: a health check that is due runs now, before a job is taken.
        if let Some(why) = self.check_wanted() {
            self.fire(DaemonEvent::CheckDue, "");
            self.check_now(&why);
            return None;
        }
        self.refresh_queues();
        let queues = if record.restricted_to.is_empty() {
            self.config.job_queues.clone()
        } else {
            record.restricted_to.clone()
        };
        let tried = Instant::now();
        match self.server.poll_job(&queues) {
            Ok(Some(body)) => {
                self.unreachable_streak = 0;
                self.run_server_job(&body);
                // The next cycle starts at once (jobs back to back, PROTOCOL §6.1 step 11),
                // with a fresh read of the agent record: a request to go offline or restart
                // made during the job is seen before the next job is taken.
            }
            Ok(None) => {
                self.unreachable_streak = 0;
                self.pause(self.config.polling_period());
            }
            Err(err) if err.is_no_answer() => self.no_answer(&err, tried),
            Err(err) if err.is_retryable() => {
                let wait = self.unreachable_backoff();
                self.unreachable_streak += 1;
                log::warn!("polling for a job failed (next try in {wait:?}): {err}");
                self.pause(wait);
            }
            Err(err) => {
                log::warn!("polling for a job was refused: {err}");
                self.pause(self.config.polling_period());
            }
        }
        None
    }

    /// Before exiting for a restart: `restart`, not `offline`, so that the next start does
    /// not take it for an administrator's decision (PROTOCOL §14.3).
    pub(super) fn post_restart(&self, comment: &str) {
        log::info!("restarting ({comment})");
        self.post_agent(json!({"state": "restart", "comment": comment}));
    }

    /// The wait after the server could not be reached: the polling interval, doubling with
    /// each failure in a row, at most eight polling intervals and never more than
    /// [`UNREACHABLE_BACKOFF_CAP`].
    pub(super) fn unreachable_backoff(&self) -> Duration {
        let base = self.config.polling_period().max(Duration::from_secs(1));
        let factor = 1u32 << self.unreachable_streak.min(3);
        base.saturating_mul(factor).min(UNREACHABLE_BACKOFF_CAP)
    }

    /// The server gave no answer to a request made at `tried`: says so, and waits for the
    /// end of the back-off step that is due, counted from that request (the next request is
    /// a probe of the server, see [`Self::read_record`]).
    fn no_answer(&mut self, err: &crate::server::ServerError, tried: Instant) {
        self.outage.get_or_insert(tried);
        let wait = self.unreachable_backoff().saturating_sub(tried.elapsed());
        self.unreachable_streak += 1;
        if wait.is_zero() {
            // The failed call outlasted the step (its own retries, or a hang).
            log::warn!("the server does not answer (asking again now): {err}");
        } else {
            log::warn!(
                "the server does not answer (next try in {:.1} s): {err}",
                wait.as_secs_f64()
            );
        }
        self.pause(wait);
    }

    /// Reads the agent record: as a call with retries while the server answers, as one
    /// probe bounded by the back-off step that is due while it does not. Says when the
    /// server answers again after giving no answer.
    pub(super) fn read_record(
        &mut self,
    ) -> Result<Option<AgentRecord>, crate::server::ServerError> {
        let tried = Instant::now();
        let result = match self.outage {
            None => self.server.read_agent_record(),
            Some(_) => {
                let timeout = self
                    .unreachable_backoff()
                    .clamp(PROBE_TIMEOUT_MIN, PROBE_TIMEOUT_MAX);
                self.server.probe_agent_record(timeout)
            }
        };
        match &result {
            Err(err) if err.is_no_answer() => {
                self.outage.get_or_insert(tried);
            }
            _ => {
                if let Some(since) = self.outage.take() {
                    log::info!(
                        "the server answers again, after {:.1} s without an answer",
                        since.elapsed().as_secs_f64()
                    );
                }
            }
        }
        result
    }

    fn heartbeat(&self, record: &AgentRecord) {
        let Some(updated) = record.updated_at.as_deref() else {
            return;
        };
        if crate::time::age_of(updated).is_some_and(|age| age >= HEARTBEAT_AGE) {
            self.post_agent(json!({
                "state": record.state.clone().unwrap_or_else(|| "waiting".into()),
                "comment": record.comment,
            }));
        }
    }
}

fn ensure_writable_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    fs::write(&probe, b"")?;
    fs::remove_file(&probe)
}
