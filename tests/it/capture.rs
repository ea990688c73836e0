//! How a phase's output reaches `<phase>.log`, through the real binary. In the daemon and
//! in `run-job`, a command without secrets writes the log itself and the agent follows the
//! file (the daemon's streamer reads the live output back from it, `run-job` copies it to
//! standard output); with secrets, the output comes through a pipe and the masker. Either
//! way the log and the server (or the terminal) get every byte in order, the output
//! timeout holds, and background processes are told apart by whether they still hold
//! the output.

use crate::run_job::{run_job, text};
use crate::support::agent::{finished, queue, wait_for, Agent};
use crate::support::fake_server::FakeServer;
use crate::support::scratch::{KillByMarker, Scratch};
use serde_json::json;
use std::process::Command;

/// Where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn yaml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// Runs one job with `test_command` (and `extra` config lines) on a daemon against the
/// fake server, whose secret store holds `secrets` (path, value); returns the server, the
/// job id and the daemon.
fn daemon_job(
    s: &Scratch,
    name: &str,
    test_command: &str,
    extra: &str,
    job: serde_json::Value,
    secrets: &[(&str, &str)],
) -> (FakeServer, String, Agent) {
    let server = FakeServer::start();
    for (path, value) in secrets {
        server.add_secret(path, value);
    }
    let config = format!("{extra}test_command: {}\n", yaml_string(test_command));
    let agent = Agent::start(&server, s, name, &config);
    let id = server.submit_job(job);
    wait_for(&server, "the job's outcome", |srv| finished(srv, &id));
    (server, id, agent)
}

fn plain_job(name: &str) -> serde_json::Value {
    json!({"job_queue": queue(name), "test_data": {"test_cmds": "x"}})
}

/// The first line of the test phase's output that starts with `prefix`.
fn line_starting<'a>(output: &'a str, prefix: &str) -> &'a str {
    output
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{output}"))
}

/// Two megabytes of random bytes in base64 lines, written in pieces by two writers in
/// turn and ending without a newline, reach the log and the server exactly once and in
/// order, after the banner; the command's standard output is the log file itself.
#[test]
fn in_the_daemon_a_command_without_secrets_writes_its_log_itself() {
    let s = Scratch::new("capture-direct");
    let reference = s.path("reference.txt");
    let made = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 1500000 /dev/urandom | base64 -w 100 > {r} && printf 'last line, no newline' >> {r}",
            r = reference.display()
        ))
        .status()
        .expect("sh runs");
    assert!(made.success());
    let expected = std::fs::read_to_string(&reference).expect("the reference text");
    let name = format!("capture-direct-{}", std::process::id());
    let command = format!(
        "echo \"stdout is $(readlink /proc/$$/fd/1)\"\nhead -c 1000000 {r}\ntail -c +1000001 {r} | head -c 500000 >&2\ntail -c +1500001 {r}",
        r = reference.display()
    );
    let (server, id, _agent) = daemon_job(&s, &name, &command, "", plain_job(&name), &[]);
    assert_eq!(server.result_data(&id)["status"]["test"], json!(0));
    let output = server.log_text(&id, "output");
    let banner = output
        .find("* Starting testflinger test phase on")
        .expect("the banner");
    let first = output.find("stdout is ").expect("the command's first line");
    assert!(banner < first, "the banner comes first");
    assert!(
        line_starting(&output, "stdout is ").ends_with("/test.log"),
        "the command writes the log itself: {}",
        line_starting(&output, "stdout is ")
    );
    let start = output.find(&expected).expect("every byte, in order");
    assert_eq!(
        output[start + expected.len()..].find(&expected[..200]),
        None,
        "nothing twice"
    );
}

/// With a secret in the job, the daemon's output comes through a pipe, and is masked.
#[test]
fn with_secrets_the_output_comes_through_a_pipe_and_is_masked() {
    let s = Scratch::new("capture-pipe");
    let name = format!("capture-pipe-{}", std::process::id());
    let job = json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x", "secrets": {"API_TOKEN": "capture/api-token"}}});
    let (server, id, _agent) = daemon_job(
        &s,
        &name,
        "echo \"stdout is $(readlink /proc/$$/fd/1)\"; echo \"secret=$API_TOKEN\"",
        "",
        job,
        &[("capture/api-token", "hunter2-s3cret")],
    );
    let output = server.log_text(&id, "output");
    assert!(
        line_starting(&output, "stdout is ").starts_with("stdout is pipe:["),
        "{output}"
    );
    assert!(
        output.contains("secret=**") && !output.contains("hunter2"),
        "{output}"
    );
}

/// `run-job`'s command, without secrets, writes its log itself too, and what it wrote is
/// copied from the log to standard output: both get every byte, exactly (not UTF-8, no
/// newline at the end). (tests/it/run_job.rs has the terminal, `/dev/null` and the secret.)
#[test]
fn run_job_lets_the_command_write_its_log_and_prints_it_from_there() {
    let s = Scratch::new("capture-run-job");
    let config = s.config(
        "agent_id: it-capture\nserver_address: http://127.0.0.1:9\njob_queues: [q]\n\
test_command: |\n  echo \"stdout is $(readlink /proc/$$/fd/1)\"\n  printf 'raw \\377\\376 end'\n",
    );
    let job = s.write("job.yaml", "job_queue: q\ntest_data: {test_cmds: x}\n");
    let out = run_job(&config, &job);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log = std::fs::read(s.rundir().join("test.log")).expect("test log");
    let line = find(&log, b"stdout is ").expect("the command's first line");
    assert!(
        find(&log[line..], b"/test.log\n").is_some(),
        "{}",
        text(&log)
    );
    assert!(log.ends_with(b"raw \xff\xfe end"), "bytes kept exactly");
    assert!(
        find(&out.stdout, &log).is_some(),
        "and printed, the whole log at once: {}",
        text(&out.stdout)
    );
}

/// A command that prints a line a second stays within an output timeout of 3 s; once it
/// falls silent, the timeout ends it (247). The server has every line and the agent's.
#[test]
fn the_output_timeout_counts_from_the_last_write_into_the_file() {
    let s = Scratch::new("capture-timeout");
    let marker = s.marker();
    let guard = KillByMarker::new(&marker);
    let name = format!("capture-timeout-{}", std::process::id());
    let job =
        json!({"job_queue": queue(&name), "output_timeout": 3, "test_data": {"test_cmds": "x"}});
    let (server, id, _agent) = daemon_job(
        &s,
        &name,
        &format!("for i in 1 2 3 4 5 6; do echo line $i; sleep 1; done; sleep 1000.{marker}1"),
        "",
        job,
        &[],
    );
    let output = server.log_text(&id, "output");
    assert_eq!(
        server.result_data(&id)["status"]["test"],
        json!(247),
        "{output}"
    );
    for i in 1..=6 {
        assert!(
            output.contains(&format!("line {i}\n")),
            "line {i}:\n{output}"
        );
    }
    assert!(
        output.contains("line 6\n\nERROR: Output timeout reached! (3s)\n"),
        "{output}"
    );
    assert!(guard.living().is_empty(), "the silent tree is gone");
}

/// After the shell exits, a background process that still holds the output may finish
/// writing (within `straggler_wait_ms`); one that let go of the output is killed at once.
#[test]
fn background_processes_are_told_apart_by_whether_they_hold_the_output() {
    let s = Scratch::new("capture-holders");
    let marker = s.marker();
    let guard = KillByMarker::new(&marker);
    let name = format!("capture-holders-{}", std::process::id());
    let (server, id, agent) = daemon_job(
        &s,
        &name,
        "( sleep 1; echo late line ) &\necho shell done",
        "straggler_wait_ms: 60000\n",
        plain_job(&name),
        &[],
    );
    let output = server.log_text(&id, "output");
    assert!(
        output.contains("shell done\nlate line\n") && !output.contains("WARNING"),
        "the holder's last line is kept and nothing was killed:\n{output}"
    );
    drop(agent);
    drop(server);

    let name = format!("capture-let-go-{}", std::process::id());
    let (server, id, _agent) = daemon_job(
        &s,
        &name,
        &format!("sleep 1000.{marker}1 > /dev/null 2>&1 &\necho shell done"),
        "straggler_wait_ms: 60000\n",
        plain_job(&name),
        &[],
    );
    let output = server.log_text(&id, "output");
    assert!(
        output.contains("shell done\n\nWARNING: 1 background process still running after the command exited; killed it.\n"),
        "{output}"
    );
    assert!(guard.living().is_empty(), "the background process is gone");
}
