//! HTTPS to a lab's own server: the daemon (real binary) behind a TLS front whose
//! certificate comes from a private CA trusts that CA when REQUESTS_CA_BUNDLE or
//! SSL_CERT_FILE names it, and otherwise says in its log what is wrong and keeps retrying.
//! The variables are set on the daemon's command only, never in the test process.

use crate::support::agent::{finished, queue, wait_for, Agent, WAIT};
use crate::support::fake_server::FakeServer;
use crate::support::scratch::Scratch;
use crate::support::tls_front::{TestCa, TlsFront};
use serde_json::json;
use std::time::{Duration, Instant};

/// Every variable the agent reads trust roots from, removed unless a test sets it, so the
/// developer's own environment cannot change the outcome.
const TRUST_VARIABLES: [&str; 4] = [
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

fn env_with<'a>(set: &[(&'a str, &'a str)]) -> Vec<(&'a str, Option<&'a str>)> {
    TRUST_VARIABLES
        .iter()
        .map(|var| {
            let value = set.iter().find(|(k, _)| k == var).map(|(_, v)| *v);
            (*var, value)
        })
        .collect()
}

/// Waits (bounded) until `condition` holds.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_of(scratch: &Scratch, name: &str) -> String {
    std::fs::read_to_string(Agent::stderr_path(scratch, name)).unwrap_or_default()
}

/// A job run over `https://` with the CA named by `variable`.
fn job_completes_with_ca_in(variable: &str, tag: &str) {
    let ca = TestCa::new("Lab CA");
    let server = FakeServer::start();
    let front = TlsFront::start(ca.leaf(&["127.0.0.1", "localhost"]), server.port());
    let s = Scratch::new(&format!("tls-{tag}"));
    let ca_file = s.write("lab-ca.pem", ca.pem());
    let ca_path = ca_file.to_str().expect("a UTF-8 scratch path");
    let name = format!("tls-{tag}-{}", std::process::id());
    let commands = format!(
        "server_address: {}\ntest_command: echo test over tls\n",
        front.url()
    );
    let mut agent = Agent::start_env(
        &server,
        &s,
        &name,
        &commands,
        &env_with(&[(variable, ca_path)]),
    );
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "test_data": {"test_cmds": "x"},
    }));
    wait_for(&server, "the job to complete over https", |srv| {
        finished(srv, &id)
    });
    assert_eq!(server.job_state(&id).as_deref(), Some("complete"));
    assert!(
        server.log_text(&id, "output").contains("test over tls"),
        "the output reached the server through the TLS front"
    );
    assert!(front.handshakes_ok() >= 1);
    assert_eq!(
        front.handshakes_failed(),
        0,
        "no refused handshake: {:?}",
        front.failures()
    );
    let log = log_of(&s, &name);
    assert!(
        log.contains(&format!("{variable}={ca_path} (1 certificate)")),
        "the start-up line says the bundle is trusted:\n{log}"
    );
    assert_eq!(agent.stop(), Some(0));
}

#[test]
fn a_job_completes_over_https_with_the_ca_in_requests_ca_bundle() {
    job_completes_with_ca_in("REQUESTS_CA_BUNDLE", "rcb");
}

#[test]
fn a_job_completes_over_https_with_the_ca_in_ssl_cert_file() {
    job_completes_with_ca_in("SSL_CERT_FILE", "scf");
}

#[test]
fn an_untrusted_ca_is_named_in_the_log_and_the_agent_keeps_trying() {
    let ca = TestCa::new("Unknown CA");
    let server = FakeServer::start();
    let front = TlsFront::start(ca.leaf(&["127.0.0.1"]), server.port());
    let s = Scratch::new("tls-unknown");
    let name = format!("tls-unknown-{}", std::process::id());
    let commands = format!(
        "server_address: {}\ntest_command: echo never\n",
        front.url()
    );
    let mut agent = Agent::start_env(&server, &s, &name, &commands, &env_with(&[]));
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "test_data": {"test_cmds": "x"},
    }));
    // The daemon's own line for its first request (the agent record, read before anything
    // is posted) carries the TLS sentence.
    let poll_line = |log: &str| {
        log.lines()
            .find(|l| l.contains("cannot read this agent's record") && l.contains("unknown issuer"))
            .map(str::to_string)
    };
    eventually("the failed record read in the log", || {
        poll_line(&log_of(&s, &name)).is_some()
    });
    let line = poll_line(&log_of(&s, &name)).expect("seen above");
    for needle in [
        format!(
            "TLS: the certificate of {} has an unknown issuer",
            front.url()
        ),
        "REQUESTS_CA_BUNDLE".to_string(),
        "SSL_CERT_FILE".to_string(),
    ] {
        assert!(line.contains(&needle), "{needle:?} in the line: {line}");
    }
    assert_eq!(
        line.matches("unknown issuer").count(),
        1,
        "said once in the line: {line}"
    );
    // It keeps trying: more refused handshakes after that line.
    let seen = front.handshakes_failed();
    assert!(seen >= 2, "handshakes refused so far: {seen}");
    eventually("another handshake after the failed poll", || {
        front.handshakes_failed() > seen
    });
    assert_eq!(front.handshakes_ok(), 0, "{:?}", front.failures());
    assert!(
        server.requests().is_empty(),
        "nothing got through the front: {:?}",
        server.requests()
    );
    assert_eq!(
        server.job_state(&id).as_deref(),
        Some("waiting"),
        "no job taken"
    );
    // One line per attempt at most: every logged sentence stands for a refused handshake.
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let said = log_of(&s, &name).matches("has an unknown issuer").count();
    eventually("the front to count the last attempts", || {
        front.handshakes_failed() >= said
    });
}

#[test]
fn a_certificate_for_another_name_is_a_name_mismatch() {
    let ca = TestCa::new("Lab CA");
    let server = FakeServer::start();
    let front = TlsFront::start(ca.leaf(&["example.invalid"]), server.port());
    let s = Scratch::new("tls-name");
    let ca_file = s.write("lab-ca.pem", ca.pem());
    let ca_path = ca_file.to_str().expect("a UTF-8 scratch path");
    let name = format!("tls-name-{}", std::process::id());
    let commands = format!("server_address: {}\n", front.url());
    let _agent = Agent::start_env(
        &server,
        &s,
        &name,
        &commands,
        &env_with(&[("REQUESTS_CA_BUNDLE", ca_path)]),
    );
    let mismatch = |log: &str| {
        log.lines()
            .find(|l| l.contains("name mismatch"))
            .map(str::to_string)
    };
    eventually("a name mismatch in the log", || {
        mismatch(&log_of(&s, &name)).is_some()
    });
    let line = mismatch(&log_of(&s, &name)).expect("seen above");
    let expected = format!(
        "TLS: the certificate of {} is not valid for 127.0.0.1 (name mismatch): it is for \
         example.invalid",
        front.url()
    );
    assert!(line.contains(&expected), "{expected:?} in the line: {line}");
    assert!(
        !line.contains("unknown issuer"),
        "the CA is trusted: {line}"
    );
    assert_eq!(front.handshakes_ok(), 0);
    assert!(server.requests().is_empty());
}
