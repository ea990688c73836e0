//! Daemon figures against the fake Testflinger server on loopback: end-to-end live-output
//! throughput (a test phase printing SIZE bytes), the agent's peak RSS, and the requests the
//! agent makes while a phase prints nothing and while it is idle.
//!
//! Also: the same job with the metrics endpoint scraped once a second (throughput, RSS and
//! scrape latency beside the unscraped job, three alternating rounds each).
//!
//! Run with `cargo bench --bench daemon [-- SIZE_MB]` (default 200). Prints numbers,
//! asserts nothing.

#[allow(dead_code)]
mod common;
use testflinger_agent_test_support as support;

use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::fake_server::{FakeServer, Route, DEFAULT_REFRESH_TOKEN};
use support::scratch::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_testflinger-agent");

fn start_agent(server: &FakeServer, scratch: &Scratch, commands: &str) -> Child {
    start_agent_with(server, scratch, commands, &[])
}

fn start_agent_with(
    server: &FakeServer,
    scratch: &Scratch,
    commands: &str,
    args: &[String],
) -> Child {
    let token = scratch.write(
        "token.json",
        &json!({"refresh_token": DEFAULT_REFRESH_TOKEN}).to_string(),
    );
    let config = scratch.config(&format!(
        "agent_id: bench-agent\nserver_address: {}\njob_queues: [bench]\nlogging_quiet: true\n{commands}",
        server.url()
    ));
    Command::new(BIN)
        .arg("-c")
        .arg(config)
        .arg("--token-file")
        .arg(token)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the agent starts")
}

/// One `GET /metrics` over loopback; its wall time, or `None` when it failed.
fn scrape(port: u16) -> Option<Duration> {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).ok()?;
    body.starts_with(b"HTTP/1.1 200").then(|| started.elapsed())
}

/// One job printing `size` bytes; with `scraped`, `/metrics` is fetched once a second
/// meanwhile. Returns (seconds, peak RSS KiB, scrape latencies).
fn one_job(size: u64, scraped: bool) -> (f64, u64, Vec<Duration>) {
    let server = FakeServer::start();
    let scratch = Scratch::new("bench-daemon-scrape");
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let args = if scraped {
        vec!["-p".to_string(), port.to_string()]
    } else {
        Vec::new()
    };
    let line = "x".repeat(99);
    // The job waits on the queue, so the agent's first poll takes it: the time measured is
    // from the agent's start to the job complete on the server.
    let id = server.submit_job(json!({"job_queue": "bench", "test_data": {"test_cmds": "x"}}));
    let started = Instant::now();
    let mut agent = start_agent_with(
        &server,
        &scratch,
        &format!(
            "metrics_endpoint_address: 127.0.0.1\ntest_command: yes {line} | head -c {size}\n"
        ),
        &args,
    );
    let stop_scraping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = scraped.then(|| {
        let stop = stop_scraping.clone();
        std::thread::spawn(move || {
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(took) = scrape(port) {
                    latencies.push(took);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            latencies
        })
    });
    server.wait_until(Duration::from_secs(600), |s| {
        s.result_data(&id).get("job_state") == Some(&json!("complete"))
    });
    let elapsed = started.elapsed().as_secs_f64();
    stop_scraping.store(true, std::sync::atomic::Ordering::SeqCst);
    let latencies = scraper
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let rss = common::status_kib(agent.id(), "VmHWM");
    common::stop(&mut agent);
    (elapsed, rss, latencies)
}

fn scrape_rounds(size: u64) {
    let mut plain = Vec::new();
    let mut scraped = Vec::new();
    let mut latencies = Vec::new();
    for _ in 0..3 {
        plain.push(one_job(size, false));
        let (secs, rss, mut l) = one_job(size, true);
        latencies.append(&mut l);
        scraped.push((secs, rss, Vec::new()));
    }
    let best =
        |runs: &[(f64, u64, Vec<Duration>)]| runs.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    let rss = |runs: &[(f64, u64, Vec<Duration>)]| runs.iter().map(|r| r.1).max().unwrap_or(0);
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let mb = size as f64 / 1e6;
    println!(
        "scraped once a second: {:.1} MB/s vs {:.1} MB/s unscraped (fastest of 3 alternating rounds: {:+.1} %); \
peak RSS {} KiB vs {} KiB; {} scrapes, latency median {:.2} ms, max {:.2} ms",
        mb / best(&scraped),
        mb / best(&plain),
        (best(&scraped) / best(&plain) - 1.0) * 100.0,
        rss(&scraped),
        rss(&plain),
        latencies.len(),
        pick(0.5),
        pick(1.0)
    );
}

fn main() {
    let size_mb: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let size = size_mb * 1_000_000;

    // 1. Throughput: all of the test phase's output on the server.
    let server = FakeServer::start();
    let scratch = Scratch::new("bench-daemon");
    let line = "x".repeat(99);
    let mut agent = start_agent(
        &server,
        &scratch,
        &format!("test_command: yes {line} | head -c {size}\n"),
    );
    let started = Instant::now();
    let id = server.submit_job(json!({"job_queue": "bench", "test_data": {"test_cmds": "x"}}));
    let done = server.wait_until(Duration::from_secs(600), |s| {
        s.result_data(&id).get("job_state") == Some(&json!("complete"))
    });
    let elapsed = started.elapsed();
    let rss = common::status_kib(agent.id(), "VmHWM");
    let text = server.log_text(&id, "output");
    let body = text.matches(line.as_str()).count() as u64 * 100;
    let fragments = server.fragments(&id, "output").len();
    println!(
        "throughput: {size_mb} MB test output, job done={done} in {:.2} s: {:.1} MB/s end to end; \
{body} bytes of lines on the server in {fragments} fragments; agent peak RSS {rss} KiB",
        elapsed.as_secs_f64(),
        size as f64 / 1e6 / elapsed.as_secs_f64()
    );
    common::stop(&mut agent);
    drop(scratch);

    // 1b. The same with the metrics endpoint scraped once a second.
    scrape_rounds(size);

    // 2. Requests while a phase prints nothing, and while idle.
    let server = FakeServer::start();
    let scratch = Scratch::new("bench-daemon-quiet");
    let mut agent = start_agent(&server, &scratch, "test_command: echo start; sleep 30\n");
    let id = server.submit_job(json!({"job_queue": "bench", "test_data": {"test_cmds": "x"}}));
    server.wait_until(Duration::from_secs(30), |s| {
        s.log_text(&id, "output").contains("start")
    });
    std::thread::sleep(Duration::from_secs(2));
    let before = server.requests().len();
    let window = Duration::from_secs(25);
    std::thread::sleep(window);
    let during = server.requests().len() - before;
    println!(
        "silent phase: {during} requests in {} s = {:.3} requests/s",
        window.as_secs(),
        during as f64 / window.as_secs_f64()
    );
    server.wait_until(Duration::from_secs(30), |s| {
        s.result_data(&id).get("job_state") == Some(&json!("complete"))
    });
    let before = server.requests().len();
    let polls_before = server.request_count(&Route::JobPoll);
    std::thread::sleep(Duration::from_secs(35));
    let idle = server.requests().len() - before;
    let cycles = server.request_count(&Route::JobPoll) - polls_before;
    println!(
        "idle: {idle} requests in {cycles} polling cycles = {:.2} requests per cycle",
        idle as f64 / cycles.max(1) as f64
    );
    common::stop(&mut agent);
}
