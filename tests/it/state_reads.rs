//! How the daemon reads its job's state (PROTOCOL §3.10, §15.1): through
//! `GET /v1/result/<id>/status` where the server has it, through the full
//! `GET /v1/result/<id>` where it answers 404, decided once per server and asked again after
//! an outage or a 404 where `/status` had answered; on a server without `/status`, when
//! every phase between test and cleanup is skipped, one read for them made beside the test
//! output's tail (not after it) and one after cleanup; a job cancelled in the last second of
//! its test phase, or during cleanup, still ends `cancelled`. Counted on the fake server
//! (each read with its kind and the log bytes it carried), through the real binary; no
//! timings.

use crate::support::agent::{finished, queue, wait_for, Agent};
use crate::support::fake_server::{FakeConfig, FakeServer, ReadKind, RequestRecord, Route};
use crate::support::scratch::Scratch;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The `job_state` posts the Python agent makes for a job that runs to its end, in its
/// order (the server derives job events from them).
const PYTHON_POSTS: [&str; 7] = [
    "setup",
    "provision",
    "firmware_update",
    "test",
    "allocate",
    "reserve",
    "complete",
];
/// Every phase has a command; a job with only `test_data` skips provision, firmware_update,
/// allocate and reserve (no data).
const COMMANDS: &str = "setup_command: echo setup ran\nprovision_command: echo provision ran\nfirmware_update_command: echo firmware ran\nallocate_command: echo allocate ran\nreserve_command: echo reserve ran\ncleanup_command: echo cleanup ran\n";

fn server_with_status(on: bool) -> FakeServer {
    FakeServer::start_with(FakeConfig {
        status_endpoint: on,
        ..Default::default()
    })
}

fn submit(server: &FakeServer, name: &str) -> String {
    server.submit_job(json!({"job_queue": queue(name), "test_data": {"test_cmds": "x"}}))
}

/// The agent's `POST /v1/result/<id>` bodies, with when they arrived.
fn result_posts(server: &FakeServer, id: &str) -> Vec<(Instant, Value)> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.route == Some(Route::ResultPost) && r.path.ends_with(id))
        .filter_map(|r| Some((r.at, serde_json::from_str(&r.body_excerpt).ok()?)))
        .collect()
}

/// The `job_state` values the agent posted, in order.
fn posted_states(server: &FakeServer, id: &str) -> Vec<String> {
    result_posts(server, id)
        .into_iter()
        .filter_map(|(_, body)| body.get("job_state")?.as_str().map(str::to_owned))
        .collect()
}

/// The `job_state` values posted after `at`.
fn states_posted_after(server: &FakeServer, id: &str, at: Instant) -> Vec<Value> {
    result_posts(server, id)
        .into_iter()
        .filter(|(posted, _)| *posted > at)
        .filter_map(|(_, body)| body.get("job_state").cloned())
        .collect()
}

/// Waits, after a cancel (which alone makes the job look finished), until the output holds
/// `last_line` and the agent's final state post (`cancelled` or `complete`) is in.
fn wait_final_post(server: &FakeServer, id: &str, last_line: &str) {
    wait_for(server, "the last command and the final state", |srv| {
        srv.log_text(id, "output").contains(last_line)
            && posted_states(srv, id)
                .last()
                .is_some_and(|s| s == "cancelled" || s == "complete")
    });
}

/// Waits until the job is finished on the server and its final state post is in the
/// request log too (the server applies a post before it logs the request, so a test that
/// saw the state could read the log a moment before the post is in it).
fn wait_finished(server: &FakeServer, id: &str) {
    wait_for(server, "the job to finish", |srv| {
        finished(srv, id)
            && posted_states(srv, id)
                .last()
                .is_some_and(|s| s == "complete" || s == "cancelled")
    });
}

/// When the test phase's exit status reached the server (the phase is over: its output
/// was delivered before).
fn test_status_posted(server: &FakeServer, id: &str) -> Instant {
    result_posts(server, id)
        .into_iter()
        .find(|(_, body)| body.pointer("/status/test").is_some())
        .map(|(at, _)| at)
        .expect("the test phase's status was posted")
}

/// When the first fragment of the cleanup phase's output arrived.
fn cleanup_started(server: &FakeServer, id: &str) -> Instant {
    server
        .requests()
        .into_iter()
        .find(|r: &RequestRecord| {
            r.route == Some(Route::LogPost)
                && r.path.contains(id)
                && r.body_excerpt.contains("\"phase\":\"cleanup\"")
        })
        .map(|r| r.at)
        .expect("cleanup's output was posted")
}

fn status_requests(server: &FakeServer) -> Vec<RequestRecord> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.route == Some(Route::ResultStatusGet))
        .collect()
}

fn agent_log(s: &Scratch, name: &str) -> String {
    std::fs::read_to_string(Agent::stderr_path(s, name)).expect("agent log")
}

/// The scenario of the tests that act while the test phase runs: an agent (every phase with
/// a command, `extra` config lines after them) whose test command prints `start`, waits for
/// a go file, runs `after_go` and prints `end`, and one job submitted to it. Fields drop in
/// order: the agent (printing its log's tail if the test failed) before its scratch.
struct WaitingForGo {
    _agent: Agent,
    s: Scratch,
    server: FakeServer,
    name: String,
    go: PathBuf,
    id: String,
}

impl WaitingForGo {
    /// Starts it against a fake server with or without `/status` (`tag` names the scratch
    /// directory and the agent) and waits until the test phase has printed `start`.
    fn start(status: bool, tag: &str, extra: &str, after_go: &str) -> WaitingForGo {
        WaitingForGo::start_with(status, tag, "start", |go| {
            format!(
                "{COMMANDS}{extra}test_command: echo start; while [ ! -e {go} ]; do sleep 0.1; done; {after_go}echo end\n",
                go = go.display()
            )
        })
    }

    /// Like [`WaitingForGo::start`], with the config `commands` makes from the go file's
    /// path; waits until the job's output holds `started`.
    fn start_with(
        status: bool,
        tag: &str,
        started: &str,
        commands: impl FnOnce(&std::path::Path) -> String,
    ) -> WaitingForGo {
        let server = server_with_status(status);
        let s = Scratch::new(&format!("state-{tag}"));
        let name = format!("state-{tag}-{}", std::process::id());
        let go = s.path("go");
        let agent = Agent::start(&server, &s, &name, &commands(&go));
        let id = submit(&server, &name);
        wait_for(&server, "the waiting command to start", |srv| {
            srv.log_text(&id, "output").contains(started)
        });
        WaitingForGo {
            _agent: agent,
            s,
            server,
            name,
            go,
            id,
        }
    }

    /// Lets the waiting command go on to its end.
    fn go(&self) {
        std::fs::write(&self.go, "").expect("write the go file");
    }
}

#[test]
fn with_status_every_read_before_and_during_phases_is_a_status_read() {
    let server = server_with_status(true);
    let s = Scratch::new("state-status");
    let name = format!("state-status-{}", std::process::id());
    let commands = format!("{COMMANDS}test_command: echo start; sleep 4; echo end\n");
    let _agent = Agent::start(&server, &s, &name, &commands);
    let id = submit(&server, &name);
    wait_finished(&server, &id);
    let reads = server.state_reads(&id);
    let during_test = reads
        .iter()
        .filter(|r| r.at > server_time_of_state(&server, &id, "test"))
        .filter(|r| r.at < test_status_posted(&server, &id))
        .count();
    assert!(
        during_test >= 2,
        "cancel checks during the 4 s test phase (every 1 s)"
    );
    // Before each of the six forward phases, and during the test phase.
    assert!(reads.len() >= 6 + 2, "{} reads", reads.len());
    assert!(
        reads.iter().all(|r| r.kind == ReadKind::Status),
        "no full read: {:?}",
        reads.iter().map(|r| r.kind).collect::<Vec<_>>()
    );
    assert_eq!(
        posted_states(&server, &id),
        PYTHON_POSTS,
        "the Python agent's job_state posts"
    );
    assert!(agent_log(&s, &name).contains("read through GET /v1/result/<id>/status"));
}

/// When the agent posted `job_state` = `state`.
fn server_time_of_state(server: &FakeServer, id: &str, state: &str) -> Instant {
    result_posts(server, id)
        .into_iter()
        .find(|(_, body)| body.get("job_state").and_then(Value::as_str) == Some(state))
        .map(|(at, _)| at)
        .unwrap_or_else(|| panic!("job_state {state} was posted"))
}

#[test]
fn without_status_one_404_decides_and_every_read_is_a_full_one() {
    let server = server_with_status(false);
    let s = Scratch::new("state-full");
    let name = format!("state-full-{}", std::process::id());
    // Allocate runs (it has data), so each phase's state is read before it.
    let commands = format!("{COMMANDS}test_command: echo start; sleep 4; echo end\n");
    let _agent = Agent::start(&server, &s, &name, &commands);
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "test_data": {"test_cmds": "x"},
        "reserve_data": {"ssh_keys": ["lp:someone"]},
    }));
    wait_finished(&server, &id);
    let probes = status_requests(&server);
    assert_eq!(
        probes.len(),
        1,
        "one /status request decides for the server"
    );
    assert_eq!(probes[0].status, 404);
    let reads = server.state_reads(&id);
    assert!(reads.iter().all(|r| r.kind == ReadKind::Full));
    let during_test = reads
        .iter()
        .filter(|r| r.at > server_time_of_state(&server, &id, "test"))
        .filter(|r| r.at < test_status_posted(&server, &id))
        .count();
    assert!(during_test >= 2, "cancel checks during the 4 s test phase");
    // Setup, provision, firmware_update, test, allocate, reserve: each read first.
    let before_reserve = server_time_of_state(&server, &id, "reserve");
    assert!(reads.iter().filter(|r| r.at < before_reserve).count() >= 6 + 2);
    assert_eq!(posted_states(&server, &id), PYTHON_POSTS);
    assert!(agent_log(&s, &name).contains("has no GET /v1/result/<id>/status (404)"));
}

#[test]
fn a_server_that_starts_answering_404_for_status_is_read_in_full_from_then_on() {
    let scenario = WaitingForGo::start(true, "switch", "", "");
    let WaitingForGo {
        server,
        s,
        name,
        id,
        ..
    } = &scenario;
    wait_for(server, "a status read during the test phase", |srv| {
        srv.state_reads(id)
            .iter()
            .any(|r| r.at > server_time_of_state(srv, id, "test"))
    });
    let switched = Instant::now();
    server.set_status_endpoint(false);
    wait_for(server, "two full reads during the test phase", |srv| {
        srv.state_reads(id)
            .iter()
            .filter(|r| r.kind == ReadKind::Full && r.at > switched)
            .count()
            >= 2
    });
    scenario.go();
    wait_finished(server, id);
    let after: Vec<RequestRecord> = status_requests(server)
        .into_iter()
        .filter(|r| r.at > switched)
        .collect();
    assert_eq!(after.len(), 1, "one 404 for /status, then none");
    assert_eq!(after[0].status, 404);
    assert_eq!(server.job_state(id).as_deref(), Some("complete"));
    assert!(agent_log(s, name).contains("now answers 404"));
}

#[test]
fn after_an_outage_the_server_is_asked_again_for_status() {
    let scenario = WaitingForGo::start(false, "outage", "", "");
    let WaitingForGo { server, id, .. } = &scenario;
    wait_for(server, "a full read during the test phase", |srv| {
        srv.state_reads(id)
            .iter()
            .any(|r| r.kind == ReadKind::Full && r.at > server_time_of_state(srv, id, "test"))
    });
    // The server goes away and comes back as a newer build.
    server.go_down();
    std::thread::sleep(Duration::from_secs(3));
    server.set_status_endpoint(true);
    let back = Instant::now();
    server.come_back();
    wait_for(server, "status reads after the outage", |srv| {
        srv.state_reads(id)
            .iter()
            .filter(|r| r.kind == ReadKind::Status && r.at > back)
            .count()
            >= 2
    });
    scenario.go();
    wait_finished(server, id);
    let full_after = server
        .state_reads(id)
        .iter()
        .filter(|r| r.kind == ReadKind::Full && r.at > back)
        .count();
    assert_eq!(full_after, 0, "back from the outage, /status is used");
    assert_eq!(server.job_state(id).as_deref(), Some("complete"));
}

/// When the test phase's `job_state` was posted.
fn state_posted(server: &FakeServer, id: &str, state: &str) -> Instant {
    result_posts(server, id)
        .into_iter()
        .find(|(_, body)| body.get("job_state").and_then(Value::as_str) == Some(state))
        .map(|(at, _)| at)
        .unwrap_or_else(|| panic!("job_state {state} was posted"))
}

#[test]
fn without_status_the_read_for_the_skipped_phases_overlaps_the_output_tail() {
    let server = server_with_status(false);
    let s = Scratch::new("state-nofull");
    let name = format!("state-nofull-{}", std::process::id());
    // 2 MB of output, every fragment held 700 ms by the server: the command is long over
    // while its output is still on its way, and a read made after the last fragment would
    // carry it all.
    let commands = format!("{COMMANDS}test_command: head -c 2000000 /dev/zero | tr '\\0' x\n");
    server.delay(Route::LogPost, Duration::from_millis(700));
    let _agent = Agent::start(&server, &s, &name, &commands);
    let id = submit(&server, &name);
    wait_finished(&server, &id);
    let test_started = state_posted(&server, &id, "test");
    let allocate = state_posted(&server, &id, "allocate");
    let cleanup = cleanup_started(&server, &id);
    assert!(test_started < allocate && allocate < cleanup);
    let reads = server.state_reads(&id);
    // One read stands for allocate and reserve: made before allocate's job_state was
    // posted, while the test output was not all stored yet.
    let for_skipped: Vec<_> = reads
        .iter()
        .filter(|r| r.at > test_started && r.at < cleanup)
        .collect();
    assert_eq!(
        for_skipped.len(),
        1,
        "reads for the skipped phases: {for_skipped:?}"
    );
    assert!(for_skipped[0].at < allocate);
    assert!(
        for_skipped[0].log_bytes < 2_000_000,
        "the read came after the output's tail: {} log bytes",
        for_skipped[0].log_bytes
    );
    // The state is read once more after cleanup, for the final state.
    let after: Vec<_> = reads.iter().filter(|r| r.at > cleanup).collect();
    assert_eq!(after.len(), 1, "one read after cleanup: {after:?}");
    assert!(
        after[0].log_bytes >= 2_000_000,
        "{} log bytes",
        after[0].log_bytes
    );
    // The job_state posts are the Python agent's, allocate and reserve included.
    assert_eq!(posted_states(&server, &id), PYTHON_POSTS);
    assert_eq!(
        server.log_text(&id, "output").matches('x').count(),
        2_000_000
    );
}

/// On a server without `/status`, a cancel that lands during cleanup (after the read the
/// skipped phases started on) ends the job `cancelled`: the read after cleanup sees it.
#[test]
fn without_status_a_cancel_during_cleanup_ends_cancelled() {
    let scenario = WaitingForGo::start_with(false, "cancel-cleanup", "cleanup began", |go| {
        format!(
            "setup_command: echo setup ran\nallocate_command: echo allocate ran\nreserve_command: echo reserve ran\ncancel_check_interval: 60\ntest_command: echo test ran\ncleanup_command: echo cleanup began; while [ ! -e {go} ]; do sleep 0.1; done; echo cleanup ended\n",
            go = go.display()
        )
    });
    let WaitingForGo { server, id, .. } = &scenario;
    let cancelled_at = Instant::now();
    assert!(server.cancel_job(id));
    scenario.go();
    wait_final_post(server, id, "cleanup ended");
    assert_eq!(server.job_state(id).as_deref(), Some("cancelled"));
    assert_eq!(
        states_posted_after(server, id, cancelled_at),
        [json!("cancelled")]
    );
    // The Python agent's posts, with `cancelled` as the final one instead of `complete`.
    let (complete, phases) = PYTHON_POSTS.split_last().expect("the posts end with one");
    assert_eq!(*complete, "complete");
    let expected: Vec<&str> = phases.iter().copied().chain(["cancelled"]).collect();
    assert_eq!(posted_states(server, id), expected);
}

/// A cancel that lands while the test command is in its last half second, long before the
/// next in-phase check (`cancel_check_interval` 60 s), still ends the job `cancelled`: on a
/// server with `/status` the read before allocate sees it; on one without, the read after
/// cleanup does. Either way no `job_state` overwrites it.
fn cancel_in_the_last_second(status: bool) {
    let tag = if status {
        "cancel-status"
    } else {
        "cancel-full"
    };
    let scenario = WaitingForGo::start(status, tag, "cancel_check_interval: 60\n", "sleep 0.5; ");
    let WaitingForGo { server, id, .. } = &scenario;
    let cancelled_at = Instant::now();
    assert!(server.cancel_job(id));
    scenario.go();
    wait_final_post(server, id, "cleanup ran");
    assert!(
        server.log_text(id, "output").contains("end"),
        "the test command ended on its own"
    );
    assert_eq!(server.job_state(id).as_deref(), Some("cancelled"));
    assert_eq!(
        states_posted_after(server, id, cancelled_at),
        [json!("cancelled")],
        "only the final state: {:?}",
        result_posts(server, id)
    );
    if !status {
        // One full read from the start of the test phase to cleanup: the one that found
        // the cancel, started when the command ended.
        let cleanup = cleanup_started(server, id);
        let test_started = state_posted(server, id, "test");
        let reads = server.state_reads(id);
        assert_eq!(
            reads
                .iter()
                .filter(|r| r.at > test_started && r.at < cleanup)
                .count(),
            1,
            "{reads:?}"
        );
    }
}

#[test]
fn a_cancel_in_the_last_second_of_the_test_phase_ends_cancelled_with_status() {
    cancel_in_the_last_second(true);
}

#[test]
fn a_cancel_in_the_last_second_of_the_test_phase_ends_cancelled_without_status() {
    cancel_in_the_last_second(false);
}
