//! Crash-recovery figures: the cost of one durable journal write (median and p99 over 1000
//! writes of a full 7-phase journal on the scratch filesystem), of the live write before a
//! command spawns, and of a phase's two together, and the time from starting
//! the agent over a run directory left by a dead agent to its old tree dead and its cleanup
//! started.
//!
//! Run with `cargo bench --bench journal`. Prints numbers, asserts nothing.

use testflinger_agent_test_support as support;

use serde_json::json;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::fake_server::{FakeServer, DEFAULT_REFRESH_TOKEN};
use support::scratch::{KillByMarker, Scratch};
use testflinger_agent::journal::{Journal, LogProgress, Why};

const BIN: &str = env!("CARGO_BIN_EXE_testflinger-agent");

fn full_journal() -> Journal {
    let mut journal = Journal::taken("00000000-0000-4000-8000-000000000001", now());
    let states = [
        ("setup", "Setup"),
        ("provision", "Provisioned"),
        ("firmware_update", "FirmwareUpdated"),
        ("test", "Tested"),
        ("allocate", "Allocated"),
        ("reserve", "Reserved"),
    ];
    for (phase, to) in states {
        journal.set_status(phase, 0);
        journal.transition(now(), to, Some(phase), Why::Exit, Some(0));
        journal.output.logs.push(LogProgress {
            phase: phase.into(),
            log_file: format!("{phase}.log"),
            sent: 123_456,
        });
    }
    journal.output.next_fragment = 1234;
    journal.phase = Some("cleanup".into());
    journal.pgid = Some(123_456);
    journal.token = Some("0123456789abcdef0123456789abcdef".into());
    journal.cleanup_attempts = 1;
    journal
}

fn now() -> String {
    "2026-01-05T10:02:30.412345+00:00".into()
}

fn write_cost(scratch: &Scratch) {
    let dir = scratch.path("rundir");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let journal = full_journal();
    let mut times: Vec<Duration> = (0..1000)
        .map(|_| {
            let started = Instant::now();
            journal.save(&dir).expect("journal write");
            started.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "journal write ({} bytes, durable): median {:.3} ms, p99 {:.3} ms, max {:.3} ms over 1000 writes on {}",
        journal.to_bytes().len(),
        times[500].as_secs_f64() * 1e3,
        times[990].as_secs_f64() * 1e3,
        times[999].as_secs_f64() * 1e3,
        dir.display()
    );
}

/// The write before each phase command spawns (phase and token, not fsynced), and what a
/// phase that runs a command costs in all: that write plus the durable one at its end.
fn live_write_cost(scratch: &Scratch) {
    let dir = scratch.path("rundir-live");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let journal = full_journal();
    let measure = |f: &dyn Fn()| {
        let mut times: Vec<Duration> = (0..1000)
            .map(|_| {
                let started = Instant::now();
                f();
                started.elapsed()
            })
            .collect();
        times.sort();
        times
    };
    let live = measure(&|| journal.save_live(&dir).expect("live write"));
    let phase = measure(&|| {
        journal.save_live(&dir).expect("live write");
        journal.save(&dir).expect("journal write");
    });
    println!(
        "live write (phase and token, renamed, not fsynced): median {:.3} ms, p99 {:.3} ms; a phase's journal writes (live + durable): median {:.3} ms, p99 {:.3} ms",
        live[500].as_secs_f64() * 1e3,
        live[990].as_secs_f64() * 1e3,
        phase[500].as_secs_f64() * 1e3,
        phase[990].as_secs_f64() * 1e3,
    );
}

fn restart_to_cleanup(scratch: &Scratch) {
    let server = FakeServer::start();
    let id = server.submit_job(json!({"job_queue": "nobody-polls-this"}));
    let marker = scratch.marker();
    let tree = KillByMarker::new(&marker);
    let token = format!("bench{marker}");
    let mut shell = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "sleep 1000.{marker}1 & setsid sleep 1000.{marker}2 & sh -c 'sleep 1000.{marker}3 & wait' & wait"
        ))
        .env("TESTFLINGER_PHASE_TOKEN", &token)
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn the tree");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tree.living().len() < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let rundir = scratch.path("run").join(&id);
    std::fs::create_dir_all(&rundir).expect("mkdir");
    std::fs::write(
        rundir.join("testflinger.json"),
        json!({"job_id": id, "job_queue": "q"}).to_string(),
    )
    .expect("write");
    let mut journal = Journal::taken(&id, now());
    journal.agent_pid = 1;
    journal.phase = Some("setup".into());
    journal.pgid = Some(shell.id() as i32);
    journal.token = Some(token);
    journal.save(&rundir).expect("journal");
    let cleanup_mark = scratch.path("cleanup-started");
    let config = scratch.config(&format!(
        "agent_id: bench-recovery\nserver_address: {}\njob_queues: [bench]\nlogging_quiet: true\ntermination_grace_period: 10\ncleanup_command: touch {}\n",
        server.url(),
        cleanup_mark.display()
    ));
    let token_file = scratch.write(
        "token.json",
        &json!({"refresh_token": DEFAULT_REFRESH_TOKEN}).to_string(),
    );
    let started = Instant::now();
    let mut agent = Command::new(BIN)
        .arg("-c")
        .arg(config)
        .arg("--token-file")
        .arg(token_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the agent starts");
    let limit = Instant::now() + Duration::from_secs(30);
    let mut dead = None;
    let mut cleaned = None;
    while (dead.is_none() || cleaned.is_none()) && Instant::now() < limit {
        if dead.is_none() && tree.living().is_empty() {
            dead = Some(started.elapsed());
        }
        if cleaned.is_none() && cleanup_mark.exists() {
            cleaned = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = shell.wait();
    let ms = |d: Option<Duration>| {
        d.map_or("not within 30 s".to_owned(), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1e3)
        })
    };
    println!(
        "agent start over a dead agent's job (SIGTERM-honouring tree of 5, a setsid escapee among them): tree dead after {}, cleanup started after {}",
        ms(dead),
        ms(cleaned)
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();
}

fn main() {
    let scratch = Scratch::new("bench-journal");
    write_cost(&scratch);
    live_write_cost(&scratch);
    restart_to_cleanup(&scratch);
}
