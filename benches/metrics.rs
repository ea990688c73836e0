//! Metrics endpoint figures: `render()` time, one `GET /metrics` round trip over loopback,
//! the same round trip while 100 slow clients hold connections (each sent half a request
//! head), and the cost of one recording call.
//!
//! Run with `cargo bench --bench metrics`. Prints medians of 1000 runs (p50/p99 of 300
//! beside the slow clients); asserts only that each scrape is answered 200.

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
        trips.push(scrape(port, &request, &mut answer));
    }
    let (median, max) = median_max(trips);
    println!(
        "GET /metrics over loopback (connect, request, whole answer): {} bytes, median {:.1} µs, max {:.1} µs over {RUNS} runs",
        answer.len(),
        micros(median),
        micros(max)
    );

    // 100 slow clients: each sent half a request head, then waits. Each run opens 100 new
    // ones, then scrapes (the server has to take them, and close the oldest past its cap of
    // 64, on the way to the scrape), then closes them.
    let mut trips = Vec::with_capacity(SLOW_RUNS);
    let mut left_open = 0;
    for _ in 0..SLOW_RUNS {
        let mut slow: Vec<TcpStream> = (0..SLOW).map(|_| slow_client(port)).collect();
        trips.push(scrape(port, &request, &mut answer));
        left_open += slow.iter_mut().map(is_open).filter(|open| *open).count();
    }
    trips.sort();
    let pick = |q: f64| trips[((trips.len() - 1) as f64 * q).round() as usize];
    println!(
        "GET /metrics beside {SLOW} slow clients (half a request head each; {:.0} of them still open after the answer, on average): p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs over {SLOW_RUNS} runs",
        left_open as f64 / SLOW_RUNS as f64,
        micros(pick(0.5)),
        micros(pick(0.99)),
        micros(pick(1.0))
    );
    server.shutdown();
}

/// One scrape: connect, request, the whole answer (into `answer`), which must be a 200;
/// the time it took.
fn scrape(port: u16, request: &str, answer: &mut Vec<u8>) -> Duration {
    answer.clear();
    let start = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    stream.write_all(request.as_bytes()).expect("sends");
    stream.read_to_end(answer).expect("reads the answer");
    let took = start.elapsed();
    assert!(answer.starts_with(b"HTTP/1.1 200 "), "scrape failed");
    took
}

const SLOW: usize = 100;
const SLOW_RUNS: usize = 300;

/// A connection that sent half a request head and then nothing.
fn slow_client(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: sl")
        .expect("sends half a head");
    stream.set_nonblocking(true).expect("a non-blocking socket");
    stream
}

/// Whether the server still holds `stream` open (it sent nothing and did not close).
fn is_open(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
}
