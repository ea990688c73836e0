//! The Unix side of the process runner: nix calls, process groups, the subreaper sweep.

use super::{CommandOutcome, CommandSpec, OutputSink, ProcessError, StopSignal};

/// A non-blocking self-pipe used to wake a `poll()` when a stop is requested.
#[derive(Debug)]
pub struct WakePipe {}

impl WakePipe {
    pub fn new() -> Result<WakePipe, ProcessError> {
        Ok(WakePipe {})
    }
    pub fn wake(&self) {}
}

/// Makes this process the child subreaper (prctl), so that descendants that leave the
/// process group are re-parented to the agent and can be found and killed.
pub fn become_subreaper() -> Result<(), ProcessError> {
    Ok(())
}

/// Runs one phase command to its end. See the module docs.
pub fn run_command(
    _spec: &CommandSpec,
    _sink: &mut dyn OutputSink,
    _stop: &StopSignal,
) -> Result<CommandOutcome, ProcessError> {
    unimplemented!("process runner: being written")
}
