//! Tests of the engine: abort rules, cleanup exactly once, and the transition table's
//! invariants.

use super::scripted::Call;
use super::*;
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};

fn ran_phases(outcome: &JobOutcome) -> Vec<Phase> {
    outcome.records.iter().map(|r| r.phase).collect()
}

#[test]
fn all_pass_runs_every_phase_in_order() {
    let done = run_to_completion(Job::new("j", Plan::all_run(), ScriptedRunner::default()));
    let (outcome, runner) = done.finish();
    assert_eq!(ran_phases(&outcome), Phase::ALL.to_vec());
    assert_eq!(runner.ran(), Phase::ALL.to_vec());
    assert!(outcome.succeeded());
    assert_eq!(outcome.end_detail(), "normal_exit");
}

#[test]
fn failing_non_test_phases_abort_to_cleanup() {
    for failing in [
        Phase::Setup,
        Phase::Provision,
        Phase::FirmwareUpdate,
        Phase::Allocate,
        Phase::Reserve,
    ] {
        let runner = ScriptedRunner::default().exit(failing, 3);
        let (outcome, runner) = run_to_completion(Job::new("j", Plan::all_run(), runner)).finish();
        let mut expected: Vec<Phase> = Phase::ALL
            .into_iter()
            .take_while(|p| *p != failing)
            .collect();
        expected.extend([failing, Phase::Cleanup]);
        assert_eq!(runner.ran(), expected, "{failing} fails");
        assert_eq!(
            outcome.abort,
            Some(AbortReason::Failed {
                phase: failing,
                exit_code: 3
            })
        );
        assert_eq!(outcome.end_detail(), format!("{failing}_fail"));
        assert!(!outcome.succeeded());
    }
}

#[test]
fn failing_test_phase_does_not_abort() {
    let runner = ScriptedRunner::default().exit(Phase::Test, 1);
    let (outcome, runner) = run_to_completion(Job::new("j", Plan::all_run(), runner)).finish();
    assert_eq!(runner.ran(), Phase::ALL.to_vec());
    assert_eq!(outcome.abort, None);
    assert!(!outcome.succeeded(), "a failed test is not a success");
}

#[test]
fn exit_46_aborts_even_in_test() {
    let runner = ScriptedRunner::default().exit(Phase::Test, RECOVERY_FAILED_EXIT_CODE);
    let (outcome, runner) = run_to_completion(Job::new("j", Plan::all_run(), runner)).finish();
    assert_eq!(runner.ran().last(), Some(&Phase::Cleanup));
    assert!(!runner.ran().contains(&Phase::Allocate));
    assert_eq!(
        outcome.abort,
        Some(AbortReason::RecoveryFailed { phase: Phase::Test })
    );
    assert_eq!(outcome.end_detail(), "recovery_fail");
}

#[test]
fn stop_before_a_phase_skips_the_rest_but_not_cleanup() {
    let runner = ScriptedRunner::default().stop_before(Phase::Test, StopCause::Cancelled);
    let (outcome, runner) = run_to_completion(Job::new("j", Plan::all_run(), runner)).finish();
    assert_eq!(
        runner.ran(),
        vec![
            Phase::Setup,
            Phase::Provision,
            Phase::FirmwareUpdate,
            Phase::Cleanup
        ]
    );
    assert!(runner.calls().contains(&Call::StoppedBefore(Phase::Test)));
    assert_eq!(
        outcome.abort,
        Some(AbortReason::Cancelled { phase: Phase::Test })
    );
}

#[test]
fn skipped_phases_are_recorded_not_run() {
    let plan = Plan::from_fn(|p| (p == Phase::Provision).then_some(SkipReason::NoData));
    let (outcome, runner) =
        run_to_completion(Job::new("j", plan, ScriptedRunner::default())).finish();
    assert!(!runner.ran().contains(&Phase::Provision));
    assert!(runner
        .calls()
        .contains(&Call::Starting(Phase::Provision, Some(SkipReason::NoData))));
    assert_eq!(outcome.records.len(), 7);
    assert_eq!(outcome.records[1].exit_code(), None);
}

#[test]
fn any_job_steps_to_cleaned() {
    let mut job: AnyJob<ScriptedRunner> = AnyJob::Polled(Job::new(
        "j",
        Plan::all_run(),
        ScriptedRunner::default().exit(Phase::Provision, 1),
    ));
    let mut seen = vec![job.state()];
    while !matches!(job, AnyJob::Cleaned(_)) {
        job = job.step();
        seen.push(job.state());
    }
    assert_eq!(seen, ["Polled", "Setup", "Aborted", "Cleaned"]);
    // A cleaned job stays cleaned.
    assert_eq!(job.step().state(), "Cleaned");
}

// ---- the transition table ----

fn edges() -> HashMap<&'static str, Vec<&'static str>> {
    let mut map: HashMap<&str, Vec<&str>> = HashMap::new();
    for t in TRANSITIONS {
        map.entry(t.from).or_default().push(t.to);
    }
    map
}

fn reachable(from: &'static str) -> BTreeSet<&'static str> {
    let edges = edges();
    let mut seen = BTreeSet::from([from]);
    let mut todo = vec![from];
    while let Some(state) = todo.pop() {
        for next in edges.get(state).into_iter().flatten() {
            if seen.insert(next) {
                todo.push(next);
            }
        }
    }
    seen
}

#[test]
fn every_state_is_reachable_from_polled() {
    let all: BTreeSet<&str> = STATES.iter().copied().collect();
    assert_eq!(reachable("Polled"), all);
}

#[test]
fn every_state_reaches_cleaned() {
    for state in STATES {
        assert!(
            reachable(state).contains("Cleaned"),
            "{state} cannot reach Cleaned"
        );
    }
}

#[test]
fn every_state_before_cleanup_can_abort() {
    for state in STATES {
        if matches!(*state, "Reserved" | "Aborted" | "Cleaned") {
            continue;
        }
        assert!(
            TRANSITIONS
                .iter()
                .any(|t| t.from == *state && t.to == "Aborted"),
            "{state} has no abort edge"
        );
    }
}

#[test]
fn cleaned_is_terminal_and_aborted_only_cleans() {
    assert!(TRANSITIONS.iter().all(|t| t.from != "Cleaned"));
    let from_aborted: Vec<_> = TRANSITIONS.iter().filter(|t| t.from == "Aborted").collect();
    assert_eq!(from_aborted.len(), 1);
    assert_eq!(from_aborted[0].method, "cleanup");
    assert_eq!(from_aborted[0].to, "Cleaned");
}

#[test]
fn forward_edges_follow_the_phase_order() {
    let methods: Vec<&str> = TRANSITIONS
        .iter()
        .filter(|t| t.kind != EdgeKind::Abort)
        .map(|t| t.method)
        .collect();
    assert_eq!(
        methods,
        [
            "setup",
            "provision",
            "firmware_update",
            "test",
            "allocate",
            "reserve",
            "cleanup",
            "cleanup"
        ]
    );
}

// ---- property: random outcomes per phase ----

fn arb_result() -> impl Strategy<Value = PhaseResult> {
    let end = prop_oneof![
        6 => Just(PhaseEnd::Exited),
        1 => Just(PhaseEnd::Signaled),
        1 => Just(PhaseEnd::GlobalTimeout),
        1 => Just(PhaseEnd::OutputTimeout),
        1 => Just(PhaseEnd::Cancelled),
        1 => Just(PhaseEnd::Shutdown),
        1 => Just(PhaseEnd::AgentError),
        1 => Just(PhaseEnd::StorageFailed),
    ];
    let code =
        prop_oneof![4 => Just(0), 1 => Just(1), 1 => Just(46), 1 => Just(247), 1 => 0..256i32];
    (end, code).prop_map(|(end, exit_code)| {
        let exit_code = match end {
            PhaseEnd::Exited | PhaseEnd::Signaled => exit_code,
            PhaseEnd::AgentError | PhaseEnd::StorageFailed => 100,
            _ => 247,
        };
        PhaseResult {
            exit_code,
            end,
            duration: Duration::ZERO,
        }
    })
}

fn arb_skip() -> impl Strategy<Value = Option<SkipReason>> {
    prop_oneof![
        4 => Just(None),
        1 => Just(Some(SkipReason::NoCommand)),
        1 => Just(Some(SkipReason::NoData)),
        1 => Just(Some(SkipReason::SkipRequested)),
    ]
}

/// The rules of PROTOCOL §5.4 written out plainly, independent of the engine.
fn expected_runs(
    results: &[PhaseResult; 7],
    skips: &[Option<SkipReason>; 7],
    stop: Option<(usize, StopCause)>,
) -> Vec<Phase> {
    let mut ran = Vec::new();
    for (i, phase) in Phase::ALL.into_iter().enumerate().take(6) {
        if stop.is_some_and(|(at, _)| at == i) {
            break;
        }
        if skips[i].is_some() {
            continue;
        }
        ran.push(phase);
        let r = results[i];
        let stopped = matches!(
            r.end,
            PhaseEnd::Cancelled
                | PhaseEnd::Shutdown
                | PhaseEnd::GlobalTimeout
                | PhaseEnd::StorageFailed
        );
        if stopped || r.exit_code == 46 || (r.exit_code != 0 && phase != Phase::Test) {
            break;
        }
    }
    if skips[6].is_none() {
        ran.push(Phase::Cleanup);
    }
    ran
}

proptest! {
    #[test]
    fn cleanup_runs_once_and_no_phase_runs_after_an_abort(
        results in proptest::array::uniform7(arb_result()),
        skips in proptest::array::uniform7(arb_skip()),
        stop in proptest::option::of((0usize..6, prop_oneof![Just(StopCause::Cancelled), Just(StopCause::Shutdown), Just(StopCause::Unrunnable), Just(StopCause::StorageFailed)])),
    ) {
        let mut runner = ScriptedRunner::default();
        for (phase, result) in Phase::ALL.into_iter().zip(results) {
            runner = runner.result(phase, result);
        }
        if let Some((at, cause)) = stop {
            runner = runner.stop_before(Phase::ALL[at], cause);
        }
        let plan = Plan::from_fn(|p| skips[p as usize]);
        let (outcome, runner) = run_to_completion(Job::new("j", plan, runner)).finish();

        prop_assert_eq!(runner.ran(), expected_runs(&results, &skips, stop));
        let cleanup_starts = runner
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Starting(Phase::Cleanup, _)))
            .count();
        prop_assert_eq!(cleanup_starts, 1, "cleanup reached exactly once");
        prop_assert_eq!(outcome.records.last().map(|r| r.phase), Some(Phase::Cleanup));
        // Records are in strict phase order: nothing ran twice or out of order.
        let phases = ran_phases(&outcome);
        prop_assert!(phases.windows(2).all(|w| w[0] < w[1]));
        // After the abort point only cleanup follows.
        if let Some(reason) = outcome.abort {
            let after: Vec<_> = phases.iter().filter(|p| **p > reason.phase()).collect();
            prop_assert_eq!(after, vec![&Phase::Cleanup]);
        }
    }
}
