//! The agent's own death: the real binary is SIGKILLed (its pid only, as supervisord does)
//! at each point of a job, then started again with the same config; the restart kills the
//! old phase's whole tree, runs cleanup once, and reports the job with the interrupted
//! phase's status. Also damaged journals and recovery while the server is down.

use crate::support::agent::{finished, queue, wait_for, Agent};
use crate::support::fake_server::{FakeServer, Route};
use crate::support::scratch::{KillByMarker, Scratch};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use testflinger_agent::journal::{Journal, Why, JOURNAL_FILE};

const PHASES: [&str; 7] = [
    "setup",
    "provision",
    "firmware_update",
    "test",
    "allocate",
    "reserve",
    "cleanup",
];

/// The exit code recovery gives the phase the agent died in (docs/operating.md, "Crash recovery").
const INTERRUPTED: i64 = 247;

/// A phase command that starts a tree of processes marked with `marker` and waits for
/// ever: a child, a grandchild, a `setsid` escapee, a double fork and a SIGTERM-ignorer.
fn tree(marker: &str) -> String {
    format!(
        "sleep 1000.{m}1 & sh -c 'sleep 1000.{m}2 & wait' & setsid sleep 1000.{m}3 & ( ( sleep 1000.{m}4 & ) & ) ; sh -c \"trap '' TERM; exec sleep 1000.{m}5\" & echo tree up; wait",
        m = marker
    )
}

/// How many processes [`tree`] starts, its shell included.
const TREE_SIZE: usize = 7;

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// The config lines: every phase echoes, except `crash_in`, which runs [`tree`]; cleanup
/// appends a line to `count` (and, when it is `crash_in`, runs the tree the first time only).
fn commands(crash_in: Option<&str>, marker: &str, count: &Path) -> String {
    let mut text = String::from("termination_grace_period: 1\n");
    for phase in PHASES {
        let mut cmd = if phase == "cleanup" {
            format!("echo cleanup >> {}", count.display())
        } else {
            format!("echo {phase} ran")
        };
        if phase == "allocate" {
            cmd.push_str(
                "; echo '{\"device_info\": {\"device_ip\": \"10.0.0.1\"}}' > device-info.json",
            );
        }
        if phase == "test" {
            cmd.push_str("; mkdir -p artifacts; echo report > artifacts/report.txt");
        }
        if crash_in == Some(phase) {
            let tree = tree(marker);
            cmd = if phase == "cleanup" {
                format!(
                    "{cmd}; if [ \"$(wc -l < {})\" -eq 1 ]; then {tree}; fi",
                    count.display()
                )
            } else {
                format!("{cmd}; {tree}")
            };
        }
        text.push_str(&format!("{phase}_command: {}\n", yaml_string(&cmd)));
    }
    text
}

fn yaml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// A job that runs every phase; allocate only when `allocate` (a successful allocate holds
/// the device until a parent job releases it).
fn job(name: &str, allocate: bool) -> Value {
    let mut job = json!({
        "job_queue": queue(name),
        "provision_data": {"url": "x"},
        "firmware_update_data": {"version": "1"},
        "test_data": {"test_cmds": "x"},
        "reserve_data": {"ssh_keys": ["lp:x"], "timeout": 60},
    });
    if allocate {
        job["allocate_data"] = json!({"allocate": true});
    }
    job
}

/// The phases a job of [`job`] runs.
fn ran(allocate: bool) -> impl Iterator<Item = &'static str> {
    PHASES
        .into_iter()
        .filter(move |p| allocate || *p != "allocate")
}

fn stderr_log(s: &Scratch, name: &str) -> String {
    std::fs::read_to_string(s.path(&format!("{name}-{}.stderr", std::process::id())))
        .unwrap_or_default()
}

fn wait_local(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where the agent is SIGKILLed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// Right after the job was taken, before setup.
    Taken,
    /// While this phase's command tree runs.
    Phase(&'static str),
    /// While the outcome is being posted.
    Report,
    /// While the artifacts are being uploaded.
    Artifacts,
}

fn sigkill_and_restart(point: Point) {
    let server = FakeServer::start();
    let label = match point {
        Point::Taken => "taken".to_owned(),
        Point::Phase(p) => p.replace('_', ""),
        Point::Report => "report".to_owned(),
        Point::Artifacts => "artifacts".to_owned(),
    };
    let s = Scratch::new(&format!("crash-{label}"));
    let name = format!("crash-{label}-{}", std::process::id());
    let marker = s.marker();
    let tree_alive = KillByMarker::new(&marker);
    let count = s.path("cleanup-count");
    let crash_in = match point {
        Point::Phase(p) => Some(p),
        _ => None,
    };
    let mut config = commands(crash_in, &marker, &count);
    // For a kill during the report, cleanup waits (bounded) until the test has slowed the
    // result posts down, so the report cannot be over before the kill can land in it.
    let gate = s.path("report-gate");
    if point == Point::Report {
        let cleanup = format!(
            "echo cleanup >> {count}; i=0; while [ ! -e {gate} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
            count = count.display(),
            gate = gate.display()
        );
        config = config
            .lines()
            .filter(|line| !line.starts_with("cleanup_command:"))
            .map(|line| format!("{line}\n"))
            .collect();
        config.push_str(&format!("cleanup_command: {}\n", yaml_string(&cleanup)));
    }
    let mut first = Agent::start(&server, &s, &name, &config);
    wait_for(&server, "the agent to come up", |srv| {
        srv.agent_record(&name)
            .is_some_and(|r| r["state"] == json!("waiting"))
    });
    match point {
        // The post of the job id right after the take waits: the agent is killed there.
        Point::Taken => server.delay(Route::AgentDataPost, Duration::from_secs(5)),
        Point::Artifacts => server.delay(Route::ArtifactPost, Duration::from_secs(5)),
        _ => {}
    }
    let allocate = point == Point::Phase("allocate");
    let id = server.submit_job(job(&name, allocate));
    let rundir = s.path("run").join(&id);
    let spooled = s.path("results").join(&id);
    match point {
        Point::Taken => wait_for(&server, "the job to be taken", |srv| {
            srv.job_state(&id).as_deref() == Some("running") && rundir.join(JOURNAL_FILE).is_file()
        }),
        Point::Phase(_) => wait_local("the phase's tree", Duration::from_secs(30), || {
            tree_alive.living().len() >= TREE_SIZE
        }),
        Point::Report => {
            wait_local("cleanup", Duration::from_secs(30), || {
                count_lines(&count) == 1
            });
            server.delay(Route::ResultPost, Duration::from_secs(2));
            std::fs::write(&gate, b"").expect("open the gate");
            wait_local("the report", Duration::from_secs(30), || spooled.is_dir());
        }
        Point::Artifacts => wait_local("the report", Duration::from_secs(30), || spooled.is_dir()),
    }
    first.signal(nix::sys::signal::Signal::SIGKILL);
    assert_eq!(first.wait_exit(), None, "killed by a signal, no exit code");
    if crash_in.is_some() {
        // Sanity: the agent's death alone leaves the tree running.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            tree_alive.living().len() >= TREE_SIZE - 2,
            "the old tree outlives its agent until the restart"
        );
    }
    server.clear_faults();

    let _second = Agent::start(&server, &s, &name, &config);
    wait_local("the old tree to die", Duration::from_secs(15), || {
        tree_alive.living().is_empty()
    });
    wait_for(&server, "the recovered job's outcome", |srv| {
        finished(srv, &id) && !spooled.exists() && !rundir.exists()
    });
    let status = server.result_data(&id)["status"].clone();
    let log = stderr_log(&s, &name);
    let expected_cleanups = if crash_in == Some("cleanup") { 2 } else { 1 };
    assert_eq!(
        count_lines(&count),
        expected_cleanups,
        "cleanup runs once (once more when the agent died in it); status {status}\n{log}"
    );
    assert_eq!(status["cleanup"], json!(0), "{status}");
    match point {
        Point::Phase(phase) => {
            let before = ran(allocate).take_while(|p| *p != phase);
            for p in before {
                assert_eq!(status[p], json!(0), "{p} ended before the crash: {status}");
            }
            if phase != "cleanup" {
                assert_eq!(status[phase], json!(INTERRUPTED), "{status}\n{log}");
                let after = PHASES.iter().skip_while(|p| **p != phase).skip(1);
                for p in after.filter(|p| **p != "cleanup") {
                    assert!(status.get(p).is_none(), "{p} never ran: {status}");
                }
            }
            assert!(
                server
                    .log_text(&id, "output")
                    .contains(&format!("died during the {phase} phase")),
                "the interrupted phase's log says what happened"
            );
            assert!(
                log.contains(&format!("recovering job {id}: killed")),
                "the recovery is logged:\n{log}"
            );
        }
        Point::Taken => {
            assert_eq!(
                status
                    .as_object()
                    .map(|o| o.keys().cloned().collect::<Vec<_>>()),
                Some(vec!["cleanup".to_owned()]),
                "no phase ran before the crash: {status}"
            );
        }
        Point::Report | Point::Artifacts => {
            for p in ran(allocate) {
                assert_eq!(status[p], json!(0), "the job had ended: {status}");
            }
        }
    }
    if point == Point::Artifacts {
        assert!(
            server.artifact(&id).is_some(),
            "the artifacts are delivered"
        );
    }
    assert_eq!(server.job_state(&id).as_deref(), Some("complete"));
}

#[test]
fn sigkill_right_after_the_job_was_taken() {
    sigkill_and_restart(Point::Taken);
}

#[test]
fn sigkill_during_setup() {
    sigkill_and_restart(Point::Phase("setup"));
}

#[test]
fn sigkill_during_provision() {
    sigkill_and_restart(Point::Phase("provision"));
}

#[test]
fn sigkill_during_firmware_update() {
    sigkill_and_restart(Point::Phase("firmware_update"));
}

#[test]
fn sigkill_during_test() {
    sigkill_and_restart(Point::Phase("test"));
}

#[test]
fn sigkill_during_allocate_before_the_hold() {
    sigkill_and_restart(Point::Phase("allocate"));
}

#[test]
fn sigkill_during_reserve() {
    sigkill_and_restart(Point::Phase("reserve"));
}

#[test]
fn sigkill_during_cleanup() {
    sigkill_and_restart(Point::Phase("cleanup"));
}

#[test]
fn sigkill_during_the_report() {
    sigkill_and_restart(Point::Report);
}

#[test]
fn sigkill_during_the_artifact_upload() {
    sigkill_and_restart(Point::Artifacts);
}

/// A run directory as a dead agent leaves it, for a job the agent will not poll.
fn left_over_rundir(s: &Scratch, id: &str, journal: Option<&[u8]>) -> std::path::PathBuf {
    let rundir = s.path("run").join(id);
    std::fs::create_dir_all(&rundir).expect("mkdir");
    std::fs::write(
        rundir.join("testflinger.json"),
        json!({"job_id": id, "job_queue": "nobody-polls-this"}).to_string(),
    )
    .expect("write");
    std::fs::write(
        rundir.join("testflinger-outcome.json"),
        r#"{"status":{"setup":0}}"#,
    )
    .expect("write");
    if let Some(bytes) = journal {
        std::fs::write(rundir.join(JOURNAL_FILE), bytes).expect("write");
    }
    rundir
}

#[test]
fn a_damaged_journal_is_reported_spooled_and_the_agent_goes_on() {
    let server = FakeServer::start();
    let s = Scratch::new("crash-garbage");
    let name = format!("crash-garbage-{}", std::process::id());
    let count = s.path("cleanup-count");
    let truncated = server.submit_job(json!({"job_queue": "nobody-polls-this"}));
    let garbage = server.submit_job(json!({"job_queue": "nobody-polls-this"}));
    let valid = Journal::taken(&truncated, "2026-01-01T00:00:00+00:00".into()).to_bytes();
    left_over_rundir(&s, &truncated, Some(&valid[..valid.len() / 2]));
    left_over_rundir(&s, &garbage, Some(b"\x00\xffnot a journal{{{"));
    let config = commands(None, "0", &count);
    let _agent = Agent::start(&server, &s, &name, &config);
    for id in [&truncated, &garbage] {
        wait_for(&server, "the damaged job's report", |srv| {
            srv.result_data(id).get("status") == Some(&json!({"setup": 0}))
        });
        assert_eq!(server.job_state(id).as_deref(), Some("complete"));
    }
    let log = stderr_log(&s, &name);
    assert_eq!(
        log.matches("the job journal cannot be used").count(),
        2,
        "each damaged journal is reported:\n{log}"
    );
    assert_eq!(count_lines(&count), 0, "no cleanup runs without a journal");
    // The agent goes on to take new work.
    let next = server.submit_job(job(&name, false));
    wait_for(&server, "a new job", |srv| finished(srv, &next));
    assert_eq!(count_lines(&count), 1);
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn recovery_while_the_server_is_down_kills_and_cleans_at_once() {
    let server = FakeServer::start();
    let s = Scratch::new("crash-down");
    let name = format!("crash-down-{}", std::process::id());
    let marker = s.marker();
    let tree_alive = KillByMarker::new(&marker);
    let count = s.path("cleanup-count");
    let id = server.submit_job(json!({"job_queue": "nobody-polls-this"}));
    // The tree of a test phase whose agent died: it carries the phase token.
    let token = format!("crashdown{marker}");
    let mut shell = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(tree(&marker))
        .env("TESTFLINGER_PHASE_TOKEN", &token)
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn the tree");
    wait_local("the tree", Duration::from_secs(10), || {
        tree_alive.living().len() >= TREE_SIZE
    });
    let mut journal = Journal::taken(&id, "2026-01-01T00:00:00+00:00".into());
    journal.agent_pid = 1;
    for (phase, to) in [("setup", "Setup"), ("provision", "Provisioned")] {
        journal.set_status(phase, 0);
        journal.transition("t".into(), to, Some(phase), Why::Exit, Some(0));
    }
    journal.transition(
        "t".into(),
        "FirmwareUpdated",
        Some("firmware_update"),
        Why::Skipped,
        None,
    );
    journal.phase = Some("test".into());
    journal.pgid = Some(shell.id() as i32);
    journal.token = Some(token);
    let rundir = left_over_rundir(&s, &id, Some(&journal.to_bytes()));
    std::fs::write(
        rundir.join("testflinger-outcome.json"),
        r#"{"status":{"setup":0,"provision":0}}"#,
    )
    .expect("write");
    std::fs::write(rundir.join("test.log"), "test output before the crash\n").expect("write");

    server.go_down();
    let config = commands(None, &marker, &count);
    let _agent = Agent::start(&server, &s, &name, &config);
    wait_local("the tree to die", Duration::from_secs(15), || {
        tree_alive.living().is_empty()
    });
    let _ = shell.wait();
    wait_local("cleanup", Duration::from_secs(15), || {
        count_lines(&count) == 1
    });
    wait_local(
        "the report to wait in the spool",
        Duration::from_secs(15),
        || s.path("results").join(&id).is_dir(),
    );
    assert!(
        server.is_down(),
        "kill and cleanup did not wait for the server"
    );
    server.come_back();
    wait_for(&server, "the report", |srv| finished(srv, &id));
    assert_eq!(
        server.result_data(&id)["status"],
        json!({"setup": 0, "provision": 0, "test": INTERRUPTED, "cleanup": 0})
    );
    let output = server.log_text(&id, "output");
    assert!(
        output.starts_with("test output before the crash\n"),
        "{output}"
    );
    assert!(output.contains("died during the test phase"), "{output}");
    assert_eq!(count_lines(&count), 1);
}

#[test]
fn a_recovered_report_the_server_refuses_stays_in_the_spool() {
    let server = FakeServer::start();
    let s = Scratch::new("crash-refused");
    let name = format!("crash-refused-{}", std::process::id());
    let count = s.path("cleanup-count");
    let id = server.submit_job(json!({"job_queue": "nobody-polls-this"}));
    let journal = Journal::taken(&id, "2026-01-01T00:00:00+00:00".into());
    left_over_rundir(&s, &id, Some(&journal.to_bytes()));
    // As if the server had forgotten the job: every report post is refused for good.
    server.fail_next(Route::ResultPost, 10_000, 404);
    let config = commands(None, "0", &count);
    let _agent = Agent::start(&server, &s, &name, &config);
    let spooled = s.path("results").join(&id);
    wait_local("the refusal to be logged", Duration::from_secs(30), || {
        stderr_log(&s, &name).contains(&format!(
            "spooled report {} kept for later",
            spooled.display()
        ))
    });
    assert!(
        spooled.join("testflinger-outcome.json").is_file(),
        "the outcome stays in the spool"
    );
    assert_eq!(count_lines(&count), 1, "cleanup ran once");
    server.clear_faults();
    wait_for(&server, "the report once the server takes it", |srv| {
        finished(srv, &id) && !spooled.exists()
    });
    assert_eq!(count_lines(&count), 1, "and only once");
}

#[test]
fn a_cancelled_job_whose_agent_died_in_cleanup_stays_cancelled() {
    let server = FakeServer::start();
    let s = Scratch::new("crash-cancelled");
    let name = format!("crash-cancelled-{}", std::process::id());
    let count = s.path("cleanup-count");
    let id = server.submit_job(json!({"job_queue": "nobody-polls-this"}));
    // Cancelled before setup, then the agent died during cleanup's first run.
    let mut journal = Journal::taken(&id, "2026-01-01T00:00:00+00:00".into());
    journal.agent_pid = 1;
    journal.transition("t".into(), "Aborted", Some("setup"), Why::Cancel, None);
    journal.phase = Some("cleanup".into());
    journal.cleanup_attempts = 1;
    let rundir = left_over_rundir(&s, &id, Some(&journal.to_bytes()));
    std::fs::write(rundir.join("testflinger-outcome.json"), r#"{"status":{}}"#).expect("write");
    let config = commands(None, "0", &count);
    let _agent = Agent::start(&server, &s, &name, &config);
    wait_for(&server, "the recovered report", |srv| finished(srv, &id));
    assert_eq!(server.job_state(&id).as_deref(), Some("cancelled"));
    assert_eq!(server.result_data(&id)["status"], json!({"cleanup": 0}));
    assert_eq!(count_lines(&count), 1, "cleanup ran once more");
}

#[test]
fn a_recovered_cleanup_that_exits_46_takes_the_device_offline() {
    let server = FakeServer::start();
    let s = Scratch::new("crash-46");
    let name = format!("crash-46-{}", std::process::id());
    let count = s.path("cleanup-count");
    let id = server.submit_job(json!({"job_queue": "nobody-polls-this"}));
    // The agent died during test; the restart's cleanup cannot recover the device.
    let mut journal = Journal::taken(&id, "2026-01-01T00:00:00+00:00".into());
    journal.agent_pid = 1;
    journal.phase = Some("test".into());
    left_over_rundir(&s, &id, Some(&journal.to_bytes()));
    let config = format!(
        "test_command: echo test\ncleanup_command: {}\n",
        yaml_string(&format!("echo cleanup >> {}; exit 46", count.display()))
    );
    let _agent = Agent::start(&server, &s, &name, &config);
    wait_for(&server, "the recovered report", |srv| finished(srv, &id));
    assert_eq!(server.result_data(&id)["status"]["cleanup"], json!(46));
    let record = server.agent_record(&name).expect("the agent's record");
    assert_eq!(record["state"], json!("offline"), "{record}");
    assert_eq!(
        record["comment"],
        json!(format!(
            "Set to offline by agent. Recovery failed during job '{id}' execution."
        )),
        "{record}"
    );
    // Held: cycles pass (polling_interval 1 s) and the agent's queue is left alone.
    let next =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    let reads = server.request_count(&Route::AgentDataGet);
    wait_for(&server, "three more record reads", |srv| {
        srv.request_count(&Route::AgentDataGet) >= reads + 3
    });
    assert_eq!(server.job_state(&next).as_deref(), Some("waiting"));
    assert_eq!(
        server.request_count(&Route::JobPoll),
        0,
        "a held agent does not poll"
    );
    assert_eq!(count_lines(&count), 1);
}

use std::os::unix::process::CommandExt;

/// The run directories under `run/`, by name.
fn rundirs(s: &Scratch) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(s.path("run"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `run-job` with the daemon's own config shares its `execution_basedir`. What it leaves
/// there, finished or killed mid-phase, is no job of the server's: the daemon neither
/// recovers it (no cleanup run, no command killed: the `run-job` might still be running)
/// nor reports it, and says so.
#[test]
fn run_job_directories_are_left_alone_by_the_daemon() {
    let server = FakeServer::start();
    let s = Scratch::new("crash-local");
    let name = format!("crash-local-{}", std::process::id());
    let marker = s.marker();
    let left = KillByMarker::new(&marker);
    let count = s.path("cleanup-count");
    let test_command = format!(
        "test_command: {}",
        yaml_string(&format!(
            "echo test ran; if [ -n \"$TF_TEST_HANG\" ]; then {}; fi",
            tree(&marker)
        ))
    );
    let config: Vec<String> = commands(None, &marker, &count)
        .lines()
        .map(|l| {
            if l.starts_with("test_command:") {
                test_command.clone()
            } else {
                l.to_owned()
            }
        })
        .collect();
    let config = config.join("\n");
    let files = crate::support::agent::write_daemon_files(&server, &s, &name, &config);
    let job = s.write("job.yaml", "job_queue: local\ntest_data:\n  test_cmds: x\n");
    let run_job = || {
        let mut cmd = std::process::Command::new(crate::support::agent::BIN);
        cmd.arg("run-job")
            .arg("-c")
            .arg(&files.config)
            .arg(&job)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    };

    // One run-job runs to its end, another is SIGKILLed in its test phase.
    let finished_run = run_job().status().expect("run-job runs");
    assert_eq!(finished_run.code(), Some(0));
    assert_eq!(count_lines(&count), 1, "the finished run-job's cleanup ran");
    let mut killed = run_job()
        .env("TF_TEST_HANG", "1")
        .spawn()
        .expect("run-job starts");
    wait_local("the killed run-job's tree", Duration::from_secs(60), || {
        rundirs(&s).iter().any(|d| {
            std::fs::read_to_string(s.path("run").join(d).join("test.log"))
                .is_ok_and(|t| t.contains("tree up"))
        })
    });
    killed.kill().expect("SIGKILL run-job");
    let _ = killed.wait();
    let local = rundirs(&s);
    assert_eq!(local.len(), 2, "{local:?}");
    let living = left.living().len();
    assert!(living > 0, "the killed run-job's tree outlives it");

    // The daemon starts on the same directories and takes a job of the server's.
    let _agent = Agent::start(&server, &s, &name, &config);
    let id = server.submit_job(job_for(&name));
    wait_for(&server, "the server's job", |srv| finished(srv, &id));

    assert_eq!(
        count_lines(&count),
        2,
        "cleanup ran for run-job's finished job and the server's job, not in a recovery"
    );
    assert_eq!(
        left.living().len(),
        living,
        "no process of run-job's was killed"
    );
    for dir in &local {
        assert!(
            s.path("run").join(dir).join(JOURNAL_FILE).is_file(),
            "{dir} stays where run-job left it"
        );
        assert!(
            !s.path("results").join(dir).exists(),
            "{dir} is not spooled"
        );
        let asked: Vec<String> = server
            .requests()
            .into_iter()
            .map(|r| r.path)
            .filter(|path| path.contains(dir.as_str()))
            .collect();
        assert!(
            asked.is_empty(),
            "nothing about {dir} reaches the server: {asked:?}"
        );
    }
    let log = stderr_log(&s, &name);
    assert_eq!(
        log.matches("was run by `run-job`").count(),
        2,
        "each run-job directory is named:\n{log}"
    );
    assert!(!log.contains("recovering job"), "{log}");
}

/// A job of the server's queue for the agent `name`, with no phase data but a test.
fn job_for(name: &str) -> Value {
    json!({"job_queue": queue(name), "test_data": {"test_cmds": "x"}})
}
