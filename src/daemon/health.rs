//! The device health check in the daemon: when a check is due (provision failures in a
//! row, exit 46, the idle interval, SIGUSR2, start-up), running it at an idle moment, and
//! the agent's own `maintenance` hold that a failed check sets and a passing one lifts.
//! The check itself (its process, output and report) is [`crate::healthcheck`].

use super::run::{Daemon, OwnHold};
use super::states::{DaemonEvent, DaemonState};
use crate::executor::{AgentRequest, RECOVERY_OFFLINE_COMMENT_PREFIX};
use crate::healthcheck::{self, CheckResult};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Daemon {
    /// Whether a hold on the server (`state` with `comment`) is the agent's own, which a
    /// health check may lift: its failed check's `maintenance`, or its `offline` after exit
    /// 46. Only with a health check configured; without one every hold is an
    /// administrator's (today's rule).
    pub(super) fn is_own_hold(&self, state: &str, comment: &str) -> bool {
        self.health.is_some()
            && match state {
                "maintenance" => healthcheck::is_own_comment(comment),
                "offline" => comment.starts_with(RECOVERY_OFFLINE_COMMENT_PREFIX),
                _ => false,
            }
    }

    /// After a job: counts jobs in a row whose provision failed (a job without a provision
    /// phase changes nothing), and says why a health check is due, if one is: a phase exited
    /// 46, or `healthcheck_after_failures` provisions in a row failed.
    pub(super) fn count_provision(&mut self, statuses: &Value) -> Option<String> {
        let status = statuses.get("status").and_then(Value::as_object);
        match status
            .and_then(|s| s.get("provision"))
            .and_then(Value::as_i64)
        {
            Some(0) => self.provision_failures = 0,
            Some(_) => self.provision_failures += 1,
            None => {}
        }
        publish_provision_failures(self.provision_failures);
        let settings = self.health.as_ref()?;
        let exit_46 = status.is_some_and(|s| {
            s.values()
                .any(|v| v.as_i64() == Some(i64::from(crate::lifecycle::RECOVERY_FAILED_EXIT_CODE)))
        });
        if exit_46 {
            return Some("a phase exited 46 (device recovery failed)".to_owned());
        }
        (settings.after_failures > 0 && self.provision_failures >= settings.after_failures).then(
            || {
                format!(
                    "{} jobs in a row failed in provision (healthcheck_after_failures)",
                    self.provision_failures
                )
            },
        )
    }

    /// A check due now, at an idle moment: one asked for earlier, SIGUSR2, or the idle
    /// interval passed.
    pub(super) fn check_wanted(&mut self) -> Option<String> {
        let settings = self.health.as_ref()?;
        if let Some(why) = self.check_due.take() {
            return Some(why);
        }
        if self.check_signal.swap(false, Ordering::SeqCst) {
            return Some("asked by SIGUSR2".to_owned());
        }
        let interval = settings.interval?;
        (self.last_check.elapsed() >= interval)
            .then(|| "idle interval (healthcheck_interval)".to_owned())
    }

    /// While the agent holds itself after a failed check, one cycle: `false` when the cycle
    /// is over (still held; the check re-ran if its retry was due, or SIGUSR2 asked), `true`
    /// when it goes on because the hold is no longer the agent's own: an administrator
    /// replaced it with theirs (kept, as any administrator's hold) or lifted it (jobs are
    /// taken again, provision failures counted from zero).
    pub(super) fn own_hold_goes_on(&mut self, server_state: Option<&str>, comment: &str) -> bool {
        let Some(state) = server_state else {
            // The record could not be read: stay held rather than guess.
            self.pause(self.config.polling_period());
            return false;
        };
        if self.is_own_hold(state, comment) {
            let retry_at = self
                .own_hold
                .as_ref()
                .map_or_else(Instant::now, |h| h.retry_at);
            let asked = self.check_signal.swap(false, Ordering::SeqCst);
            if asked || Instant::now() >= retry_at {
                self.fire(DaemonEvent::CheckDue, "");
                self.check_now(if asked {
                    "asked by SIGUSR2, while held by a failed check"
                } else {
                    "retry of a failed health check"
                });
            } else {
                self.pause(
                    self.config
                        .polling_period()
                        .min(retry_at.saturating_duration_since(Instant::now())),
                );
            }
            return false;
        }
        self.own_hold = None;
        if matches!(state, "offline" | "maintenance") {
            log::warn!(
                "an administrator replaced the agent's own hold with {state} ({comment:?}); kept until an administrator lifts it"
            );
            // The administrator's hold is taken up by the caller, as any other.
            self.held = None;
        } else {
            log::warn!(
                "an administrator released the agent from its own maintenance (the server says {state:?}); taking jobs again, provision failures counted from zero"
            );
            self.held = None;
            self.provision_failures = 0;
            publish_provision_failures(0);
            self.fire(DaemonEvent::Released, "");
        }
        true
    }

    /// Runs the health check now (the machine is in `checking`) and acts on its result:
    /// a pass releases the agent's own hold and posts `waiting`, a failure posts the agent's
    /// own `maintenance` and schedules a retry. Neither touches a hold an administrator set
    /// meanwhile (the record is read again first). A stop ends the check like a phase, and
    /// the daemon with it.
    pub(super) fn check_now(&mut self, why: &str) {
        let Some(settings) = self.health.clone() else {
            log::error!("internal: a health check without healthcheck_command");
            self.fire(DaemonEvent::CheckPassed, "");
            return;
        };
        let report = match healthcheck::run_check(&self.config, &settings, &self.stop, why) {
            Ok(report) => report,
            Err(err) => {
                log::error!("health check ({why}) could not run: {err}");
                let started = std::time::SystemTime::now();
                healthcheck::CheckReport {
                    result: Some(CheckResult::Fail),
                    at: crate::time::iso_at(started),
                    started,
                    duration: Duration::ZERO,
                    exit_code: crate::process::AGENT_FAILURE_EXIT_CODE,
                    last_line: err.to_string(),
                    log: None,
                }
            }
        };
        self.last_check = Instant::now();
        crate::process::reap_orphans();
        let Some(result) = report.result else {
            // Stopped during the check: `run` ends the daemon as it does after a phase.
            self.fire(DaemonEvent::Stop, "");
            return;
        };
        if let Some(metrics) = crate::metrics::get() {
            metrics.healthcheck_ran(
                result.as_str(),
                &report.at,
                report.started,
                report.duration.as_secs_f64(),
            );
        }
        // An administrator may have set a hold while the check ran: theirs stays.
        let admin_hold = match self.read_record() {
            Ok(Some(record)) => record
                .state
                .as_deref()
                .filter(|s| matches!(*s, "offline" | "maintenance"))
                .filter(|s| !self.is_own_hold(s, &record.comment))
                .map(|s| (s.to_owned(), record.comment.clone())),
            _ => None,
        };
        if let Some((state, comment)) = &admin_hold {
            log::warn!(
                "an administrator holds the agent {state} ({comment:?}); the health check's result changes nothing on the server"
            );
        }
        if result == CheckResult::Pass {
            self.provision_failures = 0;
            publish_provision_failures(0);
            if self.own_hold.take().is_some() {
                log::info!("health check passed: the agent releases its own hold");
            }
            self.held = None;
            self.fire(DaemonEvent::CheckPassed, "");
            if admin_hold.is_none() {
                self.post_agent(json!({"state": "waiting", "comment": ""}));
            }
            return;
        }
        let failures = self.own_hold.as_ref().map_or(0, |h| h.failures) + 1;
        let wait = settings.retry_after(failures);
        let comment = report.failure_comment();
        log::warn!(
            "health check failed ({failures} in a row): holding the agent in maintenance, next check in {} s",
            wait.as_secs()
        );
        self.own_hold = Some(OwnHold {
            failures,
            retry_at: Instant::now() + wait,
        });
        self.fire(DaemonEvent::CheckFailed, "");
        if admin_hold.is_none() {
            self.post_agent(json!({"state": "maintenance", "comment": comment}));
            self.held = Some(AgentRequest {
                state: "maintenance".to_owned(),
                comment,
            });
        }
    }

    /// After a job: [`Self::back_to_waiting`], unless the job calls for a health check
    /// (`check`, its reason), which then runs at once, before `waiting` is posted; a hold or
    /// restart asked for during the job goes first, and the check waits for the next idle
    /// moment.
    pub(super) fn back_to_waiting_or_check(
        &mut self,
        deferred: Option<&AgentRequest>,
        check: Option<String>,
    ) {
        let Some(why) = check else {
            self.back_to_waiting(deferred);
            return;
        };
        if deferred.is_some() || self.stopping() || self.machine.state() != DaemonState::Busy {
            if !self.stopping() {
                self.check_due = Some(why);
            }
            self.back_to_waiting(deferred);
            return;
        }
        self.fire(DaemonEvent::CheckDue, "");
        crate::process::reap_orphans();
        self.post_agent(json!({"job_id": ""}));
        self.check_now(&why);
    }
}

/// The consecutive-provision-failures gauge.
fn publish_provision_failures(count: u64) {
    if let Some(metrics) = crate::metrics::get() {
        metrics.set_consecutive_provision_failures(count);
    }
}
