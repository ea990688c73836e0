//! Metrics endpoint figures: `render()` time, one `GET /metrics` round trip over loopback,
//! and the cost of one recording call.
//!
//! Run with `cargo bench --bench metrics`. Prints medians of 1000 runs; asserts only that
//! each scrape is answered 200.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use testflinger_agent::metrics::{serve, KillCause, Metrics};

const RUNS: usize = 1000;

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

/// A registry as a day of jobs leaves it: every phase with a duration, some failures.
fn busy_metrics() -> &'static Metrics {
    let m: &'static Metrics = Box::leak(Box::new(Metrics::new("bench-agent", "cid-1")));
    for phase in [
        "setup",
        "provision",
        "firmware_update",
        "test",
        "allocate",
        "reserve",
        "cleanup",
    ] {
        for seconds in [0, 30, 90, 700, 5000] {
            m.phase_duration(phase, seconds, "24.04.1");
        }
        m.phase_failed(phase);
    }
    for endpoint in ["job_poll", "agent_data", "result", "log", "artifact"] {
        m.request_failed(endpoint);
    }
    for _ in 0..20 {
        m.job_taken();
    }
    m.command_killed(KillCause::OutputTimeout);
    m
}

fn main() {
    let metrics = busy_metrics();

    let text = metrics.render();
    let mut renders = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        let text = metrics.render();
        renders.push(start.elapsed());
        std::hint::black_box(text);
    }
    let (median, max) = median_max(renders);
    println!(
        "render(): {} bytes, median {:.1} µs, max {:.1} µs over {RUNS} runs",
        text.len(),
        micros(median),
        micros(max)
    );

    let start = Instant::now();
    for _ in 0..RUNS * 100 {
        metrics.job_taken();
        metrics.set_output_backlog_bytes(std::hint::black_box(4096));
    }
    println!(
        "job_taken() + set_output_backlog_bytes(): {:.1} ns per pair",
        start.elapsed().as_secs_f64() * 1e9 / (RUNS * 100) as f64
    );

    let server = serve(metrics, Some("127.0.0.1"), 0).expect("binds a loopback port");
    let port = server.local_port();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let mut trips = Vec::with_capacity(RUNS);
    let mut answer = Vec::with_capacity(16 * 1024);
    for _ in 0..RUNS {
        answer.clear();
        let start = Instant::now();
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
        stream.write_all(request.as_bytes()).expect("sends");
        stream.read_to_end(&mut answer).expect("reads the answer");
        trips.push(start.elapsed());
        assert!(answer.starts_with(b"HTTP/1.1 200 "), "scrape failed");
    }
    let (median, max) = median_max(trips);
    println!(
        "GET /metrics over loopback (connect, request, whole answer): {} bytes, median {:.1} µs, max {:.1} µs over {RUNS} runs",
        answer.len(),
        micros(median),
        micros(max)
    );
    server.shutdown();
}
