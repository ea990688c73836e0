//! What `/health` reports: the agent's state, its job, and whether the main loop is alive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the main loop may go without [`Health::beat`] before `/health` says it stalled,
/// until [`Health::set_stall_limit`] says otherwise.
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(900);

/// The main loop's liveness and what it is doing. `beat` is one atomic store; `set_state`
/// takes a lock held only for a copy.
#[derive(Debug)]
pub struct Health {
    origin: Instant,
    /// Nanoseconds from `origin` to the last beat.
    last_beat: AtomicU64,
    stall_limit_ms: AtomicU64,
    state: Mutex<(String, String)>,
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
            state: Mutex::new(("starting".to_string(), String::new())),
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

    /// Whether the last beat is within the stall limit, and the `/health` body:
    /// `{"status":"ok"|"stalled","state":..,"job_id":..,"last_cycle_seconds_ago":..,
    /// "stall_limit_seconds":..}`.
    pub fn report(&self) -> (bool, String) {
        let ago = self.since_last_beat();
        let limit = self.stall_limit();
        let ok = ago <= limit;
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
        });
        (ok, body.to_string())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
