//! An idle agent through server outages and a server that hangs (issue 15): it is never
//! silent, its next successful request comes at the back-off step that was due, and
//! `/health` names a request the server does not answer.
//!
//! The agent polls every second, so its back-off steps are 1, 2, 4 and 8 s (then 8 s
//! again); a probe while the server gives no answer lasts at most its step (at least 2 s).
//! The bounds below add [`SLACK`] for a loaded 2-core machine; the exact figures are
//! measured by `cargo bench --bench outage`.

use crate::support::agent::{finished, queue, wait_for, Agent};
use crate::support::fake_server::FakeServer;
use crate::support::loopback::{free_port, http_get};
use crate::support::scratch::Scratch;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// The longest back-off step with `polling_interval: 1`.
const MAX_STEP: Duration = Duration::from_secs(8);
/// What a loaded machine may add to any bound here.
const SLACK: Duration = Duration::from_secs(6);
/// How long a request may wait before the agent says so (`polling_interval` is 1 s).
const CALL_STALL: Duration = Duration::from_secs(30);

/// When the first request after `after` was answered (any status below 500), waiting at
/// most `limit` for it.
fn next_answered(server: &FakeServer, after: Instant, limit: Duration) -> Option<Instant> {
    let mut found = None;
    server.wait_until(limit, |srv| {
        found = srv
            .requests()
            .iter()
            .find(|r| r.at > after && r.status != 0 && r.status < 500)
            .map(|r| r.at);
        found.is_some()
    });
    found
}

/// Lines of the agent's log that contain `needle`.
fn log_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits until the agent polls (it is up and idle).
fn wait_idle(server: &FakeServer) {
    wait_for(server, "the agent to poll", |srv| {
        srv.requests().iter().any(|r| r.path == "/v1/job")
    });
}

/// Takes the server down for `outage`, brings it back, and returns how long the agent
/// took to make its next answered request.
fn outage(server: &FakeServer, outage: Duration) -> Duration {
    server.go_down();
    std::thread::sleep(outage);
    server.come_back();
    let back = Instant::now();
    let next = next_answered(server, back, MAX_STEP + SLACK + SLACK)
        .expect("the agent asks the server again after the outage");
    next.saturating_duration_since(back)
}

/// A job still runs after the outages: nothing is left broken.
fn a_job_completes(server: &FakeServer, name: &str) {
    let id = server.submit_job(json!({"job_queue": queue(name), "test_data": {"test_cmds": "x"}}));
    wait_for(server, "a job after the outage to complete", |srv| {
        finished(srv, &id)
    });
    assert_eq!(server.result_data(&id)["status"]["test"], 0);
}

#[test]
fn outages_of_0_4_and_5_seconds_end_at_the_step_that_was_due_and_are_logged() {
    let server = FakeServer::start();
    let s = Scratch::new("outage-short");
    let name = format!("outage-short-{}", std::process::id());
    let agent = Agent::start(&server, &s, &name, "test_command: echo ran\n");
    let log = agent.log.clone().expect("the agent's log");
    wait_idle(&server);

    let short = outage(&server, Duration::from_millis(400));
    assert!(
        short <= Duration::from_secs(2) + SLACK,
        "after a 0.4 s outage the agent asked again {short:?} after the server came back"
    );
    let long = outage(&server, Duration::from_secs(5));
    assert!(
        long <= Duration::from_secs(4) + SLACK,
        "after a 5 s outage the agent asked again {long:?} after the server came back"
    );
    // Said as an outage (a call gave up, the next ones probe), or, when one call's retries
    // outlasted it (a loaded machine stretches them), as a call answered after failures.
    let absorbed = log_lines(&log, "failed attempt(s) in");
    assert!(
        log_lines(&log, "the server does not answer") >= 1 || absorbed >= 1,
        "the outage is in the agent's log"
    );
    if absorbed == 0 {
        wait_for(&server, "the end of the outage in the agent's log", |_| {
            log_lines(&log, "the server answers again") >= 1
        });
    }
    a_job_completes(&server, &name);
}

#[test]
fn a_sixty_second_outage_is_logged_all_along_and_ends_at_the_step_that_was_due() {
    let server = FakeServer::start();
    let s = Scratch::new("outage-long");
    let name = format!("outage-long-{}", std::process::id());
    let agent = Agent::start(&server, &s, &name, "test_command: echo ran\n");
    let log = agent.log.clone().expect("the agent's log");
    wait_idle(&server);

    let latency = outage(&server, Duration::from_secs(60));
    assert!(
        latency <= MAX_STEP + SLACK,
        "after a 60 s outage the agent asked again {latency:?} after the server came back"
    );
    // One line a step at least: 1 + 2 + 4 + 8 × 6 s.
    let said = log_lines(&log, "the server does not answer");
    assert!(said >= 6, "{said} lines about the outage in 60 s");
    a_job_completes(&server, &name);
}

/// The server accepts connections and reads requests, and answers nothing for 60 s. The
/// agent says so within [`CALL_STALL`] (before: it retried each 30 s wait five times at
/// debug level and wrote nothing for minutes), keeps saying so, and asks again within a
/// step of the server answering (before: up to 30 s, waiting on a swallowed request).
#[test]
fn a_server_that_accepts_and_never_answers_for_sixty_seconds() {
    let server = FakeServer::start();
    let s = Scratch::new("outage-hang");
    let name = format!("outage-hang-{}", std::process::id());
    let agent = Agent::start(&server, &s, &name, "test_command: echo ran\n");
    let log = agent.log.clone().expect("the agent's log");
    wait_idle(&server);

    let before =
        log_lines(&log, "the server does not answer") + log_lines(&log, "still waiting for");
    server.swallow(true);
    let hung = Instant::now();
    let mut first_said = None;
    while hung.elapsed() < Duration::from_secs(60) {
        if first_said.is_none()
            && log_lines(&log, "the server does not answer") + log_lines(&log, "still waiting for")
                > before
        {
            first_said = Some(hung.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let first_said = first_said.expect("the agent said something in 60 s of a hung server");
    assert!(
        first_said <= CALL_STALL + SLACK,
        "the first line about the hung server came after {first_said:?}"
    );
    let said = log_lines(&log, "the server does not answer");
    assert!(said >= 3, "{said} lines about the hung server in 60 s");
    assert!(server.swallowed() >= 2, "the agent kept asking");
    server.swallow(false);
    let back = Instant::now();
    let next = next_answered(&server, back, MAX_STEP + SLACK + SLACK)
        .expect("the agent asks the server again after it answers");
    let latency = next.saturating_duration_since(back);
    assert!(
        latency <= MAX_STEP + SLACK,
        "the agent asked again {latency:?} after the server answered again"
    );
    a_job_completes(&server, &name);
}

/// `GET /health` on the agent's metrics port: status and body.
fn health(port: u16) -> Option<(u16, serde_json::Value)> {
    let (status, body) = http_get(port, "/health")?;
    Some((status, serde_json::from_str(&body).ok()?))
}

/// A job whose server stops answering mid-phase: a request that waits past the limit is
/// logged once by name, `/health` says `stalled` and names the oldest request in flight,
/// and once the server answers again the job completes with all its output.
#[test]
fn a_request_waiting_past_the_limit_is_logged_and_named_on_health() {
    let server = FakeServer::start();
    let s = Scratch::new("outage-health");
    let name = format!("outage-health-{}", std::process::id());
    let port = free_port();
    let commands = "test_command: |\n  echo first\n  sleep 2\n  i=0; while [ $i -lt 50 ]; do echo \"line $i\"; i=$((i+1)); sleep 0.1; done\n";
    let agent = Agent::start_with(&server, &s, &name, commands, &["-p", &port.to_string()]);
    let log = agent.log.clone().expect("the agent's log");
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test phase to start", |srv| {
        srv.log_text(&id, "output").contains("first")
    });
    let (status, body) = health(port).expect("/health answers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok", "{body}");

    server.swallow(true);
    let hung = Instant::now();
    let mut stalled = None;
    while hung.elapsed() < CALL_STALL + SLACK + SLACK && stalled.is_none() {
        if let Some((503, body)) = health(port) {
            stalled = Some(body);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let body = stalled.expect("/health says stalled while a request waits past the limit");
    assert_eq!(body["status"], "stalled", "{body}");
    let waiting_for = body["waiting_for"].as_str().unwrap_or_default().to_owned();
    assert!(
        waiting_for.contains(&format!("/v1/result/{id}")) || waiting_for.contains("/v1/"),
        "names the request: {body}"
    );
    assert!(
        body["waiting_seconds"].as_f64().unwrap_or_default() >= CALL_STALL.as_secs_f64(),
        "{body}"
    );
    wait_for(&server, "the agent to log the waiting request", |_| {
        log_lines(&log, "still waiting for") >= 1
    });
    server.swallow(false);
    wait_for(&server, "the job to complete", |srv| finished(srv, &id));
    let output = server.log_text(&id, "output");
    for i in 0..50 {
        assert_eq!(
            output.matches(&format!("line {i}\n")).count(),
            1,
            "line {i} once:\n{output}"
        );
    }
    wait_for(&server, "/health to be ok again", |_| {
        health(port).is_some_and(|(status, _)| status == 200)
    });
}
