//! The daemon's figures for `bench/all.sh`, each beside its limit measured in the same run,
//! all against the fake Testflinger server on loopback:
//!
//! - `daemon`: a test phase printing SIZE bytes, all of it on the server, against a bare
//!   poster (ureq, 1 MiB fragments) into the same fake server, alternating rounds, fastest
//!   of each; the agent's CPU per GB and peak RSS in that job;
//! - `idle`: an idle daemon's CPU (perf's task-clock, or the threads' schedstat when perf
//!   cannot attach), RSS and requests, beside a silent test phase's requests with access
//!   tokens that expire every 20 s (the two agents run at the same time);
//! - `fleet`: many agents on one host against one fake server, idle and then with one short
//!   job each: total RSS, total CPU, requests per second.
//!
//! Run with `cargo bench --bench suite [-- MODE…] [-- --smoke] [-- --dir DIR]` (all modes
//! by default; `--smoke` shrinks sizes, windows and the fleet for CI; `--dir` holds the
//! agents' directories, a tmpfs in `bench/all.sh`). Prints numbers, asserts nothing; the
//! lines that start with `FIGURE` are what `bench/all.sh` collects.

#[allow(dead_code)]
mod common;
use testflinger_agent_test_support as support;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::fake_server::{FakeConfig, FakeServer, Route, DEFAULT_REFRESH_TOKEN};
use support::scratch::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_testflinger-agent");
/// The bare poster's fragment size: what upstream sends serial logs in.
const FRAGMENT: usize = 1024 * 1024;

/// Sizes and windows of one run of the suite.
#[derive(Clone)]
struct Plan {
    dir: PathBuf,
    daemon_bytes: u64,
    daemon_rounds: usize,
    idle_window: Duration,
    /// The idle daemon's `polling_interval` (seconds); the smoke's window is shorter than
    /// the default 10 s, so it polls every second to see whole cycles.
    idle_poll: u64,
    fleet_agents: usize,
    fleet_window: Duration,
    fleet_poll: u64,
    /// The wait after start-up before a window opens.
    settle: Duration,
}

impl Plan {
    fn new(smoke: bool, dir: PathBuf) -> Plan {
        if smoke {
            Plan {
                dir,
                daemon_bytes: 5_000_000,
                daemon_rounds: 1,
                idle_window: Duration::from_secs(3),
                idle_poll: 1,
                fleet_agents: 10,
                fleet_window: Duration::from_secs(2),
                fleet_poll: 1,
                settle: Duration::from_secs(1),
            }
        } else {
            Plan {
                dir,
                daemon_bytes: 200_000_000,
                daemon_rounds: 3,
                idle_window: Duration::from_secs(60),
                idle_poll: 10,
                fleet_agents: 100,
                fleet_window: Duration::from_secs(30),
                fleet_poll: 10,
                settle: Duration::from_secs(2),
            }
        }
    }
}

fn figure(name: &str, value: f64, unit: &str, details: &str) {
    println!("FIGURE {name}={value:.4} unit={unit} {details}");
}

/// Writes an agent's config (its directories in `scratch`) and token file; returns the
/// arguments that start it.
fn agent_args(server: &FakeServer, scratch: &Scratch, agent_id: &str, body: &str) -> Vec<String> {
    let token = scratch.write(
        "token.json",
        &json!({"refresh_token": DEFAULT_REFRESH_TOKEN}).to_string(),
    );
    let config = scratch.config(&format!(
        "agent_id: {agent_id}\nserver_address: {}\njob_queues: [{agent_id}]\nlogging_quiet: true\n{body}",
        server.url()
    ));
    vec![
        "-c".into(),
        config.display().to_string(),
        "--token-file".into(),
        token.display().to_string(),
    ]
}

fn start_agent(args: &[String]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the agent starts")
}

/// The CPU time of the living threads of `pid`, in seconds (schedstat: nanoseconds).
fn schedstat_seconds(pid: u32) -> f64 {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// Measures the CPU that processes (with the threads and children they start meanwhile)
/// use from `start` to `stop`: perf's task-clock (nanoseconds) when perf attaches, else the
/// schedstat of their living threads before and after (nanoseconds too, but a thread that
/// exits in between takes its time with it).
struct CpuMeter {
    pids: Vec<u32>,
    perf: Option<Child>,
    before: f64,
}

impl CpuMeter {
    fn start(pids: &[u32]) -> CpuMeter {
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "task-clock", "-p", &list.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok();
        CpuMeter {
            pids: pids.to_vec(),
            perf,
            before: pids.iter().copied().map(schedstat_seconds).sum(),
        }
    }

    /// (seconds, method).
    fn stop(self) -> (f64, &'static str) {
        if let Some(perf) = self.perf {
            // perf stat prints its counts when interrupted; it is ours, stopped by its pid.
            let pid = nix::unistd::Pid::from_raw(perf.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            if let Ok(out) = perf.wait_with_output() {
                let text = String::from_utf8_lossy(&out.stderr);
                let line = text.lines().find(|l| l.contains("task-clock"));
                let fields: Vec<&str> = line.map(|l| l.split(',').collect()).unwrap_or_default();
                if fields.get(1) == Some(&"msec") {
                    // Tasks that never ran meanwhile are "<not counted>": no CPU.
                    if fields[0] == "<not counted>" {
                        return (0.0, "perf");
                    }
                    if let Ok(msec) = fields[0].parse::<f64>() {
                        return (msec / 1000.0, "perf");
                    }
                }
                eprintln!(
                    "perf stat gave no task-clock ({}): using schedstat",
                    text.trim()
                );
            }
        }
        let after: f64 = self.pids.iter().copied().map(schedstat_seconds).sum();
        (after - self.before, "schedstat")
    }
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// What a test phase prints: lines of 99 `x` and a newline.
fn line() -> String {
    "x".repeat(99)
}

/// One daemon job printing `size` bytes: (time from the agent's start to the job complete
/// on the server, the agent's CPU seconds, its peak RSS in KiB, bytes on the server), or
/// `None` when the job did not complete with all of its output on the server.
fn daemon_round(plan: &Plan, size: u64) -> Option<(Duration, f64, u64, u64)> {
    let server = FakeServer::start();
    let scratch = Scratch::new_in(&plan.dir, "bench-suite-daemon");
    let line = line();
    // The job waits on the queue, so the agent's first poll takes it.
    let id =
        server.submit_job(json!({"job_queue": "bench-daemon", "test_data": {"test_cmds": "x"}}));
    let args = agent_args(
        &server,
        &scratch,
        "bench-daemon",
        &format!("test_command: yes {line} | head -c {size}\n"),
    );
    let started = Instant::now();
    let mut agent = start_agent(&args);
    let done = server.wait_until(Duration::from_secs(600), |s| {
        s.job_state(&id).as_deref() == Some("complete")
    });
    let elapsed = started.elapsed();
    let cpu = common::cpu_seconds(agent.id());
    let rss = common::status_kib(agent.id(), "VmHWM");
    common::stop(&mut agent);
    let on_server: u64 = server
        .fragments(&id, "output")
        .iter()
        .map(|f| f.log_data.len() as u64)
        .sum();
    if !done || on_server < size {
        eprintln!("the daemon's job: complete {done}, {on_server} bytes on the server of {size}");
        return None;
    }
    Some((elapsed, cpu, rss, on_server))
}

/// A bare client: the same bytes, posted as 1 MiB fragments one after the other on one
/// keep-alive connection, into a fresh fake server. Returns the time from the first post
/// to the last answer, or `None` when not every byte was stored.
fn bare_round(size: u64) -> Option<Duration> {
    let server = FakeServer::start();
    let id = server.submit_job(json!({"job_queue": "bench-bare", "test_data": {"test_cmds": "x"}}));
    let token = server.issue_access_token();
    let url = format!("{}/v1/result/{id}/log/output", server.url());
    let mut data = String::with_capacity(size as usize);
    let line = line();
    while data.len() < size as usize {
        data.push_str(&line);
        data.push('\n');
    }
    data.truncate(size as usize);
    let client: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let started = Instant::now();
    for (number, chunk) in data.as_bytes().chunks(FRAGMENT).enumerate() {
        let text = std::str::from_utf8(chunk).expect("the data is ASCII");
        let body = json!({
            "fragment_number": number,
            "timestamp": support::iso_time::render_isoformat(support::iso_time::now_micros()),
            "phase": "test",
            "log_data": text,
        })
        .to_string();
        let answer = client
            .post(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .content_type("application/json")
            .send(body.as_bytes());
        if let Err(err) = answer {
            eprintln!("bare poster: fragment {number}: {err}");
        }
    }
    let elapsed = started.elapsed();
    let stored: usize = server
        .fragments(&id, "output")
        .iter()
        .map(|f| f.log_data.len())
        .sum();
    if stored as u64 != size {
        eprintln!("bare poster: {stored} bytes stored of {size}");
        return None;
    }
    Some(elapsed)
}

fn daemon(plan: &Plan) {
    let size = plan.daemon_bytes;
    let mut daemon_best: Option<(Duration, f64, u64, u64)> = None;
    let mut bare_best: Option<Duration> = None;
    let mut peak_rss = 0;
    for round in 1..=plan.daemon_rounds {
        let (Some(ours), Some(bare)) = (daemon_round(plan, size), bare_round(size)) else {
            eprintln!("round {round} failed: no daemon figures");
            return;
        };
        println!(
            "round {round}: daemon {:.1} MB/s ({} bytes on the server, CPU {:.2} s, peak RSS {} KiB); bare poster {:.1} MB/s",
            mb_s(size, ours.0),
            ours.3,
            ours.1,
            ours.2,
            mb_s(size, bare)
        );
        peak_rss = peak_rss.max(ours.2);
        if daemon_best.as_ref().is_none_or(|b| ours.0 < b.0) {
            daemon_best = Some(ours);
        }
        if bare_best.is_none_or(|b| bare < b) {
            bare_best = Some(bare);
        }
    }
    let (Some((time, cpu, _, on_server)), Some(bare)) = (daemon_best, bare_best) else {
        eprintln!("no daemon round ran");
        return;
    };
    let details = format!(
        "bytes={size} rounds={} fastest=1 on_server={on_server}",
        plan.daemon_rounds
    );
    let ours = mb_s(size, time);
    let theirs = mb_s(size, bare);
    figure("daemon_output_mb_s", ours, "MB/s", &details);
    figure(
        "bare_poster_mb_s",
        theirs,
        "MB/s",
        &format!(
            "bytes={size} rounds={} fragment={FRAGMENT}",
            plan.daemon_rounds
        ),
    );
    figure("daemon_vs_bare_ratio", ours / theirs, "ratio", &details);
    figure(
        "daemon_cpu_s_per_gb",
        cpu / (size as f64 / 1e9),
        "s/GB",
        &format!("bytes={size} cpu_s={cpu:.3}"),
    );
    figure(
        "daemon_job_peak_rss_mib",
        peak_rss as f64 / 1024.0,
        "MiB",
        &format!("bytes={size} rounds={}", plan.daemon_rounds),
    );
}

/// The requests a silent test phase makes over `window`, with access tokens that expire
/// every 20 s, and the window's length; `None` when the phase did not start.
fn silent_phase(plan: &Plan, window: Duration) -> Option<(usize, Duration)> {
    let ttl = Duration::from_secs(20);
    let server = FakeServer::start_with(FakeConfig {
        access_token_ttl: ttl,
        ..FakeConfig::default()
    });
    let scratch = Scratch::new_in(&plan.dir, "bench-suite-silent");
    let sleep = window.as_secs() + 30;
    let args = agent_args(
        &server,
        &scratch,
        "bench-silent",
        &format!("test_command: echo start; sleep {sleep}\n"),
    );
    let id =
        server.submit_job(json!({"job_queue": "bench-silent", "test_data": {"test_cmds": "x"}}));
    let mut agent = start_agent(&args);
    if !server.wait_until(Duration::from_secs(60), |s| {
        s.log_text(&id, "output").contains("start")
    }) {
        eprintln!("the silent phase did not start within 60 s");
        common::stop(&mut agent);
        return None;
    }
    std::thread::sleep(plan.settle);
    let before = server.requests().len();
    let started = Instant::now();
    std::thread::sleep(window);
    let during = server.requests().len() - before;
    let took = started.elapsed();
    common::stop(&mut agent);
    Some((during, took))
}

fn idle(plan: &Plan) {
    let window = plan.idle_window;
    let silent = {
        let plan = plan.clone();
        std::thread::spawn(move || silent_phase(&plan, window))
    };
    let server = FakeServer::start();
    let scratch = Scratch::new_in(&plan.dir, "bench-suite-idle");
    let args = agent_args(
        &server,
        &scratch,
        "bench-idle",
        &format!("polling_interval: {}\n", plan.idle_poll),
    );
    let mut agent = start_agent(&args);
    let polled = server.wait_until(Duration::from_secs(60), |s| {
        s.request_count(&Route::JobPoll) >= 1
    });
    std::thread::sleep(plan.settle);
    let before = server.requests().len();
    let polls_before = server.request_count(&Route::JobPoll);
    let started = Instant::now();
    let meter = CpuMeter::start(&[agent.id()]);
    std::thread::sleep(window);
    let (cpu, method) = meter.stop();
    let took = started.elapsed();
    let requests = server.requests().len() - before;
    let polls = server.request_count(&Route::JobPoll) - polls_before;
    let rss = common::status_kib(agent.id(), "VmRSS");
    let hwm = common::status_kib(agent.id(), "VmHWM");
    common::stop(&mut agent);
    if !polled {
        eprintln!("the idle daemon did not poll within 60 s: no idle figures");
        let _ = silent.join();
        return;
    }
    let minutes = took.as_secs_f64() / 60.0;
    println!(
        "idle daemon over {:.1} s (polling_interval {} s): CPU {cpu:.4} s ({method}), {requests} requests in {polls} polling cycles, RSS {rss} KiB, peak {hwm} KiB",
        took.as_secs_f64(),
        plan.idle_poll
    );
    let details = format!(
        "window_s={:.0} poll_s={} method={method}",
        took.as_secs_f64(),
        plan.idle_poll
    );
    figure("idle_cpu_s_per_min", cpu / minutes, "s/min", &details);
    figure("idle_rss_mib", rss as f64 / 1024.0, "MiB", &details);
    figure("idle_peak_rss_mib", hwm as f64 / 1024.0, "MiB", &details);
    figure(
        "idle_requests_per_min",
        requests as f64 / minutes,
        "requests/min",
        &details,
    );
    if polls > 0 {
        figure(
            "idle_requests_per_cycle",
            requests as f64 / polls as f64,
            "requests",
            &format!("{details} cycles={polls}"),
        );
    } else {
        eprintln!("no polling cycle in the idle window: no requests-per-cycle figure");
    }
    match silent.join() {
        Ok(Some((requests, took))) => {
            println!(
                "silent test phase, access tokens expiring every 20 s: {requests} requests in {:.1} s",
                took.as_secs_f64()
            );
            figure(
                "silent_phase_requests_per_s",
                requests as f64 / took.as_secs_f64(),
                "requests/s",
                &format!("window_s={:.0} token_ttl_s=20", took.as_secs_f64()),
            );
        }
        Ok(None) => {}
        Err(_) => eprintln!("the silent-phase measurement panicked"),
    }
}

/// The agents of the fleet: started by us, stopped by their pids.
struct Fleet {
    agents: Vec<Child>,
    _scratch: Vec<Scratch>,
}

impl Fleet {
    fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.agents.iter().map(Child::id)
    }

    fn meter(&self) -> CpuMeter {
        CpuMeter::start(&self.pids().collect::<Vec<_>>())
    }

    fn kib(&self, field: &str) -> u64 {
        self.pids().map(|p| common::status_kib(p, field)).sum()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for agent in &self.agents {
            let pid = nix::unistd::Pid::from_raw(agent.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        for agent in &mut self.agents {
            common::stop(agent);
        }
    }
}

fn fleet(plan: &Plan) {
    let n = plan.fleet_agents;
    let server = FakeServer::start();
    let mut scratch = Vec::new();
    let mut agents = Vec::new();
    for i in 0..n {
        let dir = Scratch::new_in(&plan.dir, &format!("bench-suite-fleet-{i}"));
        let args = agent_args(
            &server,
            &dir,
            &format!("fleet-{i:03}"),
            &format!(
                "polling_interval: {}\ntest_command: echo hello\n",
                plan.fleet_poll
            ),
        );
        agents.push(start_agent(&args));
        scratch.push(dir);
    }
    let fleet = Fleet {
        agents,
        _scratch: scratch,
    };
    let polled = |s: &FakeServer| {
        let mut queues: Vec<String> = s
            .requests()
            .into_iter()
            .filter(|r| r.route == Some(Route::JobPoll))
            .map(|r| r.query)
            .collect();
        queues.sort();
        queues.dedup();
        queues.len()
    };
    if !server.wait_until(Duration::from_secs(120), |s| polled(s) >= n) {
        eprintln!("only {} of {n} agents polled within 120 s", polled(&server));
    }
    std::thread::sleep(plan.settle);

    // Idle.
    let requests_before = server.requests().len();
    let started = Instant::now();
    let meter = fleet.meter();
    std::thread::sleep(plan.fleet_window);
    let (idle_cpu, method) = meter.stop();
    let idle_took = started.elapsed();
    let idle_requests = server.requests().len() - requests_before;
    let idle_rss = fleet.kib("VmRSS");

    // One short job each.
    let requests_before = server.requests().len();
    let started = Instant::now();
    let meter = fleet.meter();
    let ids: Vec<String> = (0..n)
        .map(|i| {
            server.submit_job(
                json!({"job_queue": format!("fleet-{i:03}"), "test_data": {"test_cmds": "x"}}),
            )
        })
        .collect();
    let all_done = server.wait_until(Duration::from_secs(300), |s| {
        ids.iter()
            .all(|id| s.job_state(id).as_deref() == Some("complete"))
    });
    let (job_cpu, job_method) = meter.stop();
    let job_took = started.elapsed();
    let job_requests = server.requests().len() - requests_before;
    let job_hwm = fleet.kib("VmHWM");
    let done = ids
        .iter()
        .filter(|id| server.job_state(id).as_deref() == Some("complete"))
        .count();
    drop(fleet);
    if !all_done {
        eprintln!("{done} of {n} fleet jobs complete within 300 s");
    }
    println!(
        "fleet of {n} agents (polling_interval {} s): idle {:.1} s: RSS {:.1} MiB, CPU {idle_cpu:.2} s, {idle_requests} requests; \
one job each: {done} done in {:.2} s, CPU {job_cpu:.2} s, {job_requests} requests, peak RSS {:.1} MiB",
        plan.fleet_poll,
        idle_took.as_secs_f64(),
        idle_rss as f64 / 1024.0,
        job_took.as_secs_f64(),
        job_hwm as f64 / 1024.0
    );
    let details = format!("agents={n} poll_s={}", plan.fleet_poll);
    let idle_details = format!(
        "{details} window_s={:.0} method={method}",
        idle_took.as_secs_f64()
    );
    figure(
        "fleet_idle_rss_mib",
        idle_rss as f64 / 1024.0,
        "MiB",
        &idle_details,
    );
    figure(
        "fleet_idle_cpu_s_per_min",
        idle_cpu / (idle_took.as_secs_f64() / 60.0),
        "s/min",
        &idle_details,
    );
    figure(
        "fleet_idle_requests_per_s",
        idle_requests as f64 / idle_took.as_secs_f64(),
        "requests/s",
        &idle_details,
    );
    if all_done {
        let job_details = format!("{details} jobs={n} method={job_method}");
        figure(
            "fleet_job_peak_rss_mib",
            job_hwm as f64 / 1024.0,
            "MiB",
            &job_details,
        );
        figure("fleet_job_cpu_s", job_cpu, "s", &job_details);
        figure(
            "fleet_job_requests_per_s",
            job_requests as f64 / job_took.as_secs_f64(),
            "requests/s",
            &job_details,
        );
        figure(
            "fleet_jobs_done_s",
            job_took.as_secs_f64(),
            "s",
            &job_details,
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; the rest: modes, `--smoke`, `--dir DIR`.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map_or_else(std::env::temp_dir, PathBuf::from);
    let mut modes: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| matches!(*a, "daemon" | "idle" | "fleet"))
        .collect();
    if modes.is_empty() {
        modes = vec!["daemon", "idle", "fleet"];
    }
    if !Path::new(&dir).is_dir() {
        eprintln!("--dir {}: not a directory", dir.display());
        std::process::exit(2);
    }
    let plan = Plan::new(smoke, dir);
    for mode in modes {
        let started = Instant::now();
        match mode {
            "daemon" => daemon(&plan),
            "idle" => idle(&plan),
            _ => fleet(&plan),
        }
        println!("({mode}: {:.1} s)", started.elapsed().as_secs_f64());
    }
}
