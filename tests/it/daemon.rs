//! The daemon through the real binary against the fake Testflinger server on loopback:
//! jobs end to end, live output delivered exactly once, cancellation, outages, token
//! expiry, signals and the spool of unsent reports.

use crate::support::agent::{cancel_and_wait_for_cleanup, finished, queue, wait_for, Agent};
use crate::support::fake_server::{FakeServer, Route};
use crate::support::scratch::{KillByMarker, Scratch};
use serde_json::{json, Value};

use std::time::Duration;

/// The output fragments of a job: numbers 0..n each exactly once (no duplicate, no gap).
fn assert_gap_free(server: &FakeServer, id: &str, log_type: &str) {
    let mut numbers: Vec<i64> = server
        .fragments(id, log_type)
        .iter()
        .map(|f| f.fragment_number)
        .collect();
    numbers.sort_unstable();
    let expected: Vec<i64> = (0..numbers.len() as i64).collect();
    assert_eq!(numbers, expected, "{log_type} fragments of {id}");
}

const COUNTING_TEST: &str = r#"test_command: |
  mkdir -p artifacts
  echo "artifact body" > artifacts/report.txt
  i=0
  while [ $i -lt 3000 ]; do echo "line $i of the test output"; i=$((i+1)); done
  printf 'tail without newline'
"#;

fn expected_test_output() -> String {
    let mut text = String::new();
    for i in 0..3000 {
        text.push_str(&format!("line {i} of the test output\n"));
    }
    text.push_str("tail without newline");
    text
}

#[test]
fn a_full_job_arrives_whole_with_serial_log_and_artifacts() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-full");
    let name = format!("full-{}", std::process::id());
    let commands = format!(
        "setup_command: echo setting up\nprovision_command: |\n  echo provisioning\n  echo '{{\"device_info\": {{\"device_ip\": \"10.0.0.5\"}}}}' > device-info.json\n  head -c 2500000 /dev/zero | tr '\\0' s > provision-serial.log\n{COUNTING_TEST}cleanup_command: echo cleaned up\n"
    );
    let mut agent = Agent::start(&server, &s, &name, &commands);
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "provision_data": {"url": "http://example.com/img"},
        "test_data": {"test_cmds": "x"},
    }));
    wait_for(&server, "the job to complete", |srv| finished(srv, &id));
    assert_eq!(server.job_state(&id).as_deref(), Some("complete"));
    let output = server.log_text(&id, "output");
    assert_eq!(
        output.matches(&expected_test_output()).count(),
        1,
        "test output exactly once"
    );
    for text in [
        "setting up",
        "provisioning",
        "cleaned up",
        "* Starting testflinger test phase on",
    ] {
        assert_eq!(output.matches(text).count(), 1, "{text:?} exactly once");
    }
    assert_gap_free(&server, &id, "output");
    let serial = server.log_text(&id, "serial");
    assert_eq!(serial.len(), 2_500_000);
    assert!(serial.bytes().all(|b| b == b's'));
    assert!(
        server.fragments(&id, "serial").len() >= 3,
        "1 MiB serial fragments"
    );
    assert_gap_free(&server, &id, "serial");
    let result = server.result_data(&id);
    assert_eq!(
        result["status"],
        json!({"setup": 0, "provision": 0, "test": 0, "cleanup": 0})
    );
    assert_eq!(result["device_info"], json!({"device_ip": "10.0.0.5"}));
    let artifact = server.artifact(&id).expect("artifacts uploaded");
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&artifact[..]));
    let names: Vec<String> = tar
        .entries()
        .expect("tarball")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["artifacts", "artifacts/report.txt"]);
    let states: Vec<Value> = server
        .agent_posts(&name)
        .iter()
        .filter_map(|p| p.get("state").cloned())
        .collect();
    for phase in ["setup", "provision", "test", "waiting"] {
        assert!(
            states.contains(&json!(phase)),
            "agent state {phase} posted: {states:?}"
        );
    }
    assert_eq!(server.provision_logs(&name).len(), 1);
    assert_eq!(agent.stop(), Some(0));
    // A supervisor stop is a short absence: the record stays `waiting`, so jobs still queue.
    assert_eq!(
        server
            .agent_record(&name)
            .and_then(|r| r.get("state").cloned()),
        Some(json!("waiting"))
    );
    // The run directory is gone once the server took everything; nothing was spooled.
    // (The agent's lock file, hidden, stays.)
    assert_eq!(
        std::fs::read_dir(s.path("run"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0),
        0
    );
    assert_eq!(
        std::fs::read_dir(s.path("results"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[test]
fn cancelling_during_test_kills_the_tree_runs_cleanup_and_stays_cancelled() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-cancel");
    let name = format!("cancel-{}", std::process::id());
    let marker = s.marker();
    let guard = KillByMarker::new(&marker);
    // The second job of this test must not hang: it finds the file `no-hang`.
    let no_hang = s.path("no-hang");
    let commands = format!(
        "test_command: |\n  [ -e {} ] && exit 0\n  sleep 1000.{marker}1 &\n  setsid sleep 1000.{marker}2 &\n  echo started\n  sleep 1000.{marker}3\ncleanup_command: echo cleanup ran\n",
        no_hang.display()
    );
    let _agent = Agent::start(&server, &s, &name, &commands);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test to start", |srv| {
        srv.log_text(&id, "output").contains("started")
    });
    cancel_and_wait_for_cleanup(&server, &id);
    assert_eq!(server.job_state(&id).as_deref(), Some("cancelled"));
    let output = server.log_text(&id, "output");
    assert!(
        output.contains("Job cancellation was requested, exiting."),
        "{output}"
    );
    assert_eq!(server.result_data(&id)["status"]["test"], 247);
    assert_eq!(
        guard.living(),
        Vec::<i32>::new(),
        "the test's processes survived"
    );
    // The cancellation belonged to that job: the next one runs normally.
    std::fs::write(&no_hang, "").expect("write no-hang");
    let next =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the next job", |srv| finished(srv, &next));
    assert_eq!(server.job_state(&next).as_deref(), Some("complete"));
    assert_eq!(server.result_data(&next)["status"]["test"], 0);
}

#[test]
fn cancelling_during_provision_does_not_interrupt_it() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-cancel-prov");
    let name = format!("cancelprov-{}", std::process::id());
    let commands = "provision_command: |\n  echo flashing\n  sleep 3\n  echo provision finished\ntest_command: echo test ran\ncleanup_command: echo cleanup ran\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "provision_data": {"url": "x"},
        "test_data": {"test_cmds": "x"},
    }));
    wait_for(&server, "provision to start", |srv| {
        srv.log_text(&id, "output").contains("flashing")
    });
    cancel_and_wait_for_cleanup(&server, &id);
    let output = server.log_text(&id, "output");
    assert!(
        output.contains("provision finished"),
        "provision ran to its end: {output}"
    );
    assert!(!output.contains("test ran"), "no phase after the cancel");
    assert_eq!(server.result_data(&id)["status"]["provision"], 0);
    assert_eq!(server.job_state(&id).as_deref(), Some("cancelled"));
}

#[test]
fn outages_and_5xx_storms_lose_nothing() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-outage");
    let name = format!("outage-{}", std::process::id());
    let commands = "test_command: |\n  i=0\n  while [ $i -lt 40 ]; do echo \"slow line $i\"; i=$((i+1)); sleep 0.05; done\n";
    let agent = Agent::start(&server, &s, &name, commands);
    server.fail_next(Route::LogPost, 6, 503);
    server.fail_next(Route::ResultPost, 3, 500);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    // The outage starts while the phase runs, seen in the run directory's log: a trigger on
    // the server's copy would fire the moment a fragment is stored, and the outage would
    // then cut that fragment's answer (a fragment the server stored but never confirmed
    // may be sent twice: that case is tested in http_client.rs, not here).
    let log = s.path("run").join(&id).join("test.log");
    wait_for(&server, "the phase to print", |_| {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("slow line 5"))
    });
    server.go_down();
    std::thread::sleep(Duration::from_secs(3));
    server.come_back();
    wait_for(&server, "the job to complete", |srv| finished(srv, &id));
    let output = server.log_text(&id, "output");
    for i in 0..40 {
        assert_eq!(
            output.matches(&format!("slow line {i}\n")).count(),
            1,
            "line {i} once:\n{output}"
        );
    }
    assert_gap_free(&server, &id, "output");
    assert_eq!(server.result_data(&id)["status"]["test"], 0);
    // The retries that absorbed the 500s are in the agent's log, not only at debug level.
    let agent_log = std::fs::read_to_string(agent.log.as_ref().expect("the agent's log"))
        .expect("the agent's log is readable");
    assert!(
        agent_log
            .lines()
            .any(|l| l.contains("failed attempt(s) in") && l.contains("answered 500")),
        "a call that succeeded after the 500s says so:\n{agent_log}"
    );
}

#[test]
fn an_expired_token_is_refreshed_mid_job() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-token");
    let name = format!("token-{}", std::process::id());
    let commands = "test_command: |\n  echo before\n  sleep 1.5\n  echo after\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test to start", |srv| {
        srv.log_text(&id, "output").contains("before")
    });
    server.expire_all_tokens();
    wait_for(&server, "the job to complete", |srv| finished(srv, &id));
    assert!(server.log_text(&id, "output").contains("after"));
    assert!(
        server.request_count(&Route::Refresh) >= 2,
        "the token was refreshed"
    );
}

/// Access tokens that live 3 s (their `exp` and `iat` claims say so, as the real server's
/// do): through a job with a silent 7 s test phase, the agent renews each token before it
/// expires, so no request comes back 401.
#[test]
fn short_lived_tokens_are_renewed_before_the_server_refuses_them() {
    let server = FakeServer::start_with(crate::support::fake_server::FakeConfig {
        access_token_ttl: Duration::from_secs(3),
        ..Default::default()
    });
    let s = Scratch::new("daemon-token-early");
    let name = format!("token-early-{}", std::process::id());
    let commands = "test_command: |\n  echo before\n  sleep 7\n  echo after\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the job to complete", |srv| finished(srv, &id));
    assert!(server.log_text(&id, "output").contains("after"));
    let refused: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.status == 401)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        refused.is_empty(),
        "requests refused for an expired token: {refused:?}"
    );
    // The first token, then one renewed before the posts that follow the 7 s of silence
    // (the silence itself renews none: its state reads need no token, see tests/it/idle.rs).
    assert!(
        server.request_count(&Route::Refresh) >= 2,
        "tokens were renewed along the way"
    );
}

#[test]
fn sigterm_mid_phase_kills_the_tree_runs_cleanup_reports_and_exits_0() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-sigterm");
    let name = format!("sigterm-{}", std::process::id());
    let marker = s.marker();
    let guard = KillByMarker::new(&marker);
    let commands = format!(
        "test_command: |\n  ( ( sleep 1000.{marker}1 & ) & )\n  echo started\n  sleep 1000.{marker}2\nallocate_command: echo allocate ran\ncleanup_command: echo cleanup ran\n"
    );
    let mut agent = Agent::start(&server, &s, &name, &commands);
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "test_data": {"test_cmds": "x"},
        "allocate_data": {"allocate": true},
    }));
    wait_for(&server, "the test to start", |srv| {
        srv.log_text(&id, "output").contains("started")
    });
    assert_eq!(agent.stop(), Some(0));
    assert_eq!(
        guard.living(),
        Vec::<i32>::new(),
        "the test's processes survived"
    );
    let output = server.log_text(&id, "output");
    assert!(output.contains("cleanup ran"), "{output}");
    assert!(
        !output.contains("allocate ran"),
        "no phase after the shutdown"
    );
    assert_eq!(server.result_data(&id)["status"]["test"], 247);
    assert_eq!(server.job_state(&id).as_deref(), Some("complete"));
}

#[test]
fn a_spooled_report_is_delivered_after_a_restart() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-spool");
    let name = format!("spool-{}", std::process::id());
    let commands =
        "test_command: |\n  mkdir -p artifacts\n  echo kept > artifacts/kept.txt\n  echo tested\n";
    // Every artifact upload fails: the report cannot be delivered and is spooled.
    server.fail_next(Route::ArtifactPost, 1_000, 500);
    let mut agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the report to be spooled", |_| {
        std::fs::read_dir(s.path("results"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 1
    });
    assert_eq!(agent.stop(), Some(0));
    assert!(server.artifact(&id).is_none());
    assert_ne!(server.job_state(&id).as_deref(), Some("complete"));
    server.clear_faults();
    let mut restarted = Agent::start(&server, &s, &name, commands);
    wait_for(&server, "the spooled report", |srv| finished(srv, &id));
    assert!(server.artifact(&id).is_some());
    assert_eq!(server.result_data(&id)["status"]["test"], 0);
    assert!(server.log_text(&id, "output").contains("tested"));
    assert_eq!(restarted.stop(), Some(0));
    assert_eq!(
        std::fs::read_dir(s.path("results"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[test]
fn a_malformed_job_is_reported_failed_and_the_agent_carries_on() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-malformed");
    let name = format!("malformed-{}", std::process::id());
    let commands = "test_command: echo good job ran\ncleanup_command: echo cleanup ran\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    // A job that exists on the server (on a queue nobody polls), handed to the agent with a
    // body that is valid JSON but not a valid job; then a body that is not JSON at all.
    let broken = server.submit_job(json!({"job_queue": "nobody-polls-this"}));
    server.serve_raw_job(
        &queue(&name),
        &json!({"job_id": broken, "job_queue": queue(&name), "test_data": "not an object"})
            .to_string(),
    );
    server.serve_raw_job(&queue(&name), "this is not JSON {");
    wait_for(&server, "the broken job to be closed", |srv| {
        srv.result_data(&broken).get("job_state") == Some(&json!("complete"))
    });
    assert_eq!(server.result_data(&broken)["status"], json!({"setup": 100}));
    let output = server.log_text(&broken, "output");
    assert!(
        output.contains("test_data"),
        "the error names the field: {output}"
    );
    // The agent carries on with the next job.
    let good =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the next job", |srv| finished(srv, &good));
    assert!(server.log_text(&good, "output").contains("good job ran"));
    assert_eq!(server.result_data(&good)["status"]["test"], 0);
}

#[test]
fn allocate_posts_device_info_and_holds_the_device_until_released() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-allocate");
    let name = format!("allocate-{}", std::process::id());
    let commands = "allocate_command: |\n  echo allocating\n  echo '{\"device_info\": {\"device_ip\": \"10.1.2.3\"}}' > device-info.json\nreserve_command: echo reserve ran\ncleanup_command: echo cleanup ran\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "allocate_data": {"allocate": true},
        "reserve_data": {"ssh_keys": ["lp:someone"]},
    }));
    wait_for(&server, "the allocated state", |srv| {
        srv.job_state(&id).as_deref() == Some("allocated")
    });
    assert_eq!(
        server.result_data(&id)["device_info"],
        json!({"device_ip": "10.1.2.3"})
    );
    assert!(
        !server.log_text(&id, "output").contains("cleanup ran"),
        "the device is held"
    );
    // The parent job releases its sub-jobs by cancelling them.
    cancel_and_wait_for_cleanup(&server, &id);
    assert!(!server.log_text(&id, "output").contains("reserve ran"));
    assert_eq!(server.job_state(&id).as_deref(), Some("cancelled"));
}

#[test]
fn an_allocation_nobody_releases_ends_at_the_global_timeout() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-allocate-timeout");
    let name = format!("alloc-timeout-{}", std::process::id());
    let commands = "allocate_command: |\n  echo allocating\n  echo '{\"device_info\": {\"device_ip\": \"10.1.2.3\"}}' > device-info.json\nreserve_command: echo reserve ran\ncleanup_command: echo cleanup ran\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    // A parent job on a queue nobody serves: it never completes.
    let parent = server
        .submit_job(json!({"job_queue": "nobody-serves-this", "test_data": {"test_cmds": "x"}}));
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "parent_job_id": parent,
        "global_timeout": 4,
        "job_status_webhook": "http://127.0.0.1:9/hook",
        "allocate_data": {"allocate": true},
        "reserve_data": {"ssh_keys": ["lp:someone"]},
    }));
    wait_for(&server, "the allocated state", |srv| {
        srv.job_state(&id).as_deref() == Some("allocated")
    });
    wait_for(&server, "the job to end", |srv| finished(srv, &id));
    assert_eq!(
        server.result_data(&id)["status"],
        json!({"allocate": 247, "cleanup": 0})
    );
    let output = server.log_text(&id, "output");
    assert!(output.contains("Global timeout reached! (4s)"), "{output}");
    assert!(output.contains("cleanup ran"));
    assert!(!output.contains("reserve ran"));
    let events = server.events(&id);
    let names: Vec<&str> = events
        .iter()
        .flat_map(|e| e["events"].as_array().into_iter().flatten())
        .filter_map(|e| e["event_name"].as_str())
        .collect();
    assert!(names.contains(&"global_timeout"), "{names:?}");
    assert_eq!(server.job_state(&parent).as_deref(), Some("waiting"));
}

#[test]
fn allocate_without_device_info_fails_the_job() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-allocate-noinfo");
    let name = format!("noinfo-{}", std::process::id());
    let commands = "allocate_command: echo allocating\nreserve_command: echo reserve ran\ncleanup_command: echo cleanup ran\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let id =
        server.submit_job(json!({"job_queue": queue(&name), "allocate_data": {"allocate": true}}));
    wait_for(&server, "the job to end", |srv| finished(srv, &id));
    let output = server.log_text(&id, "output");
    assert!(output.contains("device-info.json"), "{output}");
    assert_eq!(server.result_data(&id)["status"]["allocate"], 100);
    assert!(!output.contains("reserve ran"));
    assert!(output.contains("cleanup ran"));
}

/// A gzip tarball of regular files, with member names written raw (so hostile ones can be).
fn tarball(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (path, data) in members {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().expect("gnu header").name[..path.len()]
            .copy_from_slice(path.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    builder.into_inner().expect("tar").finish().expect("gzip")
}

#[test]
fn attachments_are_unpacked_and_a_hostile_archive_fails_the_job_safely() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-attach");
    let name = format!("attach-{}", std::process::id());
    let commands =
        "test_command: cat attachments/test/data/config.txt\ncleanup_command: echo cleanup ran\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let job = json!({
        "job_queue": queue(&name),
        "test_data": {"test_cmds": "x", "attachments": [{"agent": "data/config.txt"}]},
    });
    let good = server.submit_job(job.clone());
    assert!(server.set_attachments(
        &good,
        tarball(&[("test/data/config.txt", b"attached content\n")])
    ));
    wait_for(&server, "the job with attachments", |srv| {
        finished(srv, &good)
    });
    assert!(server
        .log_text(&good, "output")
        .contains("attached content"));
    assert_eq!(server.result_data(&good)["status"]["test"], 0);

    let evil = server.submit_job(job);
    assert!(server.set_attachments(&evil, tarball(&[("test/../../escaped.txt", b"x")])));
    wait_for(&server, "the hostile job", |srv| finished(srv, &evil));
    let output = server.log_text(&evil, "output");
    assert!(output.contains("attachments"), "{output}");
    assert!(output.contains("cleanup ran"), "cleanup still runs");
    assert_eq!(server.result_data(&evil)["status"]["setup"], 100);
    assert!(!s.path("run").join("escaped.txt").exists());
    assert!(!s.path("escaped.txt").exists());
}

#[test]
fn a_second_sigterm_kills_everything_at_once_and_spools_the_job() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-sigterm2");
    let name = format!("sigterm2-{}", std::process::id());
    let marker = s.marker();
    let guard = KillByMarker::new(&marker);
    // Both the test and cleanup ignore SIGTERM and hang: only the second signal ends them.
    let commands = format!(
        "termination_grace_period: 600\ntest_command: |\n  trap '' TERM\n  echo started\n  sleep 1000.{marker}1\ncleanup_command: |\n  trap '' TERM\n  echo cleanup started\n  sleep 1000.{marker}2\n"
    );
    let mut agent = Agent::start(&server, &s, &name, &commands);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test to start", |srv| {
        srv.log_text(&id, "output").contains("started")
    });
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    // The first signal only starts the grace period of a command that ignores it.
    std::thread::sleep(Duration::from_millis(300));
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(agent.wait_exit(), Some(0));
    assert_eq!(
        guard.living(),
        Vec::<i32>::new(),
        "every command tree is dead"
    );
    let spooled: Vec<_> = std::fs::read_dir(s.path("results"))
        .expect("spool exists")
        .collect();
    assert_eq!(spooled.len(), 1, "the job's run directory is spooled");
}

#[test]
fn sighup_reopens_the_log_file() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-hup");
    let name = format!("hup-{}", std::process::id());
    let mut agent = Agent::start(&server, &s, &name, "test_command: echo x\n");
    let log = s.path("logs").join("testflinger-agent.log");
    wait_for(&server, "the agent to poll", |srv| {
        srv.request_count(&Route::JobPoll) >= 1
    });
    std::fs::rename(&log, s.path("logs").join("rotated.log")).expect("rotate");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the job", |srv| finished(srv, &id));
    assert_eq!(agent.stop(), Some(0));
    let reopened = std::fs::read_to_string(&log).expect("a new log file after SIGHUP");
    assert!(reopened.contains(&id), "the new file gets the new lines");
}

#[test]
fn going_offline_during_a_job_is_deferred_until_it_ends() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-offline");
    let name = format!("offline-{}", std::process::id());
    let commands = "test_command: |\n  echo started\n  sleep 2\n  echo test finished\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let first =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the test to start", |srv| {
        srv.log_text(&first, "output").contains("started")
    });
    server.set_agent_state(&name, "offline", "maintenance window");
    wait_for(&server, "the first job", |srv| finished(srv, &first));
    assert!(
        server.log_text(&first, "output").contains("test finished"),
        "not interrupted"
    );
    wait_for(&server, "the agent to go offline after the job", |srv| {
        srv.agent_record(&name)
            .is_some_and(|r| r["state"] == "offline" && r["comment"] == "maintenance window")
    });
    // No job is taken while offline; the next one runs once the agent is set back.
    let second =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    let polls = server.request_count(&Route::JobPoll);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        server.request_count(&Route::JobPoll),
        polls,
        "no poll while offline"
    );
    assert_eq!(server.job_state(&second).as_deref(), Some("waiting"));
    server.set_agent_state(&name, "waiting", "");
    wait_for(&server, "the second job", |srv| finished(srv, &second));
}

#[test]
fn exit_46_takes_the_agent_offline_on_the_server() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-46");
    let name = format!("recovery-{}", std::process::id());
    let _agent = Agent::start(
        &server,
        &s,
        &name,
        "provision_command: exit 46\ntest_command: echo never\ncleanup_command: echo cleanup ran\n",
    );
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "provision_data": {"url": "x"},
        "test_data": {"test_cmds": "x"},
    }));
    wait_for(&server, "the job", |srv| finished(srv, &id));
    assert_eq!(
        server.result_data(&id)["status"],
        json!({"provision": 46, "cleanup": 0})
    );
    let record = server.agent_record(&name).expect("agent record");
    assert_eq!(record["state"], "offline");
    assert!(
        record["comment"]
            .as_str()
            .unwrap_or_default()
            .contains("Recovery failed"),
        "{record}"
    );
    let logs = server.provision_logs(&name);
    assert_eq!(
        logs.last().map(|l| l["detail"].clone()),
        Some(json!("recovery_fail"))
    );
    assert!(!std::path::Path::new(&format!("/tmp/TESTFLINGER-DEVICE-OFFLINE-{name}")).exists());
}

#[test]
fn restart_requests_exit_non_zero_after_posting_restart() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-restart");
    let name = format!("restart-{}", std::process::id());
    let mut agent = Agent::start(&server, &s, &name, "test_command: echo x\n");
    wait_for(&server, "the agent to poll", |srv| {
        srv.request_count(&Route::JobPoll) >= 1
    });
    agent.signal(nix::sys::signal::Signal::SIGUSR1);
    assert_eq!(
        agent.wait_exit(),
        Some(1),
        "exit for the supervisor to restart it"
    );
    let record = server.agent_record(&name).expect("agent record");
    assert_eq!(record["state"], "restart");
    assert_eq!(
        record["comment"],
        "Restart signal detected from supervisor process"
    );

    // Asked by the server: the same, with the administrator's comment.
    let mut agent = Agent::start(&server, &s, &name, "test_command: echo x\n");
    wait_for(&server, "the agent to be back", |srv| {
        srv.agent_record(&name)
            .is_some_and(|r| r["state"] == "waiting")
    });
    server.set_agent_state(&name, "restart", "new agent version");
    assert_eq!(agent.wait_exit(), Some(1));
    let record = server.agent_record(&name).expect("record");
    assert_eq!(record["state"], "restart");
    assert_eq!(record["comment"], "new agent version");
}

#[test]
fn restricted_queues_narrow_polling() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-restricted");
    let name = format!("restricted-{}", std::process::id());
    let private = format!("{name}-private");
    let commands = format!("job_queues: [{name}-queue, {private}]\ntest_command: echo ran\n");
    let _agent = Agent::start(&server, &s, &name, &commands);
    wait_for(&server, "the agent to poll", |srv| {
        srv.request_count(&Route::JobPoll) >= 1
    });
    server.set_restricted_queue(&private, &["owner"]);
    let open =
        server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    let owned = server.submit_job(json!({"job_queue": private, "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the restricted queue's job", |srv| {
        finished(srv, &owned)
    });
    let polls = server.request_count(&Route::JobPoll);
    wait_for(&server, "two more polls", |srv| {
        srv.request_count(&Route::JobPoll) >= polls + 2
    });
    assert_eq!(
        server.job_state(&open).as_deref(),
        Some("waiting"),
        "only restricted queues are polled"
    );
}

#[test]
fn a_stale_agent_record_gets_a_heartbeat() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-heartbeat");
    let name = format!("heartbeat-{}", std::process::id());
    let _agent = Agent::start(&server, &s, &name, "test_command: echo x\n");
    wait_for(&server, "the agent to poll", |srv| {
        srv.request_count(&Route::JobPoll) >= 1
    });
    let posts = server.agent_posts(&name).len();
    server.set_agent_field(&name, "updated_at", json!("2020-01-01T00:00:00Z"));
    wait_for(&server, "a heartbeat", |srv| {
        srv.agent_posts(&name).len() > posts
    });
    let last = server.agent_posts(&name).last().cloned().expect("a post");
    assert_eq!(last, json!({"state": "waiting", "comment": ""}));
}

#[test]
fn refused_artifacts_do_not_hold_back_the_outcome() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-413");
    let name = format!("art413-{}", std::process::id());
    let commands =
        "test_command: |\n  mkdir -p artifacts\n  echo big > artifacts/big.txt\n  echo tested\n";
    server.fail_next(Route::ArtifactPost, 1_000, 413);
    let _agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({"job_queue": queue(&name), "test_data": {"test_cmds": "x"}}));
    wait_for(&server, "the outcome", |srv| finished(srv, &id));
    assert!(server.artifact(&id).is_none());
    assert_eq!(server.result_data(&id)["status"]["test"], 0);
    wait_for(&server, "the spool to empty", |_| {
        std::fs::read_dir(s.path("results"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    });
}

#[test]
fn a_job_left_by_a_dead_agent_is_reported_at_start_up() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-recover");
    let name = format!("recover-{}", std::process::id());
    let id = server.submit_job(json!({"job_queue": "nobody-polls-this"}));
    // What an agent killed during the test phase leaves behind.
    let rundir = s.path("run").join(&id);
    std::fs::create_dir_all(&rundir).expect("mkdir");
    std::fs::write(
        rundir.join("testflinger.json"),
        json!({"job_id": id, "job_queue": "q"}).to_string(),
    )
    .expect("write");
    std::fs::write(
        rundir.join("testflinger-outcome.json"),
        r#"{"status":{"setup":0}}"#,
    )
    .expect("write");
    let _agent = Agent::start(&server, &s, &name, "test_command: echo x\n");
    wait_for(&server, "the interrupted job's outcome", |srv| {
        srv.result_data(&id).get("status") == Some(&json!({"setup": 0}))
    });
    assert_eq!(server.job_state(&id).as_deref(), Some("complete"));
    assert!(!rundir.exists());
}

#[test]
fn the_same_job_id_a_second_time_streams_its_output_again() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-again");
    let name = format!("again-{}", std::process::id());
    let _agent = Agent::start(&server, &s, &name, "test_command: cat testflinger.json\n");
    let job = |run: &str| json!({"job_queue": queue(&name), "name": run, "test_data": {"test_cmds": "x"}});
    let id = server.submit_job(job("first run"));
    wait_for(&server, "the first run", |srv| finished(srv, &id));
    let mut second = job("second run");
    second["job_id"] = json!(id);
    assert_eq!(server.submit_job(second), id);
    wait_for(&server, "the second run's output", |srv| {
        srv.log_text(&id, "output").contains("second run") && finished(srv, &id)
    });
}

#[test]
fn serial_logs_the_server_missed_go_with_the_report() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-serial");
    let name = format!("serial-{}", std::process::id());
    let commands = "provision_command: |\n  head -c 2500000 /dev/zero | tr '\\0' p > provision-serial.log\n  echo provisioned\ntest_command: |\n  echo tested\n  printf 'test serial' > test-serial.log\n";
    let _agent = Agent::start(&server, &s, &name, commands);
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "provision_data": {"url": "x"},
        "test_data": {"test_cmds": "x"},
    }));
    // Every serial post fails until the job is over: both serial logs wait in the spool.
    server.fail_next(
        Route::prefix("POST", &format!("/v1/result/{id}/log/serial")),
        1_000,
        503,
    );
    wait_for(&server, "the report to wait in the spool", |srv| {
        srv.log_text(&id, "output").contains("tested")
            && std::fs::read_dir(s.path("results"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 1
    });
    assert_eq!(server.log_text(&id, "serial"), "");
    server.clear_faults();
    wait_for(&server, "the spooled report", |srv| finished(srv, &id));
    let serial = server.log_text(&id, "serial");
    assert_eq!(serial.len(), 2_500_000 + "test serial".len());
    assert!(
        serial.starts_with("ppp") && serial.ends_with("ptest serial"),
        "in phase order"
    );
    assert_gap_free(&server, &id, "serial");
}

#[test]
fn a_daemon_that_cannot_start_exits_2_after_a_delay_off_a_terminal() {
    let s = Scratch::new("daemon-badconfig");
    let config = s.write(
        "bad.yaml",
        "agent_id: a\nserver_address: http://127.0.0.1:9\njob_queues: [q]\nnot_a_key: 1\n",
    );
    // Off a terminal (stdin is /dev/null here) the agent says why and waits before exiting,
    // so a supervisor that restarts on every exit does not loop as fast as it can.
    // A bad config and a command-line mistake alike.
    let config_arg = config.to_string_lossy().into_owned();
    for (args, named) in [
        (vec!["-c", config_arg.as_str()], "not_a_key"),
        (vec!["-c", "x.yaml", "--no-such-flag"], "--no-such-flag"),
    ] {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(crate::support::agent::BIN)
            .args(&args)
            .env("TESTFLINGER_AGENT_STARTUP_FAILURE_DELAY", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
        assert!(stderr.contains("exiting with status 2 in 1s"), "{stderr}");
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    // A stop during the wait ends it at once.
    let mut child = std::process::Command::new(crate::support::agent::BIN)
        .arg("-c")
        .arg(&config)
        .env("TESTFLINGER_AGENT_STARTUP_FAILURE_DELAY", "600")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawns");
    let mut stderr = child.stderr.take().expect("piped");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("exiting with status 2") {
        use std::io::Read;
        let n = stderr.read(&mut buf).expect("read stderr");
        assert!(
            n > 0,
            "stderr closed early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.is_some_and(|s| !s.success()), "ended by the signal");
}

/// At start the daemon posts the config's `advertised_queues` and `advertised_images`, the
/// latter written in the Python README's list shape and sent in the map shape the server
/// accepts.
#[test]
fn the_advertised_queues_and_images_are_posted() {
    let server = FakeServer::start();
    let s = Scratch::new("daemon-advertised");
    let name = format!("advertised-{}", std::process::id());
    let config = "advertised_queues:\n  lab-rpi4: Raspberry Pi 4, 4 GiB\n\
                  advertised_images:\n  lab-rpi4:\n    - core22: 'url: http://x/core22.img'\n    \
                  - jammy: 'url: http://x/jammy.img'\n";
    let _agent = Agent::start(&server, &s, &name, config);
    wait_for(&server, "the queues and images to be advertised", |srv| {
        srv.advertised_queues() != json!({}) && srv.advertised_images() != json!({})
    });
    assert_eq!(
        server.advertised_queues(),
        json!({"lab-rpi4": "Raspberry Pi 4, 4 GiB"})
    );
    assert_eq!(
        server.advertised_images(),
        json!({"lab-rpi4": {
            "core22": "url: http://x/core22.img",
            "jammy": "url: http://x/jammy.img",
        }})
    );
}
