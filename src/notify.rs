//! The systemd notify protocol (`sd_notify(3)`): one datagram per message to the Unix
//! socket `$NOTIFY_SOCKET` names (a path, or `@name` for an abstract socket). Without
//! `NOTIFY_SOCKET` every function here does nothing, silently; a socket that cannot be
//! reached is one warning, then silence. A leaf: it knows nothing of the daemon, which calls
//! it at its state changes.
//!
//! What is sent, and when:
//! - `STATUS=<state>` or `STATUS=<state> job <id>` ([`state`]) when the daemon's state or
//!   job changes (the same states as `/health`), for `systemctl status`.
//! - `READY=1` ([`ready`]) once the start-up checks (config, directories, lock, metrics
//!   port, crash recovery) are done and the server has answered. When it does not answer,
//!   the daemon reports ready anyway at the first failed attempt [`READY_WAIT`] after the
//!   first one, and logs that decision: the agent is working as it should (it keeps asking,
//!   posts nothing and takes no job until the server answers), and systemd's start job,
//!   with whatever waits on it, should not be held up by someone else's outage.
//! - `WATCHDOG=1` ([`watch`]) every half `$WATCHDOG_USEC` (systemd's `WatchdogSec=`), from
//!   a thread of its own, but only while the main loop's last beat (`metrics::beat()`) is
//!   younger than `WatchdogSec`: a loop stuck in a blocking call stops the pings, and
//!   systemd restarts the agent between `WatchdogSec` and twice that after the last beat.
//!   The loop beats at every cycle and every quarter `WatchdogSec` of its waits (at most
//!   every 100 ms; without a watchdog a wait is one sleep); while a phase runs, the
//!   executor's watcher beats every `cancel_check_interval`. `$WATCHDOG_PID`, when set,
//!   must be this process.
//! - `EXTEND_TIMEOUT_USEC=` on the same ticks, only before `READY=1`: the start-up (crash
//!   recovery may run a dead agent's cleanup) may outlast `TimeoutStartSec=` while its
//!   beats are fresh, never when it is stuck.
//! - `STOPPING=1` ([`stopping`]) on the first SIGTERM/SIGINT, before the phase is ended and
//!   cleanup runs, and before a restart's exit; pings and extensions end there, so
//!   `TimeoutStopSec=` bounds the stop.
//!
//! [`init`] reads the variables at the start of `main`, while the process has one thread,
//! and removes them from the environment, so that phase commands do not inherit them.
//!
//! Test-only seams, honoured in debug builds only (a release build ignores them):
//! `TESTFLINGER_AGENT_TEST_READY_WAIT_MS` replaces [`READY_WAIT`], and
//! `TESTFLINGER_AGENT_TEST_STALL_MS` makes the daemon's first polling cycle block that long
//! without a beat ([`test_stall`]), to show that the pings stop.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The variable naming the socket.
pub const SOCKET_VAR: &str = "NOTIFY_SOCKET";
/// The watchdog timeout, in microseconds.
pub const WATCHDOG_USEC_VAR: &str = "WATCHDOG_USEC";
/// The process the watchdog is meant for.
pub const WATCHDOG_PID_VAR: &str = "WATCHDOG_PID";

/// How long after its first attempt the daemon waits for the server before it reports ready
/// anyway (at the next failed attempt).
pub const READY_WAIT: Duration = Duration::from_secs(30);

const TEST_READY_WAIT_VAR: &str = "TESTFLINGER_AGENT_TEST_READY_WAIT_MS";
const TEST_STALL_VAR: &str = "TESTFLINGER_AGENT_TEST_STALL_MS";

/// Where the messages go and what was sent.
#[derive(Debug)]
struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `WATCHDOG_USEC`, when set for this process.
    watchdog: Option<Duration>,
    ready: AtomicBool,
    stopping: AtomicBool,
    /// The last `STATUS=` text, so that an unchanged state is not sent again.
    status: Mutex<String>,
    /// A failed send was warned about.
    warned: AtomicBool,
}

static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();

/// The settings read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The socket, as `NOTIFY_SOCKET` gives it.
    pub socket: String,
    /// The watchdog timeout, when the watchdog is on and meant for this process.
    pub watchdog: Option<Duration>,
}

/// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (what `sd_notify(3)` and
/// `sd_watchdog_enabled(3)` read) for the process `pid`: the settings (`None` without a
/// socket) and a problem to warn about (an unusable watchdog value, which only turns the
/// watchdog off).
pub fn settings_from(
    get: impl Fn(&str) -> Option<String>,
    pid: u32,
) -> (Option<Settings>, Option<String>) {
    let Some(socket) = get(SOCKET_VAR).filter(|s| !s.is_empty()) else {
        return (None, None);
    };
    let mut problem = None;
    let watchdog = match get(WATCHDOG_USEC_VAR) {
        None => None,
        Some(usec) => match usec.trim().parse::<u64>() {
            Ok(0) | Err(_) => {
                problem = Some(format!(
                    "{WATCHDOG_USEC_VAR}={usec:?} is not a positive number of microseconds; no watchdog pings"
                ));
                None
            }
            Ok(usec) => match get(WATCHDOG_PID_VAR) {
                Some(owner) if owner.trim().parse::<u32>().ok() != Some(pid) => None,
                _ => Some(Duration::from_micros(usec)),
            },
        },
    };
    (Some(Settings { socket, watchdog }), problem)
}

/// The address `NOTIFY_SOCKET` names: a path, or an abstract name after `@`.
pub fn socket_addr(socket: &str) -> Result<SocketAddr, String> {
    if let Some(name) = socket.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            return SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(|err| format!("{SOCKET_VAR}={socket:?}: {err}"));
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(format!(
                "{SOCKET_VAR}={socket:?}: abstract sockets exist only on Linux"
            ));
        }
    }
    if socket.starts_with('/') {
        return SocketAddr::from_pathname(socket)
            .map_err(|err| format!("{SOCKET_VAR}={socket:?}: {err}"));
    }
    Err(format!(
        "{SOCKET_VAR}={socket:?} is neither a path nor an abstract name (`@...`); not notifying systemd"
    ))
}

/// Reads the variables, removes them from the environment and opens the socket. Call it
/// first thing in `main`, before any thread starts (the environment is changed). Returns a
/// problem to log once logging is set up; the agent runs on without notifying (or without
/// the watchdog) in that case.
pub fn init() -> Option<String> {
    let (settings, mut problem) = settings_from(|v| std::env::var(v).ok(), std::process::id());
    if settings.is_some() {
        for var in [SOCKET_VAR, WATCHDOG_USEC_VAR, WATCHDOG_PID_VAR] {
            // The process has one thread yet: nothing reads the environment meanwhile.
            std::env::remove_var(var);
        }
    }
    let notifier = settings.and_then(|settings| {
        let opened = socket_addr(&settings.socket).and_then(|addr| {
            UnixDatagram::unbound()
                .map(|socket| (socket, addr))
                .map_err(|err| format!("cannot open a socket to notify systemd: {err}"))
        });
        match opened {
            Ok((socket, addr)) => Some(Notifier {
                socket,
                addr,
                watchdog: settings.watchdog,
                ready: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                status: Mutex::new(String::new()),
                warned: AtomicBool::new(false),
            }),
            Err(err) => {
                problem = Some(err);
                None
            }
        }
    });
    let _ = NOTIFIER.set(notifier);
    problem
}

fn notifier() -> Option<&'static Notifier> {
    NOTIFIER.get().and_then(Option::as_ref)
}

impl Notifier {
    fn send(&self, message: &str) {
        match self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(_) => log::trace!("notified systemd: {message:?}"),
            Err(err) if !self.warned.swap(true, Ordering::Relaxed) => {
                log::warn!(
                    "cannot notify systemd ({SOCKET_VAR}): {err}; further failures are not logged"
                );
            }
            Err(_) => {}
        }
    }
}

/// The `STATUS=` text of a daemon state and its job (`""` when none).
pub fn status_text(state: &str, job_id: &str) -> String {
    if job_id.is_empty() {
        state.to_owned()
    } else {
        format!("{state} job {job_id}")
    }
}

/// The daemon is now in `state`, running `job_id` (`""` when none): `STATUS=`, unless it is
/// what was sent last.
pub fn state(state: &str, job_id: &str) {
    status(&status_text(state, job_id));
}

/// `STATUS=<text>`, unless it is what was sent last. Newlines become spaces (one message
/// per line is the protocol's framing).
pub fn status(text: &str) {
    let Some(notifier) = notifier() else {
        return;
    };
    let text = text.replace(['\n', '\r'], " ");
    {
        let mut last = notifier
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last == text {
            return;
        }
        last.clone_from(&text);
    }
    notifier.send(&format!("STATUS={text}"));
}

/// `READY=1`, with the current status; once. `true` when this call sent it (so the caller
/// can log why, when it reports ready without the server).
pub fn ready() -> bool {
    let Some(notifier) = notifier() else {
        return false;
    };
    if notifier.ready.swap(true, Ordering::SeqCst) {
        return false;
    }
    let status = notifier
        .status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if status.is_empty() {
        notifier.send("READY=1");
    } else {
        notifier.send(&format!("READY=1\nSTATUS={status}"));
    }
    true
}

/// Whether `READY=1` was sent (`false` without `NOTIFY_SOCKET`).
pub fn is_ready() -> bool {
    notifier().is_some_and(|n| n.ready.load(Ordering::SeqCst))
}

/// `STOPPING=1`, once; ends the watchdog pings.
pub fn stopping() {
    let Some(notifier) = notifier() else {
        return;
    };
    if !notifier.stopping.swap(true, Ordering::SeqCst) {
        notifier.send("STOPPING=1");
    }
}

/// The watchdog timeout systemd set for this process, if any.
pub fn watchdog_timeout() -> Option<Duration> {
    notifier().and_then(|n| n.watchdog)
}

/// How long the daemon waits for the server before it reports ready anyway.
pub fn ready_wait() -> Duration {
    test_duration(TEST_READY_WAIT_VAR).unwrap_or(READY_WAIT)
}

/// What the pinger sends on one tick, given how long ago the main loop last beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Nothing: no watchdog, or the agent is stopping.
    Nothing,
    /// The beat is too old: the loop may be stuck.
    Stale,
    /// Before `READY=1`: extend the start-up timeout by this much.
    Extend(Duration),
    /// `WATCHDOG=1`.
    Ping,
}

/// The pinger's rule: with a watchdog timeout `limit`, ping (or, before ready, extend the
/// start-up by `limit`) while the last beat is younger than `limit`.
pub fn tick(limit: Duration, since_beat: Duration, ready: bool, stopping: bool) -> Tick {
    if stopping {
        Tick::Nothing
    } else if since_beat >= limit {
        Tick::Stale
    } else if ready {
        Tick::Ping
    } else {
        Tick::Extend(limit)
    }
}

/// Starts the watchdog thread when systemd asked for pings: every half timeout it sends
/// `WATCHDOG=1` (or, before `READY=1`, `EXTEND_TIMEOUT_USEC=`) if `since_beat()`, the time
/// since the main loop's last beat, is below the timeout. A run of stale ticks is logged
/// once. Nothing without a watchdog.
pub fn watch(since_beat: impl Fn() -> Duration + Send + 'static) {
    let Some(notifier) = notifier() else {
        return;
    };
    let Some(limit) = notifier.watchdog else {
        return;
    };
    let period = (limit / 2).max(Duration::from_millis(1));
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut stale = false;
            loop {
                std::thread::sleep(period);
                let ready = notifier.ready.load(Ordering::SeqCst);
                let stopping = notifier.stopping.load(Ordering::SeqCst);
                let age = since_beat();
                match tick(limit, age, ready, stopping) {
                    Tick::Nothing => return,
                    Tick::Stale => {
                        if !stale {
                            stale = true;
                            log::error!(
                                "the main loop has not moved for {:.1}s (the watchdog allows {:.1}s): \
                                 no more watchdog pings, so systemd restarts the agent unless the loop moves again",
                                age.as_secs_f64(),
                                limit.as_secs_f64()
                            );
                        }
                    }
                    Tick::Extend(by) => {
                        stale = false;
                        notifier.send(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
                    }
                    Tick::Ping => {
                        if stale {
                            stale = false;
                            log::warn!("the main loop moves again; watchdog pings resume");
                        }
                        notifier.send("WATCHDOG=1");
                    }
                }
            }
        });
    if let Err(err) = spawned {
        log::error!(
            "cannot start the watchdog thread: {err}; systemd's watchdog will restart the agent"
        );
    }
}

/// Test-only (debug builds): blocks the calling loop once, for
/// `TESTFLINGER_AGENT_TEST_STALL_MS`, without a beat. Nothing in a release build.
pub fn test_stall() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if let Some(stall) = test_duration(TEST_STALL_VAR) {
        if !DONE.swap(true, Ordering::SeqCst) {
            log::warn!(
                "test seam {TEST_STALL_VAR}: blocking the main loop for {} ms",
                stall.as_millis()
            );
            std::thread::sleep(stall);
            log::warn!("test seam {TEST_STALL_VAR}: the main loop goes on");
        }
    }
}

/// A test seam's duration in milliseconds; always `None` in a release build.
fn test_duration(var: &str) -> Option<Duration> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var(var)
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn nothing_without_a_socket() {
        let (settings, problem) = settings_from(env(&[(WATCHDOG_USEC_VAR, "1000")]), 7);
        assert_eq!(settings, None);
        assert_eq!(problem, None);
        let (settings, _) = settings_from(env(&[(SOCKET_VAR, "")]), 7);
        assert_eq!(settings, None);
    }

    #[test]
    fn the_watchdog_is_for_this_process_only() {
        let base = [(SOCKET_VAR, "/run/notify"), (WATCHDOG_USEC_VAR, "30000000")];
        let (s, p) = settings_from(env(&base), 7);
        assert_eq!(s.and_then(|s| s.watchdog), Some(Duration::from_secs(30)));
        assert_eq!(p, None);
        let mut mine = base.to_vec();
        mine.push((WATCHDOG_PID_VAR, "7"));
        let (s, _) = settings_from(env(&mine), 7);
        assert_eq!(s.and_then(|s| s.watchdog), Some(Duration::from_secs(30)));
        let mut other = base.to_vec();
        other.push((WATCHDOG_PID_VAR, "8"));
        let (s, p) = settings_from(env(&other), 7);
        let s = s.expect("the socket is still used");
        assert_eq!(s.socket, "/run/notify");
        assert_eq!(s.watchdog, None);
        assert_eq!(p, None);
    }

    #[test]
    fn a_bad_watchdog_value_is_a_problem_not_a_failure() {
        for bad in ["0", "soon", "-5"] {
            let (s, p) =
                settings_from(env(&[(SOCKET_VAR, "@notify"), (WATCHDOG_USEC_VAR, bad)]), 7);
            assert_eq!(s.expect("socket kept").watchdog, None, "{bad}");
            assert!(p.expect("a problem").contains(WATCHDOG_USEC_VAR), "{bad}");
        }
    }

    #[test]
    fn socket_addresses() {
        let path = socket_addr("/run/systemd/notify").expect("a path");
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let abs = socket_addr("@/org/freedesktop/systemd1/notify").expect("abstract");
            assert_eq!(
                abs.as_abstract_name(),
                Some(&b"/org/freedesktop/systemd1/notify"[..])
            );
        }
        let err = socket_addr("vsock:2:1234").expect_err("unsupported");
        assert!(err.contains("neither a path nor an abstract name"), "{err}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_text("waiting", ""), "waiting");
        assert_eq!(status_text("busy", "abc-123"), "busy job abc-123");
    }

    #[test]
    fn pings_only_while_the_beat_is_fresh() {
        let limit = Duration::from_secs(10);
        let fresh = Duration::from_secs(9);
        let old = Duration::from_secs(10);
        assert_eq!(tick(limit, fresh, true, false), Tick::Ping);
        assert_eq!(tick(limit, old, true, false), Tick::Stale);
        assert_eq!(tick(limit, fresh, false, false), Tick::Extend(limit));
        assert_eq!(tick(limit, old, false, false), Tick::Stale);
        assert_eq!(tick(limit, fresh, true, true), Tick::Nothing);
        assert_eq!(tick(limit, old, true, true), Tick::Nothing);
    }

    #[test]
    fn sends_datagrams_to_a_path() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let path = dir.join("notify.sock");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier {
            socket: UnixDatagram::unbound().expect("socket"),
            addr: socket_addr(&path.display().to_string()).expect("addr"),
            watchdog: None,
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            status: Mutex::new(String::new()),
            warned: AtomicBool::new(false),
        };
        notifier.send("READY=1");
        let mut buf = [0u8; 64];
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = receiver.recv(&mut buf).expect("a datagram");
        assert_eq!(&buf[..n], b"READY=1");
        drop(receiver);
        std::fs::remove_dir_all(dir).expect("remove the socket's directory");
        // The socket is gone now: one warning, no panic, no error returned.
        notifier.send("STATUS=x");
        assert!(notifier.warned.load(Ordering::Relaxed));
    }
}
