//! Signal handling without logic in handlers: a dedicated thread receives SIGTERM, SIGINT
//! and SIGHUP through signal-hook and turns them into stop requests and log reopens.

use crate::process::{StopKind, StopSignal};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Starts the signal thread. The first SIGTERM/SIGINT requests [`StopKind::Shutdown`] (end
/// the current phase, run cleanup, report); the second requests [`StopKind::KillNow`].
/// SIGHUP reopens the log file.
pub fn spawn(stop: StopSignal) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                match signal {
                    SIGHUP => crate::logging::reopen(),
                    _ if stop.is_requested(StopKind::Shutdown) => {
                        log::warn!("second stop signal: killing every command now");
                        stop.request(StopKind::KillNow);
                    }
                    _ => {
                        log::warn!(
                            "signal {signal}: finishing the current phase, running cleanup, then exiting (send it again to kill at once)"
                        );
                        stop.request(StopKind::Shutdown);
                    }
                }
            }
        })?;
    Ok(())
}
