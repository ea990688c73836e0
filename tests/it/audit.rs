//! What an auditor checks, through the real binary against the fake server: the daemon's
//! state changes are all edges of its table, and `explain` shows the path a job took, from
//! the trail kept under `logging_basedir`.

use crate::support::agent::{finished, queue, wait_for, Agent, BIN};
use crate::support::fake_server::FakeServer;
use crate::support::scratch::{KillByMarker, Scratch};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use testflinger_agent::daemon::DAEMON_TRANSITIONS;

fn stderr_of(s: &Scratch, name: &str) -> String {
    std::fs::read_to_string(Agent::stderr_path(s, name)).unwrap_or_default()
}

/// The `daemon state: FROM --LABEL--> TO` lines of a log, in order.
fn daemon_steps(log: &str) -> Vec<(String, String, String)> {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find("daemon state: ")? + "daemon state: ".len()..];
            let (from, rest) = rest.split_once(" --")?;
            let (label, to) = rest.rsplit_once("--> ")?;
            Some((from.to_owned(), label.to_owned(), to.trim().to_owned()))
        })
        .collect()
}

fn wait_local(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A job, a maintenance hold and its release, a second job stopped by SIGTERM: every state
/// change the daemon logs is an edge of `DAEMON_TRANSITIONS`, none was refused, and they
/// come in the order the scenario makes.
#[test]
fn every_daemon_state_change_is_an_edge_of_its_table() {
    let server = FakeServer::start();
    let s = Scratch::new("audit-daemon");
    let name = format!("audit-daemon-{}", std::process::id());
    let gate = s.path("gate");
    let config = format!(
        "test_command: \"if [ -e {g} ]; then echo quick; else sleep 30; fi\"\n",
        g = gate.display()
    );
    std::fs::write(&gate, "").expect("gate");
    let mut agent = Agent::start(&server, &s, &name, &config);
    let first =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the first job", |srv| finished(srv, &first));
    // After the job the agent posts `waiting`: the hold must come after that.
    wait_for(&server, "the agent back to waiting", |srv| {
        srv.agent_record(&name)
            .is_some_and(|r| r["state"] == json!("waiting") && r["job_id"] == json!(""))
    });
    server.set_agent_state(&name, "maintenance", "rack work");
    wait_local("the hold", Duration::from_secs(30), || {
        stderr_of(&s, &name).contains("--> maintenance")
    });
    server.set_agent_state(&name, "waiting", "");
    std::fs::remove_file(&gate).expect("the next test phase waits");
    let second =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the second job to run its test", |srv| {
        srv.job_state(&second).as_deref() == Some("test")
    });
    assert_eq!(agent.stop(), Some(0), "a stop exits 0");

    let log = stderr_of(&s, &name);
    assert!(
        !log.contains("no daemon edge"),
        "the loop asked for an edge its table lacks:\n{log}"
    );
    let steps = daemon_steps(&log);
    for (from, label, to) in &steps {
        assert!(
            DAEMON_TRANSITIONS
                .iter()
                .any(|(f, e, t)| f.name() == from && e.label() == label && t.name() == to),
            "{from} --{label}--> {to} is not in DAEMON_TRANSITIONS"
        );
    }
    let path: Vec<(&str, &str)> = steps
        .iter()
        .map(|(from, _, to)| (from.as_str(), to.as_str()))
        .collect();
    assert_eq!(
        path,
        [
            ("starting", "waiting"),
            ("waiting", "busy"),
            ("busy", "waiting"),
            ("waiting", "maintenance"),
            ("maintenance", "waiting"),
            ("waiting", "busy"),
            ("busy", "draining"),
            ("draining", "stopped"),
        ],
        "{log}"
    );
}

/// Runs `explain` on `path` in `format`; its stdout.
fn explain(path: &Path, format: &str) -> String {
    let out = Command::new(BIN)
        .arg("explain")
        .arg(path)
        .args(["--format", format])
        .output()
        .expect("explain runs");
    assert!(
        out.status.success(),
        "explain {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn trail(s: &Scratch, id: &str) -> PathBuf {
    s.path("logs").join("trails").join(format!("{id}.json"))
}

/// The edges `explain --format dot` draws bold, as `(from, to, label)`, in the order of
/// the first step number their label carries.
fn bold_edges(dot: &str) -> Vec<(String, String, String)> {
    let mut bold: Vec<(String, String, String)> = dot
        .lines()
        .filter(|line| line.contains("penwidth=3"))
        .filter_map(|line| {
            let line = line.trim();
            let (from, rest) = line.strip_prefix('"')?.split_once("\" -> \"")?;
            let (to, rest) = rest.split_once('"')?;
            let label = rest.split_once("label=\"")?.1.split_once('"')?.0;
            Some((from.to_owned(), to.to_owned(), label.to_owned()))
        })
        .collect();
    let first_step = |label: &str| -> usize {
        let digits: String = label.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap_or(usize::MAX)
    };
    bold.sort_by_key(|(_, _, label)| first_step(label));
    bold
}

fn edges(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn bold_pairs(dot: &str) -> Vec<(String, String)> {
    bold_edges(dot)
        .into_iter()
        .map(|(from, to, _)| (from, to))
        .collect()
}

/// Runs jobs through one agent and checks `explain` on each kept trail: a passing job, a
/// failed provision, and a job cancelled during its test phase.
#[test]
fn explain_shows_the_path_of_passing_failed_and_cancelled_jobs() {
    let server = FakeServer::start();
    let s = Scratch::new("audit-explain");
    let name = format!("audit-explain-{}", std::process::id());
    let flag = s.path("fail-provision");
    let marker = s.marker();
    let _tree = KillByMarker::new(&marker);
    let config = format!(
        "setup_command: echo setup\nprovision_command: \"if [ -e {f} ]; then exit 3; fi; echo provisioned\"\ntest_command: \"if [ -e {c} ]; then sleep 1000.{marker}1; fi; echo tested\"\ncleanup_command: echo cleanup\n",
        f = flag.display(),
        c = s.path("cancel-me").display(),
    );
    let _agent = Agent::start(&server, &s, &name, &config);
    let job = || json!({"job_queue": queue(&name), "provision_data": {"url": "x"}, "test_data": {"test_cmds": "x"}});

    let passing = server.submit_job(job());
    wait_for(&server, "the passing job", |srv| finished(srv, &passing));
    wait_local("its trail", Duration::from_secs(10), || {
        trail(&s, &passing).is_file()
    });
    let dot = explain(&trail(&s, &passing), "dot");
    assert_eq!(
        bold_pairs(&dot),
        edges(&[
            ("Polled", "Setup"),
            ("Setup", "Provisioned"),
            ("Provisioned", "FirmwareUpdated"),
            ("FirmwareUpdated", "Tested"),
            ("Tested", "Allocated"),
            ("Allocated", "Reserved"),
            ("Reserved", "Cleaned"),
        ]),
        "{dot}"
    );
    assert!(
        dot.contains("\"Polled\" -> \"Aborted\" [label=\"setup() fails, times out or is stopped\", style=dashed, color=\"gray75\""),
        "edges not taken are faded:\n{dot}"
    );
    let table = explain(&trail(&s, &passing), "table");
    assert!(table.contains("finished"), "{table}");
    assert!(
        table.lines().any(|l| l.contains("Setup")
            && l.contains("exit")
            && l.contains(" 0 ")
            && l.contains("exited")),
        "a row per phase with how its command ended:\n{table}"
    );

    std::fs::write(&flag, "").expect("flag");
    let failed = server.submit_job(job());
    wait_for(&server, "the failing job", |srv| finished(srv, &failed));
    std::fs::remove_file(&flag).expect("flag");
    wait_local("its trail", Duration::from_secs(10), || {
        trail(&s, &failed).is_file()
    });
    let dot = explain(&trail(&s, &failed), "dot");
    assert_eq!(
        bold_pairs(&dot),
        edges(&[
            ("Polled", "Setup"),
            ("Setup", "Aborted"),
            ("Aborted", "Cleaned")
        ]),
        "{dot}"
    );
    assert!(
        explain(&trail(&s, &failed), "table").contains("aborted"),
        "the summary says the job was aborted"
    );

    std::fs::write(s.path("cancel-me"), "").expect("flag");
    let cancelled = server.submit_job(job());
    wait_for(&server, "the test phase", |srv| {
        srv.job_state(&cancelled).as_deref() == Some("test")
    });
    server.cancel_job(&cancelled);
    wait_for(&server, "the cancelled job", |srv| {
        finished(srv, &cancelled)
    });
    wait_local("its trail", Duration::from_secs(10), || {
        trail(&s, &cancelled).is_file()
    });
    let dot = explain(&trail(&s, &cancelled), "dot");
    assert_eq!(
        bold_pairs(&dot),
        edges(&[
            ("Polled", "Setup"),
            ("Setup", "Provisioned"),
            ("Provisioned", "FirmwareUpdated"),
            ("FirmwareUpdated", "Aborted"),
            ("Aborted", "Cleaned"),
        ]),
        "{dot}"
    );
    let table = explain(&trail(&s, &cancelled), "table");
    assert!(
        table
            .lines()
            .any(|l| l.contains("test") && l.contains("cancel") && l.contains("SIGTERM honoured")),
        "the cancelled phase's row says how its command ended:\n{table}"
    );
    let mermaid = explain(&trail(&s, &cancelled), "mermaid");
    assert!(
        mermaid.contains("FirmwareUpdated --> Aborted: 4: test()"),
        "{mermaid}"
    );
    assert!(mermaid.contains("class "), "{mermaid}");
}

/// The agent is SIGKILLed during the test phase and started again: the recovered job's
/// trail has the recovery step, which `explain` adds in red (the lifecycle has no such edge:
/// recovery ends the job from wherever it was), then cleanup.
#[test]
fn explain_shows_a_recovered_crash() {
    let server = FakeServer::start();
    let s = Scratch::new("audit-crash");
    let name = format!("audit-crash-{}", std::process::id());
    let marker = s.marker();
    let tree = KillByMarker::new(&marker);
    let config = format!(
        "termination_grace_period: 1\nsetup_command: echo setup\ntest_command: \"sleep 1000.{marker}1\"\ncleanup_command: echo cleanup\n"
    );
    let mut first = Agent::start(&server, &s, &name, &config);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_local("the test phase's command", Duration::from_secs(30), || {
        !tree.living().is_empty()
    });
    first.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = first.wait_exit();
    // Explain reads a run directory too: the dead agent's, not finished.
    let rundir = s.path("run").join(&id);
    let table = explain(&rundir, "table");
    assert!(table.contains("not finished"), "{table}");

    let _second = Agent::start(&server, &s, &name, &config);
    wait_for(&server, "the recovered job", |srv| finished(srv, &id));
    wait_local("its trail", Duration::from_secs(10), || {
        trail(&s, &id).is_file()
    });
    let dot = explain(&trail(&s, &id), "dot");
    let bold = bold_edges(&dot);
    let pairs: Vec<(String, String)> = bold
        .iter()
        .map(|(f, t, _)| (f.clone(), t.clone()))
        .collect();
    assert_eq!(
        pairs,
        edges(&[
            ("Polled", "Setup"),
            ("Setup", "Provisioned"),
            ("Provisioned", "FirmwareUpdated"),
            ("FirmwareUpdated", "Aborted"),
            ("Aborted", "Cleaned"),
        ]),
        "{dot}"
    );
    assert!(
        dot.contains("\"FirmwareUpdated\" -> \"Aborted\" [label=\"4: crash recovery (test)\", penwidth=3, color=\"red\""),
        "the recovery step is added in red, not drawn as the lifecycle's abort edge:\n{dot}"
    );
    let table = explain(&trail(&s, &id), "table");
    assert!(table.contains("ended by crash recovery"), "{table}");
    let status: Value = server.result_data(&id)["status"].clone();
    assert_eq!(status["test"], json!(247), "{status}");
}

/// `run-job` on a shipped example in `s`'s directories; its run directory and what it
/// printed.
fn run_example(s: &Scratch, config: &str, job: &str, expected_exit: i32) -> (PathBuf, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = crate::run_job::run_job(&s.example_config(config), &root.join(job));
    assert_eq!(
        out.status.code(),
        Some(expected_exit),
        "stdout:\n{}\nstderr:\n{}",
        crate::run_job::text(&out.stdout),
        crate::run_job::text(&out.stderr)
    );
    (s.rundir(), crate::run_job::text(&out.stdout))
}

/// The README's first command, `run-job` on the shipped example config and job (it passes),
/// in a scratch named `name`.
struct PassingRunJob {
    s: Scratch,
    rundir: PathBuf,
    /// The job's id: the run directory's name.
    id: String,
    /// What run-job printed.
    printed: String,
}

fn passing_run_job(name: &str) -> PassingRunJob {
    let s = Scratch::new(name);
    let (rundir, printed) = run_example(&s, "examples/agent.yaml", "examples/job.yaml", 0);
    let id = rundir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .expect("the run directory is named after the job");
    PassingRunJob {
        s,
        rundir,
        id,
        printed,
    }
}

/// The phase column of `explain`'s table rows, in order (the first row, the job taken,
/// has none).
fn table_phases(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(2)
        .filter_map(|line| line.split_whitespace().nth(4).map(str::to_owned))
        .collect()
}

/// The README's first command leaves a run directory `explain` reads: the phases in order,
/// each with how it ended; the same trail is kept under `<logging_basedir>/trails/`.
#[test]
fn explain_reads_the_run_directory_of_a_passing_run_job() {
    let PassingRunJob {
        s,
        rundir,
        id,
        printed,
    } = passing_run_job("explain-runjob-pass");
    assert!(
        printed.ends_with(&format!(
            "run directory: {d}\nthe job's path: testflinger-agent explain {d}\n",
            d = rundir.display()
        )),
        "the summary says where to look next:\n{printed}"
    );
    let dot = explain(&rundir, "dot");
    assert_eq!(
        bold_pairs(&dot),
        edges(&[
            ("Polled", "Setup"),
            ("Setup", "Provisioned"),
            ("Provisioned", "FirmwareUpdated"),
            ("FirmwareUpdated", "Tested"),
            ("Tested", "Allocated"),
            ("Allocated", "Reserved"),
            ("Reserved", "Cleaned"),
        ]),
        "{dot}"
    );
    let table = explain(&rundir, "table");
    assert!(
        table.starts_with(&format!("job {id} (finished, last state Cleaned)\n")),
        "{table}"
    );
    assert_eq!(
        table_phases(&table),
        [
            "-",
            "setup",
            "provision",
            "firmware_update",
            "test",
            "allocate",
            "reserve",
            "cleanup"
        ],
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("allocate") && l.contains("skipped")),
        "a skipped phase says so:\n{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(" test ") && l.contains(" 0 ") && l.contains("exited")),
        "{table}"
    );
    // The kept copy is the same trail.
    assert_eq!(explain(&trail(&s, &id), "table"), table);
}

/// The failing example's provision exits 1: `explain` on its run directory shows setup,
/// the abort in provision with its exit code, then cleanup.
#[test]
fn explain_reads_the_run_directory_of_a_failed_provision() {
    let s = Scratch::new("explain-runjob-fail");
    let (rundir, _) = run_example(
        &s,
        "examples/failing/agent.yaml",
        "examples/failing/job-provision-fails.yaml",
        1,
    );
    let dot = explain(&rundir, "dot");
    assert_eq!(
        bold_pairs(&dot),
        edges(&[
            ("Polled", "Setup"),
            ("Setup", "Aborted"),
            ("Aborted", "Cleaned")
        ]),
        "{dot}"
    );
    let table = explain(&rundir, "table");
    assert!(
        table.contains("(finished, last state Cleaned; aborted: exit (provision))"),
        "{table}"
    );
    assert_eq!(
        table_phases(&table),
        ["-", "setup", "provision", "cleanup"],
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.contains("Setup")
            && l.contains("Aborted")
            && l.contains("provision")
            && l.contains(" 1 ")),
        "the abort row has the phase and its exit code:\n{table}"
    );
}

/// `explain` on a directory with no trail exits 2 and says where trails are kept and which
/// it found: the config's trails directory with `-c`, the default one without, and the
/// job's own kept trail when the directory is a run directory whose journal is gone.
#[test]
fn explain_without_a_trail_says_where_trails_are_kept() {
    let PassingRunJob { s, rundir, id, .. } = passing_run_job("explain-none");
    let config = s.path("agent.yaml");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(BIN)
            .arg("explain")
            .args(args)
            .output()
            .expect("explain runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let empty = s.path("empty");
    std::fs::create_dir(&empty).expect("empty dir");
    let trails_dir = s.path("logs").join("trails");

    let (code, stdout, stderr) = run(&["-c".as_ref(), config.as_os_str(), empty.as_os_str()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("no journal .agent-journal.json"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "Kept trails: 1 in {} (logging_basedir of {})",
            trails_dir.display(),
            config.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&trail(&s, &id).display().to_string()),
        "the newest trails are named:\n{stderr}"
    );
    assert!(!stderr.contains("This job's trail"), "{stderr}");
    assert!(
        stderr.contains("<logging_basedir>/healthchecks/"),
        "where health checks keep their trails:\n{stderr}"
    );

    // Without -c: the default logging_basedir's trails directory is named.
    let (code, _, stderr) = run(&[empty.as_os_str()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("/tmp/testflinger/logs/trails (the default logging_basedir"),
        "{stderr}"
    );

    // A run directory whose journal is gone: its own kept trail is pointed at, and works.
    std::fs::remove_file(rundir.join(".agent-journal.json")).expect("journal");
    let (code, _, stderr) = run(&["-c".as_ref(), config.as_os_str(), rundir.as_os_str()]);
    assert_eq!(code, Some(2), "{stderr}");
    let hint = format!(
        "This job's trail is kept: testflinger-agent explain {}",
        trail(&s, &id).display()
    );
    assert!(stderr.contains(&hint), "{stderr}");
    assert!(explain(&trail(&s, &id), "table").contains("finished"));

    // A config that cannot be used is said so, still with a non-zero exit.
    let bad = s.write("bad.yaml", "agent_id: [\n");
    let (code, _, stderr) = run(&["-c".as_ref(), bad.as_os_str(), empty.as_os_str()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("bad.yaml"), "{stderr}");
}
