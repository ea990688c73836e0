//! Signal handling without logic in handlers: a dedicated thread receives SIGTERM, SIGINT
//! and SIGHUP through signal-hook and turns them into stop requests and log reopens, and
//! SIGUSR2 into a health check asked for.

use crate::process::{StopKind, StopSignal};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long the agent may take, after a second stop signal, to spool the job and exit on
/// its own (a report under way may be waiting on the server).
const KILL_NOW_EXIT_LIMIT: Duration = Duration::from_secs(10);

/// After a second stop signal: the running command dies at once and the run directory goes
/// to the spool (or stays where the next start-up finds it), so a report that is still
/// waiting on the server need not be waited for. Exit if the agent has not by then.
fn exit_soon() {
    let spawned = std::thread::Builder::new()
        .name("exit-soon".into())
        .spawn(|| {
            std::thread::sleep(KILL_NOW_EXIT_LIMIT);
            log::warn!("exiting now; unsent reports wait in results_basedir");
            log::logger().flush();
            std::process::exit(0);
        });
    if let Err(err) = spawned {
        log::error!("cannot start the exit timer: {err}");
    }
}

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
                        exit_soon();
                    }
                    _ => {
                        log::warn!(
                            "signal {signal}: ending the current phase, running cleanup, then exiting (send it again to kill at once)"
                        );
                        // systemd: stopping, before the phase ends and cleanup runs.
                        crate::notify::stopping();
                        stop.request(StopKind::Shutdown);
                    }
                }
            }
        })?;
    Ok(())
}

/// SIGUSR2 asks for a health check at the next idle moment: a thread (no logic in a signal
/// handler) sets `asked`, counts the request in `count` and wakes the stop signal's pipe,
/// which ends the daemon's idle pause (the daemon's idle pause) so that the check need not wait
/// for the polling interval.
pub fn on_sigusr2(
    asked: &Arc<AtomicBool>,
    count: &Arc<AtomicU64>,
    stop: &crate::process::StopSignal,
) {
    let mut signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR2]) {
        Ok(signals) => signals,
        Err(err) => {
            log::warn!("cannot install the SIGUSR2 handler (a health check on demand): {err}");
            return;
        }
    };
    let (asked, count, stop) = (asked.clone(), count.clone(), stop.clone());
    let spawned = std::thread::Builder::new()
        .name("sigusr2".into())
        .spawn(move || {
            for _ in signals.forever() {
                log::info!("SIGUSR2: a health check is asked for; it runs at the next idle moment");
                asked.store(true, Ordering::SeqCst);
                count.fetch_add(1, Ordering::SeqCst);
                stop.wake_pipe().wake();
            }
        });
    if let Err(err) = spawned {
        log::warn!("cannot start the SIGUSR2 thread (a health check on demand): {err}");
    }
}
