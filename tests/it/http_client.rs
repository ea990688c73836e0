//! `HttpServer` against the fake Testflinger server: authentication, the identity cookie,
//! polling, strict bodies, live output under faults, serial logs, artifacts and the
//! detach/send_pending hand-over.

use crate::support::fake_server::{FakeConfig, FakeServer, Fragment, Route, DEFAULT_REFRESH_TOKEN};
use crate::support::http_wire::{Handler, Reply, WireRequest, WireResponse, WireServer};
use crate::support::scratch::Scratch;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testflinger_agent::phase::Phase;
use testflinger_agent::server::backoff::{Backoff, RetryPolicy};
use testflinger_agent::server::http::{HttpServer, HttpSettings, PendingOutput, Timeouts};
use testflinger_agent::server::{Server, ServerErrorKind};

const AGENT: &str = "agent-under-test";

/// Settings with millisecond intervals, a token file for the fake's default refresh token.
pub(crate) fn settings(url: &str, scratch: &Scratch) -> HttpSettings {
    let token = scratch.write(
        "refresh_token",
        &json!({"refresh_token": DEFAULT_REFRESH_TOKEN, "obtained_at": "2026-01-05T10:00:00+00:00"})
            .to_string(),
    );
    let mut s = HttpSettings::new(url, AGENT);
    s.token_file = Some(token);
    s.output_post_interval = Duration::from_millis(20);
    s.retry = RetryPolicy {
        max_attempts: 5,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
    };
    s.refresh_backoff = Backoff {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(60),
    };
    s.timeouts = Timeouts {
        default: Duration::from_secs(10),
        log: Duration::from_secs(10),
        transfer: Duration::from_secs(20),
        refresh: Duration::from_secs(5),
        health: Duration::from_secs(5),
        connect: Duration::from_secs(2),
    };
    s.finish_wait = Duration::from_secs(5);
    s
}

pub(crate) fn new_job(server: &FakeServer) -> String {
    server.submit_job(json!({"job_queue": "q-one"}))
}

/// A phase log the test appends to, telling the server about each chunk as the executor
/// does.
pub(crate) struct PhaseLog {
    path: PathBuf,
    phase: Phase,
    len: u64,
    all: Vec<u8>,
}

impl PhaseLog {
    pub(crate) fn new(dir: &Path, phase: Phase) -> PhaseLog {
        let path = dir.join(format!("{}.log", phase.name()));
        std::fs::write(&path, b"").expect("create the phase log");
        PhaseLog {
            path,
            phase,
            len: 0,
            all: Vec::new(),
        }
    }

    pub(crate) fn append(&mut self, server: &HttpServer, job: &str, chunk: &[u8]) {
        let mut f = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .expect("open the phase log");
        f.write_all(chunk).expect("append to the phase log");
        self.len += chunk.len() as u64;
        self.all.extend_from_slice(chunk);
        server.output(job, self.phase, chunk, &self.path, self.len);
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.all).into_owned()
    }
}

/// Fragment numbers are exactly 0..n: no gap, no duplicate.
fn assert_gap_free(frags: &[Fragment]) {
    let mut numbers: Vec<i64> = frags.iter().map(|f| f.fragment_number).collect();
    numbers.sort_unstable();
    let expected: Vec<i64> = (0..numbers.len() as i64).collect();
    assert_eq!(
        numbers, expected,
        "fragment numbers are not gap-free and unique"
    );
}

/// The text the server holds for one phase, fragments in number order.
fn phase_text(frags: &[Fragment], phase: &str) -> String {
    let mut mine: Vec<&Fragment> = frags.iter().filter(|f| f.phase == phase).collect();
    mine.sort_by_key(|f| f.fragment_number);
    mine.iter().map(|f| f.log_data.as_str()).collect()
}

fn log_posts(server: &FakeServer) -> usize {
    server.request_count(&Route::LogPost)
}

pub(crate) fn assert_no_server_panics(server: &FakeServer) {
    assert!(
        server.server_errors().is_empty(),
        "fake server errors: {:?}",
        server.server_errors()
    );
}

#[test]
fn token_is_fetched_lazily_and_a_401_refreshes_and_replays_once() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-auth");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    assert!(
        server.requests().is_empty(),
        "no request before the first call"
    );
    let job = new_job(&server);

    client
        .post_result(&job, &json!({"job_state": "setup"}))
        .expect("first post with a fresh token");
    let routes: Vec<(Option<Route>, u16)> = server
        .requests()
        .into_iter()
        .map(|r| (r.route, r.status))
        .collect();
    assert_eq!(
        routes,
        [(Some(Route::Refresh), 200), (Some(Route::ResultPost), 200)]
    );

    server.expire_all_tokens();
    client
        .post_result(&job, &json!({"job_state": "provision"}))
        .expect("replayed after a refresh");
    let tail: Vec<(Option<Route>, u16)> = server.requests()[2..]
        .iter()
        .map(|r| (r.route.clone(), r.status))
        .collect();
    assert_eq!(
        tail,
        [
            (Some(Route::ResultPost), 401),
            (Some(Route::Refresh), 200),
            (Some(Route::ResultPost), 200)
        ]
    );
    assert_eq!(server.job_state(&job).as_deref(), Some("provision"));
    assert_eq!(
        client
            .job_state(&job)
            .expect("read the job state")
            .as_deref(),
        Some("provision")
    );
    assert_no_server_panics(&server);
}

#[test]
fn a_failed_refresh_is_retried_later_not_cached_forever() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-auth-retry");
    let mut s = settings(&server.url(), &scratch);
    let token_path = scratch.path("late_token");
    s.token_file = Some(token_path.clone());
    let client = HttpServer::new(s);
    let job = new_job(&server);

    // No file yet: the request goes out without a token and is refused (403, OIDC off).
    let e = client
        .post_result(&job, &json!({"job_state": "setup"}))
        .expect_err("no token, no access");
    assert_eq!(e.kind, ServerErrorKind::Unavailable, "{e}");
    assert!(!e.to_string().contains("Bearer"), "{e}");

    // The tooling writes a token the server does not know yet: refused with 400.
    std::fs::write(
        &token_path,
        json!({"refresh_token": "issued-later"}).to_string(),
    )
    .expect("write the token file");
    std::thread::sleep(Duration::from_millis(80));
    assert!(client
        .post_result(&job, &json!({"job_state": "setup"}))
        .is_err());

    // The server learns the token: a later request refreshes again and succeeds.
    server.add_refresh_token("issued-later");
    let ok = server.wait_until(Duration::from_secs(5), |_| {
        client
            .post_result(&job, &json!({"job_state": "test"}))
            .is_ok()
    });
    assert!(ok, "the agent never recovered a token");
    assert_eq!(server.job_state(&job).as_deref(), Some("test"));
    let refreshes = server.request_count(&Route::Refresh);
    let posts = server.request_count(&Route::ResultPost);
    assert!(refreshes >= 2, "refresh was not retried ({refreshes})");
    assert!(
        refreshes < posts + 2,
        "refreshes ({refreshes}) are not paced by the back-off ({posts} posts)"
    );
    assert_no_server_panics(&server);
}

/// A capturing server: answers every request with something plausible and records it.
fn capture_server() -> (WireServer, Arc<Mutex<Vec<WireRequest>>>) {
    let seen: Arc<Mutex<Vec<WireRequest>>> = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let handler: Handler = Arc::new(move |req: WireRequest| {
        let path = req.path.clone();
        record.lock().expect("capture lock").push(req);
        let resp = if path.ends_with("/oauth2/refresh") {
            WireResponse::new(
                200,
                "application/json",
                r#"{"access_token": "tok-123", "token_type": "Bearer", "expires_in": 600}"#,
            )
        } else if path.ends_with("/attachments") {
            WireResponse::new(200, "application/gzip", b"archive-bytes".to_vec())
        } else if path.contains("/agents/data/") {
            WireResponse::new(
                200,
                "application/json",
                r#"{"name": "x", "state": "waiting", "comment": "", "restricted_to": {"q b": ["o"]}}"#,
            )
        } else if path.ends_with("/v1/job") {
            WireResponse::empty(204)
        } else {
            WireResponse::new(200, "application/json", r#"{"job_state": "test"}"#)
        };
        Reply::Send(resp)
    });
    let wire = WireServer::start(0, handler).expect("start the capture server");
    (wire, seen)
}

#[test]
fn every_request_carries_the_cookie_and_token_under_a_path_prefix() {
    let (wire, seen) = capture_server();
    let scratch = Scratch::new("http-capture");
    let url = format!("127.0.0.1:{}/tf/", wire.port());
    let client = HttpServer::new(settings(&url, &scratch));
    let job = "2bac1457-7d5e-4b8f-9f6a-15f23f69fd39";

    assert!(client.health());
    client
        .post_agent_data(&json!({"state": "waiting"}))
        .expect("agent data");
    let record = client.agent_record();
    assert_eq!(record.state.as_deref(), Some("waiting"));
    assert_eq!(record.restricted_to, ["q b"]);
    client.post_queues(&json!({"q": "d"})).expect("queues");
    client
        .post_images(&json!({"q": {"i": "url: x"}}))
        .expect("images");
    let queues = ["rpi4".to_string(), "lab queue&x".to_string()];
    assert_eq!(client.poll_job(&queues).expect("poll"), None);
    let dest = scratch.path("att.tar.gz");
    client.download_attachments(job, &dest).expect("download");
    assert_eq!(std::fs::read(&dest).expect("downloaded"), b"archive-bytes");
    client
        .post_result(job, &json!({"job_state": "test"}))
        .expect("result");
    assert_eq!(
        client.job_state(job).expect("state").as_deref(),
        Some("test")
    );
    client.post_agent_state("test", "").expect("agent state");
    client
        .post_provision_log(job, 0, "provision_success")
        .expect("provision log");
    client
        .post_events(job, &json!({"events": []}))
        .expect("events");
    let tarball = scratch.write("artifacts.tar.gz", "tarball");
    client.upload_artifacts(job, &tarball).expect("artifact");
    let serial = scratch.write("provision-serial.log", "serial text");
    client
        .post_serial_log(job, Phase::Provision, &serial)
        .expect("serial");
    let mut log = PhaseLog::new(&scratch.path(""), Phase::Setup);
    log.append(&client, job, b"hello\n");
    client.finish_output(job, Phase::Setup);
    assert!(client.drain(job, Duration::from_secs(5)));
    drop(client);

    let seen = seen.lock().expect("capture lock").clone();
    assert!(seen.len() >= 16, "only {} requests", seen.len());
    for req in &seen {
        assert!(req.path.starts_with("/tf/v1"), "prefix lost: {}", req.path);
        assert_eq!(
            req.header("Cookie"),
            Some("agent_name=agent-under-test"),
            "{} {}",
            req.method,
            req.path
        );
        let open = req.path == "/tf/v1" || req.path.ends_with("/oauth2/refresh");
        let expected = if open { None } else { Some("Bearer tok-123") };
        assert_eq!(
            req.header("Authorization"),
            expected,
            "{} {}",
            req.method,
            req.path
        );
    }
    assert_eq!(
        seen.iter()
            .filter(|r| r.path.ends_with("/oauth2/refresh"))
            .count(),
        1,
        "one refresh serves every request"
    );
    let poll = seen
        .iter()
        .find(|r| r.path == "/tf/v1/job")
        .expect("the poll");
    assert_eq!(poll.query, "queue=rpi4&queue=lab%20queue%26x");
    let artifact = seen
        .iter()
        .find(|r| r.path.ends_with("/artifact"))
        .expect("the artifact upload");
    assert_eq!(
        artifact.header("Content-Length"),
        Some(artifact.body.len().to_string().as_str())
    );
}

#[test]
fn poll_job_asks_every_queue_and_maps_204_to_none() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-poll");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = server.submit_job(json!({"job_queue": "q-two", "test_data": {"test_cmds": "x"}}));

    let body = client
        .poll_job(&["q-one".to_string(), "q-two".to_string()])
        .expect("poll")
        .expect("a job");
    let doc: Value = serde_json::from_slice(&body).expect("the job is JSON");
    assert_eq!(doc["job_id"], json!(job));
    assert_eq!(server.job_state(&job).as_deref(), Some("running"));

    assert_eq!(
        client
            .poll_job(&["q-one".to_string(), "q-two".to_string()])
            .expect("poll"),
        None
    );
    let e = client.poll_job(&[]).expect_err("no queue is a 400");
    assert_eq!(e.kind, ServerErrorKind::Rejected, "{e}");

    server.fail_next(Route::JobPoll, 10, 503);
    let e = client
        .poll_job(&["q-one".to_string()])
        .expect_err("a 503 storm");
    assert_eq!(e.kind, ServerErrorKind::Unavailable, "{e}");
    server.clear_faults();

    server.go_down();
    assert!(!client.health());
    let e = client.poll_job(&["q-one".to_string()]).expect_err("down");
    assert_eq!(e.kind, ServerErrorKind::Unavailable, "{e}");
    assert_eq!(client.agent_record(), Default::default());
    server.come_back();
    assert!(client.health());
    assert_no_server_panics(&server);
}

#[test]
fn strict_bodies_are_accepted_without_422() {
    let server = FakeServer::start_with(FakeConfig {
        webhook_base: Some("https://hooks.example.com".to_string()),
        ..FakeConfig::default()
    });
    let scratch = Scratch::new("http-strict");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = server.submit_job(json!({
        "job_queue": "q-one",
        "job_status_webhook": "https://hooks.example.com/tf",
    }));

    client
        .post_agent_data(&json!({"state": "waiting", "comment": ""}))
        .expect("agent data");
    client
        .post_agent_data(
            &json!({"location": "lab", "queues": ["q-one"], "provision_type": "noprovision"}),
        )
        .expect("agent data");
    client.post_agent_state("setup", "").expect("agent state");
    client
        .post_result(&job, &json!({"job_state": "setup"}))
        .expect("job state");
    client
        .post_result(
            &job,
            &json!({"device_info": {"device_ip": "10.0.0.5", "agent_name": AGENT}}),
        )
        .expect("device info");
    client
        .post_result(
            &job,
            &json!({"status": {"setup": 0}, "job_state": "complete"}),
        )
        .expect("final result");
    client
        .post_provision_log(&job, 0, "provision_success")
        .expect("provision log");
    client
        .post_events(
            &job,
            &json!({
                "agent_id": AGENT,
                "job_queue": "q-one",
                "job_status_webhook": "https://hooks.example.com/tf",
                "events": [{"event_name": "job_start", "timestamp": "2026-01-05T10:00:00.000000+00:00", "detail": ""}],
            }),
        )
        .expect("events");
    client
        .post_queues(&json!({"q-one": "the queue"}))
        .expect("queues");

    let refused: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.status >= 400)
        .map(|r| format!("{} {} → {}: {}", r.method, r.path, r.status, r.body_excerpt))
        .collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
    let result = server.result_data(&job);
    assert_eq!(result["job_state"], json!("complete"));
    assert_eq!(result["status"], json!({"setup": 0}));
    assert_eq!(result["device_info"]["device_ip"], json!("10.0.0.5"));
    let record = client.agent_record();
    assert_eq!(record.state.as_deref(), Some("setup"));
    assert!(record.updated_at.is_some());
    assert_eq!(server.provision_logs(AGENT).len(), 1);

    // A refused body is an error naming the request and the server's explanation.
    let e = client
        .post_result(&job, &json!({"bogus": 1}))
        .expect_err("unknown field");
    assert_eq!(e.kind, ServerErrorKind::Rejected);
    assert!(e.to_string().contains("422"), "{e}");
    assert!(
        e.to_string().contains(&format!("POST /v1/result/{job}")),
        "{e}"
    );
    // Unknown job: 204 → no state.
    assert_eq!(
        client
            .job_state("0b7bd2d8-8f4f-4c3c-9a51-3c7f1f6a0e11")
            .expect("state"),
        None
    );
    assert_no_server_panics(&server);
}

#[test]
fn many_small_chunks_across_two_phases_arrive_once_in_order_in_few_posts() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-stream");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);
    let dir = scratch.path("");

    let mut chunks = 0;
    let started = Instant::now();
    let mut setup = PhaseLog::new(&dir, Phase::Setup);
    for i in 0..1500 {
        setup.append(&client, &job, format!("setup line {i} ✓\n").as_bytes());
        chunks += 1;
        if i % 10 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    client.finish_output(&job, Phase::Setup);
    let mut test = PhaseLog::new(&dir, Phase::Test);
    for i in 0..1500 {
        test.append(&client, &job, format!("test line {i} – ok\n").as_bytes());
        chunks += 1;
        if i % 10 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    client.finish_output(&job, Phase::Test);
    assert!(client.drain(&job, Duration::from_secs(20)), "not drained");
    let elapsed = started.elapsed();

    let frags = server.fragments(&job, "output");
    assert_gap_free(&frags);
    assert_eq!(phase_text(&frags, "setup"), setup.text());
    assert_eq!(phase_text(&frags, "test"), test.text());
    assert_eq!(server.log_text(&job, "output"), setup.text() + &test.text());
    // Every setup fragment is numbered before every test fragment.
    let last_setup = frags
        .iter()
        .filter(|f| f.phase == "setup")
        .map(|f| f.fragment_number)
        .max();
    let first_test = frags
        .iter()
        .filter(|f| f.phase == "test")
        .map(|f| f.fragment_number)
        .min();
    assert!(last_setup < first_test, "{last_setup:?} !< {first_test:?}");
    // At most one post per 20 ms interval while output flows, plus the first post and
    // one flush per finished phase.
    let posts = log_posts(&server);
    let allowed = (elapsed.as_millis() / 20) as usize + 4;
    eprintln!("MEASURE {posts} log posts for {chunks} chunks in {elapsed:?}");
    assert!(
        posts <= allowed && posts * 10 < chunks,
        "{posts} log posts for {chunks} chunks in {elapsed:?}: not batched"
    );
    let pending = client.detach(&job);
    assert!(pending.is_empty(), "{pending:?}");
    assert_no_server_panics(&server);
}

#[test]
fn a_storm_of_5xx_and_dropped_connections_loses_and_duplicates_nothing() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-storm");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);
    let mut log = PhaseLog::new(&scratch.path(""), Phase::Test);

    server.fail_next(Route::LogPost, 6, 503);
    server.drop_next(Route::LogPost, 2);
    server.fail_next(Route::LogPost, 3, 500);
    for i in 0..400 {
        log.append(&client, &job, format!("line {i}\n").as_bytes());
        if i == 200 {
            server.fail_next(Route::LogPost, 4, 502);
        }
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    client.finish_output(&job, Phase::Test);
    assert!(client.drain(&job, Duration::from_secs(30)), "not drained");

    let frags = server.fragments(&job, "output");
    assert_gap_free(&frags);
    assert_eq!(server.log_text(&job, "output"), log.text());
    let failed = server
        .requests()
        .iter()
        .filter(|r| r.route == Some(Route::LogPost) && r.status >= 500)
        .count();
    assert_eq!(failed, 13, "every injected failure was met");
    let dropped = server
        .requests()
        .iter()
        .filter(|r| r.route == Some(Route::LogPost) && r.status == 0)
        .count();
    assert_eq!(dropped, 2, "every injected drop was met");
    assert_no_server_panics(&server);
}

#[test]
fn dropped_connections_are_resent_with_the_same_number() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-drop");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);
    let mut log = PhaseLog::new(&scratch.path(""), Phase::Setup);

    server.drop_next(Route::LogPost, 3);
    log.append(&client, &job, b"first\n");
    client.finish_output(&job, Phase::Setup);
    assert!(client.drain(&job, Duration::from_secs(10)), "not drained");
    let frags = server.fragments(&job, "output");
    assert_eq!(frags.len(), 1);
    assert_eq!(frags[0].fragment_number, 0);
    assert_eq!(frags[0].log_data, "first\n");
    let dropped = server
        .requests()
        .iter()
        .filter(|r| r.route == Some(Route::LogPost) && r.status == 0)
        .count();
    assert_eq!(dropped, 3);
    assert_no_server_panics(&server);
}

#[test]
fn server_down_while_streaming_then_back_delivers_everything() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-down");
    let mut s = settings(&server.url(), &scratch);
    s.finish_wait = Duration::from_secs(30);
    let client = HttpServer::new(s);
    let job = new_job(&server);
    let mut log = PhaseLog::new(&scratch.path(""), Phase::Provision);

    for i in 0..100 {
        log.append(&client, &job, format!("before {i}\n").as_bytes());
    }
    // Let the streamer go idle so that no post is in flight when the server vanishes.
    let delivered = log.text();
    assert!(
        server.wait_until(Duration::from_secs(10), |s| s.log_text(&job, "output")
            == delivered)
    );

    server.go_down();
    for i in 0..300 {
        log.append(&client, &job, format!("during {i}\n").as_bytes());
    }
    let started = Instant::now();
    client.finish_output(&job, Phase::Provision);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "finish_output waited {:?} for a server that is down",
        started.elapsed()
    );
    assert!(!client.drain(&job, Duration::from_millis(200)));
    server.come_back();
    assert!(client.drain(&job, Duration::from_secs(20)), "not drained");

    let frags = server.fragments(&job, "output");
    assert_gap_free(&frags);
    assert_eq!(server.log_text(&job, "output"), log.text());
    assert_no_server_panics(&server);
}

#[test]
fn split_characters_and_invalid_bytes_decode_like_the_whole_file() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-utf8");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);
    let mut log = PhaseLog::new(&scratch.path(""), Phase::Test);

    // "é" split across two chunks, with the streamer given time to see the first half.
    log.append(&client, &job, b"start \xc3");
    assert!(server.wait_until(Duration::from_secs(10), |s| {
        s.log_text(&job, "output") == "start "
    }));
    log.append(&client, &job, b"\xa9 then \xff\xfe invalid ");
    // "€" in three chunks, "𝄞" in two.
    let euro = "€".as_bytes();
    log.append(&client, &job, &euro[..1]);
    std::thread::sleep(Duration::from_millis(40));
    log.append(&client, &job, &euro[1..2]);
    std::thread::sleep(Duration::from_millis(40));
    log.append(&client, &job, &euro[2..]);
    let clef = "𝄞".as_bytes();
    log.append(&client, &job, &clef[..3]);
    std::thread::sleep(Duration::from_millis(40));
    log.append(&client, &job, &clef[3..]);
    // An invalid sequence cut short, and a truncated character at the very end.
    log.append(&client, &job, b" \xe0\x80 end \xe2\x82");
    client.finish_output(&job, Phase::Test);
    assert!(client.drain(&job, Duration::from_secs(10)), "not drained");

    let expected = String::from_utf8_lossy(&std::fs::read(&log.path).expect("log")).into_owned();
    let got = server.log_text(&job, "output");
    assert_eq!(got, expected);
    assert!(got.contains("start é then"), "{got:?}");
    assert!(got.contains("€𝄞"), "{got:?}");
    assert_gap_free(&server.fragments(&job, "output"));
    assert_no_server_panics(&server);
}

#[test]
fn a_refused_fragment_is_skipped_and_later_output_still_flows() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-refused");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);
    let mut log = PhaseLog::new(&scratch.path(""), Phase::Setup);

    log.append(&client, &job, b"kept one\n");
    assert!(server.wait_until(Duration::from_secs(10), |s| {
        s.log_text(&job, "output") == "kept one\n"
    }));
    server.fail_next(Route::LogPost, 1, 400);
    log.append(&client, &job, b"refused\n");
    assert!(server.wait_until(Duration::from_secs(10), |s| {
        s.request_count(&Route::LogPost) >= 2
    }));
    log.append(&client, &job, b"kept two\n");
    client.finish_output(&job, Phase::Setup);
    assert!(
        client.drain(&job, Duration::from_secs(10)),
        "blocked by a refusal"
    );

    assert_eq!(server.log_text(&job, "output"), "kept one\nkept two\n");
    assert_gap_free(&server.fragments(&job, "output"));
    assert_no_server_panics(&server);
}

#[test]
fn serial_logs_over_1_mib_go_in_numbered_fragments() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-serial");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);

    // 2.5 MiB with multibyte characters straddling every 1 MiB boundary, one bad byte.
    let mut bytes = Vec::new();
    let mut i = 0;
    while bytes.len() < 5 * 512 * 1024 {
        bytes.extend_from_slice(format!("serial {i} ⚡ ünïcödé\n").as_bytes());
        i += 1;
    }
    bytes.extend_from_slice(b"\xff tail\n");
    let path = scratch.path("provision-serial.log");
    std::fs::write(&path, &bytes).expect("write the serial log");
    client
        .post_serial_log(&job, Phase::Provision, &path)
        .expect("serial log");
    let frags = server.fragments(&job, "serial");
    assert_eq!(frags.len(), 3, "2.5 MiB in 1 MiB fragments");
    assert!(frags
        .iter()
        .all(|f| f.log_data.len() <= 1024 * 1024 && f.phase == "provision"));
    assert_gap_free(&frags);
    assert_eq!(
        server.log_text(&job, "serial"),
        String::from_utf8_lossy(&bytes)
    );

    // The numbering continues with the next phase's serial log; a missing file is no error.
    let path = scratch.write("test-serial.log", "test serial\n");
    server.fail_next(Route::LogPost, 2, 503);
    client
        .post_serial_log(&job, Phase::Test, &path)
        .expect("serial log after 503s");
    client
        .post_serial_log(&job, Phase::Reserve, &scratch.path("absent-serial.log"))
        .expect("no serial log");
    let frags = server.fragments(&job, "serial");
    assert_gap_free(&frags);
    assert_eq!(frags.last().map(|f| f.fragment_number), Some(3));
    assert_eq!(
        frags.last().map(|f| f.log_data.as_str()),
        Some("test serial\n")
    );
    assert_no_server_panics(&server);
}

#[test]
fn serial_logs_are_masked_with_their_phase_secrets_also_when_sent_from_the_spool() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-serial-mask");
    let mut s = settings(&server.url(), &scratch);
    s.fragment_size = 16;
    let client = HttpServer::new(s.clone());
    let job = new_job(&server);
    let rundir = scratch.path("run");
    std::fs::create_dir_all(&rundir).expect("run dir");
    std::fs::write(
        rundir.join("testflinger.json"),
        json!({"job_id": job, "test_data": {"test_cmds": "true",
               "secrets": {"TOKEN": "hunter2-very-long-secret", "OTHER": "pw"}}})
        .to_string(),
    )
    .expect("job file");
    // Secrets across every 16-byte boundary, one longer than a fragment.
    let text = "boot: pw ok\nlogin hunter2-very-long-secret\n$ echo hunter2-very-long-secretpw\n";
    let path = rundir.join("test-serial.log");
    std::fs::write(&path, text).expect("serial log");
    client
        .post_serial_log(&job, Phase::Test, &path)
        .expect("serial log");
    // Setup has no secrets: its serial log goes as it is.
    let setup = rundir.join("setup-serial.log");
    std::fs::write(&setup, "pw\n").expect("serial log");
    client
        .post_serial_log(&job, Phase::Setup, &setup)
        .expect("serial log");
    let masker = testflinger_agent::mask::Masker::new(["hunter2-very-long-secret", "pw"]);
    let masked = String::from_utf8_lossy(&masker.mask_all(text.as_bytes())).into_owned();
    assert!(!masked.contains("pw") && masked.contains("**"), "{masked}");
    assert_eq!(server.log_text(&job, "serial"), format!("{masked}pw\n"));
    for f in server.fragments(&job, "serial") {
        assert!(!f.log_data.contains("hunter2"), "{f:?}");
    }

    // The same log, left for the report (as after a restart): masked the same way.
    let job2 = new_job(&server);
    let pending: PendingOutput = serde_json::from_value(json!({
        "next_fragment": 0, "phases": [], "next_serial_fragment": 5,
        "serial": [{"phase": "test", "log_file": "test-serial.log", "sent": 0}],
    }))
    .expect("record");
    let client = HttpServer::new(s);
    server.fail_next(Route::LogPost, 2, 503);
    client
        .send_pending(&job2, &rundir, &pending)
        .expect("send the rest");
    assert_eq!(server.log_text(&job2, "serial"), masked);
    assert_no_server_panics(&server);
}

#[test]
fn artifacts_and_attachments_round_trip_byte_for_byte() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-artifact");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);

    let mut bytes = Vec::with_capacity(300_000);
    let mut x: u32 = 12345;
    while bytes.len() < 300_000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        bytes.push((x >> 16) as u8);
        if bytes.len() % 10_000 == 0 {
            bytes.extend_from_slice(b"\r\n--boundary-like\r\n");
        }
    }
    let tarball = scratch.path("artifacts.tar.gz");
    std::fs::write(&tarball, &bytes).expect("write the tarball");
    client.upload_artifacts(&job, &tarball).expect("upload");
    assert_eq!(server.artifact(&job).as_deref(), Some(&bytes[..]));

    let e = client
        .upload_artifacts(&job, &scratch.path("missing.tar.gz"))
        .expect_err("no file");
    assert_eq!(e.kind, ServerErrorKind::Local);

    let dest = scratch.path("attachments.tar.gz");
    let with_attachments = server.submit_job(json!({
        "job_queue": "q-one",
        "test_data": {"test_cmds": "x", "attachments": [{"agent": "data.txt"}]},
    }));
    let e = client
        .download_attachments(&with_attachments, &dest)
        .expect_err("no archive stored");
    assert_eq!(e.kind, ServerErrorKind::Malformed, "{e}");
    assert!(!dest.exists(), "no empty file for a 204");
    assert!(server.set_attachments(&with_attachments, bytes.clone()));
    client
        .download_attachments(&with_attachments, &dest)
        .expect("download");
    assert_eq!(std::fs::read(&dest).expect("downloaded"), bytes);
    assert_no_server_panics(&server);
}

#[test]
fn detach_then_send_pending_continues_the_numbering() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-pending");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);
    let rundir = scratch.path("run");
    std::fs::create_dir_all(&rundir).expect("run dir");

    let mut setup = PhaseLog::new(&rundir, Phase::Setup);
    for i in 0..50 {
        setup.append(&client, &job, format!("setup {i}\n").as_bytes());
    }
    client.finish_output(&job, Phase::Setup);
    assert!(client.drain(&job, Duration::from_secs(10)));
    let delivered_fragments = server.fragments(&job, "output").len();

    server.go_down();
    let mut test = PhaseLog::new(&rundir, Phase::Test);
    for i in 0..50 {
        test.append(&client, &job, format!("test {i} ✓\n").as_bytes());
    }
    client.finish_output(&job, Phase::Test);
    let mut cleanup = PhaseLog::new(&rundir, Phase::Cleanup);
    cleanup.append(&client, &job, b"cleanup \xe2\x82");
    client.finish_output(&job, Phase::Cleanup);
    let pending = client.detach(&job);
    assert_eq!(pending.next_fragment, delivered_fragments as u64);
    let names: Vec<&str> = pending.phases.iter().map(|p| p.log_file.as_str()).collect();
    assert_eq!(names, ["test.log", "cleanup.log"]);
    // Output after detach is not streamed.
    cleanup.append(&client, &job, b"");
    drop(client);

    // The daemon stores the record, moves the run directory into the spool, restarts.
    let stored = serde_json::to_string(&pending).expect("serialise");
    let spooled = scratch.path("spool-run");
    std::fs::rename(&rundir, &spooled).expect("move the run dir");
    server.come_back();
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let mut pending: PendingOutput = serde_json::from_str(&stored).expect("parse");
    server.fail_next(Route::LogPost, 2, 503);
    client
        .send_pending_resumable(&job, &spooled, &mut pending)
        .expect("send the rest");
    assert!(pending.is_empty(), "{pending:?}");

    let frags = server.fragments(&job, "output");
    assert_gap_free(&frags);
    assert_eq!(
        server.log_text(&job, "output"),
        setup.text() + &test.text() + &cleanup.text()
    );
    // Sending again has nothing left to send.
    client
        .send_pending(&job, &spooled, &pending)
        .expect("nothing to send");
    assert_eq!(server.fragments(&job, "output").len(), frags.len());
    assert_no_server_panics(&server);
}

/// Runs `send` against a server that starts failing every log post once three went
/// through; returns what `send` returned.
fn fail_after_three<T>(server: &FakeServer, send: impl FnOnce() -> T) -> T {
    std::thread::scope(|scope| {
        scope.spawn(|| {
            server.wait_until(Duration::from_secs(10), |s| {
                s.request_count(&Route::LogPost) >= 3
            });
            server.fail_next(Route::LogPost, 100_000, 503);
        });
        send()
    })
}

fn pending_fixture(
    server: &FakeServer,
    scratch: &Scratch,
) -> (HttpServer, String, PathBuf, String, PendingOutput) {
    let mut s = settings(&server.url(), scratch);
    s.fragment_size = 64;
    let client = HttpServer::new(s);
    let job = new_job(server);
    let rundir = scratch.path("run");
    std::fs::create_dir_all(&rundir).expect("run dir");
    let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(rundir.join("test.log"), &text).expect("log");
    let pending: PendingOutput = serde_json::from_value(json!({
        "next_fragment": 4,
        "phases": [{"phase": "test", "log_file": "test.log", "sent": 0}],
    }))
    .expect("record");
    (client, job, rundir, text, pending)
}

/// The server holds `text` once, numbered gap-free from 4.
fn assert_delivered_once_from_4(server: &FakeServer, job: &str, text: &str) {
    let frags = server.fragments(job, "output");
    let mut numbers: Vec<i64> = frags.iter().map(|f| f.fragment_number).collect();
    numbers.sort_unstable();
    let expected: Vec<i64> = (4..4 + numbers.len() as i64).collect();
    assert_eq!(numbers, expected);
    assert_eq!(server.log_text(job, "output"), text);
}

#[test]
fn send_pending_resumable_keeps_its_place_when_the_server_fails() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-pending-fail");
    let (client, job, rundir, text, mut pending) = pending_fixture(&server, &scratch);

    let first = fail_after_three(&server, || {
        client.send_pending_resumable(&job, &rundir, &mut pending)
    });
    let e = first.expect_err("the server failed mid-way");
    assert_eq!(e.kind, ServerErrorKind::Unavailable, "{e}");
    let stored = server.fragments(&job, "output").len() as u64;
    assert!(stored >= 3, "{stored}");
    assert_eq!(
        pending.next_fragment,
        4 + stored,
        "the record follows the server"
    );
    assert!(pending.phases[0].sent > 0);

    // As after a restart: a new client with the stored record.
    server.clear_faults();
    let stored_record = serde_json::to_string(&pending).expect("serialise");
    drop(client);
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let mut pending: PendingOutput = serde_json::from_str(&stored_record).expect("parse");
    client
        .send_pending_resumable(&job, &rundir, &mut pending)
        .expect("resume");
    assert!(pending.is_empty());
    assert_delivered_once_from_4(&server, &job, &text);
    assert_no_server_panics(&server);
}

#[test]
fn send_pending_by_reference_resumes_where_a_failed_call_stopped() {
    let server = FakeServer::start();
    let scratch = Scratch::new("http-pending-ref");
    let (client, job, rundir, text, pending) = pending_fixture(&server, &scratch);

    let first = fail_after_three(&server, || client.send_pending(&job, &rundir, &pending));
    let e = first.expect_err("the server failed mid-way");
    assert_eq!(e.kind, ServerErrorKind::Unavailable, "{e}");
    assert!(server.fragments(&job, "output").len() >= 3);

    server.clear_faults();
    client
        .send_pending(&job, &rundir, &pending)
        .expect("resume with the same record");
    assert_delivered_once_from_4(&server, &job, &text);
    assert_no_server_panics(&server);
}

#[test]
fn answers_not_needed_are_read_so_the_connection_is_reused() {
    let server = FakeServer::start();
    let scratch = Scratch::new("reuse");
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);
    for n in 0..10 {
        client
            .post_result(&job, &json!({"job_state": "test"}))
            .expect("result post");
        client
            .post_agent_state("test", &format!("post {n}"))
            .expect("agent state post");
    }
    assert!(client.health());
    // The token exchange and the posts: one connection (two if the pool lost a race), not
    // one per request.
    let accepted = server.connections_accepted();
    assert!(accepted <= 2, "{accepted} connections for 21 requests");
}

/// A server that accepts and reads every request and answers none: one call costs one
/// deadline, not one per attempt (before: five attempts of the whole timeout each, retried
/// at debug level, so an agent record read was silent for minutes), and the error says the
/// server gave no answer.
#[test]
fn a_server_that_never_answers_costs_one_deadline_not_one_per_attempt() {
    let server = FakeServer::start();
    let s = Scratch::new("http-swallow");
    let mut settings = settings(&server.url(), &s);
    settings.timeouts.default = Duration::from_millis(1500);
    let client = HttpServer::new(settings);
    server.swallow(true);
    let err = client
        .read_agent_record()
        .expect_err("no answer is an error");
    assert!(err.is_no_answer(), "{err}");
    assert_eq!(err.kind, ServerErrorKind::Unavailable, "{err}");
    assert_eq!(
        server.swallowed(),
        1,
        "one attempt filled the deadline: {err}"
    );
    // A refused connection is no answer either, and is retried within the deadline.
    server.swallow(false);
    server.go_down();
    let err = client.read_agent_record().expect_err("refused is an error");
    assert!(err.is_no_answer(), "{err}");
    assert!(err.detail.contains("attempt(s)"), "{err}");
    server.come_back();
    assert!(client.read_agent_record().is_ok());
    // An answer that is an error is not "no answer".
    server.fail_next(Route::AgentDataGet, 5, 503);
    let err = client.read_agent_record().expect_err("5xx is an error");
    assert!(!err.is_no_answer(), "{err}");
}
