//! The metrics endpoint over loopback: `/metrics`, `/health`, refusals and bounds, and the
//! start-up error for a port in use.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{PrometheusType, PrometheusValue};
use testflinger_agent::metrics::{serve, Metrics, MetricsServer, HEAD_TIMEOUT, MAX_CONNECTIONS};

/// A client read gives up after this long: far beyond any answer, so a hang fails the test.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn start(agent_id: &str) -> (&'static Metrics, MetricsServer) {
    let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new(agent_id, "cid-1")));
    let server = serve(metrics, Some("127.0.0.1"), 0).expect("binds an ephemeral loopback port");
    (metrics, server)
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .expect("write timeout");
    stream
}

/// Reads an answer to the end of the connection and splits it.
fn read_answer(mut stream: TcpStream) -> Answer {
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .expect("the server answers and closes");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8(raw[..split].to_vec()).expect("head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {status_line:?}"));
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header has a colon");
            (n.to_string(), v.trim().to_string())
        })
        .collect();
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn exchange(port: u16, request: &[u8]) -> Answer {
    let mut stream = connect(port);
    stream.write_all(request).expect("sends the request");
    read_answer(stream)
}

fn get(port: u16, path: &str) -> Answer {
    exchange(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\r\n").as_bytes(),
    )
}

#[test]
fn get_metrics_serves_prometheus_text_a_scraper_parses() {
    let (metrics, server) = start("agent-get");
    metrics.job_taken();
    metrics.job_taken();
    metrics.phase_duration("provision", 400, "");
    let answer = get(server.local_port(), "/metrics");
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        answer.header("Content-Length"),
        Some(answer.body.len().to_string().as_str())
    );
    let text = String::from_utf8(answer.body).expect("UTF-8 body");
    let exposition = parse_prometheus(&text)
        .unwrap_or_else(|err| panic!("not valid Prometheus text ({err:?}):\n{text}"));
    let jobs = &exposition.families["jobs_total"];
    assert_eq!(jobs.family_type, PrometheusType::Counter);
    let values: Vec<f64> = jobs
        .iter_samples()
        .map(|s| match &s.value {
            PrometheusValue::Counter(c) => c.value.as_f64(),
            other => panic!("jobs_total sample is {other:?}"),
        })
        .collect();
    assert_eq!(values, [2.0]);
    let durations = &exposition.families["phase_duration_seconds"];
    assert_eq!(durations.family_type, PrometheusType::Histogram);
    assert!(exposition
        .families
        .contains_key("process_resident_memory_bytes"));
}

#[test]
fn head_metrics_sends_the_headers_without_a_body() {
    let (_metrics, server) = start("agent-head");
    let port = server.local_port();
    let answer = exchange(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(answer.status, 200);
    assert!(answer.body.is_empty(), "{} body bytes", answer.body.len());
    let length: usize = answer
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    assert!(length > 0, "HEAD announces the length a GET would send");
}

#[test]
fn health_is_200_while_the_loop_beats_and_503_after_a_stall() {
    let (metrics, server) = start("agent-health");
    let port = server.local_port();
    metrics.health().set_state("waiting", "");
    metrics.health().set_stall_limit(Duration::from_secs(3600));
    metrics.health().beat();
    let answer = get(port, "/health");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON body");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["state"], "waiting");
    assert_eq!(body["job_id"], "");
    assert!(body["last_cycle_seconds_ago"].is_number(), "{body}");

    metrics.health().set_state("test", "job-9");
    metrics.health().set_stall_limit(Duration::from_millis(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    let stalled = loop {
        let answer = get(port, "/health");
        if answer.status == 503 {
            break answer;
        }
        assert_eq!(answer.status, 200);
        assert!(
            Instant::now() < deadline,
            "/health never reported the stall"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let body: serde_json::Value = serde_json::from_slice(&stalled.body).expect("JSON body");
    assert_eq!(body["status"], "stalled");
    assert_eq!(body["state"], "test");
    assert_eq!(body["job_id"], "job-9");

    let head = exchange(port, b"HEAD /health HTTP/1.1\r\n\r\n");
    assert_eq!(head.status, 503);
    assert!(head.body.is_empty());
}

#[test]
fn other_paths_are_404_and_other_methods_405() {
    let (_metrics, server) = start("agent-refusals");
    let port = server.local_port();
    for path in ["/", "/metricsx", "/favicon.ico", "/metrics/extra"] {
        assert_eq!(get(port, path).status, 404, "{path}");
    }
    assert_eq!(get(port, "/metrics?name[]=jobs_total").status, 200);

    let post = exchange(
        port,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world",
    );
    assert_eq!(post.status, 405);
    assert_eq!(post.header("Allow"), Some("GET, HEAD"));
    for method in ["PUT", "DELETE", "OPTIONS"] {
        let answer = exchange(
            port,
            format!("{method} /health HTTP/1.1\r\n\r\n").as_bytes(),
        );
        assert_eq!(answer.status, 405, "{method}");
    }
    assert_eq!(exchange(port, b"GARBAGE\r\n\r\n").status, 400);
}

#[test]
fn oversized_request_heads_are_refused_without_hanging() {
    let (_metrics, server) = start("agent-oversized");
    let port = server.local_port();

    let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(10 * 1024));
    assert_eq!(exchange(port, long_line.as_bytes()).status, 431);

    let mut many_headers = String::from("GET /metrics HTTP/1.1\r\n");
    for n in 0..1000 {
        many_headers.push_str(&format!("X-Filler-{n}: {}\r\n", "b".repeat(20)));
    }
    many_headers.push_str("\r\n");
    assert_eq!(exchange(port, many_headers.as_bytes()).status, 431);

    // A head that never ends: the server answers once it has read its cap.
    let mut stream = connect(port);
    let endless = "X".repeat(9 * 1024);
    stream.write_all(endless.as_bytes()).expect("sends");
    assert_eq!(read_answer(stream).status, 431);

    assert_eq!(get(port, "/metrics").status, 200, "still serving");
}

#[test]
fn a_silent_client_neither_blocks_others_nor_stays_connected() {
    let (_metrics, server) = start("agent-silent");
    let port = server.local_port();
    let silent = connect(port);
    assert_eq!(get(port, "/metrics").status, 200);
    // The server gives up on it after its read timeout and says why.
    let answer = read_answer(silent);
    assert_eq!(answer.status, 408);
}

/// Opens a connection that sends half a request head and then nothing: a slow client.
fn slow_client(port: u16) -> TcpStream {
    let mut stream = connect(port);
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: sl")
        .expect("sends half a head");
    stream
}

/// Whether a slow client's connection is still open, or was closed cleanly: with nothing,
/// or with a whole 503 or 408 answer, then the end of the stream (no reset).
fn still_open(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).expect("non-blocking");
    let mut first = [0u8; 1];
    match stream.read(&mut first) {
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return true,
        Err(err) => panic!("a slow client's connection ended with an error: {err}"),
        Ok(0) => return false,
        Ok(_) => {}
    }
    stream.set_nonblocking(false).expect("blocking");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("the answer ends with a clean close");
    let answer = [&first[..], &rest].concat();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 503 ") || text.starts_with("HTTP/1.1 408 "),
        "{text}"
    );
    false
}

/// A hundred clients each sent half a request head and wait (slow, or malicious: the
/// endpoint binds all interfaces). A scrape is answered while they hold their connections,
/// before their head deadline: no worker waits on them. Those past the cap were closed
/// cleanly; the rest are still open.
#[test]
fn a_scrape_answers_while_a_hundred_slow_clients_hold_connections() {
    let (metrics, server) = start("agent-slow");
    let port = server.local_port();
    metrics.job_taken();
    let mut slow: Vec<TcpStream> = (0..100).map(|_| slow_client(port)).collect();
    let started = Instant::now();
    let mut stream = connect(port);
    // Less than the head deadline: an answer that waited for the slow ones to time out
    // fails here.
    let patience = HEAD_TIMEOUT - Duration::from_millis(500);
    stream
        .set_read_timeout(Some(patience))
        .expect("read timeout");
    stream
        .write_all(format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .expect("sends the scrape");
    let answer = read_answer(stream);
    let took = started.elapsed();
    assert_eq!(answer.status, 200, "after {took:?}");
    let text = String::from_utf8(answer.body).expect("UTF-8 body");
    let exposition = parse_prometheus(&text)
        .unwrap_or_else(|err| panic!("not valid Prometheus text ({err:?}):\n{text}"));
    assert!(exposition.families.contains_key("jobs_total"));
    assert!(
        took < patience,
        "the scrape took {took:?} beside 100 slow clients"
    );

    let open = slow.iter_mut().map(still_open).filter(|open| *open).count();
    assert!(
        open < MAX_CONNECTIONS,
        "{open} slow connections open, the cap is {MAX_CONNECTIONS} with the scrape"
    );
    assert!(
        open >= MAX_CONNECTIONS / 2,
        "only {open} slow connections still open: the newest ones should be left alone"
    );
    // Still serving, and /health too.
    assert_eq!(get(port, "/health").status, 200);
}

#[test]
fn a_half_sent_request_is_dropped_when_the_client_leaves() {
    let (_metrics, server) = start("agent-half");
    let port = server.local_port();
    let mut stream = connect(port);
    stream.write_all(b"GET /metr").expect("sends");
    stream.shutdown(Shutdown::Write).expect("half-closes");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("the server closes without waiting for its timeout");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(get(port, "/health").status, 200);
}

#[test]
fn a_port_in_use_is_refused_naming_the_port_and_its_holder() {
    let (metrics, server) = start("agent-busy");
    let port = server.local_port();
    let err = serve(metrics, Some("127.0.0.1"), port).expect_err("the port is taken");
    let message = err.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("already in use"), "{message}");
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "this test process holds the port: {message}"
    );
    assert!(message.contains("metrics_endpoint_port"), "{message}");
}

#[test]
fn shutdown_closes_the_port() {
    let (_metrics, server) = start("agent-shutdown");
    let port = server.local_port();
    assert_eq!(get(port, "/health").status, 200);
    server.shutdown();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens after shutdown"
    );
    TcpListener::bind(("127.0.0.1", port)).expect("the port can be bound again");
}
