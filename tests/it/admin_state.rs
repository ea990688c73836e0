//! The agent state across restarts (PROTOCOL §14.3), through the real binary against the
//! fake server: what the agent posts at start-up for each record it finds, whether it takes
//! a job, what a stop leaves behind, and restart requests while an administrator holds it.

use crate::support::agent::{finished, queue, wait_for, Agent, WAIT};
use crate::support::fake_server::{FakeServer, Route};
use crate::support::scratch::Scratch;
use serde_json::{json, Value};
use std::time::Duration;

/// The agent's state posts, in order.
fn state_posts(server: &FakeServer, name: &str) -> Vec<(String, String)> {
    server
        .agent_posts(name)
        .iter()
        .filter_map(|p| {
            let state = p.get("state")?.as_str()?.to_owned();
            let comment = p.get("comment").and_then(Value::as_str).unwrap_or("");
            Some((state, comment.to_owned()))
        })
        .collect()
}

/// Requests to this agent's record, in order: `GET` or `POST`.
fn record_requests(server: &FakeServer, name: &str) -> Vec<String> {
    let path = format!("/v1/agents/data/{name}");
    server
        .requests()
        .into_iter()
        .filter(|r| r.path == path)
        .map(|r| r.method)
        .collect()
}

/// Starts an agent on a server whose record for it is `start` (`None`: no record), submits
/// a job and returns the first state the agent posted and whether it ran the job. A job the
/// agent should run (`expect_run`) gets the whole [`WAIT`] on a loaded machine; a held agent
/// is watched for 4 s, in which it would have taken the job had it not been held.
fn start_from(tag: &str, start: Option<(&str, &str)>, expect_run: bool) -> (String, String, bool) {
    let server = FakeServer::start();
    let s = Scratch::new(&format!("admin-{tag}"));
    let name = format!("admin-{tag}-{}", std::process::id());
    if let Some((state, comment)) = start {
        server.set_agent_state(&name, state, comment);
    }
    let mut agent = Agent::start(&server, &s, &name, "test_command: echo ran\n");
    wait_for(&server, "the first state post", |srv| {
        !state_posts(srv, &name).is_empty()
    });
    let requests = record_requests(&server, &name);
    assert_eq!(
        requests.first().map(String::as_str),
        Some("GET"),
        "the record is read before anything is posted: {requests:?}"
    );
    let (state, comment) = state_posts(&server, &name)[0].clone();
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    let watch = if expect_run {
        WAIT
    } else {
        Duration::from_secs(4)
    };
    let ran = server.wait_until(watch, |srv| finished(srv, &id));
    if !ran {
        assert_eq!(
            server.job_state(&id).as_deref(),
            Some("waiting"),
            "a held agent leaves the job alone"
        );
        assert_eq!(
            server.request_count(&Route::JobPoll),
            0,
            "a held agent does not poll"
        );
    }
    assert_eq!(agent.stop(), Some(0));
    if !ran {
        // A stop while held posts nothing over the administrator's state.
        let record = server.agent_record(&name).expect("record");
        assert_eq!(record["state"], json!(state));
        assert_eq!(record["comment"], json!(comment));
    }
    (state, comment, ran)
}

#[test]
fn an_administrators_offline_is_posted_back_and_holds_the_agent() {
    let (state, comment, ran) = start_from(
        "offline",
        Some(("offline", "bench power supply broken")),
        false,
    );
    assert_eq!(
        (state.as_str(), comment.as_str()),
        ("offline", "bench power supply broken")
    );
    assert!(!ran);
}

#[test]
fn maintenance_is_posted_back_and_holds_the_agent() {
    let (state, comment, ran) =
        start_from("maint", Some(("maintenance", "firmware rollout")), false);
    assert_eq!(
        (state.as_str(), comment.as_str()),
        ("maintenance", "firmware rollout")
    );
    assert!(!ran);
}

#[test]
fn the_agents_own_offline_after_exit_46_holds_the_next_start() {
    let comment = "Set to offline by agent. Recovery failed during job 'x' execution.";
    let (state, posted, ran) = start_from("own46", Some(("offline", comment)), false);
    assert_eq!((state.as_str(), posted.as_str()), ("offline", comment));
    assert!(!ran);
}

#[test]
fn transient_states_come_up_waiting_and_take_jobs() {
    for (tag, start) in [
        ("restart", Some(("restart", "new agent version"))),
        ("waiting", Some(("waiting", ""))),
        ("phase", Some(("test", ""))),
        ("none", None),
        ("stopcomment", Some(("offline", "Agent stopped by signal"))),
        (
            "pyrestart",
            Some(("offline", "Restart signal detected from supervisor process")),
        ),
    ] {
        let (state, comment, ran) = start_from(tag, start, true);
        assert_eq!(
            (state.as_str(), comment.as_str(), ran),
            ("waiting", "", true),
            "starting from {start:?}"
        );
    }
}

#[test]
fn a_stop_leaves_waiting_and_the_next_start_takes_jobs() {
    let server = FakeServer::start();
    let s = Scratch::new("admin-stop");
    let name = format!("admin-stop-{}", std::process::id());
    let commands = "test_command: |\n  echo started\n  sleep 30\n";
    let mut agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test to start", |srv| {
        srv.log_text(&id, "output").contains("started")
    });
    assert_eq!(agent.stop(), Some(0));
    let record = server.agent_record(&name).expect("record");
    assert_eq!(record["state"], "waiting", "{record}");
    let states = state_posts(&server, &name);
    assert!(
        !states.iter().any(|(state, _)| state == "offline"),
        "a stop never posts offline: {states:?}"
    );
    let mut again = Agent::start(&server, &s, &name, "test_command: echo ran\n");
    let next =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the next job", |srv| finished(srv, &next));
    assert_eq!(again.stop(), Some(0));
}

/// A restart asked for (by `ask`) while the agent is in maintenance waits until it is
/// released; then `restart` is posted and the agent exits 1.
fn restart_waits_for_release(tag: &str, ask: impl Fn(&Agent, &FakeServer, &str)) {
    let server = FakeServer::start();
    let s = Scratch::new(&format!("admin-{tag}"));
    let name = format!("admin-{tag}-{}", std::process::id());
    server.set_agent_state(&name, "maintenance", "cabling");
    let mut agent = Agent::start(&server, &s, &name, "test_command: echo x\n");
    wait_for(&server, "the maintenance post", |srv| {
        state_posts(srv, &name).first().map(|(s, _)| s.as_str()) == Some("maintenance")
    });
    ask(&agent, &server, &name);
    // Held: several cycles (polling_interval 1 s) pass without a restart.
    let reads = server.request_count(&Route::AgentDataGet);
    wait_for(&server, "three more record reads", |srv| {
        srv.request_count(&Route::AgentDataGet) >= reads + 3
    });
    assert!(
        agent.child.try_wait().expect("try_wait").is_none(),
        "no restart while in maintenance"
    );
    assert!(!state_posts(&server, &name)
        .iter()
        .any(|(state, _)| state == "restart" || state == "offline"));
    server.set_agent_state(&name, "waiting", "");
    assert_eq!(agent.wait_exit(), Some(1), "restart once released");
    let record = server.agent_record(&name).expect("record");
    assert_eq!(record["state"], "restart", "{record}");
}

#[test]
fn sigusr1_during_maintenance_waits_for_release() {
    restart_waits_for_release("usr1", |agent, _, _| {
        agent.signal(nix::sys::signal::Signal::SIGUSR1)
    });
}

#[test]
fn a_server_restart_replaces_maintenance_and_is_carried_out() {
    // The record has one state: an administrator's `restart` over `maintenance` replaces
    // it, so the agent is no longer held and restarts at its next read (as the Python agent
    // does); it posts `restart`, exits 1, and the next start comes up `waiting`.
    let server = FakeServer::start();
    let s = Scratch::new("admin-srvrestart");
    let name = format!("admin-srvrestart-{}", std::process::id());
    server.set_agent_state(&name, "maintenance", "cabling");
    let mut agent = Agent::start(&server, &s, &name, "test_command: echo x\n");
    wait_for(&server, "the maintenance post", |srv| {
        state_posts(srv, &name).first().map(|(s, _)| s.as_str()) == Some("maintenance")
    });
    server.set_agent_state(&name, "restart", "new agent version");
    assert_eq!(agent.wait_exit(), Some(1));
    let record = server.agent_record(&name).expect("record");
    assert_eq!(
        (record["state"].clone(), record["comment"].clone()),
        (json!("restart"), json!("new agent version"))
    );
    let mut again = Agent::start(&server, &s, &name, "test_command: echo x\n");
    wait_for(&server, "waiting after the restart", |srv| {
        srv.agent_record(&name)
            .is_some_and(|r| r["state"] == "waiting")
    });
    assert_eq!(again.stop(), Some(0));
}

/// Runs the agent on the scratch's config and token file to its exit, which a lock already
/// held makes immediate.
fn run_second_copy(s: &Scratch) -> std::process::Output {
    std::process::Command::new(crate::support::agent::BIN)
        .arg("-c")
        .arg(s.path("agent.yaml"))
        .arg("--token-file")
        .arg(s.path("refresh_token"))
        .env("TESTFLINGER_AGENT_STARTUP_FAILURE_DELAY", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runs")
}

#[test]
fn a_second_agent_with_the_same_id_exits_2_naming_the_first() {
    let server = FakeServer::start();
    let s = Scratch::new("admin-twice");
    let name = format!("admin-twice-{}", std::process::id());
    let mut first = Agent::start(&server, &s, &name, "test_command: echo x\n");
    wait_for(&server, "the first agent to poll", |srv| {
        srv.request_count(&Route::JobPoll) >= 1
    });
    // Same config (same agent_id, same directories): refused before it does anything.
    let posts_before = server.agent_posts(&name).len();
    let out = run_second_copy(&s);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {})", first.child.id())),
        "names the holder: {stderr}"
    );
    assert_eq!(
        server.agent_posts(&name).len(),
        posts_before,
        "the second copy posted nothing"
    );
    // The lock dies with its holder: after a SIGKILL a new agent starts at once.
    first.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(first.wait_exit().is_none(), "killed by the signal");
    let polls = server.request_count(&Route::JobPoll);
    let mut next = Agent::start(&server, &s, &name, "test_command: echo x\n");
    wait_for(&server, "the new agent to poll", |srv| {
        srv.request_count(&Route::JobPoll) > polls
    });
    assert_eq!(next.stop(), Some(0));
}

/// Two agents started at the same instant: the first has taken the lock and not yet written
/// its pid. The test process plays the first (it holds the flock on an empty lock file);
/// the agent must still name it, from the kernel's record of the lock.
#[test]
fn a_second_agent_names_a_holder_that_has_not_written_its_pid() {
    let server = FakeServer::start();
    let s = Scratch::new("admin-early-lock");
    let name = format!("admin-early-lock-{}", std::process::id());
    crate::support::agent::write_daemon_files(&server, &s, &name, "");
    std::fs::create_dir_all(s.path("run")).expect("execution_basedir");
    let lock_path = s.path(&format!("run/.testflinger-agent-{name}.lock"));
    let lock = std::fs::File::create(&lock_path).expect("create the lock file");
    lock.try_lock().expect("the test takes the lock first");
    let out = run_second_copy(&s);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {})", std::process::id())),
        "names the test process, which holds the lock: {stderr}"
    );
    assert_eq!(
        std::fs::metadata(&lock_path).expect("stat").len(),
        0,
        "the refused copy wrote nothing into the lock file"
    );
    assert!(server.agent_posts(&name).is_empty(), "it posted nothing");
    drop(lock);
}

/// The start-up posts are refused (a token problem on the server's side, say): the server
/// has no record of the agent, so the next cycle announces it again and it shows up
/// `waiting`, with its queues, and takes a job.
#[test]
fn an_agent_the_server_does_not_know_announces_itself_again() {
    let server = FakeServer::start();
    let s = Scratch::new("admin-reannounce");
    let name = format!("admin-reannounce-{}", std::process::id());
    server.fail_next(Route::AgentDataPost, 3, 403);
    let _agent = Agent::start(&server, &s, &name, "test_command: echo ran\n");
    wait_for(&server, "the agent to be known", |srv| {
        srv.agent_record(&name)
            .is_some_and(|r| r["state"] == json!("waiting"))
    });
    let record = server.agent_record(&name).unwrap_or_default();
    assert_eq!(record["queues"], json!([queue(&name)]), "{record}");
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the job", |srv| finished(srv, &id));
}
