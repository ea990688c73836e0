//! Process runner figures: kill latency, per-command overhead, output throughput, peak RSS.
//!
//! Run with `cargo bench --bench process`. Prints numbers, asserts nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use testflinger_agent::process::{
    become_subreaper, run_command, CommandSpec, StopSignal, Termination,
};

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
        oom_score_adj: None,
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

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let index = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted[index.min(sorted.len() - 1)]
}

/// Living processes whose command line carries `needle`.
fn living_carrying(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !cmdline
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        if !matches!(state, Some("Z" | "X") | None) {
            found.push(pid);
        }
    }
    found
}

/// Deadline to `run_command` returning for a tree that honours SIGTERM but whose `setsid`
/// escapee holds the output pipe, with the default 10 s grace period. Every process of
/// the tree must be dead when it returns: checked by a marker in their command lines.
fn escapee_kill_latency(runs: usize) {
    let timeout = Duration::from_millis(200);
    let stop = StopSignal::new().expect("stop signal");
    let mut to_return = Vec::new();
    let mut survivors = 0;
    let mut sigkills = 0;
    for run in 0..runs {
        let marker = format!("{}{run:04}", std::process::id());
        let mut spec = spec(&format!(
            "setsid sh -c 'trap \"exit 0\" TERM; while :; do sleep 0.1; done' marker-{marker} & \
             sleep 1000.{marker} & wait"
        ));
        spec.global_timeout = Some(timeout);
        spec.grace_period = Duration::from_secs(10);
        let outcome = run_command(&spec, &mut |_: &[u8]| {}, &stop).expect("runs");
        let returned = Instant::now();
        assert_eq!(outcome.termination, Termination::GlobalTimeout);
        sigkills += usize::from(outcome.needed_sigkill);
        // `duration` runs from spawn to the last reap, so spawn ≈ returned - duration.
        to_return.push(returned.saturating_duration_since(returned - outcome.duration + timeout));
        let left = living_carrying(&marker);
        survivors += left.len();
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    to_return.sort();
    println!(
        "escapee kill latency, deadline -> every process dead (SIGTERM-honouring tree, setsid escapee holding the pipe, 10 s grace, {runs} runs): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; SIGKILL needed in {sigkills} runs, {survivors} processes outlived run_command",
        ms(percentile(&to_return, 50)),
        ms(percentile(&to_return, 99)),
        ms(to_return[to_return.len() - 1]),
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
    // What the executor runs: with an oom_score_adj, written between fork and exec.
    let mut with_oom = spec.clone();
    with_oom.oom_score_adj = Some(500);
    let start = Instant::now();
    for _ in 0..runs {
        let outcome = run_command(&with_oom, &mut |_: &[u8]| {}, &stop).expect("runs");
        assert_eq!(outcome.termination, Termination::Exited(0));
    }
    let ours_oom = start.elapsed() / runs;
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
        "per-command overhead (`true` x {runs}): run_command {:.3} ms/run, with oom_score_adj {:.3} ms/run, std Command::status {:.3} ms/run",
        ms(ours),
        ms(ours_oom),
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
    // `cargo bench` passes `--bench`; `TF_BENCH_ESCAPEE_RUNS` sets the escapee runs.
    become_subreaper().expect("subreaper");
    kill_latency(20);
    let escapee_runs = std::env::var("TF_BENCH_ESCAPEE_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    escapee_kill_latency(escapee_runs);
    overhead(200);
    throughput(1_000_000_000);
    match vm_hwm_kib() {
        Some(kib) => println!("peak RSS of the bench process (VmHWM): {kib} KiB"),
        None => println!("peak RSS: /proc/self/status unreadable"),
    }
}
