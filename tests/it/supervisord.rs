//! The agent under a real, private supervisord with the shipped program file
//! (deploy/supervisord/testflinger-agent.conf): start-up and a job, a restart on SIGUSR1,
//! `supervisorctl stop` in the middle of a phase, no restart loop on a bad config; and what
//! the host charm's own program file does to a busy agent.
//!
//! The command line is the charm's template rendered with the packaged binary in it,
//! `/usr/bin/testflinger-agent -c <agent_config_path>/testflinger-agent.conf -p <port>`, where
//! `<agent_config_path>` is a directory named after the agent, as the charm lays them out
//! (the way docs/migrating.md gives to survive the charm's reinstalls and rewrites). The
//! one substitution: /usr/bin/testflinger-agent is the binary under test (the package
//! itself runs under supervisord's sibling, systemd, in packaging/system-test.sh). There is
//! no `--token-file`, so the agent looks for its refresh token in the default
//! /var/lib/testflinger-agent/refresh_token, which a test must not write: the fake server
//! here does not require a token.

use crate::support::agent::{finished, queue, wait_for, write_daemon_files, BIN, WAIT};
use crate::support::fake_server::{FakeConfig, FakeServer};
use crate::support::loopback::free_port;
use crate::support::scratch::{living_carrying, stat_of, KillByMarker, Scratch};
use serde_json::json;
use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shipped program file, read at build time.
const TEMPLATE: &str = include_str!("../../deploy/supervisord/testflinger-agent.conf");
/// The packaged binary, which the template's `command=` names.
const PACKAGED: &str = "/usr/bin/testflinger-agent";
/// The settings of the charm's program (templates/testflinger-agent.supervisord.conf.j2).
const CHARM_KEYS: [&str; 5] = [
    "startsecs",
    "redirect_stderr",
    "environment",
    "user",
    "command",
];

/// Whether supervisord and supervisorctl can be run. Under CI their absence fails the
/// test; elsewhere the test is skipped, loudly.
fn supervisor_installed() -> bool {
    // supervisorctl has no --version; -h works without a server.
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if runs("supervisord", "--version") && runs("supervisorctl", "-h") {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "supervisord/supervisorctl not found on PATH, but CI is set: .ci/run should have \
         installed them (apt-get install supervisor)"
    );
    // Written to the stderr handle, not with eprintln!, which the test harness captures.
    let _ = writeln!(
        std::io::stderr(),
        "\n********************************************************************\n\
         skipped: supervisord not installed (apt-get install supervisor)\n\
         ********************************************************************"
    );
    false
}

/// The fake server, without token checks (see the module comment).
fn server() -> FakeServer {
    FakeServer::start_with(FakeConfig {
        require_auth: false,
        ..FakeConfig::default()
    })
}

/// The name of the account running the tests (supervisord's `user=` also takes a uid).
fn current_user() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

/// One supervisord program: its name, its file's text, and the agent config it runs.
struct Program {
    name: String,
    text: String,
    config: PathBuf,
}

impl Program {
    /// The shipped template with every placeholder filled, running the daemon config of
    /// [`write_daemon_files`] plus `commands`.
    fn shipped(server: &FakeServer, s: &Scratch, name: &str, commands: &str) -> Program {
        // When the metrics endpoint is wired, it stays on loopback.
        let files = write_daemon_files(
            server,
            s,
            name,
            &format!("metrics_endpoint_address: 127.0.0.1\n{commands}"),
        );
        // The charm's layout: <config-dir>/<agent>/testflinger-agent.conf.
        let agent_dir = s.path(name);
        std::fs::create_dir_all(&agent_dir).expect("create the agent's config directory");
        let config = agent_dir.join("testflinger-agent.conf");
        std::fs::rename(&files.config, &config).expect("rename the agent config");
        let home = s.path("home");
        std::fs::create_dir_all(&home).expect("create the home directory");
        let user = current_user();
        let port = free_port().to_string();
        // The charm's command line with the packaged binary, word for word.
        assert!(
            TEMPLATE
                .lines()
                .any(|l| l == format!("command={PACKAGED} -c @CONFIG@ -p @PORT@")),
            "the template's command= is not the packaged binary's charm command line"
        );
        let mut text = TEMPLATE.replace(PACKAGED, BIN);
        for (placeholder, value) in [
            ("@AGENT@", name),
            ("@CONFIG@", &config.display().to_string()),
            ("@PORT@", &port),
            ("@USER@", &user),
            ("@HOME@", &home.display().to_string()),
        ] {
            assert!(
                text.contains(placeholder),
                "the template lost {placeholder}"
            );
            text = text.replace(placeholder, value);
        }
        let left: Vec<&str> = text
            .split('@')
            .skip(1)
            .step_by(2)
            .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect();
        assert!(
            left.is_empty(),
            "placeholders this test does not fill: {left:?}"
        );
        // The charm finds the port again with `-p (\d+)` on a command line that names
        // testflinger-agent.
        let command = text
            .lines()
            .find_map(|l| l.strip_prefix("command="))
            .expect("the template has a command");
        assert!(
            command.contains("testflinger-agent") && command.contains(&format!(" -p {port}")),
            "the charm could not read the port back from {command:?}"
        );
        Program {
            name: name.to_owned(),
            text,
            config,
        }
    }

    /// The charm's program: the shipped one with only the charm's settings kept (and
    /// supervisord's defaults for the rest: stopwaitsecs=10, exitcodes=0).
    fn charm(server: &FakeServer, s: &Scratch, name: &str, commands: &str) -> Program {
        let mut program = Program::shipped(server, s, name, commands);
        program.text = program
            .text
            .lines()
            .filter(|line| {
                line.starts_with("[program:")
                    || CHARM_KEYS
                        .iter()
                        .any(|key| line.starts_with(&format!("{key}=")))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(program.text.lines().count(), 1 + CHARM_KEYS.len());
        program
    }

    /// A setting of the program as written (`None`: supervisord's default applies).
    fn setting(&self, key: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A private supervisord, a child of the test, with its socket, log, pid file, child logs
/// and programs in a scratch directory. On drop: `supervisorctl shutdown`, then SIGKILL to
/// supervisord if it is still there, then SIGKILL to every agent it started (by the pids
/// seen while it was up, and by the agent config paths in their command lines).
struct Supervisor<'s> {
    scratch: &'s Scratch,
    conf: PathBuf,
    child: Child,
    configs: Vec<PathBuf>,
    /// Agent pids seen, with their start times (so a reused pid is never killed).
    seen: RefCell<Vec<(i32, u64)>>,
}

/// The end of a `supervisorctl` run: its exit status (`None` when it had to be killed)
/// and its output, stdout and stderr together.
struct Ctl {
    status: Option<i32>,
    output: String,
}

impl<'s> Supervisor<'s> {
    fn start(scratch: &'s Scratch, programs: &[&Program]) -> Supervisor<'s> {
        let dir = scratch.path("");
        let d = dir.display().to_string();
        let d = d.trim_end_matches('/');
        let programs_dir = scratch.path("programs");
        std::fs::create_dir_all(&programs_dir).expect("create the programs directory");
        for program in programs {
            std::fs::write(
                programs_dir.join(format!("{}.conf", program.name)),
                &program.text,
            )
            .expect("write a program file");
        }
        let conf = scratch.write(
            "supervisord.conf",
            &format!(
                "[unix_http_server]\nfile={d}/supervisor.sock\n\n\
                 [supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\n\
                 pidfile={d}/supervisord.pid\nchildlogdir={d}\n\n\
                 [rpcinterface:supervisor]\n\
                 supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
                 [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n\
                 [include]\nfiles={d}/programs/*.conf\n"
            ),
        );
        let out = std::fs::File::create(scratch.path("supervisord.out")).expect("output file");
        let err = out.try_clone().expect("output file");
        let child = Command::new("supervisord")
            .arg("-n")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("supervisord starts");
        let supervisor = Supervisor {
            scratch,
            conf,
            child,
            configs: programs.iter().map(|p| p.config.clone()).collect(),
            seen: RefCell::new(Vec::new()),
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let status = supervisor.ctl(&["status"], Duration::from_secs(10));
            if programs
                .iter()
                .all(|p| status.output.contains(p.name.as_str()))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "supervisord did not come up: {}\n{}",
                status.output,
                supervisor.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        supervisor
    }

    /// Runs `supervisorctl -c <conf> args`, killed after `limit`.
    fn ctl(&self, args: &[&str], limit: Duration) -> Ctl {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let out_path = self.scratch.path(&format!(
            "supervisorctl-{}.out",
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let spawned = std::fs::File::create(&out_path).and_then(|out| {
            let err = out.try_clone()?;
            Command::new("supervisorctl")
                .arg("-c")
                .arg(&self.conf)
                .args(args)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
        });
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => {
                return Ctl {
                    status: None,
                    output: format!("cannot run supervisorctl: {err}"),
                }
            }
        };
        let deadline = Instant::now() + limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        Ctl {
            status,
            output: std::fs::read_to_string(&out_path).unwrap_or_default(),
        }
    }

    /// The program's pid, 0 when it is not running; remembered for the clean-up.
    fn pid(&self, name: &str) -> i32 {
        let pid = self
            .ctl(&["pid", name], Duration::from_secs(10))
            .output
            .trim()
            .parse()
            .unwrap_or(0);
        self.remember(pid);
        pid
    }

    fn remember(&self, pid: i32) {
        if pid > 0 {
            if let Some((_, start)) = stat_of(pid) {
                self.seen.borrow_mut().push((pid, start));
            }
        }
    }

    /// The program's state as `supervisorctl status` shows it (RUNNING, EXITED, STOPPED…).
    fn state(&self, name: &str) -> String {
        let status = self.ctl(&["status", name], Duration::from_secs(10));
        status
            .output
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.path("supervisord.log")).unwrap_or_default()
    }

    /// How many times supervisord started the program.
    fn spawns(&self, name: &str) -> usize {
        self.log()
            .matches(&format!("spawned: '{name}' with pid"))
            .count()
    }

    /// Waits until supervisord's log contains `text`.
    fn wait_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "supervisord's log never said {text:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// supervisord's log and the programs' output (stdout and stderr), for failure messages.
    fn diagnostics(&self) -> String {
        let mut text = format!("--- supervisord.log\n{}", self.log());
        let dir = self.scratch.path("");
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains("-stdout---supervisor-") || name == "supervisord.out" {
                let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: String = body
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .map(|l| format!("{l}\n"))
                    .collect();
                text.push_str(&format!("--- {name} (last 40 lines)\n{tail}"));
            }
        }
        text
    }
}

impl Drop for Supervisor<'_> {
    fn drop(&mut self) {
        let pids = self.ctl(&["pid", "all"], Duration::from_secs(5)).output;
        for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
            self.remember(pid);
        }
        let _ = self.ctl(&["shutdown"], Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let kill = |pid: i32| {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            // Reaped here when the test process inherited it (it may be a subreaper).
            let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        };
        for &(pid, start) in self.seen.borrow().iter() {
            if stat_of(pid).is_some_and(|(state, now)| now == start && state != 'Z') {
                kill(pid);
            }
        }
        for config in &self.configs {
            let needle = config.display().to_string();
            for (pid, _) in living_carrying(needle.as_bytes()) {
                kill(pid);
            }
        }
    }
}

/// The shipped file starts the agent as the charm's file would: it registers `waiting`,
/// advertises its queue and runs a job to the end.
#[test]
fn the_shipped_file_runs_the_agent_and_a_job() {
    if !supervisor_installed() {
        return;
    }
    let server = server();
    let s = Scratch::new("sv-start");
    let name = format!("sv-start-{}", std::process::id());
    let program = Program::shipped(&server, &s, &name, "test_command: echo the job ran\n");
    let sup = Supervisor::start(&s, &[&program]);
    wait_for(&server, "the agent waiting, its queue advertised", |srv| {
        srv.agent_record(&name)
            .is_some_and(|r| r["state"] == "waiting")
            && srv.advertised_queues()[queue(&name)] == json!("a test queue")
    });
    assert_eq!(sup.state(&name), "RUNNING", "{}", sup.diagnostics());
    assert!(sup.pid(&name) > 0);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the job to finish", |srv| finished(srv, &id));
    assert_eq!(server.job_state(&id).as_deref(), Some("complete"));
    assert_eq!(server.result_data(&id)["status"]["test"], 0);
    assert!(server.log_text(&id, "output").contains("the job ran"));
    assert_eq!(sup.spawns(&name), 1, "{}", sup.diagnostics());
}

/// `supervisorctl signal USR1` between jobs (what the charm does after every update): the
/// agent exits 1, supervisord starts it again, and the new agent takes the next job.
#[test]
fn sigusr1_between_jobs_restarts_the_agent_which_takes_the_next_job() {
    if !supervisor_installed() {
        return;
    }
    let server = server();
    let s = Scratch::new("sv-usr1");
    let name = format!("sv-usr1-{}", std::process::id());
    let program = Program::shipped(&server, &s, &name, "test_command: echo the job ran\n");
    let sup = Supervisor::start(&s, &[&program]);
    let first =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the first job", |srv| finished(srv, &first));
    let old_pid = sup.pid(&name);
    assert!(old_pid > 0, "{}", sup.diagnostics());
    let signalled = sup.ctl(&["signal", "USR1", &name], Duration::from_secs(10));
    assert!(
        signalled.output.contains("signalled"),
        "{}",
        signalled.output
    );
    sup.wait_log(&format!("exited: {name} (exit status 1; not expected)"));
    let deadline = Instant::now() + WAIT;
    let new_pid = loop {
        let pid = sup.pid(&name);
        if pid > 0 && pid != old_pid {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no new agent: {}",
            sup.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(new_pid, old_pid);
    assert_eq!(sup.spawns(&name), 2, "{}", sup.diagnostics());
    let second =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the second job", |srv| finished(srv, &second));
    assert_eq!(server.job_state(&second).as_deref(), Some("complete"));
    assert_eq!(
        sup.pid(&name),
        new_pid,
        "the job ran in the restarted agent"
    );
}

/// `supervisorctl stop` in the middle of a long test phase: the agent ends the phase's
/// whole tree (a child and a `setsid` escapee too), runs cleanup once, reports and exits 0
/// by itself, well within the shipped `stopwaitsecs`.
#[test]
fn supervisorctl_stop_mid_phase_ends_the_tree_cleans_up_once_and_reports() {
    if !supervisor_installed() {
        return;
    }
    let server = server();
    let s = Scratch::new("sv-stop");
    let name = format!("sv-stop-{}", std::process::id());
    let marker = s.marker();
    let guard = KillByMarker::new(&marker);
    let cleanups = s.path("cleanups");
    let commands = format!(
        "test_command: |\n  sleep 1000.{marker}1 &\n  setsid sleep 1000.{marker}2 &\n  echo started\n  sleep 1000.{marker}3\ncleanup_command: echo cleanup >> {}\n",
        cleanups.display()
    );
    let program = Program::shipped(&server, &s, &name, &commands);
    let stopwait: u64 = program
        .setting("stopwaitsecs")
        .and_then(|v| v.parse().ok())
        .expect("the shipped file sets stopwaitsecs");
    let sup = Supervisor::start(&s, &[&program]);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test phase to start", |srv| {
        srv.log_text(&id, "output").contains("started")
    });
    // The shell and its three sleeps carry the marker.
    assert!(
        guard.living().len() >= 3,
        "the tree is up: {:?}",
        guard.living()
    );
    assert!(sup.pid(&name) > 0);
    let asked = Instant::now();
    let stop = sup.ctl(&["stop", &name], Duration::from_secs(stopwait + 30));
    let took = asked.elapsed();
    assert!(
        stop.status.is_some() && stop.output.contains("stopped"),
        "supervisorctl stop: {:?} {}\n{}",
        stop.status,
        stop.output,
        sup.diagnostics()
    );
    assert!(
        took < Duration::from_secs(stopwait),
        "the stop took {took:?}, more than stopwaitsecs={stopwait}"
    );
    let log = sup.log();
    assert!(
        log.contains(&format!("stopped: {name} (exit status 0)")),
        "the agent exited by itself\n{}",
        sup.diagnostics()
    );
    assert!(!log.contains("SIGKILL"), "{}", sup.diagnostics());
    assert_eq!(sup.state(&name), "STOPPED");
    let ran = std::fs::read_to_string(&cleanups).unwrap_or_default();
    assert_eq!(ran.lines().count(), 1, "cleanup ran exactly once: {ran:?}");
    assert!(
        finished(&server, &id),
        "the outcome reached the server: {}",
        server.result_data(&id)
    );
    assert_eq!(server.job_state(&id).as_deref(), Some("complete"));
    assert_eq!(
        guard.living(),
        Vec::<i32>::new(),
        "the test's processes survived"
    );
}

/// A bad config under the shipped file: the agent exits 2 and stays down (EXITED, one
/// spawn), while the same config under the charm's file is restarted again and again.
#[test]
fn a_bad_config_exits_2_and_is_not_restarted() {
    if !supervisor_installed() {
        return;
    }
    let server = server();
    let s = Scratch::new("sv-badconf");
    let name = format!("sv-bad-{}", std::process::id());
    let charm_name = format!("sv-bad-charm-{}", std::process::id());
    let bad = "no_such_key: 1\n";
    let shipped = Program::shipped(&server, &s, &name, bad);
    let charm = Program::charm(&server, &s, &charm_name, bad);
    let sup = Supervisor::start(&s, &[&shipped, &charm]);
    sup.wait_log(&format!("exited: {name} (exit status 2; expected)"));
    let first_exit = Instant::now();
    // A few seconds, and until the charm's program has visibly looped: a loop would show.
    let deadline = Instant::now() + WAIT;
    while first_exit.elapsed() < Duration::from_secs(3) || sup.spawns(&charm_name) < 3 {
        assert!(
            Instant::now() < deadline,
            "the charm's program did not loop\n{}",
            sup.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let charm_spawns = sup.spawns(&charm_name);
    let _ = sup.ctl(&["stop", &charm_name], Duration::from_secs(30));
    assert_eq!(sup.spawns(&name), 1, "{}", sup.diagnostics());
    assert_eq!(sup.state(&name), "EXITED");
    assert!(
        charm_spawns >= 3,
        "the charm's file restarts a bad config: {charm_spawns} spawns"
    );
    let tail = sup.ctl(&["tail", &name], Duration::from_secs(10)).output;
    assert!(
        tail.contains("unknown config key no_such_key"),
        "the reason is in the program's output: {tail}"
    );
}

/// The charm's own file (supervisord's default stopwaitsecs=10): an agent still ending a
/// phase that ignores SIGTERM (termination_grace_period 15 s) is SIGKILLed 10 s after
/// `supervisorctl stop`: cleanup never runs, the job is not reported, and the phase's
/// processes are left running without an owner. The shipped file's stopwaitsecs avoids
/// this; recovering from such a kill is the next issue.
#[test]
fn the_charms_file_sigkills_a_busy_agent_after_10_s() {
    if !supervisor_installed() {
        return;
    }
    let server = server();
    let s = Scratch::new("sv-charm");
    let name = format!("sv-charm-{}", std::process::id());
    let marker = s.marker();
    let guard = KillByMarker::new(&marker);
    let cleanups = s.path("cleanups");
    let commands = format!(
        "termination_grace_period: 15\ntest_command: |\n  trap '' TERM\n  sleep 1000.{marker}1 &\n  echo started\n  sleep 1000.{marker}2\ncleanup_command: echo cleanup >> {}\n",
        cleanups.display()
    );
    let program = Program::charm(&server, &s, &name, &commands);
    assert_eq!(program.setting("stopwaitsecs"), None);
    assert_eq!(program.setting("exitcodes"), None);
    let sup = Supervisor::start(&s, &[&program]);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test phase to start", |srv| {
        srv.log_text(&id, "output").contains("started")
    });
    assert!(sup.pid(&name) > 0);
    let stop = sup.ctl(&["stop", &name], WAIT);
    assert!(stop.output.contains("stopped"), "{}", stop.output);
    let log = sup.log();
    assert!(
        log.contains(&format!("stopped: {name} (terminated by SIGKILL)")),
        "supervisord SIGKILLed the agent\n{}",
        sup.diagnostics()
    );
    assert!(
        !cleanups.exists(),
        "cleanup ran although the agent was killed first"
    );
    assert!(!finished(&server, &id), "the job was reported");
    // The guard kills them when the test ends.
    assert!(
        guard.living().len() >= 2,
        "the phase's processes outlive the agent: {:?}",
        guard.living()
    );
}
