//! Property tests of the live-output streamer and the serial-log sender against the fake
//! server under random faults (5xx answers, dropped connections, slow answers, answers
//! slower than the client's timeout, outages), each case ending with the daemon's
//! hand-over (detach, then the report's `send_pending` from a new client):
//!
//! * per log type the fragment numbers are exactly 0..n, and a phase's fragments are all
//!   numbered before the next phase's;
//! * nothing is lost: taking one fragment per number gives every byte of every log, once,
//!   in order (live output as written; serial logs masked);
//! * a number the server holds twice (only after an ambiguous failure: an outage or a
//!   client timeout while the server was still handling the post) carries the same bytes,
//!   or, for live output, the same start extended by what was written since; without
//!   such failures the server holds no duplicate at all;
//! * no serial fragment holds a secret of its phase, however the log is cut into
//!   fragments and wherever a resend starts.

use crate::http_client::{assert_no_server_panics, new_job, settings, PhaseLog};
use crate::support::fake_server::{FakeServer, Fragment, Route};
use crate::support::scratch::Scratch;
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use testflinger_agent::mask::Masker;
use testflinger_agent::phase::Phase;
use testflinger_agent::server::http::{HttpServer, PendingOutput};
use testflinger_agent::server::Server;

/// The client gives up on a log post after this long (the slow fault outlasts it).
const LOG_TIMEOUT: Duration = Duration::from_millis(250);

/// What the server does while one chunk of output is written.
#[derive(Clone, Debug)]
enum Fault {
    None,
    /// The next `n` log posts get this 5xx status.
    Fail(usize, u16),
    /// The next `n` log posts are read, not stored, and their connection closed.
    Drop(usize),
    /// Every log post waits this long (below the client's timeout).
    Slow(u64),
    /// Every log post waits longer than the client's timeout, then is stored anyway.
    TooSlow,
    /// The server is down for this many milliseconds.
    Outage(u64),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        4 => Just(Fault::None),
        2 => (1usize..4, prop::sample::select(vec![500u16, 502, 503, 504]))
            .prop_map(|(n, s)| Fault::Fail(n, s)),
        2 => (1usize..3).prop_map(Fault::Drop),
        1 => (1u64..30).prop_map(Fault::Slow),
        1 => Just(Fault::TooSlow),
        1 => (20u64..120).prop_map(Fault::Outage),
    ]
}

/// One step of a phase: a chunk written to its log while a fault is in force.
#[derive(Clone, Debug)]
struct Step {
    chunk: String,
    fault: Fault,
}

fn step() -> impl Strategy<Value = Step> {
    ("[a-z €é\n]{0,40}", fault()).prop_map(|(chunk, fault)| Step { chunk, fault })
}

/// One phase: its steps, and the serial log its connector leaves (fillers and secrets).
#[derive(Clone, Debug)]
struct PhaseScript {
    steps: Vec<Step>,
    serial: Option<Vec<(String, usize)>>,
}

fn phase_script() -> impl Strategy<Value = PhaseScript> {
    (
        prop::collection::vec(step(), 1..6),
        prop::option::of(prop::collection::vec(
            ("[a-z €é\n]{0,30}", 0usize..3),
            1..12,
        )),
    )
        .prop_map(|(steps, serial)| PhaseScript { steps, serial })
}

/// The phases that run, with a secret each (provision and test have `_data` with secrets).
const PHASES: [(Phase, &str); 2] = [(Phase::Provision, "pr0v1s10n"), (Phase::Test, "t0ken")];

/// The job's other secret, used in both phases' serial logs: only test's is masked in
/// test, only provision's in provision, so the secret of the other phase stays.
fn secret_for(phase: Phase) -> &'static str {
    PHASES
        .iter()
        .find(|(p, _)| *p == phase)
        .map(|(_, s)| *s)
        .expect("a scripted phase")
}

/// Applies a fault; returns whether it can make the server store a post the client saw
/// fail.
fn apply(server: &FakeServer, fault: &Fault) -> bool {
    server.delay(Route::LogPost, Duration::ZERO);
    match *fault {
        Fault::None => false,
        Fault::Fail(n, status) => {
            server.fail_next(Route::LogPost, n, status);
            false
        }
        Fault::Drop(n) => {
            server.drop_next(Route::LogPost, n);
            false
        }
        Fault::Slow(ms) => {
            server.delay(Route::LogPost, Duration::from_millis(ms));
            false
        }
        Fault::TooSlow => {
            server.delay(Route::LogPost, LOG_TIMEOUT + Duration::from_millis(100));
            true
        }
        Fault::Outage(_) => true,
    }
}

/// One fragment per number, checking that a number held twice is the same post (or, for
/// live output, its start extended); returns the kept fragments in number order and
/// whether any number was held twice.
fn one_per_number(
    frags: &[Fragment],
    extends: bool,
) -> Result<(Vec<Fragment>, bool), TestCaseError> {
    let mut by_number: BTreeMap<i64, Fragment> = BTreeMap::new();
    let mut duplicated = false;
    for f in frags {
        match by_number.get(&f.fragment_number) {
            None => {
                by_number.insert(f.fragment_number, f.clone());
            }
            Some(kept) => {
                duplicated = true;
                prop_assert_eq!(
                    &kept.phase,
                    &f.phase,
                    "fragment {} in two phases",
                    f.fragment_number
                );
                let (short, long) = if kept.log_data.len() <= f.log_data.len() {
                    (&kept.log_data, &f.log_data)
                } else {
                    (&f.log_data, &kept.log_data)
                };
                if extends {
                    prop_assert!(
                        long.starts_with(short.as_str()),
                        "fragment {} resent with other bytes: {:?} / {:?}",
                        f.fragment_number,
                        short,
                        long
                    );
                } else {
                    prop_assert_eq!(
                        short,
                        long,
                        "fragment {} resent with other bytes",
                        f.fragment_number
                    );
                }
                let longer = f.log_data.len() > kept.log_data.len();
                if longer {
                    by_number.insert(f.fragment_number, f.clone());
                }
            }
        }
    }
    let numbers: Vec<i64> = by_number.keys().copied().collect();
    let expected: Vec<i64> = (0..numbers.len() as i64).collect();
    prop_assert_eq!(numbers, expected, "fragment numbers with a gap");
    Ok((by_number.into_values().collect(), duplicated))
}

/// The phases' texts in number order; a phase's fragments must all come before the next
/// phase's.
fn texts_in_order(kept: &[Fragment]) -> Result<Vec<(String, String)>, TestCaseError> {
    let mut texts: Vec<(String, String)> = Vec::new();
    for f in kept {
        match texts.last_mut() {
            Some((phase, text)) if *phase == f.phase => text.push_str(&f.log_data),
            _ => {
                prop_assert!(
                    !texts.iter().any(|(p, _)| *p == f.phase),
                    "{} fragments on both sides of another phase's",
                    f.phase
                );
                texts.push((f.phase.clone(), f.log_data.clone()));
            }
        }
    }
    Ok(texts)
}

fn run_case(script: &[PhaseScript], detach_while_down: bool) -> Result<(), TestCaseError> {
    let server = FakeServer::start();
    let scratch = Scratch::new("stream-props");
    let mut s = settings(&server.url(), &scratch);
    s.timeouts.log = LOG_TIMEOUT;
    s.fragment_size = 16;
    s.finish_wait = Duration::from_millis(500);
    let job = new_job(&server);
    let rundir = scratch.path("run");
    std::fs::create_dir_all(&rundir).expect("run dir");
    std::fs::write(
        rundir.join("testflinger.json"),
        json!({
            "job_id": job,
            "provision_data": {"secrets": {"PROVISION_KEY": secret_for(Phase::Provision)}},
            "test_data": {"test_cmds": "true", "secrets": {"TOKEN": secret_for(Phase::Test)}},
        })
        .to_string(),
    )
    .expect("job file");

    let client = HttpServer::new(s.clone());
    let mut ambiguous = false;
    let mut logs: Vec<(Phase, String)> = Vec::new();
    let mut serials: Vec<(Phase, Vec<u8>)> = Vec::new();
    for ((phase, _), phase_script) in PHASES.iter().zip(script) {
        let mut log = PhaseLog::new(&rundir, *phase);
        for step in &phase_script.steps {
            ambiguous |= apply(&server, &step.fault);
            if let Fault::Outage(ms) = step.fault {
                server.go_down();
                log.append(&client, &job, step.chunk.as_bytes());
                std::thread::sleep(Duration::from_millis(ms));
                server.come_back();
            } else {
                log.append(&client, &job, step.chunk.as_bytes());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        client.finish_output(&job, *phase);
        logs.push((*phase, log.text()));
        if let Some(parts) = &phase_script.serial {
            // Both phases' secrets, split anywhere across fragments of 16 bytes.
            let mut bytes = Vec::new();
            for (filler, pick) in parts {
                bytes.extend_from_slice(filler.as_bytes());
                match pick {
                    0 => bytes.extend_from_slice(secret_for(*phase).as_bytes()),
                    1 => bytes.extend_from_slice(secret_for(Phase::Test).as_bytes()),
                    _ => {}
                }
            }
            let path = rundir.join(format!("{}-serial.log", phase.name()));
            std::fs::write(&path, &bytes).expect("serial log");
            // A failure leaves the log queued for the report.
            let _ = client.post_serial_log(&job, *phase, &path);
            serials.push((*phase, bytes));
        }
    }
    server.delay(Route::LogPost, Duration::ZERO);
    if detach_while_down {
        server.go_down();
        ambiguous = true;
    } else {
        client.drain(&job, Duration::from_secs(5));
    }
    let pending = client.detach(&job);
    drop(client);
    server.come_back();

    // The report, from a new client (as after a restart), retried like the spool does.
    let stored = serde_json::to_string(&pending).expect("serialise");
    let mut pending: PendingOutput = serde_json::from_str(&stored).expect("parse");
    let client = HttpServer::new(s);
    let mut delivered = false;
    for attempt in 0..20 {
        if attempt == 10 {
            server.clear_faults();
        }
        if client
            .send_pending_resumable(&job, &rundir, &mut pending)
            .is_ok()
        {
            delivered = true;
            break;
        }
    }
    prop_assert!(delivered, "the report was not delivered: {:?}", pending);
    prop_assert!(pending.is_empty(), "{:?}", pending);

    let (kept, duplicated) = one_per_number(&server.fragments(&job, "output"), true)?;
    prop_assert!(
        ambiguous || !duplicated,
        "output duplicated without an ambiguous failure"
    );
    let texts = texts_in_order(&kept)?;
    let expected: Vec<(String, String)> = logs
        .iter()
        .filter(|(_, text)| !text.is_empty())
        .map(|(phase, text)| (phase.name().to_string(), text.clone()))
        .collect();
    prop_assert_eq!(texts, expected, "live output lost, reordered or duplicated");

    let serial_frags = server.fragments(&job, "serial");
    for f in &serial_frags {
        let phase = Phase::from_name(&f.phase).expect("a phase name");
        prop_assert!(
            !f.log_data.contains(secret_for(phase)),
            "secret of {} in serial fragment {}: {:?}",
            f.phase,
            f.fragment_number,
            f.log_data
        );
    }
    let (kept, duplicated) = one_per_number(&serial_frags, false)?;
    prop_assert!(
        ambiguous || !duplicated,
        "serial duplicated without an ambiguous failure"
    );
    let texts = texts_in_order(&kept)?;
    let expected: Vec<(String, String)> = serials
        .iter()
        .filter(|(_, bytes)| !bytes.is_empty())
        .map(|(phase, bytes)| {
            let masker = Masker::new([secret_for(*phase)]);
            let masked = String::from_utf8_lossy(&masker.mask_all(bytes)).into_owned();
            (phase.name().to_string(), masked)
        })
        .collect();
    prop_assert_eq!(
        texts,
        expected,
        "serial logs lost, reordered, duplicated or not masked"
    );
    assert_no_server_panics(&server);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    })]

    #[test]
    fn fragments_gap_free_in_order_and_masked_under_faults(
        script in prop::collection::vec(phase_script(), PHASES.len()),
        detach_while_down in any::<bool>(),
    ) {
        run_case(&script, detach_while_down)?;
    }
}
