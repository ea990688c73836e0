//! Outage recovery (issue 15): from the moment the server answers again to the agent's next
//! answered request, for outages of 0.4 s, 5 s and 60 s (connections refused) and for 60 s
//! of a server that accepts connections and never answers. Each figure is printed beside the
//! back-off step that was due (`polling_interval: 1`: steps of 1, 2, 4 and 8 s), which is
//! its limit. The four scenarios run at once, each with its own agent and fake server.
//!
//!   cargo bench --bench outage [-- --rounds N] [--quick]   (--quick: 6 s instead of 60 s)
//!
//! Figures, not assertions; tests/it/outage.rs asserts the outcomes.

use testflinger_agent_test_support as support;

use std::time::{Duration, Instant};
use support::agent::Agent;
use support::fake_server::FakeServer;
use support::scratch::Scratch;

#[derive(Clone, Copy, Debug)]
enum Fault {
    Refused(Duration),
    Hang(Duration),
}

impl Fault {
    fn name(self) -> String {
        match self {
            Fault::Refused(d) => format!("outage {:.1} s (refused)", d.as_secs_f64()),
            Fault::Hang(d) => format!("hang {:.0} s (accepted, never answered)", d.as_secs_f64()),
        }
    }
}

/// The back-off step the agent was in when the server came back: the gap between its
/// last two requests to a server that gave no answer, read from its log.
fn last_step(log: &std::path::Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("the server does not answer (next try in"))?;
    let after = line.split("next try in ").nth(1)?;
    after.split(' ').next()?.parse().ok()
}

struct Figure {
    fault: Fault,
    latency: Option<Duration>,
    step_left: Option<f64>,
}

fn scenario(fault: Fault, n: usize) -> Figure {
    let server = FakeServer::start();
    let s = Scratch::new(&format!("bench-outage-{n}"));
    let name = format!("bench-outage-{n}-{}", std::process::id());
    let agent = Agent::start(
        &server,
        &s,
        &name,
        "logging_level: INFO\ntest_command: \"true\"\n",
    );
    server.wait_until(Duration::from_secs(60), |srv| {
        srv.requests().iter().any(|r| r.path == "/v1/job")
    });
    match fault {
        Fault::Refused(d) => {
            server.go_down();
            std::thread::sleep(d);
            server.come_back();
        }
        Fault::Hang(d) => {
            server.swallow(true);
            std::thread::sleep(d);
            server.swallow(false);
        }
    }
    let back = Instant::now();
    let mut latency = None;
    server.wait_until(Duration::from_secs(60), |srv| {
        latency = srv
            .requests()
            .iter()
            .find(|r| r.at > back && r.status != 0 && r.status < 500)
            .map(|r| r.at.saturating_duration_since(back));
        latency.is_some()
    });
    let step_left = agent.log.as_deref().and_then(last_step);
    if latency.is_none() {
        eprintln!(
            "{}: no answered request after the fault; the agent's log ends:\n{}\n{}",
            fault.name(),
            agent
                .log
                .as_deref()
                .map(|p| support::agent::log_tail(p, 30))
                .unwrap_or_default(),
            server.request_tail(20)
        );
    }
    drop(agent);
    Figure {
        fault,
        latency,
        step_left,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize);
    let quick = args.iter().any(|a| a == "--quick");
    let long = Duration::from_secs(if quick { 6 } else { 60 });
    let faults = [
        Fault::Refused(Duration::from_millis(400)),
        Fault::Refused(Duration::from_secs(5)),
        Fault::Refused(long),
        Fault::Hang(long),
    ];
    println!(
        "outage recovery: the server answers again -> the agent's next answered request ({} round(s))",
        rounds
    );
    println!(
        "{:<42} {:>12} {:>24}",
        "fault", "recovery", "last wait announced"
    );
    for round in 0..rounds {
        let figures: Vec<Figure> = std::thread::scope(|scope| {
            let handles: Vec<_> = faults
                .iter()
                .enumerate()
                .map(|(i, fault)| scope.spawn(move || scenario(*fault, round * 10 + i)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a scenario does not panic"))
                .collect()
        });
        for f in figures {
            println!(
                "{:<42} {:>12} {:>24}",
                f.fault.name(),
                f.latency
                    .map_or("none".into(), |l| format!("{:.3} s", l.as_secs_f64())),
                f.step_left
                    .map_or("(no failure seen)".into(), |s| format!("{s:.1} s"))
            );
        }
    }
}
