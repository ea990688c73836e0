//! The allocate phase's two extra steps (PROTOCOL §5.7, §14.4): publishing the device
//! info the parent job needs, then holding the device until this job or its parent is
//! released or the phase's global timeout runs out.

use super::{append_agent_line, PhaseExecutor};
use crate::lifecycle::{PhaseEnd, PhaseResult};
use crate::outcome;
use crate::phase::Phase;
use crate::process;
use serde_json::json;
use std::time::{Duration, Instant};

impl PhaseExecutor<'_> {
    /// An allocated device is useless to its parent job without its device info
    /// (PROTOCOL §5.7): after a successful allocate, `device-info.json` must exist and the
    /// server must take it, else the phase counts as failed. The post is retried while the
    /// server is unreachable, until it succeeds, the job is cancelled or the agent stops.
    pub(super) fn publish_device_info(&self, result: PhaseResult) -> PhaseResult {
        if result.exit_code != 0 {
            return result;
        }
        let job_id = self.spec.job_id();
        let period = self.config.cancel_check_period();
        let problem = loop {
            let Some(info) = outcome::read_device_info(&self.rundir) else {
                break format!(
                    "allocate finished without writing {} (a JSON object)",
                    outcome::DEVICE_INFO_FILE
                );
            };
            match self.server.post_result(job_id, &info) {
                Ok(()) => return result,
                Err(err) if !err.is_retryable() => {
                    break format!("the server refused the device info: {err}")
                }
                Err(err) => {
                    log::warn!("job {job_id}: posting device info failed, retrying: {err}");
                    let cancelled = matches!(
                        self.server.job_state(job_id),
                        Ok(Some(state)) if state == "cancelled"
                    );
                    if cancelled || !self.stop.sleep_unless_shutdown(period) {
                        return result;
                    }
                }
            }
        };
        let message = format!("\nERROR: {problem}; the parent job cannot use this device.\n");
        log::error!("job {job_id}: {}", message.trim());
        append_agent_line(self.server, job_id, &self.rundir, Phase::Allocate, &message);
        PhaseResult {
            exit_code: process::AGENT_FAILURE_EXIT_CODE,
            end: PhaseEnd::AgentError,
            duration: result.duration,
        }
    }

    /// After a successful allocate whose device info the server took: post `allocated`,
    /// then hold the device until this job or its parent is complete or cancelled (the
    /// parent releases its sub-jobs by cancelling them), the agent shuts down, or the
    /// phase's global timeout (from the start of the allocate command) expires: an orphaned
    /// sub-job must not hold the device for ever (PROTOCOL §14.4). On expiry the phase ends
    /// as a global timeout: the event, exit code 247, the log line, and cleanup runs. Own
    /// state is read every `cancel_check_interval`, the parent's every sixth time.
    pub(super) fn hold_allocation(
        &mut self,
        mut result: PhaseResult,
        started: Instant,
        global_timeout: Option<Duration>,
    ) -> PhaseResult {
        let deadline = global_timeout.map(|limit| started + limit);
        let job_id = self.spec.job_id().to_owned();
        let period = self.config.cancel_check_period();
        self.post_result(&json!({"job_state": "allocated"}), "allocated state");
        log::info!("job {job_id}: allocated; waiting for this job or its parent to finish");
        let released = |state: Option<String>| {
            matches!(
                state.as_deref(),
                Some("complete" | "completed" | "cancelled")
            )
        };
        let parent = self.spec.parent_job_id().map(str::to_owned);
        for tick in 0u64.. {
            crate::metrics::beat();
            let wait = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        result.duration = started.elapsed();
                        return self.allocation_timed_out(result);
                    }
                    left.min(period)
                }
                None => period,
            };
            if !self.stop.sleep_unless_shutdown(wait) {
                return result;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                continue;
            }
            if released(self.server.job_state(&job_id).ok().flatten()) {
                break;
            }
            if let Some(parent) = parent.as_deref().filter(|_| tick % 6 == 5) {
                if released(self.server.job_state(parent).ok().flatten()) {
                    break;
                }
            }
        }
        log::info!("job {job_id}: allocation released");
        // The phase lasted until the release (the metrics' phase duration says so).
        result.duration = started.elapsed();
        result
    }

    /// The allocate hold outlived the phase's global timeout.
    fn allocation_timed_out(&mut self, result: PhaseResult) -> PhaseResult {
        let job_id = self.spec.job_id();
        let limit = self.spec.global_timeout(self.config).as_secs();
        let detail = format!("ERROR: Global timeout reached! ({limit}s)");
        log::warn!(
            "job {job_id}: allocate: neither this job nor its parent was released within the global timeout ({limit}s); ending the phase"
        );
        append_agent_line(
            self.server,
            job_id,
            &self.rundir,
            Phase::Allocate,
            &format!("\n{detail} The device was held allocated and nothing released it.\n"),
        );
        self.emit("global_timeout", &detail);
        PhaseResult {
            exit_code: process::KILLED_EXIT_CODE,
            end: PhaseEnd::GlobalTimeout,
            duration: result.duration,
        }
    }
}
