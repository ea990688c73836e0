//! The phase metrics of a job (PROTOCOL §14.2): durations observed with the `release`
//! label once the device has answered, failures, recovery failures, escapees and kills.

use super::PhaseExecutor;
use crate::lifecycle::{PhaseEnd, PhaseRecord, PhaseStatus, RECOVERY_FAILED_EXIT_CODE};
use crate::phase::Phase;
use crate::process;
use crate::release::ReleaseProbe;
use std::time::Duration;

impl PhaseExecutor<'_> {
    /// The Python agent's per-phase metrics (PROTOCOL §14.2): every phase the job reaches
    /// but cleanup is observed in `phase_duration_seconds` (a skipped one at 0 s, in whole
    /// seconds), a non-zero exit counts in `failures_total`, exit 46 also in
    /// `recovery_failures_total`.
    pub(super) fn record_phase_metrics(&mut self, record: &PhaseRecord, failed_code: Option<i32>) {
        let Some(metrics) = crate::metrics::get() else {
            return;
        };
        let phase = record.phase;
        if phase == Phase::Cleanup {
            return;
        }
        if let Some(code) = failed_code {
            metrics.phase_failed(phase.name());
            if code == RECOVERY_FAILED_EXIT_CODE {
                metrics.recovery_failed();
            }
        }
        let seconds = match record.status {
            PhaseStatus::Ran(result) => result.duration.as_secs(),
            PhaseStatus::Skipped(_) => 0,
        };
        if phase == Phase::Provision
            && matches!(record.status, PhaseStatus::Ran(r) if r.exit_code == 0)
        {
            let user = self
                .spec
                .phase_data(Phase::Test)
                .and_then(|data| data.get("test_username"))
                .and_then(|user| user.as_str());
            self.phase_metrics
                .start_probe(ReleaseProbe::start(&self.rundir, user));
        }
        self.phase_metrics.observe(phase, seconds);
    }
}

/// Phase durations of one job, observed with the job's `release` label. After a
/// provision that exited 0 the label is asked of the device ([`ReleaseProbe`]) beside the
/// job, never in its way: the observations wait for the answer (at most the probe's 30 s,
/// or until the job ends), the phases do not.
#[derive(Default)]
pub(super) struct PhaseMetrics {
    /// `""` until a provision succeeded, as in the Python agent.
    release: String,
    probe: Option<ReleaseProbe>,
    /// Observations waiting for the probe's label.
    waiting: Vec<(Phase, u64)>,
}

impl std::fmt::Debug for PhaseMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhaseMetrics")
            .field("release", &self.release)
            .field("probing", &self.probe.is_some())
            .field("waiting", &self.waiting)
            .finish()
    }
}

/// How long the end of a job waits for a probe still asking the device.
const RELEASE_WAIT_AT_JOB_END: Duration = Duration::from_secs(5);

impl PhaseMetrics {
    fn start_probe(&mut self, probe: ReleaseProbe) {
        self.probe = Some(probe);
    }

    fn observe(&mut self, phase: Phase, seconds: u64) {
        if let Some(label) = self.probe.as_ref().and_then(ReleaseProbe::try_label) {
            self.settle(label);
        }
        if self.probe.is_some() {
            self.waiting.push((phase, seconds));
            return;
        }
        if let Some(metrics) = crate::metrics::get() {
            metrics.phase_duration(phase.name(), seconds, &self.release);
        }
    }

    fn settle(&mut self, label: String) {
        self.probe = None;
        self.release = label;
        if let Some(metrics) = crate::metrics::get() {
            for (phase, seconds) in self.waiting.drain(..) {
                metrics.phase_duration(phase.name(), seconds, &self.release);
            }
        }
    }

    /// The job is over: what still waits is observed, with the label if it comes in time.
    /// (The probe must end before the daemon reaps orphans between jobs.)
    pub(super) fn flush(&mut self) {
        if let Some(probe) = self.probe.take() {
            let label = probe.wait_label(RELEASE_WAIT_AT_JOB_END);
            self.settle(label);
        }
    }
}

/// The escapee counter: processes that had left the command's group and were ended.
pub(super) fn record_escapees(done: &process::CommandOutcome) {
    let escapees = done.escapees_killed + done.escapees_terminated;
    if let (Some(metrics), true) = (crate::metrics::get(), escapees > 0) {
        metrics.escapees_killed(escapees as u64);
    }
}

/// The kill counter, from how the phase ended: the agent ended its command (or, for an
/// allocate hold, the phase) on a timeout, a cancellation or a shutdown.
pub(super) fn record_kill(end: PhaseEnd) {
    use crate::metrics::KillCause;
    let cause = match end {
        PhaseEnd::GlobalTimeout => KillCause::GlobalTimeout,
        PhaseEnd::OutputTimeout => KillCause::OutputTimeout,
        PhaseEnd::Cancelled => KillCause::Cancel,
        PhaseEnd::Shutdown => KillCause::Shutdown,
        PhaseEnd::Exited | PhaseEnd::Signaled | PhaseEnd::AgentError | PhaseEnd::StorageFailed => {
            return
        }
    };
    if let Some(metrics) = crate::metrics::get() {
        metrics.command_killed(cause);
    }
}
