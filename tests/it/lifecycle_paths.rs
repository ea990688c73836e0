//! Every path of the job machine, not a sample: all combinations of per-phase outcomes over
//! the seven phases, checked against a model of PROTOCOL §5.4 and the operator guide's crash
//! recovery rules written out here, independently of the engine.
//!
//! # What a path is
//!
//! Each phase from setup to reserve ends in one of: ran ok, failed (non-zero exit), skipped,
//! global timeout (not reserve: §5.6), output timeout (test only), cancelled before it
//! starts, cancelled while it runs (provision is never interrupted: it runs to its end and
//! the cancel is seen before firmware_update), agent shutdown before it or while it runs,
//! exit 46, the agent dying just before it starts or while it runs. Cleanup ends ok,
//! failed, skipped, global timeout, exit 46, or the agent dies before it, during it or right
//! after it (before the outcome is final). After the agent's death, a restart recovers the
//! job: the interrupted phase gets 247 and cleanup runs, through the engine, with an outcome
//! of its own: ok, failed, global timeout, exit 46, the agent dying during it or right after
//! it, again and again, until cleanup has been started twice (then it is recorded 247).
//!
//! Paths are enumerated as a tree of outcome prefixes, not the cartesian product: once a
//! phase ends the forward path (an abort, a stop or the agent's death), the later phases'
//! outcomes are irrelevant and not enumerated. Outcomes the engine cannot tell apart are
//! one representative each: every non-zero exit other than 46 (1, 100 "could not run", a
//! signal) is "failed"; the three skip reasons are "skipped"; a cancel during cleanup
//! (cleanup is never interrupted) is "ran ok"; a shutdown during cleanup ends it like its
//! timeout (247). A refused job (bad attachments) is a stop before setup recorded by the
//! executor, covered by the daemon tests. That leaves **21,823 distinct paths**: 19,159
//! that end in the live agent's cleanup (833 forward prefixes × 23 cleanup and recovery
//! continuations) and 2,664 whose agent dies in a forward phase (222 prefixes × 12).
//!
//! # What drives them
//!
//! The real engine (`run_to_completion`, `Job::recovered(..).cleanup()`) with a
//! [`ScriptedRunner`] per agent life, wrapped in a runner that keeps the job journal with
//! the executor's own journal functions and that "dies" at the path's crash point: from
//! then on it does nothing, and the journal as it was is what the dead agent left on disk.
//! Recovery is driven through its pure journal-level functions (`begin_recovery`,
//! `conclude_recovery`), the ones `src/daemon/recovery.rs` runs around the real executor's
//! cleanup; killing the old tree and the log lines are the integration tests' business
//! (tests/it/crash_recovery.rs).
//!
//! # What is asserted, on every path
//!
//! The sequence of phase commands started, across every life of the agent; cleanup reached
//! exactly once when the agent does not die, started at most twice in all when it does;
//! the outcome reported (by the live agent) or spooled (by a restart); the final status of
//! each phase; the job's final state (`cancelled` stays `cancelled`); the agent's state
//! after (`offline` after an exit 46 anywhere, also in a recovered cleanup); the `job_end`
//! detail; the phase a recovered job is deemed aborted in; a final journal in `Cleaned`,
//! finished, whose trail is a chain of edges of the transition table (plus recovery's own).
//! The engine's records and the journal's statuses agree.

use std::collections::BTreeMap;
use testflinger_agent::daemon::{begin_recovery, conclude_recovery, MAX_CLEANUP_ATTEMPTS};
use testflinger_agent::executor::{
    journal_command_spawned, journal_phase_finished, journal_phase_starting, journal_stopped_before,
};
use testflinger_agent::journal::{Journal, Why};
use testflinger_agent::lifecycle::{
    run_to_completion, AbortReason, Call, Job, PhaseEnd, PhaseRecord, PhaseResult, PhaseRunner,
    Plan, ScriptedRunner, StopCause, TRANSITIONS,
};
use testflinger_agent::phase::{Phase, SkipReason};

const JOB_ID: &str = "00000000-0000-4000-8000-000000000000";

/// The forward phases, in order.
const FORWARD: [Phase; 6] = [
    Phase::Setup,
    Phase::Provision,
    Phase::FirmwareUpdate,
    Phase::Test,
    Phase::Allocate,
    Phase::Reserve,
];

/// How one phase ends, as the world sees it (not as the engine encodes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The command ran and exited 0.
    Passed,
    Failed,
    Skipped,
    GlobalTimeout,
    OutputTimeout,
    CancelledBefore,
    Cancelled,
    ShutdownBefore,
    Shutdown,
    Exit46,
    /// The agent dies after the previous phase ended, before this one starts.
    CrashBefore,
    /// The agent dies while the phase's command runs.
    Crash,
    /// Cleanup only: cleanup ends ok, then the agent dies before the outcome is final.
    CrashAfter,
}

use Outcome::*;

// ---- the model: PROTOCOL §5.3–§5.6 and the operator guide's crash recovery, written out ----

/// The outcomes a phase can have (§5.6: no global timeout in reserve, the output timeout
/// only in test).
fn outcomes_of(phase: Phase) -> Vec<Outcome> {
    if phase == Phase::Cleanup {
        return vec![
            Skipped,
            Passed,
            Failed,
            GlobalTimeout,
            Exit46,
            CrashBefore,
            Crash,
            CrashAfter,
        ];
    }
    let mut all = vec![Passed, Skipped, Failed];
    if phase != Phase::Reserve {
        all.push(GlobalTimeout);
    }
    if phase == Phase::Test {
        all.push(OutputTimeout);
    }
    all.extend([
        CancelledBefore,
        Cancelled,
        ShutdownBefore,
        Shutdown,
        Exit46,
        CrashBefore,
        Crash,
    ]);
    all
}

/// The outcomes of a cleanup run by a restarted agent (it has a command: the plan is the
/// job's, and a skipped cleanup has no outcome to choose).
const RECOVERED_CLEANUP: [Outcome; 6] = [Passed, Failed, GlobalTimeout, Exit46, Crash, CrashAfter];

/// §5.4/§5.5: whether a forward phase's outcome ends the forward path. A failing test does
/// not, nor does its output timeout (a non-zero test code); exit 46 does, in test too.
fn ends_forward(phase: Phase, outcome: Outcome) -> bool {
    match outcome {
        Passed | Skipped | OutputTimeout => false,
        Failed => phase != Phase::Test,
        _ => true,
    }
}

/// One path: the outcomes the live agent sees, phase by phase (cleanup last when it gets
/// there), whether the job has a cleanup command, and the outcome of each cleanup run by a
/// restarted agent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PathSpec {
    live: Vec<(Phase, Outcome)>,
    cleanup_configured: bool,
    recovered: Vec<Outcome>,
}

/// Every path, as a tree of outcome prefixes.
fn enumerate() -> Vec<PathSpec> {
    fn forward(index: usize, live: &mut Vec<(Phase, Outcome)>, out: &mut Vec<PathSpec>) {
        let Some(&phase) = FORWARD.get(index) else {
            return cleanup(live, out);
        };
        for outcome in outcomes_of(phase) {
            live.push((phase, outcome));
            match outcome {
                CrashBefore | Crash => {
                    for configured in [false, true] {
                        recovery(live, configured, Vec::new(), 0, false, out);
                    }
                }
                _ if ends_forward(phase, outcome) => cleanup(live, out),
                _ => forward(index + 1, live, out),
            }
            live.pop();
        }
    }
    fn cleanup(live: &mut Vec<(Phase, Outcome)>, out: &mut Vec<PathSpec>) {
        for outcome in outcomes_of(Phase::Cleanup) {
            live.push((Phase::Cleanup, outcome));
            match outcome {
                Skipped => out.push(path(live, false, Vec::new())),
                CrashBefore => recovery(live, true, Vec::new(), 0, false, out),
                Crash => recovery(live, true, Vec::new(), 1, false, out),
                CrashAfter => recovery(live, true, Vec::new(), 1, true, out),
                _ => out.push(path(live, true, Vec::new())),
            }
            live.pop();
        }
    }
    /// A restart: `starts` cleanups started so far; `cleaned`: the agent died after one
    /// ended. Cleanup runs again unless it was started twice already or had ended.
    fn recovery(
        live: &[(Phase, Outcome)],
        configured: bool,
        recovered: Vec<Outcome>,
        starts: u32,
        cleaned: bool,
        out: &mut Vec<PathSpec>,
    ) {
        if !configured || cleaned || starts >= 2 {
            return out.push(path(live, configured, recovered));
        }
        for outcome in RECOVERED_CLEANUP {
            let mut recovered = recovered.clone();
            recovered.push(outcome);
            match outcome {
                Crash => recovery(live, configured, recovered, starts + 1, false, out),
                CrashAfter => recovery(live, configured, recovered, starts + 1, true, out),
                _ => out.push(path(live, configured, recovered)),
            }
        }
    }
    fn path(live: &[(Phase, Outcome)], configured: bool, recovered: Vec<Outcome>) -> PathSpec {
        PathSpec {
            live: live.to_vec(),
            cleanup_configured: configured,
            recovered,
        }
    }
    let mut out = Vec::new();
    forward(0, &mut Vec::new(), &mut out);
    out
}

/// Where the job stands when an agent dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Death {
    /// Before `phase` started (after the previous one ended).
    Before(Phase),
    /// While `phase`'s command ran.
    During(Phase),
    /// After cleanup ended, before the outcome was final.
    AfterCleanup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    /// The live agent reports it.
    Reported,
    /// A restarted agent finishes the job and spools it.
    Spooled,
}

/// What a path does, as the model predicts it and as the engine shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Report {
    /// Phase commands started, in order, across every life of the agent.
    runs: Vec<Phase>,
    /// Cleanup commands started, in all.
    cleanup_starts: u32,
    /// The final exit code of each phase that has one.
    statuses: BTreeMap<Phase, i32>,
    /// The `job_end` detail, when the live agent finished the job.
    job_end: Option<String>,
    /// The phase each restarted agent's engine deems the job aborted in.
    recovered_in: Vec<Phase>,
    delivery: Delivery,
    job_state: &'static str,
    agent_state: &'static str,
}

/// The model's prediction for `path`.
fn expect(path: &PathSpec) -> Report {
    let mut runs = Vec::new();
    let mut statuses = BTreeMap::new();
    let mut ran = |phase: Phase, code: Option<i32>, runs: &mut Vec<Phase>| {
        runs.push(phase);
        if let Some(code) = code {
            statuses.insert(phase, code);
        }
    };
    let mut job_end: Option<String> = None;
    let mut cancelled = false;
    let mut offline = false;
    let mut death = None;
    for &(phase, outcome) in &path.live {
        let stop = |end: &str| Some(end.to_owned());
        match outcome {
            Passed => ran(phase, Some(0), &mut runs),
            Skipped => {}
            Failed => {
                ran(phase, Some(1), &mut runs);
                if phase != Phase::Test && phase != Phase::Cleanup {
                    job_end = stop(&format!("{phase}_fail"));
                }
            }
            GlobalTimeout => {
                ran(phase, Some(247), &mut runs);
                if phase != Phase::Cleanup {
                    job_end = stop("global_timeout");
                }
            }
            OutputTimeout => ran(phase, Some(247), &mut runs),
            CancelledBefore => {
                cancelled = true;
                job_end = stop("cancelled");
            }
            Cancelled => {
                // Provision is never interrupted: it ends on its own, the cancel is seen
                // before the next phase.
                let code = if phase == Phase::Provision { 0 } else { 247 };
                ran(phase, Some(code), &mut runs);
                cancelled = true;
                job_end = stop("cancelled");
            }
            ShutdownBefore => job_end = stop("agent_shutdown"),
            Shutdown => {
                ran(phase, Some(247), &mut runs);
                job_end = stop("agent_shutdown");
            }
            Exit46 => {
                ran(phase, Some(46), &mut runs);
                offline = true;
                if phase != Phase::Cleanup {
                    job_end = stop("recovery_fail");
                }
            }
            CrashBefore => death = Some(Death::Before(phase)),
            Crash => {
                ran(phase, None, &mut runs);
                death = Some(Death::During(phase));
            }
            CrashAfter => {
                ran(phase, Some(0), &mut runs);
                death = Some(Death::AfterCleanup);
            }
        }
    }
    let count_cleanups = |runs: &[Phase]| runs.iter().filter(|p| **p == Phase::Cleanup).count();
    let Some(mut death) = death else {
        return Report {
            cleanup_starts: count_cleanups(&runs) as u32,
            runs,
            statuses,
            job_end: Some(job_end.unwrap_or_else(|| "normal_exit".to_owned())),
            recovered_in: Vec::new(),
            delivery: Delivery::Reported,
            job_state: if cancelled { "cancelled" } else { "complete" },
            agent_state: if offline { "offline" } else { "waiting" },
        };
    };
    // docs/operating.md, "Crash recovery": each restart gives the interrupted phase 247 and runs
    // cleanup, once more if the agent died in it, never a third time.
    let mut recovered_in = Vec::new();
    let mut outcomes = path.recovered.iter();
    loop {
        let abort_phase = match death {
            Death::AfterCleanup => break,
            Death::During(Phase::Cleanup) if count_cleanups(&runs) >= 2 => {
                statuses.insert(Phase::Cleanup, 247);
                break;
            }
            Death::During(phase) => {
                if phase != Phase::Cleanup {
                    statuses.insert(phase, 247);
                }
                phase
            }
            Death::Before(phase) => phase,
        };
        recovered_in.push(abort_phase);
        if !path.cleanup_configured {
            break;
        }
        let outcome = *outcomes
            .next()
            .expect("the enumeration gives every recovered cleanup an outcome");
        runs.push(Phase::Cleanup);
        match outcome {
            Passed => statuses.insert(Phase::Cleanup, 0),
            Failed => statuses.insert(Phase::Cleanup, 1),
            GlobalTimeout => statuses.insert(Phase::Cleanup, 247),
            Exit46 => {
                offline = true;
                statuses.insert(Phase::Cleanup, 46)
            }
            Crash => {
                death = Death::During(Phase::Cleanup);
                continue;
            }
            CrashAfter => {
                statuses.insert(Phase::Cleanup, 0);
                death = Death::AfterCleanup;
                continue;
            }
            other => unreachable!("{other:?} is not a recovered cleanup's outcome"),
        };
        break;
    }
    Report {
        cleanup_starts: count_cleanups(&runs) as u32,
        runs,
        statuses,
        job_end: None,
        recovered_in,
        delivery: Delivery::Spooled,
        job_state: if cancelled { "cancelled" } else { "complete" },
        agent_state: if offline { "offline" } else { "waiting" },
    }
}

// ---- driving the engine --------------------------------------------------------------

/// Where, in one life, the agent dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    Before,
    During,
    After,
}

/// A [`ScriptedRunner`] that also keeps the job journal the way the executor does, and
/// that dies at `crash`: from then on every call is a no-op, and `disk` holds the journal
/// as the dead agent left it.
struct LifeRunner {
    inner: ScriptedRunner,
    journal: Journal,
    crash: Option<(Phase, When)>,
    disk: Option<Journal>,
    /// A phase exited 46 and its end was handed to the executor (which posts `offline`).
    saw_46: bool,
}

impl LifeRunner {
    fn new(inner: ScriptedRunner, journal: Journal, crash: Option<(Phase, When)>) -> LifeRunner {
        LifeRunner {
            inner,
            journal,
            crash,
            disk: None,
            saw_46: false,
        }
    }

    fn dead(&self) -> bool {
        self.disk.is_some()
    }

    fn die_if(&mut self, phase: Phase, when: When) -> bool {
        if self.crash == Some((phase, when)) {
            self.disk = Some(self.journal.clone());
        }
        self.dead()
    }
}

impl PhaseRunner for LifeRunner {
    fn stop_requested(&mut self, next: Phase) -> Option<StopCause> {
        if self.dead() {
            return None;
        }
        self.inner.stop_requested(next)
    }

    fn phase_starting(&mut self, phase: Phase, skip: Option<SkipReason>) {
        if self.dead() || self.die_if(phase, When::Before) {
            return;
        }
        self.inner.phase_starting(phase, skip);
        journal_phase_starting(&mut self.journal, phase, skip);
    }

    fn run_phase(&mut self, phase: Phase) -> PhaseResult {
        if self.dead() {
            return PhaseResult::exited(0);
        }
        let result = self.inner.run_phase(phase);
        journal_command_spawned(&mut self.journal, 4242, "token");
        self.die_if(phase, When::During);
        result
    }

    fn phase_finished(&mut self, record: &PhaseRecord, abort: Option<&AbortReason>) {
        if self.dead() {
            return;
        }
        self.inner.phase_finished(record, abort);
        journal_phase_finished(&mut self.journal, "t".to_owned(), record, abort);
        self.saw_46 |= record.exit_code() == Some(46);
        self.die_if(record.phase, When::After);
    }

    fn stopped_before(&mut self, reason: &AbortReason) {
        if self.dead() {
            return;
        }
        self.inner.stopped_before(reason);
        journal_stopped_before(&mut self.journal, "t".to_owned(), reason);
    }
}

fn killed(end: PhaseEnd) -> PhaseResult {
    PhaseResult {
        exit_code: 247,
        end,
        duration: std::time::Duration::ZERO,
    }
}

/// The scripted end of `phase` for `outcome`, and where the agent dies.
fn script(
    runner: ScriptedRunner,
    phase: Phase,
    outcome: Outcome,
) -> (ScriptedRunner, Option<(Phase, When)>) {
    let runner = match outcome {
        Passed | Skipped | CrashBefore | Crash | CrashAfter => runner,
        Failed => runner.exit(phase, 1),
        GlobalTimeout => runner.result(phase, killed(PhaseEnd::GlobalTimeout)),
        OutputTimeout => runner.result(phase, killed(PhaseEnd::OutputTimeout)),
        CancelledBefore => runner.stop_before(phase, StopCause::Cancelled),
        // Provision runs to its end; the stop check before the next phase sees the cancel.
        Cancelled if phase == Phase::Provision => {
            runner.stop_before(Phase::FirmwareUpdate, StopCause::Cancelled)
        }
        Cancelled => runner.result(phase, killed(PhaseEnd::Cancelled)),
        ShutdownBefore => runner.stop_before(phase, StopCause::Shutdown),
        Shutdown => runner.result(phase, killed(PhaseEnd::Shutdown)),
        Exit46 => runner.exit(phase, 46),
    };
    let crash = match outcome {
        CrashBefore => Some((phase, When::Before)),
        Crash => Some((phase, When::During)),
        CrashAfter => Some((phase, When::After)),
        _ => None,
    };
    (runner, crash)
}

fn skip_reason(phase: Phase) -> SkipReason {
    match phase {
        Phase::Setup | Phase::Cleanup => SkipReason::NoCommand,
        _ => SkipReason::NoData,
    }
}

/// What every life of the agent did, put together.
#[derive(Default)]
struct Lives {
    runs: Vec<Phase>,
    cleanup_starts: u32,
    saw_46: bool,
}

impl Lives {
    fn add(&mut self, runner: &LifeRunner) {
        self.runs.extend(runner.inner.ran());
        self.cleanup_starts += runner
            .inner
            .calls()
            .iter()
            .filter(|call| matches!(call, Call::Starting(Phase::Cleanup, None)))
            .count() as u32;
        self.saw_46 |= runner.saw_46;
    }
}

fn statuses_of(journal: &Journal) -> BTreeMap<Phase, i32> {
    journal
        .statuses
        .iter()
        .map(|s| {
            let phase = Phase::from_name(&s.phase).expect("the journal names real phases");
            (phase, s.exit_code)
        })
        .collect()
}

/// Runs `path` through the engine and recovery; returns what they did and the last journal.
fn drive(path: &PathSpec) -> Result<(Report, Journal), String> {
    let skipped = |phase: Phase| match phase {
        Phase::Cleanup => !path.cleanup_configured,
        _ => path.live.contains(&(phase, Skipped)),
    };
    let plan = Plan::from_fn(|phase| skipped(phase).then(|| skip_reason(phase)));
    let mut inner = ScriptedRunner::default();
    let mut crash = None;
    for &(phase, outcome) in &path.live {
        let (scripted, at) = script(inner, phase, outcome);
        inner = scripted;
        crash = crash.or(at);
    }
    let journal = Journal::taken(JOB_ID, "t0".to_owned());
    let runner = LifeRunner::new(inner, journal, crash);
    let (outcome, runner) = run_to_completion(Job::new(JOB_ID, plan, runner)).finish();
    let mut lives = Lives::default();
    lives.add(&runner);

    let Some(mut disk) = runner.disk else {
        // The live agent finished the job: what the engine recorded is what the executor
        // wrote to the outcome file, and the journal agrees.
        let records: BTreeMap<Phase, i32> = outcome
            .records
            .iter()
            .filter_map(|r| Some((r.phase, r.exit_code()?)))
            .collect();
        let journal = runner.journal;
        if records != statuses_of(&journal) {
            return Err(format!(
                "engine records {records:?} differ from the journal's {:?}",
                journal.statuses
            ));
        }
        let reached_cleanup = runner
            .inner
            .calls()
            .iter()
            .filter(|call| matches!(call, Call::Starting(Phase::Cleanup, _)))
            .count();
        if reached_cleanup != 1 {
            return Err(format!("cleanup reached {reached_cleanup} times"));
        }
        let report = Report {
            runs: lives.runs,
            cleanup_starts: lives.cleanup_starts,
            statuses: records,
            job_end: Some(outcome.end_detail()),
            recovered_in: Vec::new(),
            delivery: Delivery::Reported,
            // As the daemon's finish_job decides it from the engine's outcome.
            job_state: if matches!(outcome.abort, Some(AbortReason::Cancelled { .. })) {
                "cancelled"
            } else {
                "complete"
            },
            agent_state: if lives.saw_46 { "offline" } else { "waiting" },
        };
        return Ok((report, journal));
    };

    // The agent died: restarts recover the job until one finishes it.
    let mut recovered_in = Vec::new();
    let mut outcomes = path.recovered.iter().copied();
    loop {
        let start = begin_recovery(&mut disk, "t");
        if !start.run_cleanup {
            break;
        }
        let outcome = if path.cleanup_configured {
            outcomes
                .next()
                .ok_or("a restart ran cleanup the path has no outcome for")?
        } else {
            Skipped
        };
        let (inner, crash) = script(ScriptedRunner::default(), Phase::Cleanup, outcome);
        let runner = LifeRunner::new(inner, disk.clone(), crash);
        let job = Job::recovered(JOB_ID, plan, runner, start.records, start.abort_phase);
        let (done, runner) = job.cleanup().finish();
        lives.add(&runner);
        match done.abort {
            Some(AbortReason::AgentDied { phase }) => recovered_in.push(phase),
            other => return Err(format!("a recovered job ended with {other:?}")),
        }
        match runner.disk {
            Some(left) => disk = left,
            None => {
                disk = runner.journal;
                break;
            }
        }
    }
    if outcomes.next().is_some() {
        return Err("a recovered cleanup the path expects did not run".to_owned());
    }
    let job_state = conclude_recovery(&mut disk);
    if disk.cleanup_attempts != lives.cleanup_starts {
        return Err(format!(
            "the journal counts {} cleanup starts, the lives {}",
            disk.cleanup_attempts, lives.cleanup_starts
        ));
    }
    let report = Report {
        runs: lives.runs,
        cleanup_starts: lives.cleanup_starts,
        statuses: statuses_of(&disk),
        job_end: None,
        recovered_in,
        delivery: Delivery::Spooled,
        job_state,
        agent_state: if lives.saw_46 { "offline" } else { "waiting" },
    };
    Ok((report, disk))
}

/// The final journal: `Cleaned`, and (after a restart) finished; its trail a chain whose
/// edges are the table's, or recovery's own moves to `Aborted` and on to `Cleaned`.
fn check_journal(journal: &Journal, recovered: bool) -> Result<(), String> {
    if journal.state != "Cleaned" {
        return Err(format!("the journal ends in {}", journal.state));
    }
    if journal.finished != recovered {
        return Err(format!("finished = {}", journal.finished));
    }
    for pair in journal.trail.windows(2) {
        let (before, entry) = (&pair[0], &pair[1]);
        if entry.from != before.to {
            return Err(format!(
                "the trail jumps from {} to {}",
                before.to, entry.from
            ));
        }
        let in_table = match entry.why {
            Why::CrashRecovery => {
                entry.to == "Aborted" || (entry.from == "Aborted" && entry.to == "Cleaned")
            }
            // The table names an edge by its method, which is the phase's name.
            _ => TRANSITIONS.iter().any(|t| {
                t.from == entry.from && t.to == entry.to && entry.phase.as_deref() == Some(t.method)
            }),
        };
        if !in_table {
            return Err(format!(
                "the trail takes an edge not in the table: {entry:?}"
            ));
        }
    }
    Ok(())
}

#[test]
fn every_path_of_the_job_machine_matches_the_model() {
    let paths = enumerate();
    let mut sorted = paths.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), paths.len(), "every path is enumerated once");
    assert_eq!(
        paths.len(),
        21_823,
        "the path count in the module documentation"
    );

    let mut recovered = 0;
    let mut max_cleanups = 0;
    for path in &paths {
        let expected = expect(path);
        let (got, journal) = drive(path).unwrap_or_else(|err| panic!("{path:?}: {err}"));
        assert_eq!(got, expected, "{path:?}");
        if let Err(err) = check_journal(&journal, got.delivery == Delivery::Spooled) {
            panic!("{path:?}: {err}\n{:#?}", journal.trail);
        }
        match got.delivery {
            Delivery::Reported => assert!(got.cleanup_starts <= 1, "{path:?}"),
            Delivery::Spooled => {
                recovered += 1;
                assert!(got.cleanup_starts <= MAX_CLEANUP_ATTEMPTS, "{path:?}");
            }
        }
        max_cleanups = max_cleanups.max(got.cleanup_starts);
    }
    // The enumeration reaches the corners it claims to.
    assert_eq!(max_cleanups, MAX_CLEANUP_ATTEMPTS);
    assert!(recovered > 0 && recovered < paths.len());
}

/// The model's outcome sets and its reading of provision under a cancel are the rules the
/// agent applies (src/phase.rs), so a path the model leaves out is one that cannot happen.
#[test]
fn the_models_phase_rules_are_the_agents() {
    for phase in FORWARD {
        let outcomes = outcomes_of(phase);
        assert_eq!(
            outcomes.contains(&GlobalTimeout),
            phase.has_global_timeout(),
            "{phase}"
        );
        assert_eq!(
            outcomes.contains(&OutputTimeout),
            phase.has_output_timeout(),
            "{phase}"
        );
        assert_eq!(
            phase != Phase::Provision,
            phase.interrupted_by_cancel(),
            "{phase}"
        );
    }
    assert!(!Phase::Cleanup.interrupted_by_cancel());
}
