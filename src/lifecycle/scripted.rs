//! A [`PhaseRunner`] that plays back scripted results and records what the engine asked of
//! it: the test double of the engine's tests, doctests and property tests.

use super::{AbortReason, PhaseRecord, PhaseResult, PhaseRunner, StopCause};
use crate::phase::{Phase, SkipReason};
use std::collections::HashMap;

/// One call the engine made on a [`ScriptedRunner`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    StopCheck(Phase),
    Starting(Phase, Option<SkipReason>),
    Ran(Phase),
    Finished(Phase),
    StoppedBefore(Phase),
}

/// Plays back a result per phase (exit 0 unless scripted) and an optional stop before a
/// phase; records every call.
#[derive(Clone, Debug, Default)]
pub struct ScriptedRunner {
    results: HashMap<Phase, PhaseResult>,
    stop_before: Option<(Phase, StopCause)>,
    calls: Vec<Call>,
}

impl ScriptedRunner {
    /// `phase` exits with `code`.
    pub fn exit(self, phase: Phase, code: i32) -> ScriptedRunner {
        self.result(phase, PhaseResult::exited(code))
    }

    /// `phase` ends with `result`.
    pub fn result(mut self, phase: Phase, result: PhaseResult) -> ScriptedRunner {
        self.results.insert(phase, result);
        self
    }

    /// The stop check before `phase` answers `cause`.
    pub fn stop_before(mut self, phase: Phase, cause: StopCause) -> ScriptedRunner {
        self.stop_before = Some((phase, cause));
        self
    }

    /// Every call, in order.
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// The phases whose command ran, in order.
    pub fn ran(&self) -> Vec<Phase> {
        self.calls
            .iter()
            .filter_map(|call| match call {
                Call::Ran(phase) => Some(*phase),
                _ => None,
            })
            .collect()
    }
}

impl PhaseRunner for ScriptedRunner {
    fn stop_requested(&mut self, next: Phase) -> Option<StopCause> {
        self.calls.push(Call::StopCheck(next));
        match self.stop_before {
            Some((phase, cause)) if phase == next => Some(cause),
            _ => None,
        }
    }

    fn phase_starting(&mut self, phase: Phase, skip: Option<SkipReason>) {
        self.calls.push(Call::Starting(phase, skip));
    }

    fn run_phase(&mut self, phase: Phase) -> PhaseResult {
        self.calls.push(Call::Ran(phase));
        self.results
            .get(&phase)
            .copied()
            .unwrap_or_else(|| PhaseResult::exited(0))
    }

    fn phase_finished(&mut self, record: &PhaseRecord, _abort: Option<&AbortReason>) {
        self.calls.push(Call::Finished(record.phase));
    }

    fn stopped_before(&mut self, reason: &AbortReason) {
        self.calls.push(Call::StoppedBefore(reason.phase()));
    }
}
