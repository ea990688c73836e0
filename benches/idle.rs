//! What an agent costs while nothing happens, against the fake Testflinger server on
//! loopback (release build): the idle daemon's CPU time and its requests per polling cycle,
//! and the requests of a test phase that prints nothing, with short-lived access tokens.
//!
//! 1. idle: `polling_interval` 10 s, access tokens of 20 s;
//!    CPU from utime+stime in `/proc/PID/stat` (10 ms ticks) and, when `perf` is there,
//!    from `perf stat -e task-clock -p PID` over the same window; requests per cycle.
//! 2. silent phase: `test_command` prints one line and then sleeps; requests per second
//!    over the window, with 3 s and with 20 s access tokens (`cancel_check_interval` 10 s).
//!
//! The server address is `http://localhost:PORT`, a name to resolve as in a lab, not an
//! address literal.
//!
//! Run with `cargo bench --bench idle [-- OPTIONS]`: `--idle-secs N` (180), `--polling N`
//! (the idle agent's `polling_interval`, 10), `--idle-ttl N` (20), `--silent-secs N` (60),
//! `--only idle|silent`, `--perf-record FILE` (a `perf record --call-graph dwarf` profile of the idle
//! window instead of `perf stat`); `TF_AGENT_BIN=path` runs another build of the agent. Prints human text and one `FIGURE name=value unit=...` line per
//! figure; asserts nothing.

#[allow(dead_code)]
mod common;
use testflinger_agent_test_support as support;

use serde_json::json;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::fake_server::{FakeConfig, FakeServer, RequestRecord, Route, DEFAULT_REFRESH_TOKEN};
use support::scratch::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_testflinger-agent");

/// The agent binary: `$TF_AGENT_BIN` when set (to compare builds), else this build's.
fn agent_bin() -> String {
    std::env::var("TF_AGENT_BIN").unwrap_or_else(|_| BIN.to_string())
}

fn figure(name: &str, value: f64, unit: &str) {
    println!("FIGURE {name}={value:.4} unit={unit}");
}

fn start_agent(server: &FakeServer, scratch: &Scratch, commands: &str, polling: u64) -> Child {
    let token = scratch.write(
        "token.json",
        &json!({"refresh_token": DEFAULT_REFRESH_TOKEN}).to_string(),
    );
    let config = scratch.config(&format!(
        "agent_id: idle-bench\nserver_address: http://localhost:{}\njob_queues: [idle-bench]\n\
         logging_quiet: true\npolling_interval: {polling}\n{commands}",
        server.port()
    ));
    Command::new(agent_bin())
        .arg("-c")
        .arg(config)
        .arg("--token-file")
        .arg(token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the agent starts")
}

/// Starts `perf stat -e task-clock` on `pid` for `window`; `None` when perf cannot run.
fn start_perf(pid: u32, window: Duration) -> Option<Child> {
    Command::new("perf")
        .args([
            "stat",
            "-x",
            ",",
            "-e",
            "task-clock",
            "-p",
            &pid.to_string(),
            "--",
        ])
        .arg("sleep")
        .arg(format!("{}", window.as_secs_f64()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()
}

/// Starts `perf record --call-graph dwarf` on `pid` for `window`, into `path`.
fn start_perf_record(pid: u32, window: Duration, path: &str) -> Option<Child> {
    Command::new("perf")
        .args(["record", "-F", "5000", "--call-graph", "dwarf", "-o", path])
        .args(["-p", &pid.to_string(), "--"])
        .arg("sleep")
        .arg(format!("{}", window.as_secs_f64()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()
}

/// The task-clock perf counted, in seconds.
fn perf_seconds(child: Child) -> Option<f64> {
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().find(|l| l.contains("task-clock"))?;
    let msec: f64 = line.split(',').next()?.trim().parse().ok()?;
    Some(msec / 1000.0)
}

fn requests_between(server: &FakeServer, from: Instant, to: Instant) -> Vec<RequestRecord> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.at >= from && r.at < to)
        .collect()
}

fn by_route(requests: &[RequestRecord]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in requests {
        let name = r.route.as_ref().map_or_else(
            || format!("{} {}", r.method, r.path),
            |route| format!("{route:?}"),
        );
        *counts.entry(name).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn count(requests: &[RequestRecord], route: &Route) -> usize {
    requests
        .iter()
        .filter(|r| r.route.as_ref() == Some(route))
        .count()
}

/// What [`idle`] measures with.
struct IdleRun {
    window: Duration,
    ttl: u64,
    polling: u64,
    /// `perf record` into this file instead of `perf stat`.
    record: Option<String>,
}

fn idle(run: &IdleRun) {
    let IdleRun {
        window,
        ttl,
        polling,
        ..
    } = *run;
    let server = FakeServer::start_with(FakeConfig {
        access_token_ttl: Duration::from_secs(ttl),
        ..Default::default()
    });
    let scratch = Scratch::new("bench-idle");
    let mut agent = start_agent(&server, &scratch, "", polling);
    let pid = agent.id();
    // Settle: start-up posts and the first cycles.
    server.wait_until(Duration::from_secs(60), |s| {
        s.request_count(&Route::JobPoll) >= 2
    });
    std::thread::sleep(Duration::from_secs(1));
    let perf = match &run.record {
        Some(path) => start_perf_record(pid, window, path),
        None => start_perf(pid, window),
    };
    let from = Instant::now();
    let cpu_before = common::cpu_seconds(pid);
    std::thread::sleep(window);
    let cpu = common::cpu_seconds(pid) - cpu_before;
    let to = Instant::now();
    let perf = match run.record {
        Some(_) => {
            let _ = perf.map(|p| p.wait_with_output());
            None
        }
        None => perf.and_then(perf_seconds),
    };
    let minutes = to.duration_since(from).as_secs_f64() / 60.0;
    let requests = requests_between(&server, from, to);
    let cycles = count(&requests, &Route::JobPoll).max(1);
    let refreshes = count(&requests, &Route::Refresh);
    let per_cycle_ms = perf.unwrap_or(cpu) * 1000.0 / cycles as f64;
    println!(
        "idle ({} s, {ttl} s tokens, polling_interval {polling} s): CPU {:.4} s/min by /proc ticks{}; \
         {:.3} ms a cycle; {} requests in {cycles} cycles ({}) = {:.2} per cycle, {:.2} without \
         token refreshes; {} connections accepted in all",
        window.as_secs(),
        cpu / minutes,
        perf.map_or_else(
            || ", no perf figure".to_string(),
            |p| format!(", {:.4} s/min by perf task-clock", p / minutes)
        ),
        per_cycle_ms,
        requests.len(),
        by_route(&requests),
        requests.len() as f64 / cycles as f64,
        (requests.len() - refreshes) as f64 / cycles as f64,
        server.connections_accepted(),
    );
    let tag = format!("p{polling}");
    figure(&format!("idle_cpu_proc_{tag}"), cpu / minutes, "s/min");
    if let Some(perf) = perf {
        figure(&format!("idle_cpu_perf_{tag}"), perf / minutes, "s/min");
    }
    figure(&format!("idle_cpu_per_cycle_{tag}"), per_cycle_ms, "ms");
    figure(
        &format!("idle_requests_per_cycle_{tag}"),
        requests.len() as f64 / cycles as f64,
        "requests",
    );
    figure(
        &format!("idle_requests_per_cycle_without_refresh_{tag}"),
        (requests.len() - refreshes) as f64 / cycles as f64,
        "requests",
    );
    common::stop(&mut agent);
}

fn silent(window: Duration, ttl: u64) {
    let server = FakeServer::start_with(FakeConfig {
        access_token_ttl: Duration::from_secs(ttl),
        ..Default::default()
    });
    let scratch = Scratch::new("bench-idle-silent");
    let sleep = window.as_secs() + 30;
    let mut agent = start_agent(
        &server,
        &scratch,
        &format!("test_command: echo start; sleep {sleep}\n"),
        10,
    );
    let id = server.submit_job(json!({"job_queue": "idle-bench", "test_data": {"test_cmds": "x"}}));
    server.wait_until(Duration::from_secs(60), |s| {
        s.log_text(&id, "output").contains("start")
    });
    // The fragment with the line, and the posts around the phase's start, are done.
    std::thread::sleep(Duration::from_secs(3));
    let from = Instant::now();
    std::thread::sleep(window);
    let to = Instant::now();
    let requests = requests_between(&server, from, to);
    let seconds = to.duration_since(from).as_secs_f64();
    let refreshes = count(&requests, &Route::Refresh);
    println!(
        "silent phase ({} s, {ttl} s tokens, cancel_check_interval 10 s): {} requests ({}) = \
         {:.3} requests/s; {refreshes} token refreshes",
        window.as_secs(),
        requests.len(),
        by_route(&requests),
        requests.len() as f64 / seconds,
    );
    figure(
        &format!("silent_requests_ttl{ttl}"),
        requests.len() as f64 / seconds,
        "requests/s",
    );
    figure(
        &format!("silent_refreshes_ttl{ttl}"),
        refreshes as f64,
        &format!("refreshes/{}s", window.as_secs()),
    );
    server.cancel_job(&id);
    server.wait_until(Duration::from_secs(60), |s| {
        s.result_data(&id).get("status").is_some()
    });
    common::stop(&mut agent);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let option =
        |name: &str, default: u64| value(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    let only = value("--only");
    if only.as_deref() != Some("silent") {
        idle(&IdleRun {
            window: Duration::from_secs(option("--idle-secs", 180)),
            ttl: option("--idle-ttl", 20),
            polling: option("--polling", 10),
            record: value("--perf-record"),
        });
    }
    if only.as_deref() != Some("idle") {
        for ttl in [3, 20] {
            silent(Duration::from_secs(option("--silent-secs", 60)), ttl);
        }
    }
}
