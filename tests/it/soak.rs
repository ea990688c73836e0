//! The soak: 200 short jobs back to back through the real binary, against the fake server
//! with faults injected and phase trees that escape, ignore SIGTERM and hold the output
//! (see tests/support/soak.rs). Every outcome reaches the server, no process of any job
//! outlives it, and the agent's descriptors, threads and children are what they were
//! after the first job.

use crate::support::soak;
use std::time::Duration;

#[test]
fn two_hundred_jobs_with_faults_and_escaping_trees_leak_nothing() {
    let report = soak::run(200, 100, Duration::from_secs(120), |_| {});
    let (base, end) = (report.baseline(), report.end());
    eprintln!(
        "soak: {} jobs in {:.1} s; at rest after job 1 {base:?}, after job 200 {end:?}; faults answered {:?}",
        end.jobs,
        report.elapsed.as_secs_f64(),
        report.faults_seen
    );
    assert!(report.wrong.is_empty(), "{:#?}", report.wrong);
    assert_eq!(end.jobs, 200);
    assert!(
        report.survivors.is_empty(),
        "processes outlived their job: {:?}",
        report.survivors
    );
    assert!(report.left_at_end.is_empty(), "{:?}", report.left_at_end);
    assert_eq!(
        report.seen_alive,
        [199],
        "the check sees a job's processes while it runs"
    );
    assert!(
        report.leftover_dirs.is_empty(),
        "{:?}",
        report.leftover_dirs
    );
    // Every kind of fault was met, and every kind of tree ran.
    for status in [0, 401, 500, 502, 503] {
        assert!(
            report.faults_seen.get(&status).is_some_and(|n| *n > 0),
            "no request was answered {status}: {:?}",
            report.faults_seen
        );
    }
    assert_eq!(report.kinds.len(), 10, "{:?}", report.kinds);
    assert_eq!(end.fds, base.fds, "open descriptors: {base:?} → {end:?}");
    assert_eq!(end.threads, base.threads, "threads: {base:?} → {end:?}");
    assert_eq!(end.children, base.children, "children: {base:?} → {end:?}");
}
