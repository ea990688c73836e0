//! The agent the systemd way, through the real binary against the fake server: the notify
//! protocol on a datagram socket the test binds (`READY=1`, `STATUS=`, `WATCHDOG=1`,
//! `STOPPING=1`, in order; no ping while the main loop is blocked; ready anyway when the
//! server stays unreachable), stderr for journald (`JOURNAL_STREAM`), the log to syslog on
//! a socket the test binds, and the shipped units in deploy/systemd/ (`systemd-analyze
//! verify`, and the arithmetic of their timeouts).

use crate::support::agent::{finished, queue, wait_for, write_daemon_files, Agent, BIN, WAIT};
use crate::support::fake_server::{FakeServer, Route};
use crate::support::scratch::Scratch;
use serde_json::json;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const UNIT: &str = include_str!("../../deploy/systemd/testflinger-agent@.service");
const HARDENING: &str = include_str!("../../deploy/systemd/hardening.conf");
const SUPERVISORD: &str = include_str!("../../deploy/supervisord/testflinger-agent.conf");

/// A datagram socket bound by the test, and every datagram it received, with its arrival.
struct Listener {
    path: PathBuf,
    received: Arc<Mutex<Vec<(Instant, String)>>>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn bind(path: PathBuf) -> Listener {
        let socket = UnixDatagram::bind(&path).expect("bind the test's datagram socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let received = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let received = received.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !done.load(Ordering::SeqCst) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        received
                            .lock()
                            .expect("listener lock")
                            .push((Instant::now(), text));
                    }
                }
            })
        };
        Listener {
            path,
            received,
            done,
            thread: Some(thread),
        }
    }

    fn path_str(&self) -> String {
        self.path.display().to_string()
    }

    /// Every datagram so far.
    fn datagrams(&self) -> Vec<(Instant, String)> {
        self.received.lock().expect("listener lock").clone()
    }

    /// Every line of every datagram so far (a notify datagram may carry several), in
    /// order, with the datagram's arrival.
    fn lines(&self) -> Vec<(Instant, String)> {
        self.datagrams()
            .into_iter()
            .flat_map(|(at, text)| text.lines().map(|l| (at, l.to_owned())).collect::<Vec<_>>())
            .collect()
    }

    /// Waits until `condition` holds for the lines received so far.
    fn wait(&self, what: &str, mut condition: impl FnMut(&[(Instant, String)]) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            if condition(&self.lines()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received {:?}",
                self.lines().iter().map(|(_, l)| l).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn positions(lines: &[(Instant, String)], wanted: &str) -> Vec<usize> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, (_, l))| l == wanted)
        .map(|(i, _)| i)
        .collect()
}

fn count_after(lines: &[(Instant, String)], wanted: &str, after: usize) -> usize {
    positions(lines, wanted)
        .into_iter()
        .filter(|&i| i > after)
        .count()
}

/// The environment of a daemon under systemd with the notify socket at `socket`.
fn notify_env<'a>(socket: &'a str, watchdog_usec: &'a str) -> Vec<(&'a str, Option<&'a str>)> {
    vec![
        ("NOTIFY_SOCKET", Some(socket)),
        ("WATCHDOG_USEC", Some(watchdog_usec)),
        ("WATCHDOG_PID", None),
        ("JOURNAL_STREAM", None),
    ]
}

fn wait_for_stderr(path: &Path, what: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what:?} in the agent's stderr:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ready_status_watchdog_and_stopping_arrive_in_order() {
    let server = FakeServer::start();
    let s = Scratch::new("systemd-notify");
    let name = format!("sd-notify-{}", std::process::id());
    let listener = Listener::bind(s.path("notify.sock"));
    let socket = listener.path_str();
    // A 2 s watchdog: pings every second. The phase lasts 3 s with no output, so the pings
    // during it come from the executor's beats (cancel_check_interval: 1).
    let commands = "test_command: |\n  echo \"socket=${NOTIFY_SOCKET:-unset} watchdog=${WATCHDOG_USEC:-unset}\"\n  sleep 3\n";
    let mut agent = Agent::start_env(
        &server,
        &s,
        &name,
        commands,
        &notify_env(&socket, "2000000"),
    );
    listener.wait("READY=1", |l| !positions(l, "READY=1").is_empty());
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "test_data": {"test_cmds": "x"},
    }));
    wait_for(&server, "the job to complete", |srv| finished(srv, &id));
    let busy = format!("STATUS=busy job {id}");
    listener.wait("waiting again after the job, then two pings", |l| {
        positions(l, &busy).first().is_some_and(|&b| {
            positions(l, "STATUS=waiting")
                .into_iter()
                .find(|&w| w > b)
                .is_some_and(|w| count_after(l, "WATCHDOG=1", w) >= 2)
        })
    });
    assert_eq!(agent.stop(), Some(0), "SIGTERM: exit 0");
    listener.wait("STOPPING=1", |l| !positions(l, "STOPPING=1").is_empty());
    listener.wait("STATUS=stopped", |l| {
        !positions(l, "STATUS=stopped").is_empty()
    });

    let lines = listener.lines();
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    let ready = positions(&lines, "READY=1");
    assert_eq!(ready.len(), 1, "READY=1 exactly once: {text:?}");
    let ready = ready[0];
    // The ready datagram carries the state.
    assert!(
        listener
            .datagrams()
            .iter()
            .any(|(_, d)| d == "READY=1\nSTATUS=waiting"),
        "{text:?}"
    );
    let pings = positions(&lines, "WATCHDOG=1");
    assert!(
        pings.iter().all(|&p| p > ready),
        "no ping before READY=1: {text:?}"
    );
    let busy_at = positions(&lines, &busy)[0];
    assert!(busy_at > ready, "the job's state after READY=1: {text:?}");
    let idle_at = positions(&lines, "STATUS=waiting")
        .into_iter()
        .find(|&w| w > busy_at)
        .expect("waiting after the job");
    assert!(
        pings.iter().any(|&p| p > busy_at && p < idle_at),
        "pings while the phase ran (the executor's beats count): {text:?}"
    );
    let stopping = positions(&lines, "STOPPING=1");
    assert_eq!(stopping.len(), 1, "STOPPING=1 exactly once: {text:?}");
    assert!(
        pings.iter().all(|&p| p < stopping[0]),
        "STOPPING=1 after every ping, and no ping after it: {text:?}"
    );
    assert!(
        positions(&lines, "STATUS=stopped")[0] > stopping[0],
        "{text:?}"
    );
    // The phase command did not inherit systemd's variables.
    let output = server.log_text(&id, "output");
    assert!(
        output.contains("socket=unset watchdog=unset"),
        "the phase command saw systemd's variables: {output}"
    );
}

/// The stall seam is compiled into debug builds only (see src/notify.rs).
#[cfg(debug_assertions)]
#[test]
fn no_watchdog_ping_while_the_main_loop_is_blocked() {
    let server = FakeServer::start();
    let s = Scratch::new("systemd-stall");
    let name = format!("sd-stall-{}", std::process::id());
    let listener = Listener::bind(s.path("notify.sock"));
    let socket = listener.path_str();
    let mut env = notify_env(&socket, "1000000");
    // The first polling cycle blocks 5 s without a beat.
    env.push(("TESTFLINGER_AGENT_TEST_STALL_MS", Some("5000")));
    let mut agent = Agent::start_env(&server, &s, &name, "", &env);
    let stderr = Agent::stderr_path(&s, &name);
    wait_for_stderr(&stderr, "the main loop goes on");
    let resumed = Instant::now();
    listener.wait("two pings after the stall", |l| {
        l.iter()
            .filter(|(at, line)| line == "WATCHDOG=1" && *at > resumed)
            .count()
            >= 2
    });
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert_eq!(agent.stop(), Some(0));

    let lines = listener.lines();
    let ready_at = lines
        .iter()
        .find(|(_, l)| l == "READY=1")
        .map(|(at, _)| *at)
        .expect("READY=1");
    let mut times = vec![ready_at];
    times.extend(
        lines
            .iter()
            .filter(|(_, l)| l == "WATCHDOG=1")
            .map(|(at, _)| *at),
    );
    let longest = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .expect("pings after READY=1");
    // Pinging every 0.5 s while the loop moves; silent from 1 s after its last beat until
    // it beats again, 5 s later.
    assert!(
        longest >= Duration::from_secs(3),
        "the pings went on while the main loop was blocked (longest silence {longest:?})"
    );
    assert!(
        log.contains("the main loop has not moved for"),
        "the stall is logged:\n{log}"
    );
    assert!(
        log.contains("watchdog pings resume"),
        "the recovery is logged:\n{log}"
    );
}

#[test]
fn an_unreachable_server_delays_ready_only_for_the_bounded_wait() {
    let server = FakeServer::start();
    // The agent record, read before anything is posted, is answered 503 (Service
    // Unavailable) until the faults are cleared. (Going down and coming back on the same
    // port could race another test for the port.)
    server.fail_next(Route::prefix("GET", "/v1/agents/data/"), 1_000_000, 503);
    let s = Scratch::new("systemd-unreachable");
    let name = format!("sd-unreachable-{}", std::process::id());
    let listener = Listener::bind(s.path("notify.sock"));
    let socket = listener.path_str();
    // A 4 s watchdog: the first read, with its retries, takes a few seconds without a beat.
    let mut env = notify_env(&socket, "4000000");
    env.push(("TESTFLINGER_AGENT_TEST_READY_WAIT_MS", Some("1500")));
    let started = Instant::now();
    let mut agent = Agent::start_env(&server, &s, &name, "", &env);
    listener.wait("READY=1", |l| !positions(l, "READY=1").is_empty());
    let lines = listener.lines();
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    let (ready_at, _) = lines
        .iter()
        .find(|(_, l)| l == "READY=1")
        .cloned()
        .expect("READY=1");
    assert!(
        ready_at.duration_since(started) >= Duration::from_millis(1500),
        "READY=1 only after the bounded wait ({:?})",
        ready_at.duration_since(started)
    );
    let ready = positions(&lines, "READY=1")[0];
    assert!(
        listener
            .datagrams()
            .iter()
            .any(|(_, d)| d == "READY=1\nSTATUS=starting: the server has not answered yet"),
        "the status says why: {text:?}"
    );
    assert!(
        positions(&lines, "EXTEND_TIMEOUT_USEC=4000000")
            .iter()
            .any(|&e| e < ready),
        "the start-up timeout is extended while the agent waits: {text:?}"
    );
    assert!(
        count_after(&lines, "EXTEND_TIMEOUT_USEC=4000000", ready) == 0,
        "no extension after READY=1: {text:?}"
    );
    let stderr = Agent::stderr_path(&s, &name);
    wait_for_stderr(&stderr, "telling systemd the agent is up anyway");
    assert!(
        server.agent_record(&name).is_none(),
        "nothing posted while the server is down"
    );
    // The server comes back: the agent comes up waiting, and says so.
    server.clear_faults();
    listener.wait("STATUS=waiting", |l| {
        count_after(l, "STATUS=waiting", ready) >= 1
    });
    let up = server.wait_until(WAIT, |srv| {
        srv.agent_record(&name)
            .is_some_and(|r| r["state"] == json!("waiting"))
    });
    assert!(
        up,
        "the agent did not post waiting: record {:?}\n{}",
        server.agent_record(&name),
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    assert_eq!(agent.stop(), Some(0));
    assert_eq!(
        positions(&listener.lines(), "READY=1").len(),
        1,
        "READY=1 once"
    );
}

/// Starts the daemon of [`write_daemon_files`] with `stderr` as its standard error and
/// `JOURNAL_STREAM` set to `journal_stream`.
fn start_with_journal(
    server: &FakeServer,
    s: &Scratch,
    name: &str,
    stderr: std::fs::File,
    journal_stream: &str,
) -> Agent {
    let files = write_daemon_files(server, s, name, "");
    let args: Vec<OsString> = vec![
        "-c".into(),
        files.config.into(),
        "--token-file".into(),
        files.token_file.into(),
    ];
    Agent::exec(
        &args,
        &[
            ("JOURNAL_STREAM", Some(journal_stream)),
            ("NOTIFY_SOCKET", None),
        ],
        stderr,
    )
}

fn wait_up(server: &FakeServer, name: &str) {
    wait_for(server, "the agent to post waiting", |srv| {
        srv.agent_record(name)
            .is_some_and(|r| r["state"] == json!("waiting"))
    });
}

#[test]
fn under_journald_stderr_has_priority_prefixes_and_no_timestamps() {
    let server = FakeServer::start();
    let s = Scratch::new("systemd-journald");
    let name = format!("sd-journal-{}", std::process::id());
    let path = s.path("journal.stderr");
    let stderr = std::fs::File::create(&path).expect("create the stderr file");
    let meta = stderr.metadata().expect("stat the stderr file");
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut agent = start_with_journal(&server, &s, &name, stderr, &stream);
    wait_up(&server, &name);
    // SIGTERM logs a warning.
    assert_eq!(agent.stop(), Some(0));
    let text = std::fs::read_to_string(&path).expect("read stderr");
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "the agent logged to stderr");
    for line in &lines {
        let ok = [
            ("<3>", "ERROR "),
            ("<4>", "WARN  "),
            ("<6>", "INFO  "),
            ("<7>", "DEBUG "),
            ("<7>", "TRACE "),
        ]
        .iter()
        .any(|(prefix, level)| {
            line.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with(level))
        });
        assert!(
            ok,
            "not a journald line (priority prefix, level, no timestamp): {line:?}\n{text}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("<6>INFO  agent {name} starting"))),
        "{text}"
    );
    assert!(lines.iter().any(|l| l.starts_with("<7>DEBUG ")), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>WARN  signal 15: ending the current phase")),
        "{text}"
    );
    // The log file keeps its timestamps.
    let file = std::fs::read_to_string(s.path("logs/testflinger-agent.log")).expect("log file");
    let starting = file
        .lines()
        .find(|l| l.contains(&format!("agent {name} starting")))
        .expect("the start in the log file");
    assert!(
        starting.starts_with("20") && starting.contains("Z INFO  agent"),
        "{starting}"
    );

    // A JOURNAL_STREAM that names another stream (a wrapper redirected stderr): the
    // timestamps stay.
    let path = s.path("plain.stderr");
    let stderr = std::fs::File::create(&path).expect("create the stderr file");
    let mut agent = start_with_journal(&server, &s, &name, stderr, "1:1");
    wait_for_stderr(&path, &format!("agent {name} starting"));
    assert_eq!(agent.stop(), Some(0));
    let text = std::fs::read_to_string(&path).expect("read stderr");
    let line = text
        .lines()
        .find(|l| l.contains(&format!("agent {name} starting")))
        .expect("the start");
    assert!(
        line.starts_with("20") && !line.starts_with('<'),
        "timestamped, no prefix: {line}"
    );
}

#[test]
fn logging_syslog_sends_facility_and_severity_to_the_socket() {
    let server = FakeServer::start();
    let s = Scratch::new("systemd-syslog");
    let name = format!("sd-syslog-{}", std::process::id());
    let listener = Listener::bind(s.path("log.sock"));
    let commands = format!(
        "logging_syslog: local5\nlogging_syslog_socket: {}\n",
        listener.path_str()
    );
    let mut agent = Agent::start(&server, &s, &name, &commands);
    let pid = agent.child.id();
    wait_up(&server, &name);
    assert_eq!(agent.stop(), Some(0));
    let tag = format!(" testflinger-agent[{pid}]: ");
    // local5 is facility 21: PRI = 21 * 8 + severity.
    for (pri, message) in [
        (174, format!("agent {name} starting")),
        (172, "signal 15: ending the current phase".to_owned()),
        (174, format!("agent {name} exiting")),
    ] {
        listener.wait(&message, |_| {
            listener
                .datagrams()
                .iter()
                .any(|(_, d)| d.contains(&message))
        });
        let datagrams = listener.datagrams();
        let line = datagrams
            .iter()
            .map(|(_, d)| d)
            .find(|d| d.contains(&message))
            .expect("the line");
        assert!(line.starts_with(&format!("<{pri}>")), "{line}");
        let (_, after_tag) = line.split_once(&tag).expect("the tag and pid");
        assert!(after_tag.starts_with(&message), "{line}");
    }
    assert!(
        listener
            .datagrams()
            .iter()
            .any(|(_, d)| d.starts_with("<175>")),
        "debug lines at severity 7"
    );
}

#[test]
fn a_missing_syslog_socket_is_one_warning_and_the_agent_runs() {
    let server = FakeServer::start();
    let s = Scratch::new("systemd-nolog");
    let name = format!("sd-nolog-{}", std::process::id());
    let missing = s.path("no-such-dir/log");
    let commands = format!(
        "logging_syslog: true\nlogging_syslog_socket: {}\ntest_command: echo ran\n",
        missing.display()
    );
    let mut agent = Agent::start(&server, &s, &name, &commands);
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "test_data": {"test_cmds": "x"},
    }));
    wait_for(&server, "the job to complete", |srv| finished(srv, &id));
    assert_eq!(agent.stop(), Some(0));
    let log = std::fs::read_to_string(Agent::stderr_path(&s, &name)).expect("stderr");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("syslog")).collect();
    assert_eq!(warnings.len(), 1, "one warning about syslog:\n{log}");
    assert!(
        warnings[0].contains(" WARN ")
            && warnings[0].contains(&missing.display().to_string())
            && warnings[0].contains("logging to stderr and the log file only"),
        "{}",
        warnings[0]
    );
}

/// The value of `key` in a unit file's text (the last assignment wins, as in systemd).
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

/// A systemd time span: `360`, `90s`, `15min`, `2min`.
fn seconds(span: &str) -> u64 {
    let (number, unit) = span
        .find(|c: char| !c.is_ascii_digit())
        .map_or((span, ""), |i| span.split_at(i));
    let n: u64 = number.parse().expect("a number of time units");
    match unit {
        "" | "s" => n,
        "min" => n * 60,
        "h" => n * 3600,
        other => panic!("unit {other:?} not handled by this test"),
    }
}

fn default_seconds(key: &str) -> u64 {
    match testflinger_agent::config::key_spec(key).map(|k| k.default) {
        Some(testflinger_agent::config::DefaultValue::Int(n)) => n,
        other => panic!("{key} has no whole-number default: {other:?}"),
    }
}

#[test]
fn the_units_timeouts_and_settings_fit_the_agent() {
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("KillMode", "mixed"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        ("User", "testflinger"),
        ("StateDirectory", "testflinger-agent/%i"),
        ("LogsDirectory", "testflinger-agent/%i"),
    ] {
        assert_eq!(setting(UNIT, key), Some(value), "{key}");
    }
    let exec = setting(UNIT, "ExecStart").expect("ExecStart");
    assert!(
        exec.ends_with(
            " -c /etc/testflinger-agent/%i.yaml --token-file /var/lib/testflinger-agent/%i/refresh_token"
        ),
        "{exec}"
    );
    // The stop: the phase's grace period, the cleanup budget and the output drain (10 s)
    // must fit, with room for the final posts; the same figure as the supervisord file.
    let stop = seconds(setting(UNIT, "TimeoutStopSec").expect("TimeoutStopSec"));
    let needed = default_seconds("termination_grace_period")
        + default_seconds("shutdown_cleanup_timeout")
        + 10;
    assert!(
        stop > needed,
        "TimeoutStopSec={stop}s, the stop needs {needed}s and more"
    );
    let stopwait = setting(SUPERVISORD, "stopwaitsecs").expect("stopwaitsecs");
    assert_eq!(stop, seconds(stopwait), "the same budget as supervisord's");
    // The watchdog is no shorter than the health endpoint's stall limit (the agent warns
    // otherwise).
    let watchdog = seconds(setting(UNIT, "WatchdogSec").expect("WatchdogSec"));
    assert!(
        watchdog >= testflinger_agent::metrics::DEFAULT_STALL_LIMIT.as_secs(),
        "WatchdogSec={watchdog}s"
    );
    assert_eq!(
        setting(UNIT, "Environment"),
        Some("TESTFLINGER_AGENT_STARTUP_FAILURE_DELAY=0")
    );
    // The hardening drop-in: the four protections, the agent's directories writable, and
    // what no device connector needs (docs/operating.md, "The hardened profile").
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        (
            "ReadWritePaths",
            "/var/lib/testflinger-agent/%i /var/log/testflinger-agent/%i",
        ),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ),
    ] {
        assert_eq!(setting(HARDENING, key), Some(value), "{key}");
    }
    // What a device connector needs stays: device nodes (through the user's groups), the
    // network, every system call.
    for key in [
        "PrivateDevices",
        "DevicePolicy",
        "PrivateUsers",
        "PrivateNetwork",
        "IPAddressDeny",
        "SystemCallFilter",
        "MemoryDenyWriteExecute",
    ] {
        assert_eq!(
            setting(HARDENING, key),
            None,
            "{key} would break connectors"
        );
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    if !systemd_analyze_installed() {
        return;
    }
    let s = Scratch::new("systemd-verify");
    // The unit as installed, but running the binary under test (verify checks that the
    // command exists), and the drop-in beside it, where verify reads it too.
    let unit = UNIT.replace("/usr/bin/testflinger-agent", BIN);
    assert_ne!(unit, UNIT, "the unit runs /usr/bin/testflinger-agent");
    std::fs::write(s.path("testflinger-agent@.service"), unit).expect("write the unit");
    let dropins = s.path("testflinger-agent@.service.d");
    std::fs::create_dir_all(&dropins).expect("drop-in dir");
    std::fs::write(dropins.join("hardening.conf"), HARDENING).expect("write the drop-in");
    for name in [
        "testflinger-agent@.service",
        "testflinger-agent@dev01.service",
    ] {
        let (ok, problems, text) = verify(&s.path(name));
        assert!(
            ok && problems.is_empty(),
            "systemd-analyze verify {name}:\n{text}"
        );
    }
    // What a mistake looks like: reported, though the status is still success.
    let broken = UNIT
        .replace("/usr/bin/testflinger-agent", BIN)
        .replace("KillMode=mixed", "KillMode=mixd");
    std::fs::write(s.path("broken-agent@.service"), broken).expect("write the broken unit");
    let (_, problems, text) = verify(&s.path("broken-agent@.service"));
    assert!(
        problems.iter().any(|l| l.contains("mixd")),
        "the check misses a bad value:\n{text}"
    );
}

/// Runs `systemd-analyze verify` on `unit`: whether it succeeded, the lines about this
/// project's units, and everything it printed.
fn verify(unit: &Path) -> (bool, Vec<String>, String) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify also reports problems of the host's own units; only ours count. A bad key or
    // value is reported with a success status, hence the text.
    let ours = text
        .lines()
        .filter(|l| l.contains("-agent@"))
        .map(str::to_owned)
        .collect();
    (out.status.success(), ours, text)
}

/// Whether `systemd-analyze` runs here. Under CI its absence fails the test; elsewhere the
/// test is skipped, loudly.
fn systemd_analyze_installed() -> bool {
    crate::support::tools::installed("systemd-analyze", "--version", "systemd-analyze", "systemd")
}
