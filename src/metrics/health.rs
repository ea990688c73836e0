//! What `/health` reports: the agent's state, its job, and whether the main loop is alive.
//!
//! Besides the main loop's beat, every request to the server is registered here while it is
//! in flight ([`Health::call_started`], [`CallGuard`]): a request still waiting after
//! [`Health::set_call_stall`] makes `/health` say `stalled` and name it, and
//! [`Health::watch_calls`] (a thread of the daemon) logs it once, so that an agent held by
//! a server that accepts connections and never answers is never silent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long the main loop may go without [`Health::beat`] before `/health` says it stalled,
/// until [`Health::set_stall_limit`] says otherwise.
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(900);

/// How long a request may wait before it is logged and `/health` says `stalled`, until
/// [`Health::set_call_stall`] says otherwise (the daemon: `polling_interval` or 30 s,
/// whichever is longer).
pub const DEFAULT_CALL_STALL: Duration = Duration::from_secs(30);

/// One request in flight.
#[derive(Debug)]
struct Call {
    id: u64,
    what: String,
    started: Instant,
    /// Whether [`Health::watch_calls`] has logged it.
    logged: bool,
}

/// The requests in flight, oldest first.
#[derive(Debug, Default)]
struct Calls {
    next_id: u64,
    open: Vec<Call>,
}

/// The main loop's liveness and what it is doing. `beat` is one atomic store; `set_state`
/// takes a lock held only for a copy.
#[derive(Debug)]
pub struct Health {
    origin: Instant,
    /// Nanoseconds from `origin` to the last beat.
    last_beat: AtomicU64,
    stall_limit_ms: AtomicU64,
    call_stall_ms: AtomicU64,
    state: Mutex<(String, String)>,
    /// The last health check: `{"at", "result", "duration_seconds"}`, `null` before any.
    last_check: Mutex<serde_json::Value>,
    calls: Mutex<Calls>,
    /// Signalled when a call starts, for [`Health::watch_calls`].
    call_started: Condvar,
}

/// Ends the registration of a call when dropped (see [`Health::call_started`]).
#[derive(Debug)]
pub struct CallGuard<'a> {
    health: &'a Health,
    id: u64,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let mut calls = self.health.calls();
        if let Some(at) = calls.open.iter().position(|c| c.id == self.id) {
            let call = calls.open.remove(at);
            if call.logged {
                log::info!(
                    "{} ended after {:.0} s",
                    call.what,
                    call.started.elapsed().as_secs_f64()
                );
            }
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// Counts as a beat now: the loop has the whole stall limit to make its first one.
    pub fn new() -> Health {
        Health {
            origin: Instant::now(),
            last_beat: AtomicU64::new(0),
            stall_limit_ms: AtomicU64::new(millis(DEFAULT_STALL_LIMIT)),
            call_stall_ms: AtomicU64::new(millis(DEFAULT_CALL_STALL)),
            state: Mutex::new(("starting".to_string(), String::new())),
            last_check: Mutex::new(serde_json::Value::Null),
            calls: Mutex::new(Calls::default()),
            call_started: Condvar::new(),
        }
    }

    fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a request (`what`, e.g. `GET /v1/job?queue=…`) as in flight until the
    /// guard is dropped.
    pub fn call_started(&self, what: &str) -> CallGuard<'_> {
        let mut calls = self.calls();
        let id = calls.next_id;
        calls.next_id += 1;
        calls.open.push(Call {
            id,
            what: what.to_owned(),
            started: Instant::now(),
            logged: false,
        });
        drop(calls);
        self.call_started.notify_all();
        CallGuard { health: self, id }
    }

    /// How long a request may wait before it counts as stalled.
    pub fn set_call_stall(&self, limit: Duration) {
        self.call_stall_ms.store(millis(limit), Ordering::Relaxed);
        self.call_started.notify_all();
    }

    /// The current limit of [`Self::set_call_stall`].
    pub fn call_stall(&self) -> Duration {
        Duration::from_millis(self.call_stall_ms.load(Ordering::Relaxed))
    }

    /// The oldest request in flight and how long it has waited.
    pub fn oldest_call(&self) -> Option<(String, Duration)> {
        let calls = self.calls();
        calls
            .open
            .iter()
            .min_by_key(|c| c.started)
            .map(|c| (c.what.clone(), c.started.elapsed()))
    }

    /// Logs, once each, the requests that have waited longer than the call stall limit
    /// (a warning naming the request and the wait), and returns how many it logged. Waits
    /// at most `for_at_most` for one to become due; returns at once when one is.
    pub fn log_stalled_calls(&self, for_at_most: Duration) -> usize {
        let limit = self.call_stall();
        let mut calls = self.calls();
        let now = Instant::now();
        let mut logged = 0;
        for call in calls.open.iter_mut().filter(|c| !c.logged) {
            let waited = now.saturating_duration_since(call.started);
            if waited >= limit {
                call.logged = true;
                logged += 1;
                log::warn!(
                    "still waiting for {} after {:.0} s: the server accepted the request but has not answered",
                    call.what,
                    waited.as_secs_f64()
                );
            }
        }
        if logged > 0 {
            return logged;
        }
        // Sleep until the next call becomes due, a call starts, or the limit changes.
        let next_due = calls
            .open
            .iter()
            .filter(|c| !c.logged)
            .map(|c| (c.started + limit).saturating_duration_since(now))
            .min()
            .unwrap_or(for_at_most)
            .min(for_at_most);
        let _unused = self
            .call_started
            .wait_timeout(calls, next_due)
            .unwrap_or_else(PoisonError::into_inner);
        0
    }

    /// Runs [`Self::log_stalled_calls`] for ever: the body of the daemon's watch thread.
    pub fn watch_calls(&self) -> ! {
        loop {
            self.log_stalled_calls(Duration::from_secs(3600));
        }
    }

    /// The agent state (`waiting`, a phase name, `offline`, ...) and the job it runs (`""`
    /// when none).
    pub fn set_state(&self, state: &str, job_id: &str) {
        let mut guard = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.0.clear();
        guard.0.push_str(state);
        guard.1.clear();
        guard.1.push_str(job_id);
    }

    /// The last health check, for the `last_healthcheck` of the body: when it started
    /// (ISO 8601), its result and how long it ran.
    pub fn set_last_check(&self, at: &str, result: &str, seconds: f64) {
        let mut guard = self
            .last_check
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = serde_json::json!({
            "at": at,
            "result": result,
            "duration_seconds": (seconds * 10.0).round() / 10.0,
        });
    }

    /// The main loop is alive now.
    pub fn beat(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_beat.store(nanos, Ordering::Relaxed);
    }

    /// How long ago the last beat was (the systemd watchdog's measure).
    pub fn since_last_beat(&self) -> Duration {
        let last = Duration::from_nanos(self.last_beat.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// The current stall limit.
    pub fn stall_limit(&self) -> Duration {
        Duration::from_millis(self.stall_limit_ms.load(Ordering::Relaxed))
    }

    /// How long without a beat counts as stalled.
    pub fn set_stall_limit(&self, limit: Duration) {
        self.stall_limit_ms.store(millis(limit), Ordering::Relaxed);
    }

    /// Whether the last beat is within the stall limit and no request has waited longer
    /// than the call stall limit, and the `/health` body:
    /// `{"status":"ok"|"stalled","state":..,"job_id":..,"last_cycle_seconds_ago":..,
    /// "stall_limit_seconds":..,"waiting_for":..,"waiting_seconds":..,"last_healthcheck":..}`
    /// (`waiting_*` name the oldest request in flight, `null` when there is none;
    /// `last_healthcheck` is `{"at","result","duration_seconds"}`, `null` before any check).
    pub fn report(&self) -> (bool, String) {
        let ago = self.since_last_beat();
        let limit = self.stall_limit();
        let waiting = self.oldest_call();
        let call_stalled = waiting
            .as_ref()
            .is_some_and(|(_, waited)| *waited >= self.call_stall());
        let ok = ago <= limit && !call_stalled;
        let (state, job_id) = {
            let guard = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            guard.clone()
        };
        let body = serde_json::json!({
            "status": if ok { "ok" } else { "stalled" },
            "state": state,
            "job_id": job_id,
            "last_cycle_seconds_ago": (ago.as_secs_f64() * 10.0).round() / 10.0,
            "stall_limit_seconds": limit.as_secs_f64(),
            "waiting_for": waiting.as_ref().map(|(what, _)| what.as_str()),
            "waiting_seconds": waiting.as_ref().map(|(_, waited)| (waited.as_secs_f64() * 10.0).round() / 10.0),
            "last_healthcheck": self
                .last_check
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        });
        (ok, body.to_string())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
