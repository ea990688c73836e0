//! The device health check (issue 18), through the real binary: the one-shot
//! `testflinger-agent healthcheck` (its exit status, its log, its lock, a hanging check
//! killed with its tree) and the daemon's checks against the fake server (after failing
//! provisions, after exit 46, the idle interval, at start-up, the agent's own maintenance
//! and an administrator's).

use crate::support::agent::{wait_for, Agent, BIN, WAIT};
use crate::support::fake_server::FakeServer;
use crate::support::scratch::{KillByMarker, Scratch};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the one-shot command did.
struct OneShot {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn one_shot(config: &Path) -> OneShot {
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["healthcheck", "-c"])
        .arg(config)
        .output()
        .expect("the binary runs");
    OneShot {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// A config of agent `name` whose health check is `command` (plus `extra` lines).
fn check_config(s: &Scratch, name: &str, command: &str, extra: &str) -> std::path::PathBuf {
    s.config(&format!(
        "agent_id: {name}\nserver_address: http://127.0.0.1:9\njob_queues: [q]\nhealthcheck_command: {command:?}\n{extra}"
    ))
}

/// The check logs kept under `logs/healthchecks/`, sorted.
fn check_logs(s: &Scratch) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> = std::fs::read_dir(s.path("logs/healthchecks"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    logs
}

#[test]
fn one_shot_pass_and_fail_give_the_exit_status_and_keep_the_output_byte_exact() {
    let s = Scratch::new("hc-oneshot");
    let name = format!("hc-oneshot-{}", std::process::id());
    // The command sees the config's string values, like a phase command.
    let pass = check_config(
        &s,
        &name,
        "printf 'agent %s\\n\\001raw\\377\\nall good\\n' \"$agent_id\"",
        "",
    );
    let run = one_shot(&pass);
    assert_eq!(run.code, Some(0), "{} {}", run.stdout, run.stderr);
    assert!(run.stdout.contains("health check: pass"), "{}", run.stdout);
    assert!(run.stdout.contains("\"all good\""), "{}", run.stdout);
    let logs = check_logs(&s);
    assert_eq!(logs.len(), 1, "{logs:?}");
    let mut want = format!("agent {name}\n\x01raw").into_bytes();
    want.push(0xff);
    want.extend_from_slice(b"\nall good\n");
    assert_eq!(
        std::fs::read(&logs[0]).expect("check log"),
        want,
        "the log holds the output byte for byte"
    );
    let last = std::fs::read_to_string(s.path("logs/healthchecks/last.json")).expect("last.json");
    assert!(last.contains("\"result\":\"pass\""), "{last}");

    let fail = check_config(
        &s,
        &name,
        "echo checking; echo 'no serial console' >&2; exit 3",
        "",
    );
    let run = one_shot(&fail);
    assert_eq!(run.code, Some(1), "{} {}", run.stdout, run.stderr);
    assert!(run.stdout.contains("health check: fail"), "{}", run.stdout);
    assert!(run.stdout.contains("exit status 3"), "{}", run.stdout);
    assert!(
        run.stdout.contains("\"no serial console\""),
        "{}",
        run.stdout
    );
    assert_eq!(check_logs(&s).len(), 2);
    // The agent log has the summary line.
    let agent_log = std::fs::read_dir(s.path("logs"))
        .expect("logs")
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        agent_log.contains("health check (asked on the command line): fail"),
        "{agent_log}"
    );
}

#[test]
fn one_shot_without_a_check_or_with_a_bad_config_exits_2() {
    let s = Scratch::new("hc-nocheck");
    let config =
        s.config("agent_id: hc-none\nserver_address: http://127.0.0.1:9\njob_queues: [q]\n");
    let run = one_shot(&config);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("healthcheck_command"), "{}", run.stderr);
    let bad = s.write(
        "bad.yaml",
        "agent_id: x\nserver_address: y\njob_queues: [q]\nhealthcheck_timeout: soon\n",
    );
    let run = one_shot(&bad);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("healthcheck_timeout"), "{}", run.stderr);
}

#[test]
fn a_hanging_check_is_killed_at_its_timeout_with_its_tree() {
    let s = Scratch::new("hc-hang");
    let marker = s.marker();
    let killer = KillByMarker::new(&marker);
    // Both sleeps ignore SIGTERM (inherited): only the SIGKILL after the grace period ends
    // them; the background one would outlive a runner that killed only the shell.
    let command = format!(
        "trap '' TERM; echo started; sleep 1000.{marker}1 & sleep 1000.{marker}2; echo never"
    );
    let config = check_config(
        &s,
        "hc-hang",
        &command,
        "healthcheck_timeout: 2\ntermination_grace_period: 1\n",
    );
    let run = one_shot(&config);
    assert_eq!(run.code, Some(1), "{} {}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("health check: timeout"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("exit status 247"), "{}", run.stdout);
    assert!(
        run.took >= Duration::from_secs(2) && run.took < WAIT,
        "ended at the timeout, not before and not never: {:?}",
        run.took
    );
    assert_eq!(
        killer.living(),
        Vec::<i32>::new(),
        "no process of the check survives"
    );
}

#[test]
fn the_one_shot_refuses_while_the_daemon_holds_the_lock() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-lock");
    let name = format!("hc-lock-{}", std::process::id());
    let agent = Agent::start(
        &server,
        &s,
        &name,
        "healthcheck_command: echo ran-by-one-shot\n",
    );
    wait_for(&server, "the daemon's first post", |srv| {
        !srv.agent_posts(&name).is_empty()
    });
    let run = one_shot(&s.path("agent.yaml"));
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(&format!("(pid {})", agent.child.id())),
        "names the daemon's pid: {}",
        run.stderr
    );
    assert!(check_logs(&s).is_empty(), "the check did not run");
}
