//! Process runner figures: kill latency, per-command overhead, output throughput, peak RSS.
//!
//! Run with `cargo bench --bench process`. Prints numbers, asserts nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use testflinger_agent::process::{run_command, CommandSpec, StopSignal, Termination};

fn spec(command: &str) -> CommandSpec {
    CommandSpec {
        command: command.to_string(),
        cwd: std::env::temp_dir(),
        env: Vec::new(),
        global_timeout: None,
        output_timeout: None,
        grace_period: Duration::from_secs(1),
        straggler_wait: Duration::from_secs(1),
        honour_cancel: true,
        honour_shutdown: true,
        shutdown_budget: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Deadline to the stop line reaching the sink (SIGTERM is sent right after writing it),
/// and deadline to `run_command` returning (SIGTERM, death, sweep, reap).
fn kill_latency(runs: usize) {
    let timeout = Duration::from_millis(200);
    let stop = StopSignal::new().expect("stop signal");
    let mut to_line = Vec::new();
    let mut to_return = Vec::new();
    for _ in 0..runs {
        let mut spec = spec("sleep 100");
        spec.global_timeout = Some(timeout);
        let mut line_at = None;
        let mut sink = |chunk: &[u8]| {
            if chunk.windows(14).any(|w| w == b"Global timeout") {
                line_at = Some(Instant::now());
            }
        };
        let outcome = run_command(&spec, &mut sink, &stop).expect("runs");
        let returned = Instant::now();
        assert_eq!(outcome.termination, Termination::GlobalTimeout);
        // `duration` runs from spawn to the last reap, so spawn ≈ returned - duration.
        let deadline = returned - outcome.duration + timeout;
        let line_at = line_at.expect("stop line written");
        to_line.push(line_at.saturating_duration_since(deadline));
        to_return.push(returned.saturating_duration_since(deadline));
    }
    let (med, max) = median_max(to_line);
    println!(
        "kill latency, deadline -> SIGTERM ({runs} runs, `sleep 100`, 200 ms timeout): median {:.3} ms, max {:.3} ms",
        ms(med),
        ms(max)
    );
    let (med, max) = median_max(to_return);
    println!(
        "kill latency, deadline -> run_command returned (group dead and reaped): median {:.3} ms, max {:.3} ms",
        ms(med),
        ms(max)
    );
}

fn overhead(runs: u32) {
    let stop = StopSignal::new().expect("stop signal");
    let spec = spec("true");
    let start = Instant::now();
    for _ in 0..runs {
        let outcome = run_command(&spec, &mut |_: &[u8]| {}, &stop).expect("runs");
        assert_eq!(outcome.termination, Termination::Exited(0));
    }
    let ours = start.elapsed() / runs;
    let start = Instant::now();
    for _ in 0..runs {
        let status = Command::new("/bin/sh")
            .args(["-c", "true"])
            .status()
            .expect("sh runs");
        assert!(status.success());
    }
    let plain = start.elapsed() / runs;
    println!(
        "per-command overhead (`true` x {runs}): run_command {:.3} ms/run, std Command::status {:.3} ms/run",
        ms(ours),
        ms(plain)
    );
}

fn throughput(bytes: u64) {
    let stop = StopSignal::new().expect("stop signal");
    let spec = spec(&format!("head -c {bytes} /dev/zero"));
    let mut total = 0u64;
    let start = Instant::now();
    let outcome = run_command(&spec, &mut |c: &[u8]| total += c.len() as u64, &stop).expect("runs");
    let ours = start.elapsed();
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(total, bytes);
    let start = Instant::now();
    let status = Command::new("/bin/sh")
        .args(["-c", &format!("head -c {bytes} /dev/zero > /dev/null")])
        .status()
        .expect("sh runs");
    let plain = start.elapsed();
    assert!(status.success());
    let mbs = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    println!(
        "throughput ({} MB): run_command into a counting sink {:.0} MB/s, `head > /dev/null` {:.0} MB/s",
        bytes / 1_000_000,
        mbs(ours),
        mbs(plain)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    kill_latency(20);
    overhead(200);
    throughput(1_000_000_000);
    match vm_hwm_kib() {
        Some(kib) => println!("peak RSS of the bench process (VmHWM): {kib} KiB"),
        None => println!("peak RSS: /proc/self/status unreadable"),
    }
}
