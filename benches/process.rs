//! Process runner figures: deadline → tree dead and cancel → tree dead for each tree shape
//! (p50, p99), deadline → SIGTERM, per-command overhead, output throughput, peak RSS.
//!
//! Run with `cargo bench --bench process [-- --smoke] [-- --runs N]` (100 runs of each tree
//! shape, 5 with `--smoke`). Prints numbers, asserts nothing; the lines that start with
//! `FIGURE` are what `bench/all.sh` collects.

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use testflinger_agent::process::{
    become_subreaper, run_command, CommandSpec, StopKind, StopSignal, Termination,
};

/// The deadline of the deadline runs: long enough for every shape's tree to be started
/// (each prints `ready` once its processes are forked; a run where it came later is
/// counted as late).
const TIMEOUT: Duration = Duration::from_millis(100);

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

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The value at percentile `p` (nearest rank) of sorted durations.
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

/// A command tree the runner must end. Every process of it carries the run's marker
/// (digits) in its command line, and the shell prints `ready` once all are forked.
struct Shape {
    /// The figure names' infix.
    name: &'static str,
    what: &'static str,
    /// The command, with `{m}` for the marker.
    command: &'static str,
    grace: Duration,
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "single",
        what: "one process (`sleep`)",
        command: "echo ready; exec sleep 1000.{m}",
        grace: Duration::from_secs(1),
    },
    Shape {
        name: "tree",
        what: "a tree of 5 (a subshell with two children, a third sleep), honouring SIGTERM",
        command: "sleep 1000.{m} & (sleep 1000.{m} & sleep 1000.{m} & wait) & echo ready; wait",
        grace: Duration::from_secs(1),
    },
    Shape {
        name: "sigkill_tree",
        what: "a tree of 3 that ignores SIGTERM: SIGKILL after the grace period (100 ms here)",
        command: "trap '' TERM; sleep 1000.{m} & sleep 1000.{m} & echo ready; wait",
        grace: Duration::from_millis(100),
    },
    Shape {
        name: "escapee",
        what: "a tree honouring SIGTERM whose `setsid` escapee holds the output pipe",
        command: "setsid sh -c 'trap \"exit 0\" TERM; while :; do sleep 0.1; done' marker-{m} & \
                  sleep 1000.{m} & echo ready; wait",
        grace: Duration::from_secs(1),
    },
];

/// What the runs of one shape and one trigger measured.
#[derive(Default)]
struct Runs {
    /// Trigger (deadline or cancel request) → `run_command` returned, every process dead.
    to_dead: Vec<Duration>,
    /// Deadline → the stop line in the output (SIGTERM is sent right after writing it).
    to_stop_line: Vec<Duration>,
    /// Runs whose tree printed `ready` after the deadline.
    late: usize,
    sigkills: usize,
    survivors: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Trigger {
    Deadline,
    Cancel,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Deadline => "deadline",
            Trigger::Cancel => "cancel",
        }
    }
}

/// One run: spawn the shape, end it by `trigger`, measure, then check by marker that no
/// process of it is left (and kill any, by pid, so that the next run starts clean).
fn one_run(shape: &Shape, trigger: Trigger, marker: &str, runs: &mut Runs) {
    let stop = StopSignal::new().expect("stop signal");
    let mut spec = spec(&shape.command.replace("{m}", marker));
    spec.grace_period = shape.grace;
    spec.global_timeout = Some(match trigger {
        Trigger::Deadline => TIMEOUT,
        // A bound, should the cancellation be missed.
        Trigger::Cancel => Duration::from_secs(30),
    });
    let mut ready_at = None;
    let mut stop_line_at = None;
    let mut cancelled_at = None;
    let mut sink = |chunk: &[u8]| {
        let now = Instant::now();
        if ready_at.is_none() && chunk.windows(5).any(|w| w == b"ready") {
            ready_at = Some(now);
            if trigger == Trigger::Cancel {
                cancelled_at = Some(now);
                stop.request(StopKind::Cancel);
            }
        }
        if stop_line_at.is_none() && chunk.windows(14).any(|w| w == b"Global timeout") {
            stop_line_at = Some(now);
        }
    };
    let outcome = run_command(&spec, &mut sink, &stop).expect("runs");
    let returned = Instant::now();
    // `duration` runs from spawn to the last reap, so spawn ≈ returned - duration.
    let spawned = returned - outcome.duration;
    let (expected, triggered) = match trigger {
        Trigger::Deadline => (Termination::GlobalTimeout, Some(spawned + TIMEOUT)),
        Trigger::Cancel => (Termination::Cancelled, cancelled_at),
    };
    assert_eq!(
        outcome.termination,
        expected,
        "{} {}",
        shape.name,
        trigger.name()
    );
    let triggered = triggered.expect("the tree printed ready and was cancelled");
    runs.to_dead
        .push(returned.saturating_duration_since(triggered));
    if trigger == Trigger::Deadline {
        if let Some(line) = stop_line_at {
            runs.to_stop_line
                .push(line.saturating_duration_since(triggered));
        }
        if ready_at.is_none_or(|r| r > triggered) {
            runs.late += 1;
        }
    }
    runs.sigkills += usize::from(outcome.needed_sigkill);
    let left = living_carrying(marker);
    runs.survivors += left.len();
    for pid in left {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn figure(name: &str, value: f64, unit: &str, details: &str) {
    println!("FIGURE {name}={value:.3} unit={unit} {details}");
}

/// Deadline → tree dead and cancel → tree dead, `count` runs of each shape, alternating
/// the two triggers.
fn tree_kills(count: usize) {
    let mut survivors = 0;
    for (index, shape) in SHAPES.iter().enumerate() {
        let mut deadline = Runs::default();
        let mut cancel = Runs::default();
        for run in 0..count {
            let marker = format!("{}{index}{run:04}", std::process::id());
            one_run(
                shape,
                Trigger::Deadline,
                &format!("{marker}1"),
                &mut deadline,
            );
            one_run(shape, Trigger::Cancel, &format!("{marker}2"), &mut cancel);
        }
        for (trigger, runs) in [
            (Trigger::Deadline, &mut deadline),
            (Trigger::Cancel, &mut cancel),
        ] {
            runs.to_dead.sort();
            let p50 = ms(percentile(&runs.to_dead, 50));
            let p99 = ms(percentile(&runs.to_dead, 99));
            let max = ms(runs.to_dead[runs.to_dead.len() - 1]);
            let (late, late_detail) = match trigger {
                Trigger::Deadline => (
                    format!("; {} runs ready after the deadline", runs.late),
                    format!(" late={}", runs.late),
                ),
                Trigger::Cancel => (String::new(), String::new()),
            };
            println!(
                "{} -> every process dead, {} ({count} runs, grace {} ms): p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms; \
SIGKILL needed in {} runs; {} processes outlived run_command{late}",
                trigger.name(),
                shape.what,
                shape.grace.as_millis(),
                runs.sigkills,
                runs.survivors,
            );
            let details = format!(
                "runs={count} grace_ms={} sigkills={}{late_detail}",
                shape.grace.as_millis(),
                runs.sigkills,
            );
            let stem = format!("{}_dead_{}", trigger.name(), shape.name);
            figure(&format!("{stem}_p50_ms"), p50, "ms", &details);
            figure(&format!("{stem}_p99_ms"), p99, "ms", &details);
            survivors += runs.survivors;
        }
        if shape.name == "single" {
            deadline.to_stop_line.sort();
            if !deadline.to_stop_line.is_empty() {
                let p50 = ms(percentile(&deadline.to_stop_line, 50));
                let max = ms(deadline.to_stop_line[deadline.to_stop_line.len() - 1]);
                println!("deadline -> SIGTERM of the group (the stop line written just before it), one process: p50 {p50:.3} ms, max {max:.3} ms");
                figure(
                    "deadline_sigterm_p50_ms",
                    p50,
                    "ms",
                    &format!("runs={}", deadline.to_stop_line.len()),
                );
            }
        }
    }
    println!(
        "FIGURE tree_survivors={survivors} unit=processes shapes={} runs={count}",
        SHAPES.len()
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
    // `cargo bench` passes `--bench`; the rest: `--smoke`, `--runs N`.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(if smoke { 5 } else { 100 });
    become_subreaper().expect("subreaper");
    tree_kills(runs);
    if smoke {
        overhead(20);
        throughput(100_000_000);
    } else {
        overhead(200);
        throughput(1_000_000_000);
    }
    match vm_hwm_kib() {
        Some(kib) => println!("peak RSS of the bench process (VmHWM): {kib} KiB"),
        None => println!("peak RSS: /proc/self/status unreadable"),
    }
}
