//! What the daemon asks of the server while nothing happens: an idle cycle is one
//! agent-record read and one poll, the server's name is looked up once, and a phase that
//! prints nothing only reads its job's state, without a token and without renewing one,
//! however short-lived the tokens are (PROTOCOL §1.3: any role, and an anonymous caller
//! while OIDC is off, may read a job's state). Counted on the fake server; no timings.

use crate::support::agent::{cancel_and_wait_for_cleanup, finished, queue, wait_for, Agent};
use crate::support::fake_server::{FakeConfig, FakeServer, RequestRecord, Route};
use crate::support::scratch::Scratch;
use serde_json::json;
use std::time::{Duration, Instant};

fn routes(requests: &[RequestRecord]) -> Vec<Option<Route>> {
    requests.iter().map(|r| r.route.clone()).collect()
}

fn refused(server: &FakeServer) -> Vec<String> {
    server
        .requests()
        .iter()
        .filter(|r| r.status == 401)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[test]
fn an_idle_cycle_is_two_requests_and_the_server_name_is_looked_up_once() {
    let server = FakeServer::start();
    let s = Scratch::new("idle-cycle");
    let name = format!("idle-cycle-{}", std::process::id());
    // A name to resolve, not an address literal.
    let commands = format!("server_address: http://localhost:{}\n", server.port());
    let mut agent = Agent::start(&server, &s, &name, &commands);
    wait_for(&server, "three polling cycles", |srv| {
        srv.request_count(&Route::JobPoll) >= 3
    });
    let start = server.requests().len();
    wait_for(&server, "six more polling cycles", |srv| {
        srv.request_count(&Route::JobPoll) >= 9
    });
    let requests = server.requests();
    let polls: Vec<usize> = requests
        .iter()
        .enumerate()
        .filter(|(i, r)| *i >= start && r.route == Some(Route::JobPoll))
        .map(|(i, _)| i)
        .collect();
    // From just after one poll to the sixth poll after it: five whole cycles.
    let cycles = &requests[polls[0] + 1..=polls[5]];
    let five_cycles: Vec<Option<Route>> = (0..5)
        .flat_map(|_| [Some(Route::AgentDataGet), Some(Route::JobPoll)])
        .collect();
    assert_eq!(routes(cycles), five_cycles, "five idle cycles");
    assert!(
        server.connections_accepted() <= 2,
        "one connection serves the cycles ({} accepted)",
        server.connections_accepted()
    );
    let stderr = std::fs::read_to_string(Agent::stderr_path(&s, &name)).expect("agent log");
    let lookups = stderr.matches("resolved localhost:").count();
    assert_eq!(lookups, 1, "look-ups of the server's name:\n{stderr}");
    assert_eq!(agent.stop(), Some(0));
}

#[test]
fn a_silent_phase_only_reads_the_job_state_and_never_renews_short_tokens() {
    let server = FakeServer::start_with(FakeConfig {
        access_token_ttl: Duration::from_secs(2),
        ..Default::default()
    });
    let s = Scratch::new("idle-silent");
    let name = format!("idle-silent-{}", std::process::id());
    let commands = "test_command: |\n  echo before\n  sleep 8\n  echo after\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test to print", |srv| {
        srv.log_text(&id, "output").contains("before")
    });
    // Four seconds in the middle of the silence: the tokens issued before it have expired
    // by their end.
    std::thread::sleep(Duration::from_millis(500));
    let from = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let to = Instant::now();
    let silent: Vec<RequestRecord> = server
        .requests()
        .into_iter()
        .filter(|r| r.at >= from && r.at < to)
        .collect();
    assert!(
        silent.len() >= 2,
        "the job state was read during the phase (cancel_check_interval 1 s): {:?}",
        routes(&silent)
    );
    for r in &silent {
        assert_eq!(
            r.route,
            Some(Route::ResultStatusGet),
            "{} {}",
            r.method,
            r.path
        );
        assert_eq!(r.status, 200, "{} {}", r.method, r.path);
    }
    let late: Vec<&RequestRecord> = silent
        .iter()
        .filter(|r| r.at >= from + Duration::from_secs(2))
        .collect();
    assert!(
        late.iter().all(|r| !r.authorization),
        "state reads after the last token expired go without one"
    );
    // After the silence the agent needs a token again: renewed before it is refused.
    wait_for(&server, "the job to complete", |srv| finished(srv, &id));
    assert!(server.log_text(&id, "output").contains("after"));
    assert_eq!(refused(&server), Vec::<String>::new());
    let refreshes_after = server
        .requests()
        .iter()
        .filter(|r| r.at >= to && r.route == Some(Route::Refresh))
        .count();
    assert!(refreshes_after >= 1, "a token was renewed for the report");
}

#[test]
fn with_oidc_on_a_refused_tokenless_read_makes_every_later_read_carry_a_token() {
    let server = FakeServer::start_with(FakeConfig {
        oidc_enabled: true,
        ..Default::default()
    });
    let s = Scratch::new("idle-oidc");
    let name = format!("idle-oidc-{}", std::process::id());
    let commands =
        "test_command: |\n  echo started\n  sleep 60\ncleanup_command: echo cleanup ran\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test to start", |srv| {
        srv.log_text(&id, "output").contains("started")
    });
    cancel_and_wait_for_cleanup(&server, &id);
    assert_eq!(server.job_state(&id).as_deref(), Some("cancelled"));
    let requests = server.requests();
    let refusals: Vec<&RequestRecord> = requests.iter().filter(|r| r.status == 401).collect();
    assert_eq!(
        refusals.len(),
        1,
        "one refusal teaches the agent: {:?}",
        refusals
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
    assert!(!refusals[0].authorization);
    let reads: Vec<&RequestRecord> = requests
        .iter()
        .filter(|r| matches!(r.route, Some(Route::ResultStatusGet)))
        .collect();
    assert!(!reads.is_empty());
    assert!(
        reads.iter().all(|r| r.authorization && r.status == 200),
        "job-state reads carry a token"
    );
}
