//! The device health check (issue 18), through the real binary: the one-shot
//! `testflinger-agent healthcheck` (its exit status, its log, its lock, a hanging check
//! killed with its tree) and the daemon's checks against the fake server (after failing
//! provisions, after exit 46, the idle interval, at start-up, the agent's own maintenance
//! and an administrator's).

use crate::support::agent::{finished, queue, wait_for, Agent, BIN, WAIT};
use crate::support::fake_server::{FakeServer, Route};
use crate::support::loopback::http_get;
use crate::support::scratch::{KillByMarker, Scratch};
use serde_json::json;
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
    run_bin(&["healthcheck".as_ref(), "-c".as_ref(), config.as_os_str()])
}

/// The binary run to its end with `args`.
fn run_bin(args: &[&std::ffi::OsStr]) -> OneShot {
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(args)
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

// ----- The daemon's checks, against the fake server -----

/// The agent's record on the server: state and comment.
fn record(server: &FakeServer, name: &str) -> (String, String) {
    let record = server.agent_record(name).unwrap_or_default();
    let text = |key: &str| {
        record
            .get(key)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    (text("state"), text("comment"))
}

/// A check command that passes once `flag` exists, and says why not until then.
fn flag_check(flag: &Path) -> String {
    format!(
        "healthcheck_command: \"test -e {} || {{ echo 'serial console silent'; exit 1; }}\"\n",
        flag.display()
    )
}

/// A job whose provision runs (it has provision data).
fn provisioned_job(name: &str) -> serde_json::Value {
    json!({"job_queue": queue(name), "provision_data": {"url": "x"}, "test_data": {"test_cmds": "x"}})
}

/// Whether `id` stays unclaimed (`waiting` on the server) for `watch`.
fn stays_unclaimed(server: &FakeServer, id: &str, watch: Duration) -> bool {
    !server.wait_until(watch, |srv| srv.job_state(id).as_deref() != Some("waiting"))
}

#[test]
fn three_failed_provisions_lead_to_a_failing_check_then_a_pass_releases_the_agent() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-streak");
    let name = format!("hc-streak-{}", std::process::id());
    let flag = s.path("device-ok");
    let commands = format!(
        "provision_command: echo provisioning; exit 1\ntest_command: echo ran\n{}healthcheck_retry_interval: 1\n",
        flag_check(&flag)
    );
    let _agent = Agent::start(&server, &s, &name, &commands);
    for _ in 0..2 {
        let id = server.submit_job(provisioned_job(&name));
        wait_for(&server, "a failed provision, then waiting", |srv| {
            finished(srv, &id) && record(srv, &name).0 == "waiting"
        });
    }
    assert!(check_logs(&s).is_empty(), "no check after two failures");
    let id = server.submit_job(provisioned_job(&name));
    wait_for(&server, "the third failed provision", |srv| {
        finished(srv, &id)
    });
    wait_for(&server, "the agent's own maintenance", |srv| {
        record(srv, &name).0 == "maintenance"
    });
    let (_, comment) = record(&server, &name);
    assert!(
        comment.starts_with("health check failed at ")
            && comment.ends_with(": serial console silent"),
        "{comment}"
    );
    let waiting = server.submit_job(provisioned_job(&name));
    assert!(
        stays_unclaimed(&server, &waiting, Duration::from_secs(4)),
        "a job waits while the check fails"
    );
    assert!(check_logs(&s).len() >= 2, "the check was retried");
    std::fs::write(&flag, b"").expect("flip the flag");
    wait_for(&server, "the job taken once the check passes", |srv| {
        srv.job_state(&waiting).as_deref() != Some("waiting")
    });
    let states: Vec<String> = server
        .agent_posts(&name)
        .iter()
        .filter_map(|p| Some(p.get("state")?.as_str()?.to_owned()))
        .collect();
    let held = states
        .iter()
        .rposition(|s| s == "maintenance")
        .expect("maintenance posted");
    assert!(
        states[held..].iter().any(|s| s == "waiting"),
        "waiting posted after the pass: {states:?}"
    );
}

#[test]
fn exit_46_with_a_check_lets_the_check_decide() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-46");
    let name = format!("hc-46-{}", std::process::id());
    let commands = "provision_command: exit 46\ntest_command: echo ran\nhealthcheck_command: echo device back\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(provisioned_job(&name));
    wait_for(&server, "the job that exits 46", |srv| finished(srv, &id));
    wait_for(&server, "a passing check after exit 46", |_| {
        !check_logs(&s).is_empty()
    });
    let next =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the next job taken", |srv| finished(srv, &next));
    let states: Vec<String> = server
        .agent_posts(&name)
        .iter()
        .filter_map(|p| Some(p.get("state")?.as_str()?.to_owned()))
        .collect();
    assert!(
        states.iter().any(|s| s == "offline"),
        "exit 46 posted offline: {states:?}"
    );
}

#[test]
fn exit_46_with_a_failing_check_holds_the_agent_in_its_own_maintenance() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-46f");
    let name = format!("hc-46f-{}", std::process::id());
    let commands = format!(
        "provision_command: exit 46\n{}",
        flag_check(&s.path("never"))
    );
    let _agent = Agent::start(&server, &s, &name, &commands);
    let id = server.submit_job(provisioned_job(&name));
    wait_for(&server, "the job that exits 46", |srv| finished(srv, &id));
    wait_for(&server, "the agent's own maintenance", |srv| {
        record(srv, &name).0 == "maintenance"
    });
    assert!(record(&server, &name)
        .1
        .starts_with("health check failed at "));
}

#[test]
fn exit_46_without_a_check_stays_offline() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-46n");
    let name = format!("hc-46n-{}", std::process::id());
    let _agent = Agent::start(&server, &s, &name, "provision_command: exit 46\n");
    let id = server.submit_job(provisioned_job(&name));
    wait_for(&server, "the job that exits 46", |srv| finished(srv, &id));
    let next =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    assert!(stays_unclaimed(&server, &next, Duration::from_secs(4)));
    assert_eq!(record(&server, &name).0, "offline");
    assert!(check_logs(&s).is_empty());
}

#[test]
fn a_passing_check_never_lifts_an_administrators_maintenance() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-admin");
    let name = format!("hc-admin-{}", std::process::id());
    let flag = s.path("device-ok");
    let commands = format!(
        "{}healthcheck_on_start: true\nhealthcheck_retry_interval: 1\n",
        flag_check(&flag)
    );
    let _agent = Agent::start(&server, &s, &name, &commands);
    wait_for(&server, "the agent's own maintenance", |srv| {
        record(srv, &name).0 == "maintenance"
    });
    server.set_agent_state(&name, "maintenance", "fan replacement");
    std::fs::write(&flag, b"").expect("flip the flag");
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    assert!(stays_unclaimed(&server, &id, Duration::from_secs(5)));
    assert_eq!(
        record(&server, &name),
        ("maintenance".to_owned(), "fan replacement".to_owned())
    );
}

#[test]
fn an_administrator_lifting_the_agents_hold_wins() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-lift");
    let name = format!("hc-lift-{}", std::process::id());
    // The check keeps failing, and its retry is far away.
    let commands = format!(
        "{}healthcheck_on_start: true\nhealthcheck_retry_interval: 3600\ntest_command: echo ran\n",
        flag_check(&s.path("never"))
    );
    let _agent = Agent::start(&server, &s, &name, &commands);
    wait_for(&server, "the agent's own maintenance", |srv| {
        record(srv, &name).0 == "maintenance"
    });
    server.set_agent_state(&name, "waiting", "");
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the job taken", |srv| finished(srv, &id));
    assert_eq!(check_logs(&s).len(), 1, "no check ran again");
}

#[test]
fn a_restart_while_held_by_its_own_check_checks_at_start_up() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-restart");
    let name = format!("hc-restart-{}", std::process::id());
    server.set_agent_state(
        &name,
        "maintenance",
        "health check failed at 2026-01-05T10:00:00.000000+00:00: serial console silent",
    );
    let _agent = Agent::start(
        &server,
        &s,
        &name,
        "healthcheck_command: echo fine\ntest_command: echo ran\n",
    );
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the job taken after the start-up check", |srv| {
        finished(srv, &id)
    });
    assert_eq!(check_logs(&s).len(), 1, "one check, at start-up");
}

#[test]
fn without_a_check_the_agents_old_maintenance_is_kept_like_an_administrators() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-restart-n");
    let name = format!("hc-restart-n-{}", std::process::id());
    let comment = "health check failed at 2026-01-05T10:00:00.000000+00:00: x";
    server.set_agent_state(&name, "maintenance", comment);
    let _agent = Agent::start(&server, &s, &name, "test_command: echo ran\n");
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    assert!(stays_unclaimed(&server, &id, Duration::from_secs(4)));
    assert_eq!(
        record(&server, &name),
        ("maintenance".to_owned(), comment.to_owned())
    );
}

/// The value of the sample `name{labels}` in a scrape, parsed as Prometheus text.
fn sample(port: u16, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    use openmetrics_parser::prometheus::parse_prometheus;
    use openmetrics_parser::PrometheusValue;
    let (_, body) = http_get(port, "/metrics")?;
    let exposition = parse_prometheus(&body).ok()?;
    let family = exposition.families.get(name)?;
    let found = family.iter_samples().find_map(|s| {
        if let Some((key, want)) = label {
            if s.get_labelset().ok()?.get_label_value(key)? != want {
                return None;
            }
        }
        match &s.value {
            PrometheusValue::Counter(c) => Some(c.value.as_f64()),
            PrometheusValue::Gauge(g) => Some(g.as_f64()),
            _ => None,
        }
    });
    found
}

#[test]
fn the_idle_interval_runs_the_check_and_metrics_and_health_show_it() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-idle");
    let name = format!("hc-idle-{}", std::process::id());
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port");
    let runs = s.path("runs");
    let commands = format!(
        "healthcheck_command: \"echo run >> {}; echo checked\"\nhealthcheck_interval: 1\nprovision_command: exit 1\ntest_command: echo ran\nhealthcheck_after_failures: 0\n",
        runs.display()
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let _agent = Agent::start_with(&server, &s, &name, &commands, &["-p", &port.to_string()]);
    // Declared from the first scrape, at zero.
    wait_for(&server, "the metrics endpoint", |_| {
        sample(
            port,
            "testflinger_agent_healthcheck_runs_total",
            Some(("result", "timeout")),
        ) == Some(0.0)
    });
    wait_for(&server, "two idle checks", |_| {
        std::fs::read_to_string(&runs).map_or(0, |t| t.lines().count()) >= 2
    });
    wait_for(&server, "the pass counted", |_| {
        sample(
            port,
            "testflinger_agent_healthcheck_runs_total",
            Some(("result", "pass")),
        )
        .is_some_and(|n| n >= 2.0)
    });
    let last = sample(
        port,
        "testflinger_agent_healthcheck_last_success_timestamp_seconds",
        None,
    )
    .expect("the last-success gauge");
    assert!(last >= started.floor(), "{last} against {started}");
    assert_eq!(
        sample(
            port,
            "testflinger_agent_healthcheck_runs_total",
            Some(("result", "fail"))
        ),
        Some(0.0)
    );
    let (status, body) = http_get(port, "/health").expect("/health answers");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        health["last_healthcheck"]["result"],
        json!("pass"),
        "{body}"
    );
    assert!(
        health["last_healthcheck"]["duration_seconds"].is_number(),
        "{body}"
    );
    assert!(
        health["last_healthcheck"]["at"]
            .as_str()
            .is_some_and(|a| a.len() > 20),
        "{body}"
    );
    // A failed provision counts; with healthcheck_after_failures 0 it calls no check.
    let id = server.submit_job(provisioned_job(&name));
    wait_for(&server, "the failed provision", |srv| finished(srv, &id));
    wait_for(&server, "the provision failure counted", |_| {
        sample(
            port,
            "testflinger_agent_consecutive_provision_failures",
            None,
        ) == Some(1.0)
    });
    // check-config reports the last check.
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(s.path("agent.yaml"))
        .output()
        .expect("check-config runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("# note    last health check at ") && text.contains(": pass in "),
        "{text}"
    );
}

#[test]
fn sigusr2_runs_a_check_at_the_next_idle_moment() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-usr2");
    let name = format!("hc-usr2-{}", std::process::id());
    let agent = Agent::start(&server, &s, &name, "healthcheck_command: echo on demand\n");
    wait_for(&server, "the first post", |srv| {
        !srv.agent_posts(&name).is_empty()
    });
    assert!(check_logs(&s).is_empty(), "no check before it is asked for");
    agent.signal(nix::sys::signal::Signal::SIGUSR2);
    wait_for(&server, "the check SIGUSR2 asked for", |_| {
        check_logs(&s).len() == 1
    });
}

#[test]
fn sigusr2_wakes_the_idle_pause_instead_of_waiting_for_the_polling_interval() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-usr2-wake");
    let name = format!("hc-usr2-wake-{}", std::process::id());
    let agent = Agent::start(
        &server,
        &s,
        &name,
        "polling_interval: 300\nhealthcheck_command: echo woken\n",
    );
    // After its first poll the agent sleeps for 300 s; a signal sent just before the sleep
    // starts must end it all the same.
    wait_for(&server, "the first job poll", |srv| {
        srv.request_count(&Route::JobPoll) >= 1
    });
    let asked = Instant::now();
    agent.signal(nix::sys::signal::Signal::SIGUSR2);
    let log_path = Agent::stderr_path(&s, &name);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // WAIT (60 s) is far below the polling interval: only a woken pause meets it.
    wait_for(&server, "the check SIGUSR2 asked for", |_| {
        log().contains("health check (asked by SIGUSR2): pass")
    });
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(60), "{took:?}");
    let log = log();
    assert!(
        log.contains("SIGUSR2: a health check is asked for; it runs at the next idle moment"),
        "{log}"
    );
    assert_eq!(check_logs(&s).len(), 1, "one check for one signal");
    // The cycle after the check polls again at once, then sleeps its interval.
    wait_for(&server, "the poll after the check", |srv| {
        srv.request_count(&Route::JobPoll) >= 2
    });
}

#[test]
fn sigterm_during_a_check_ends_it_like_a_phase_and_the_agent_exits_0() {
    let server = FakeServer::start();
    let s = Scratch::new("hc-term");
    let name = format!("hc-term-{}", std::process::id());
    let marker = s.marker();
    let killer = KillByMarker::new(&marker);
    let commands = format!(
        "healthcheck_command: \"sleep 1000.{marker}1 & sleep 1000.{marker}2\"\nhealthcheck_on_start: true\n"
    );
    let mut agent = Agent::start(&server, &s, &name, &commands);
    wait_for(&server, "the check's processes", |_| {
        killer.living().len() >= 2
    });
    assert_eq!(agent.stop(), Some(0), "exits as after a phase");
    assert_eq!(
        killer.living(),
        Vec::<i32>::new(),
        "the check's tree is gone"
    );
    assert_eq!(
        record(&server, &name).0,
        "waiting",
        "an interrupted check holds nothing"
    );
    let last = s.path("logs/healthchecks/last.json");
    assert!(!last.exists(), "an interrupted check is no result");
}

/// `explain` through the real binary.
fn explain(args: &[&std::ffi::OsStr]) -> OneShot {
    let mut all = vec!["explain".as_ref()];
    all.extend_from_slice(args);
    run_bin(&all)
}

/// The row of an explain table whose `to` column is `to`, split into its columns.
fn row<'a>(table: &'a str, to: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|line| {
            line.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.get(3) == Some(&to))
        .unwrap_or_else(|| panic!("no row to {to} in:\n{table}"))
}

#[test]
fn explain_shows_a_checks_trail_like_a_phase() {
    let s = Scratch::new("hc-explain");
    let name = format!("hc-explain-{}", std::process::id());
    let pass = check_config(&s, &name, "echo probing; echo device fine", "");
    assert_eq!(one_shot(&pass).code, Some(0));
    let hang = check_config(
        &s,
        &name,
        "echo waiting for the console; sleep 30",
        "healthcheck_timeout: 1\ntermination_grace_period: 1\n",
    );
    assert_eq!(one_shot(&hang).code, Some(1));
    let dir = s.path("logs/healthchecks");
    let mut trails: Vec<_> = std::fs::read_dir(&dir)
        .expect("the checks' directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".trail.json"))
        .collect();
    trails.sort();
    assert_eq!(trails.len(), 2, "one trail per check, beside its log");
    let logs = check_logs(&s);
    for (trail, log) in trails.iter().zip(&logs) {
        let stem = log.file_stem().expect("a log name").to_string_lossy();
        assert!(trail
            .to_string_lossy()
            .ends_with(&format!("{stem}.trail.json")));
    }

    // The passing check: started, then exited 0.
    let run = explain(&[trails[0].as_os_str()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let out = &run.stdout;
    assert!(
        out.contains("(asked on the command line): pass in "),
        "{out}"
    );
    assert!(out.contains("last output line: \"device fine\""), "{out}");
    assert!(
        out.contains(&format!("output: {}", logs[0].display())),
        "{out}"
    );
    let start = row(out, "Checking");
    assert_eq!(
        &start[4..],
        ["healthcheck", "check started", "-", "-"],
        "{out}"
    );
    let end = row(out, "Passed");
    assert_eq!(
        &end[2..],
        ["Checking", "Passed", "healthcheck", "exit", "0", "exited"],
        "{out}"
    );

    // The directory shows its newest check: the one killed at its timeout.
    let run = explain(&[dir.as_os_str()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let out = &run.stdout;
    assert!(
        run.stderr.contains("the newest of 2 health check trail(s)"),
        "{}",
        run.stderr
    );
    assert!(
        out.contains("(asked on the command line): timeout in 1."),
        "{out}"
    );
    assert!(
        out.contains("last output line: \"ERROR: Global timeout reached! (1s)\""),
        "{out}"
    );
    let end = row(out, "TimedOut");
    assert_eq!(
        &end[4..7],
        ["healthcheck", "global timeout", "247"],
        "{out}"
    );
    assert!(
        matches!(end[7], "SIGTERM honoured" | "SIGKILL needed"),
        "ended by the agent: {out}"
    );
    // The check's log leads to its trail too.
    let by_log = explain(&[logs[1].as_os_str()]);
    assert_eq!(by_log.stdout, run.stdout);

    // A check has no lifecycle to draw.
    let run = explain(&["--format".as_ref(), "dot".as_ref(), trails[1].as_os_str()]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("health check's trail"),
        "{}",
        run.stderr
    );
}
