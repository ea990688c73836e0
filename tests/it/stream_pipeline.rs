//! The live-output pipeline (one fragment on the wire, the next one read and built behind
//! it) against the fake server, in scenarios where the fragment prepared ahead must be
//! dropped or renumbered: every post slowed down (so one is always prepared ahead), then
//! a fragment refused, failures and dropped connections, an outage while a post is in
//! flight, a detach while fragments wait. What is checked is only the outcome: numbers
//! exactly 0..n, every byte once and in order, nothing lost; no timing.

use crate::http_client::{assert_no_server_panics, new_job, settings};
use crate::support::fake_server::{FakeServer, Fragment, Route};
use crate::support::scratch::Scratch;
use std::path::PathBuf;
use std::time::Duration;
use testflinger_agent::phase::Phase;
use testflinger_agent::server::http::{HttpServer, HttpSettings, MAX_FRAGMENT_TEXT};
use testflinger_agent::server::Server;

/// Small fragments, so that a short log makes many of them.
const FRAGMENT: usize = 64;

/// A log of `lines` numbered lines (ASCII, so fragments are exactly [`FRAGMENT`] bytes).
fn log_text(lines: usize) -> String {
    (0..lines)
        .map(|i| format!("line {i:05} of the log\n"))
        .collect()
}

fn pipeline_settings(server: &FakeServer, scratch: &Scratch) -> HttpSettings {
    let mut s = settings(&server.url(), scratch);
    s.fragment_size = FRAGMENT;
    s.finish_wait = Duration::from_millis(200);
    s
}

/// Writes the whole log of `phase` at once and tells the client about it.
fn write_log(
    client: &HttpServer,
    job: &str,
    dir: &std::path::Path,
    phase: Phase,
    text: &str,
) -> PathBuf {
    let path = dir.join(format!("{}.log", phase.name()));
    std::fs::write(&path, text).expect("write the phase log");
    client.output(job, phase, text.as_bytes(), &path, text.len() as u64);
    path
}

/// The numbers in arrival order are 0..n, each once.
fn assert_numbered_once_in_order(frags: &[Fragment]) {
    let numbers: Vec<i64> = frags.iter().map(|f| f.fragment_number).collect();
    let expected: Vec<i64> = (0..frags.len() as i64).collect();
    assert_eq!(
        numbers, expected,
        "fragments not numbered 0..n once each, in order"
    );
}

/// The text of each phase in number order, phases in the order their fragments come.
fn phase_texts(frags: &[Fragment]) -> Vec<(String, String)> {
    let mut sorted: Vec<&Fragment> = frags.iter().collect();
    sorted.sort_by_key(|f| f.fragment_number);
    let mut texts: Vec<(String, String)> = Vec::new();
    for f in sorted {
        match texts.last_mut() {
            Some((phase, text)) if *phase == f.phase => text.push_str(&f.log_data),
            _ => texts.push((f.phase.clone(), f.log_data.clone())),
        }
    }
    texts
}

#[test]
fn slow_posts_still_arrive_numbered_0_to_n_once_each_and_complete() {
    let server = FakeServer::start();
    let scratch = Scratch::new("pipe-slow");
    let client = HttpServer::new(pipeline_settings(&server, &scratch));
    let job = new_job(&server);
    let dir = scratch.path("");
    server.delay(Route::LogPost, Duration::from_millis(15));

    let setup = log_text(40);
    let test = log_text(60);
    write_log(&client, &job, &dir, Phase::Setup, &setup);
    client.finish_output(&job, Phase::Setup);
    write_log(&client, &job, &dir, Phase::Test, &test);
    client.finish_output(&job, Phase::Test);
    assert!(client.drain(&job, Duration::from_secs(60)), "not drained");

    let frags = server.fragments(&job, "output");
    assert_numbered_once_in_order(&frags);
    assert!(
        frags.len() >= (setup.len() + test.len()) / FRAGMENT,
        "{} fragments",
        frags.len()
    );
    assert!(frags.iter().all(|f| f.log_data.len() <= FRAGMENT));
    assert_eq!(
        phase_texts(&frags),
        vec![("setup".to_string(), setup), ("test".to_string(), test)]
    );
    assert!(client.detach(&job).is_empty());
    assert_no_server_panics(&server);
}

#[test]
fn a_refused_fragment_renumbers_the_one_prepared_behind_it() {
    let server = FakeServer::start();
    let scratch = Scratch::new("pipe-refused");
    let client = HttpServer::new(pipeline_settings(&server, &scratch));
    let job = new_job(&server);
    server.delay(Route::LogPost, Duration::from_millis(15));
    // The first post is refused for good; the second fragment, prepared meanwhile as
    // number 1, must go out as 0.
    server.fail_next(Route::LogPost, 1, 400);

    let text = log_text(20);
    write_log(&client, &job, &scratch.path(""), Phase::Test, &text);
    client.finish_output(&job, Phase::Test);
    assert!(client.drain(&job, Duration::from_secs(30)), "not drained");

    let frags = server.fragments(&job, "output");
    assert_numbered_once_in_order(&frags);
    assert_eq!(server.log_text(&job, "output"), text[FRAGMENT..]);
    assert_eq!(
        server
            .requests()
            .iter()
            .filter(|r| r.route == Some(Route::LogPost) && r.status == 400)
            .count(),
        1
    );
    assert_no_server_panics(&server);
}

#[test]
fn failures_and_dropped_connections_mid_pipeline_lose_and_repeat_nothing() {
    let server = FakeServer::start();
    let scratch = Scratch::new("pipe-faults");
    let client = HttpServer::new(pipeline_settings(&server, &scratch));
    let job = new_job(&server);
    let dir = scratch.path("");
    server.delay(Route::LogPost, Duration::from_millis(10));

    let provision = log_text(30);
    let test = log_text(50);
    write_log(&client, &job, &dir, Phase::Provision, &provision);
    assert!(server.wait_until(Duration::from_secs(10), |s| s
        .fragments(&job, "output")
        .len()
        >= 3));
    // Neither kind of failure stores the post (a 503 answer; a connection closed after the
    // request was read and not applied), so nothing may show twice.
    server.fail_next(Route::LogPost, 2, 503);
    server.drop_next(Route::LogPost, 2);
    client.finish_output(&job, Phase::Provision);
    write_log(&client, &job, &dir, Phase::Test, &test);
    assert!(server.wait_until(Duration::from_secs(10), |s| {
        s.fragments(&job, "output")
            .iter()
            .any(|f| f.phase == "test")
    }));
    server.drop_next(Route::LogPost, 1);
    server.fail_next(Route::LogPost, 1, 502);
    client.finish_output(&job, Phase::Test);
    assert!(client.drain(&job, Duration::from_secs(60)), "not drained");

    let frags = server.fragments(&job, "output");
    assert_numbered_once_in_order(&frags);
    assert_eq!(
        phase_texts(&frags),
        vec![
            ("provision".to_string(), provision),
            ("test".to_string(), test)
        ]
    );
    let failed = server
        .requests()
        .iter()
        .filter(|r| r.route == Some(Route::LogPost) && (r.status == 0 || r.status >= 500))
        .count();
    assert_eq!(failed, 6, "every injected failure was met");
    assert_no_server_panics(&server);
}

#[test]
fn an_outage_with_a_post_in_flight_loses_nothing_and_repeats_at_most_that_post() {
    let server = FakeServer::start();
    let scratch = Scratch::new("pipe-outage");
    let mut s = pipeline_settings(&server, &scratch);
    s.timeouts.log = Duration::from_secs(2);
    let client = HttpServer::new(s);
    let job = new_job(&server);
    server.delay(Route::LogPost, Duration::from_millis(40));

    let text = log_text(40);
    write_log(&client, &job, &scratch.path(""), Phase::Test, &text);
    assert!(server.wait_until(Duration::from_secs(10), |s| s
        .fragments(&job, "output")
        .len()
        >= 4));
    // A post is on the wire (each waits 40 ms) and the next one prepared: the server goes
    // away. The post in flight may still be stored although its answer is lost.
    server.go_down();
    std::thread::sleep(Duration::from_millis(150));
    server.come_back();
    client.finish_output(&job, Phase::Test);
    assert!(client.drain(&job, Duration::from_secs(60)), "not drained");

    let frags = server.fragments(&job, "output");
    let mut numbers: Vec<i64> = frags.iter().map(|f| f.fragment_number).collect();
    numbers.sort_unstable();
    let twice: Vec<i64> = numbers
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    assert!(twice.len() <= 1, "numbers held twice: {twice:?}");
    numbers.dedup();
    assert_eq!(
        numbers,
        (0..numbers.len() as i64).collect::<Vec<_>>(),
        "a gap"
    );
    // One fragment per number (the one that came last) rebuilds the log exactly; a number
    // held twice holds the same bytes both times.
    for n in &twice {
        let same: Vec<&Fragment> = frags.iter().filter(|f| f.fragment_number == *n).collect();
        assert_eq!(
            same[0].log_data, same[1].log_data,
            "fragment {n} resent with other bytes"
        );
    }
    let mut kept: Vec<&Fragment> = Vec::new();
    for f in &frags {
        kept.retain(|k| k.fragment_number != f.fragment_number);
        kept.push(f);
    }
    kept.sort_by_key(|f| f.fragment_number);
    let rebuilt: String = kept.iter().map(|f| f.log_data.as_str()).collect();
    assert_eq!(rebuilt, text, "output lost or reordered");
    assert_no_server_panics(&server);
}

#[test]
fn detach_with_fragments_prepared_ahead_hands_over_exactly_what_was_not_accepted() {
    let server = FakeServer::start();
    let scratch = Scratch::new("pipe-detach");
    let s = pipeline_settings(&server, &scratch);
    let client = HttpServer::new(s.clone());
    let job = new_job(&server);
    let dir = scratch.path("");
    server.delay(Route::LogPost, Duration::from_millis(20));

    let text = log_text(60);
    write_log(&client, &job, &dir, Phase::Test, &text);
    assert!(server.wait_until(Duration::from_secs(10), |s| s
        .fragments(&job, "output")
        .len()
        >= 2));
    // Mid-stream: one post in flight, one prepared behind it.
    let pending = client.detach(&job);
    drop(client);
    assert!(
        !pending.is_empty(),
        "the whole log went out before the detach"
    );
    let delivered = server.fragments(&job, "output");
    assert_numbered_once_in_order(&delivered);
    assert_eq!(pending.next_fragment, delivered.len() as u64);
    let sent: usize = delivered.iter().map(|f| f.log_data.len()).sum();
    assert_eq!(pending.phases.len(), 1);
    assert_eq!(pending.phases[0].sent, sent as u64, "{pending:?}");

    // The report sends the rest from the file, numbered on.
    server.delay(Route::LogPost, Duration::ZERO);
    let client = HttpServer::new(s);
    client
        .send_pending(&job, &dir, &pending)
        .expect("the rest is delivered");
    let frags = server.fragments(&job, "output");
    assert_numbered_once_in_order(&frags);
    assert_eq!(server.log_text(&job, "output"), text);
    assert_no_server_panics(&server);
}

/// Escaped as `\u0001`: six bytes of JSON a byte of log.
fn control_bytes(n: usize) -> Vec<u8> {
    vec![1u8; n]
}

#[test]
fn text_that_escapes_badly_is_cut_into_fragments_whose_json_text_stays_under_the_limit() {
    let server = FakeServer::start();
    let scratch = Scratch::new("pipe-escape");
    // The default fragment size, 1 MiB: such a fragment would carry 6 MiB of escaped text.
    let client = HttpServer::new(settings(&server.url(), &scratch));
    let job = new_job(&server);
    let dir = scratch.path("");
    let bytes = control_bytes(1536 * 1024);
    let path = dir.join("test.log");
    std::fs::write(&path, &bytes).expect("write the log");
    client.output(&job, Phase::Test, &bytes, &path, bytes.len() as u64);
    client.finish_output(&job, Phase::Test);
    assert!(client.drain(&job, Duration::from_secs(60)), "not drained");
    // The serial log takes the same cut.
    let serial = dir.join("test-serial.log");
    std::fs::write(&serial, &bytes).expect("write the serial log");
    client
        .post_serial_log(&job, Phase::Test, &serial)
        .expect("the serial log is delivered");

    for log_type in ["output", "serial"] {
        let frags = server.fragments(&job, log_type);
        assert_numbered_once_in_order(&frags);
        assert!(frags.len() >= 2, "{log_type}: {} fragment(s)", frags.len());
        for f in &frags {
            let escaped = serde_json::to_string(&f.log_data).expect("serialise").len() - 2;
            assert!(
                escaped <= MAX_FRAGMENT_TEXT,
                "{log_type} fragment {}: {escaped} bytes of escaped text",
                f.fragment_number
            );
        }
        let text: String = frags.iter().map(|f| f.log_data.as_str()).collect();
        assert_eq!(
            text.as_bytes(),
            &bytes[..],
            "{log_type} log lost or changed"
        );
    }
    assert_no_server_panics(&server);
}

/// Waits up to `limit` for the fake server to hold `n` output fragments of `job`.
fn wait_for_fragments(server: &FakeServer, job: &str, n: usize, limit: Duration) -> usize {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let held = server.fragments(job, "output").len();
        if held >= n || std::time::Instant::now() >= deadline {
            return held;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_fragment_goes_out_at_once_while_a_partial_one_waits_for_the_interval() {
    let server = FakeServer::start();
    let scratch = Scratch::new("pipe-full");
    let mut settings = pipeline_settings(&server, &scratch);
    // Far longer than the test waits: only a full fragment may go out before it ends.
    settings.output_post_interval = Duration::from_secs(600);
    let client = HttpServer::new(settings);
    let job = new_job(&server);
    let path = scratch.path("test.log");
    let mut text = String::new();
    let mut grow = |more: &str| {
        text.push_str(more);
        std::fs::write(&path, &text).expect("write the phase log");
        client.output(&job, Phase::Test, more.as_bytes(), &path, text.len() as u64);
    };

    // The job's first fragment goes out at once; the next partial one waits for the
    // interval.
    grow("first\n");
    assert_eq!(
        wait_for_fragments(&server, &job, 1, Duration::from_secs(30)),
        1,
        "the first fragment was not posted"
    );
    grow("partial\n");
    // Gives the streamer time to start waiting out the interval for the partial fragment.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.fragments(&job, "output").len(),
        1,
        "posted before the interval"
    );

    // The log now holds more than a fragment: it goes out without waiting the interval.
    grow(&log_text(4));
    assert!(
        wait_for_fragments(&server, &job, 2, Duration::from_secs(30)) >= 2,
        "a full fragment waited for the output interval"
    );
    let frags = server.fragments(&job, "output");
    assert_numbered_once_in_order(&frags);
    assert_eq!(frags[1].log_data.len(), FRAGMENT);
    client.finish_output(&job, Phase::Test);
    assert!(client.drain(&job, Duration::from_secs(60)), "not drained");
    assert_eq!(
        phase_texts(&server.fragments(&job, "output")),
        vec![("test".to_string(), text.clone())]
    );
    assert_no_server_panics(&server);
}
