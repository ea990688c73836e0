//! Direct capture through the real binary: without secrets to mask, a phase's command
//! writes `<phase>.log` itself and the agent follows the file; with secrets, the output
//! comes through a pipe. Either way the log and the terminal get every byte in order, the
//! output timeout holds, and background processes are told apart by whether they still
//! hold the output.

use crate::run_job::{run_job, text};
use crate::support::scratch::{KillByMarker, Scratch};
use std::process::Command;

/// Where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn agent_config(s: &Scratch, test_command: &str, extra: &str) -> std::path::PathBuf {
    s.config(&format!(
        "agent_id: it-capture\nserver_address: http://127.0.0.1:9\njob_queues: [q]\n{extra}test_command: |\n{}\n",
        test_command
            .lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ))
}

/// Three megabytes of random bytes (not UTF-8, no newline at the end), written in pieces by
/// two writers in turn, land in the log and on the terminal exactly once and in order,
/// after the banner; the command's standard output is the log file itself.
#[test]
fn without_secrets_the_command_writes_the_log_itself_byte_exact() {
    let s = Scratch::new("capture-direct");
    let reference = s.path("reference.bin");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 3000000 /dev/urandom > {}",
            reference.display()
        ))
        .status()
        .expect("sh runs");
    assert!(status.success());
    let expected = std::fs::read(&reference).expect("the reference bytes");
    let command = format!(
        "echo \"stdout is $(readlink /proc/$$/fd/1)\"\nhead -c 1000000 {r}\ntail -c +1000001 {r} | head -c 1000000 >&2\ntail -c +2000001 {r}",
        r = reference.display()
    );
    let config = agent_config(&s, &command, "");
    let job = s.write("job.yaml", "job_queue: q\ntest_data: {test_cmds: x}\n");
    let out = run_job(&config, &job);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log = std::fs::read(s.rundir().join("test.log")).expect("test log");
    let banner = find(&log, b"* Starting testflinger test phase on it-capture *")
        .expect("the banner is in the log");
    let line = find(&log, b"stdout is ").expect("the command's first line");
    assert!(banner < line, "the banner comes first");
    let first = &log[line..];
    let end = first
        .iter()
        .position(|&b| b == b'\n')
        .expect("a whole line");
    assert!(
        text(&first[..end]).ends_with("/test.log"),
        "the command writes the log itself: {}",
        text(&first[..end])
    );
    assert!(
        log.ends_with(&expected),
        "every byte, in order, at the end of the log"
    );
    assert_eq!(
        log.len() - expected.len(),
        line + end + 1,
        "nothing more and nothing twice"
    );
    let printed = find(&out.stdout, &expected).expect("the terminal got the same bytes");
    assert!(find(&out.stdout[..printed], b"/test.log").is_some());
}

/// With a secret in the job, the output comes through a pipe, and the secret is masked.
#[test]
fn with_secrets_the_output_comes_through_a_pipe_and_is_masked() {
    let s = Scratch::new("capture-pipe");
    let config = agent_config(
        &s,
        "echo \"stdout is $(readlink /proc/$$/fd/1)\"\necho \"secret=$API_TOKEN\"",
        "",
    );
    let job = s.write(
        "job.json",
        r#"{"job_queue": "q", "test_data": {"test_cmds": "x", "secrets": {"API_TOKEN": "hunter2-s3cret"}}}"#,
    );
    let out = run_job(&config, &job);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log = text(&std::fs::read(s.rundir().join("test.log")).expect("test log"));
    assert!(log.contains("stdout is pipe:["), "{log}");
    assert!(
        log.contains("secret=**") && !log.contains("hunter2"),
        "{log}"
    );
}

/// A command that prints a line a second stays within an output timeout of 3 s; once it
/// falls silent, the timeout ends it. The log has every line and the agent's line.
#[test]
fn the_output_timeout_counts_from_the_last_write_into_the_file() {
    let s = Scratch::new("capture-timeout");
    let marker = s.marker();
    let guard = KillByMarker::new(&marker);
    let config = agent_config(
        &s,
        &format!("for i in 1 2 3 4 5 6; do echo line $i; sleep 1; done\nsleep 1000.{marker}1"),
        "",
    );
    let job = s.write(
        "job.yaml",
        "job_queue: q\noutput_timeout: 3\ntest_data: {test_cmds: x}\n",
    );
    let out = run_job(&config, &job);
    let log = text(&std::fs::read(s.rundir().join("test.log")).expect("test log"));
    assert_eq!(out.status.code(), Some(1), "{log}");
    for i in 1..=6 {
        assert!(log.contains(&format!("line {i}\n")), "line {i}:\n{log}");
    }
    assert!(
        log.ends_with("line 6\n\nERROR: Output timeout reached! (3s)\n"),
        "{log}"
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
    let held = agent_config(
        &s,
        "( sleep 1; echo late line ) &\necho shell done",
        "straggler_wait_ms: 60000\n",
    );
    let job = s.write("job.yaml", "job_queue: q\ntest_data: {test_cmds: x}\n");
    let out = run_job(&held, &job);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log = text(&std::fs::read(s.rundir().join("test.log")).expect("test log"));
    assert!(
        log.ends_with("shell done\nlate line\n"),
        "the holder's last line is kept and nothing was killed:\n{log}"
    );

    let s = Scratch::new("capture-let-go");
    let let_go = agent_config(
        &s,
        &format!("sleep 1000.{marker}1 > /dev/null 2>&1 &\necho shell done"),
        "straggler_wait_ms: 60000\n",
    );
    let out = run_job(&let_go, &job);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log = text(&std::fs::read(s.rundir().join("test.log")).expect("test log"));
    assert!(
        log.contains("shell done\n\nWARNING: 1 background process still running after the command exited; killed it.\n"),
        "{log}"
    );
    assert!(guard.living().is_empty(), "the background process is gone");
}
