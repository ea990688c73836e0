//! The soak at length: 2,000 short jobs back to back through the agent (release build)
//! against the fake server, with the soak test's faults and escaping, SIGTERM-ignoring,
//! pipe-holding command trees (tests/support/soak.rs). Every 100 jobs, with the agent at
//! rest, prints its resident memory, open descriptors (sockets among them), threads, child
//! processes and CPU time so far; flat is the goal. Ends with a summary line. As in the
//! test, the agent's directories are on `/dev/shm` when there is one (no fsync cost).
//!
//! Run with `cargo bench --bench soak [-- JOBS]` (default 2000). Prints numbers, asserts
//! nothing.

use testflinger_agent_test_support as support;

use std::time::{Duration, Instant};
use support::soak;

fn main() {
    let jobs = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(2000);
    let started = Instant::now();
    println!("soak: {jobs} jobs, a sample at rest after the first job and every 100");
    println!(
        "{:>6} {:>8} {:>10} {:>4} {:>8} {:>8} {:>9} {:>10}",
        "jobs", "wall s", "RSS KiB", "fds", "sockets", "threads", "children", "agent CPU"
    );
    let report = soak::run(jobs, 100, Duration::from_secs(600), |u| {
        println!(
            "{:>6} {:>8.1} {:>10} {:>4} {:>8} {:>8} {:>9} {:>9.1}s",
            u.jobs,
            started.elapsed().as_secs_f64(),
            u.rss_kib,
            u.fds,
            u.sockets,
            u.threads,
            u.children,
            u.cpu_ms as f64 / 1000.0
        );
    });
    let (first, last) = (report.baseline(), report.end());
    let per_job_cpu = (last.cpu_ms - first.cpu_ms) as f64 / (last.jobs - first.jobs).max(1) as f64;
    println!(
        "soak summary: {} jobs in {:.1} s ({:.1} jobs/s); after job {} → {}: RSS {} → {} KiB ({:+} KiB), fds {} → {}, threads {} → {}, children {} → {}; agent CPU {per_job_cpu:.1} ms/job; {} wrong outcomes, {} jobs with survivors, {} processes left; faults answered {:?}",
        last.jobs,
        report.elapsed.as_secs_f64(),
        last.jobs as f64 / report.elapsed.as_secs_f64(),
        first.jobs,
        last.jobs,
        first.rss_kib,
        last.rss_kib,
        last.rss_kib as i64 - first.rss_kib as i64,
        first.fds,
        last.fds,
        first.threads,
        last.threads,
        first.children,
        last.children,
        report.wrong.len(),
        report.survivors.len(),
        report.left_at_end.len(),
        report.faults_seen
    );
    for line in report.wrong.iter().take(10) {
        println!("wrong: {line}");
    }
    for (job, pids) in report.survivors.iter().take(10) {
        println!("survivors of job {job}: {pids:?}");
    }
}
