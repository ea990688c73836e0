//! Process runner: whole trees die on timeout, stragglers are killed, output arrives
//! byte-exact, stop requests and exit codes map as Testflinger expects.
//!
//! Every test marks the processes it starts with a unique number in their command line
//! (`sleep 1000.<marker>`, `sh -c ... marker-<marker>`), checks by that marker that none
//! of them is alive afterwards, and kills them by that marker when it fails.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::scratch::{living_carrying, stat_of};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testflinger_agent::process::{
    become_subreaper, run_command, CommandOutcome, CommandSpec, ProcessError, StopKind, StopSignal,
    Termination, KILLED_EXIT_CODE,
};

/// A unique number carried in the command line of every process a test starts.
/// Dropping it SIGKILLs whatever still carries it, so a failing test leaks nothing.
struct Marker {
    digits: String,
}

impl Marker {
    fn new() -> Marker {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Marker {
            digits: format!(
                "{}{:04}{:09}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                nanos
            ),
        }
    }

    /// A `sleep` argument that runs for 1000 s and carries the marker.
    fn sleep(&self) -> String {
        format!("sleep 1000.{}", self.digits)
    }

    /// Living (non-zombie) processes whose command line carries the marker, with their
    /// start times (to tell a reaped pid from a reused one).
    fn living(&self) -> Vec<(i32, u64)> {
        living_carrying(self.digits.as_bytes())
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        for (pid, _) in self.living() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `(state, starttime)` from `/proc/PID/stat`.
/// Whether `(pid, starttime)` still exists in any form, zombie included.
fn still_exists(pid: i32, start: u64) -> bool {
    stat_of(pid).is_some_and(|(_, s)| s == start)
}

fn spec(command: &str) -> CommandSpec {
    CommandSpec {
        command: command.to_string(),
        cwd: std::env::temp_dir(),
        env: Vec::new(),
        global_timeout: Some(Duration::from_secs(60)),
        output_timeout: None,
        grace_period: Duration::from_millis(200),
        straggler_wait: Duration::from_millis(300),
        honour_cancel: true,
        honour_shutdown: true,
        shutdown_budget: None,
        oom_score_adj: None,
    }
}

fn run(spec: &CommandSpec) -> (CommandOutcome, Vec<u8>) {
    let stop = StopSignal::new().expect("stop signal");
    let mut out = Vec::new();
    let outcome = run_command(
        spec,
        &mut |chunk: &[u8]| out.extend_from_slice(chunk),
        &stop,
    )
    .expect("command runs");
    (outcome, out)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Runs `spec`; when the output first contains `ready\n`, records the marked processes
/// alive at that moment. Returns the outcome, the output and those processes.
fn run_until_ready(
    spec: &CommandSpec,
    marker: &Marker,
) -> (CommandOutcome, Vec<u8>, Vec<(i32, u64)>) {
    let stop = StopSignal::new().expect("stop signal");
    let mut out = Vec::new();
    let mut seen = Vec::new();
    let mut sink = |chunk: &[u8]| {
        out.extend_from_slice(chunk);
        if seen.is_empty() && contains(&out, b"ready\n") {
            seen = sample_living(marker);
        }
    };
    let outcome = run_command(spec, &mut sink, &stop).expect("command runs");
    (outcome, out, seen)
}

/// The marked processes alive now, sampled a few times over ~50 ms: a process between
/// fork and exec can briefly show an empty command line.
fn sample_living(marker: &Marker) -> Vec<(i32, u64)> {
    let mut seen = Vec::new();
    for _ in 0..5 {
        for p in marker.living() {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// The tree was seen alive before the end, nothing of it is alive after, and every
/// process seen was reaped (not even a zombie is left).
fn assert_tree_gone(marker: &Marker, seen: &[(i32, u64)], at_least: usize) {
    assert!(
        seen.len() >= at_least,
        "expected at least {at_least} marked processes while running, saw {seen:?}"
    );
    let living = marker.living();
    assert!(
        living.is_empty(),
        "processes outlived the phase: {living:?}"
    );
    let left: Vec<_> = seen.iter().filter(|(p, s)| still_exists(*p, *s)).collect();
    assert!(left.is_empty(), "processes left unreaped: {left:?}");
}

fn tree_spec(command: String) -> CommandSpec {
    let mut spec = spec(&command);
    spec.global_timeout = Some(Duration::from_millis(500));
    spec.grace_period = Duration::from_millis(200);
    spec
}

const GLOBAL_LINE_0S: &str = "\nERROR: Global timeout reached! (0s)\n";

#[test]
fn global_timeout_kills_a_plain_child() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let spec = tree_spec(format!("{} & echo ready; wait", m.sleep()));
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert_eq!(outcome.termination.exit_code(), KILLED_EXIT_CODE);
    assert!(
        !outcome.needed_sigkill,
        "sleep and sh obey SIGTERM: {outcome:?}"
    );
    assert!(text(&out).ends_with(GLOBAL_LINE_0S), "{}", text(&out));
    assert_tree_gone(&m, &seen, 2);
}

#[test]
fn global_timeout_kills_a_grandchild_in_the_group() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let inner = format!("{} & echo ready; wait", m.sleep());
    let spec = tree_spec(format!("sh -c '{inner}' marker-{} & wait", m.digits));
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert!(text(&out).contains(GLOBAL_LINE_0S), "{}", text(&out));
    assert_tree_gone(&m, &seen, 3);
}

#[test]
fn global_timeout_kills_a_setsid_escapee() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let inner = format!("{} & echo ready; wait", m.sleep());
    let spec = tree_spec(format!("setsid sh -c '{inner}' marker-{} & wait", m.digits));
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert!(text(&out).contains(GLOBAL_LINE_0S), "{}", text(&out));
    // The escapees (another session, carrying the token) got SIGTERM with the group and
    // obeyed it: nothing was left for SIGKILL.
    assert!(!outcome.needed_sigkill, "{outcome:?}");
    assert!(outcome.escapees_terminated >= 2, "{outcome:?}");
    assert_eq!(outcome.stragglers_killed, 0, "{outcome:?}");
    assert_tree_gone(&m, &seen, 3);
}

#[test]
fn global_timeout_kills_a_double_forked_daemon() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let spec = tree_spec(format!(
        "( ( {} & echo ready ) & ); {}",
        m.sleep(),
        m.sleep()
    ));
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert!(text(&out).contains(GLOBAL_LINE_0S), "{}", text(&out));
    assert_tree_gone(&m, &seen, 2);
}

#[test]
fn global_timeout_kills_a_child_that_ignores_sigterm() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let spec = tree_spec(format!("trap '' TERM; {} & echo ready; wait", m.sleep()));
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert!(outcome.needed_sigkill, "SIGTERM is ignored: {outcome:?}");
    assert!(text(&out).ends_with(GLOBAL_LINE_0S), "{}", text(&out));
    assert_tree_gone(&m, &seen, 2);
}

/// A shell loop in its own session that exits on SIGTERM, holding the output pipe, with
/// the marker as its `$0`.
fn honouring_escapee(m: &Marker) -> String {
    format!(
        "setsid sh -c 'trap \"exit 0\" TERM; while :; do sleep 0.1; done' marker-{}",
        m.digits
    )
}

#[test]
fn a_stopped_tree_whose_setsid_escapee_holds_the_output_ends_without_the_grace_period() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let mut spec = tree_spec(format!(
        "{} & {} & echo ready; wait",
        honouring_escapee(&m),
        m.sleep()
    ));
    spec.grace_period = Duration::from_secs(60);
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    // The escapee's shell may still report its `sleep`'s death after the stop line.
    assert!(
        text(&out).starts_with(&format!("ready\n{GLOBAL_LINE_0S}")),
        "{}",
        text(&out)
    );
    // Waiting for the escapee to close the pipe would have taken the 60 s grace period.
    assert!(
        outcome.duration < Duration::from_secs(30),
        "the phase waited for the grace period: {outcome:?}"
    );
    assert!(
        !outcome.needed_sigkill,
        "the whole tree obeys SIGTERM: {outcome:?}"
    );
    assert!(outcome.escapees_terminated >= 1, "{outcome:?}");
    assert_eq!(outcome.escapees_killed, 0, "{outcome:?}");
    assert_tree_gone(&m, &seen, 2);
    assert!(
        seen.len() >= 2,
        "the escapee and the group's sleep were seen: {seen:?}"
    );
}

#[test]
fn a_cancelled_tree_whose_double_forked_escapee_holds_the_output_ends_without_the_grace_period() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    // The subshell starts the escapee in the background and exits at once: the escapee is
    // an orphan (adopted by the subreaper) in its own session, holding the output.
    let mut spec = spec(&format!(
        "( {} & ); {} & echo ready; wait",
        honouring_escapee(&m),
        m.sleep()
    ));
    spec.grace_period = Duration::from_secs(60);
    let stop = StopSignal::new().expect("stop signal");
    let mut out = Vec::new();
    let mut seen = Vec::new();
    let mut sink = |chunk: &[u8]| {
        out.extend_from_slice(chunk);
        if seen.is_empty() && contains(&out, b"ready\n") {
            seen = sample_living(&m);
            stop.request(StopKind::Cancel);
        }
    };
    let outcome = run_command(&spec, &mut sink, &stop).expect("command runs");
    assert_eq!(outcome.termination, Termination::Cancelled);
    assert!(
        text(&out).starts_with("ready\n\nJob cancellation was requested, exiting.\n"),
        "{}",
        text(&out)
    );
    assert!(
        outcome.duration < Duration::from_secs(30),
        "the phase waited for the grace period: {outcome:?}"
    );
    assert!(!outcome.needed_sigkill, "{outcome:?}");
    assert!(outcome.escapees_terminated >= 1, "{outcome:?}");
    assert_tree_gone(&m, &seen, 2);
}

#[test]
fn an_escapee_that_ignores_sigterm_is_killed_after_the_grace_period() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let mut spec = tree_spec(format!(
        "setsid sh -c 'trap \"\" TERM; while :; do sleep 0.1; done' marker-{} & {} & echo ready; wait",
        m.digits,
        m.sleep()
    ));
    spec.grace_period = Duration::from_millis(300);
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert!(
        text(&out).starts_with(&format!("ready\n{GLOBAL_LINE_0S}")),
        "{}",
        text(&out)
    );
    assert!(outcome.needed_sigkill, "{outcome:?}");
    assert!(outcome.escapees_killed >= 1, "{outcome:?}");
    // SIGKILL comes only once the grace period after the deadline is over.
    let timeout = spec
        .global_timeout
        .expect("tree_spec sets a global timeout");
    assert!(
        outcome.duration >= timeout + spec.grace_period,
        "killed before the grace period ended: {outcome:?}"
    );
    assert_tree_gone(&m, &seen, 2);
}

#[test]
fn what_the_commands_sigterm_trap_starts_is_left_to_it() {
    // The shell's SIGTERM trap runs cleanup commands: like `killpg` alone, the stop does
    // not SIGTERM them, so the cleanup finishes and its output arrives. The second one
    // starts well after the stop, when the rescans are running.
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let mut spec = tree_spec(format!(
        "trap 'sleep 0.2; sleep 0.3 && echo cleaned; exit 0' TERM; {} & echo ready; wait",
        m.sleep()
    ));
    spec.grace_period = Duration::from_secs(60);
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert_eq!(text(&out), format!("ready\n{GLOBAL_LINE_0S}cleaned\n"));
    assert!(!outcome.needed_sigkill, "{outcome:?}");
    assert!(outcome.duration < Duration::from_secs(30), "{outcome:?}");
    assert_tree_gone(&m, &seen, 1);
}

#[test]
fn what_an_escapee_starts_after_the_stop_gets_sigterm_too() {
    // The escapee's trap starts a long sleep after the stop: the rescans find it and send
    // it SIGTERM, so the escapee exits long before the grace period.
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let mut spec = tree_spec(format!(
        "setsid sh -c 'trap \"{}; exit 0\" TERM; while :; do sleep 0.1; done' marker-{} & \
         {} & echo ready; wait",
        m.sleep(),
        m.digits,
        m.sleep()
    ));
    spec.grace_period = Duration::from_secs(60);
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert!(
        text(&out).starts_with(&format!("ready\n{GLOBAL_LINE_0S}")),
        "{}",
        text(&out)
    );
    assert!(!outcome.needed_sigkill, "{outcome:?}");
    assert!(
        outcome.duration < Duration::from_secs(30),
        "the trap's sleep did not get SIGTERM: {outcome:?}"
    );
    // The escapee's shell and the sleep its trap started, at least.
    assert!(outcome.escapees_terminated >= 2, "{outcome:?}");
    assert_tree_gone(&m, &seen, 2);
}

#[test]
fn a_pipe_held_outside_the_phase_does_not_hold_a_stopped_command() {
    // `env -i` drops the phase token and `setsid` leaves the group: without
    // `claim_orphans` (the test harness runs commands concurrently) this sleep is not the
    // phase's. It holds the output, but once the phase's processes are gone the command
    // ends without waiting for the pipe to close.
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let mut spec = tree_spec(format!(
        "env -i setsid {} & echo ready; {}",
        m.sleep(),
        m.sleep()
    ));
    spec.grace_period = Duration::from_secs(60);
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert_eq!(text(&out), format!("ready\n{GLOBAL_LINE_0S}"));
    assert!(!outcome.needed_sigkill, "{outcome:?}");
    assert!(
        outcome.duration < Duration::from_secs(30),
        "the command waited for a pipe held outside the phase: {outcome:?}"
    );
    assert!(seen.len() >= 2, "{seen:?}");
    // The outsider is still there (the marker's drop kills it).
    assert_eq!(m.living().len(), 1, "{:?}", m.living());
}

#[test]
fn a_panicking_sink_leaks_no_tree() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let spec = spec(&format!("{} & echo ready; wait", m.sleep()));
    let stop = StopSignal::new().expect("stop signal");
    let mut seen = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sink = |chunk: &[u8]| {
            if contains(chunk, b"ready") {
                seen = sample_living(&m);
                panic!("sink failed on purpose");
            }
        };
        run_command(&spec, &mut sink, &stop)
    }));
    assert!(result.is_err(), "the sink's panic propagates");
    assert_tree_gone(&m, &seen, 2);
}

#[test]
fn stragglers_holding_the_output_are_killed_after_the_wait() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let mut spec = spec(&format!("{} & echo ready; exit 5", m.sleep()));
    spec.straggler_wait = Duration::from_millis(300);
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::Exited(5));
    assert_eq!(outcome.termination.exit_code(), 5);
    assert_eq!(outcome.stragglers_killed, 1, "{outcome:?}");
    assert!(
        text(&out).ends_with(
            "\nWARNING: 1 background process still held the output 300 ms after the command exited; killed it.\n"
        ),
        "{}",
        text(&out)
    );
    assert_tree_gone(&m, &seen, 1);
}

#[test]
fn background_processes_not_holding_the_output_are_swept() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let mut spec = spec(&format!("{} >/dev/null 2>&1 & echo ready", m.sleep()));
    spec.straggler_wait = Duration::from_secs(5);
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(outcome.stragglers_killed, 1, "{outcome:?}");
    assert!(
        !outcome.needed_sigkill,
        "no stop was requested: {outcome:?}"
    );
    assert!(
        text(&out).contains("\nWARNING: 1 background process still "),
        "{}",
        text(&out)
    );
    assert!(outcome.duration < Duration::from_secs(5), "{outcome:?}");
    assert_tree_gone(&m, &seen, 1);
}

#[test]
fn a_setsid_daemon_after_a_normal_exit_is_swept() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let spec = spec(&format!(
        "setsid {} >/dev/null 2>&1 < /dev/null & echo ready",
        m.sleep()
    ));
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert!(
        outcome.stragglers_killed >= 1,
        "{outcome:?}: {}",
        text(&out)
    );
    assert_tree_gone(&m, &seen, 1);
}

/// A killed process is neither alive nor reapable while it is still inside `exit()`, and
/// its environment already reads empty there. `tail -c N` from a pipe keeps the last N
/// bytes in memory until its input ends (here never), so once killed it spends some
/// milliseconds freeing them: the runner must wait for it and reap it before returning.
/// Nothing of it holds the output, whose end would otherwise be awaited (and come after
/// the memory is freed).
#[test]
fn a_straggler_still_exiting_when_swept_is_reaped_before_the_runner_returns() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let scratch = crate::support::scratch::Scratch::new("straggler-exiting");
    let absorbed = scratch.path(&format!("absorbed-{}", m.digits));
    let absorbed = absorbed.display();
    let spec = spec(&format!(
        "{{ head -c 268435456 /dev/zero; : > {absorbed}; {}; }} 2>/dev/null | tail -c 268435456 - /dev/null/marker-{} >/dev/null 2>&1 & \
         until [ -e {absorbed} ]; do sleep 0.01; done; echo ready",
        m.sleep(),
        m.digits
    ));
    let (outcome, out, seen) = run_until_ready(&spec, &m);
    assert_eq!(
        outcome.termination,
        Termination::Exited(0),
        "{}",
        text(&out)
    );
    assert!(
        outcome.stragglers_killed >= 1,
        "{outcome:?}: {}",
        text(&out)
    );
    // The subshell (which execs its sleep) and tail.
    assert_tree_gone(&m, &seen, 2);
}

#[test]
fn global_timeout_line_names_whole_seconds() {
    let m = Marker::new();
    let mut spec = spec(&format!("echo started; {}", m.sleep()));
    spec.global_timeout = Some(Duration::from_millis(1100));
    let (outcome, out) = run(&spec);
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert_eq!(outcome.termination.exit_code(), 247);
    assert_eq!(
        text(&out),
        "started\n\nERROR: Global timeout reached! (1s)\n"
    );
    assert!(m.living().is_empty());
}

#[test]
fn output_timeout_fires_after_silence() {
    let m = Marker::new();
    let mut spec = spec(&format!("echo hi; {}", m.sleep()));
    spec.output_timeout = Some(Duration::from_millis(300));
    let (outcome, out) = run(&spec);
    assert_eq!(outcome.termination, Termination::OutputTimeout);
    assert_eq!(outcome.termination.exit_code(), 247);
    assert_eq!(text(&out), "hi\n\nERROR: Output timeout reached! (0s)\n");
    assert!(m.living().is_empty());
}

#[test]
fn steady_output_keeps_the_output_timeout_away() {
    let mut spec = spec("i=0; while [ $i -lt 24 ]; do echo tick; sleep 0.05; i=$((i+1)); done");
    spec.output_timeout = Some(Duration::from_millis(500));
    let (outcome, out) = run(&spec);
    assert_eq!(
        outcome.termination,
        Termination::Exited(0),
        "{}",
        text(&out)
    );
    assert_eq!(text(&out), "tick\n".repeat(24));
}

/// Runs `spec` and requests `kind` from another thread once `started` was printed.
/// Returns the outcome, the output, and whether the request was made before `finished`
/// was printed.
fn run_with_request(
    spec: &CommandSpec,
    stop: &StopSignal,
    kind: StopKind,
) -> (CommandOutcome, Vec<u8>, bool) {
    let (tx, rx) = mpsc::channel::<()>();
    let requester = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if rx.recv_timeout(Duration::from_secs(30)).is_ok() {
                stop.request(kind);
            }
        })
    };
    let mut out = Vec::new();
    let mut requested_in_time = false;
    let mut sink = |chunk: &[u8]| {
        out.extend_from_slice(chunk);
        if contains(chunk, b"started") {
            let _ = tx.send(());
        }
        if contains(chunk, b"finished") {
            requested_in_time = stop.is_requested(kind);
        }
    };
    let outcome = run_command(spec, &mut sink, stop).expect("command runs");
    requester.join().expect("requester thread");
    (outcome, out, requested_in_time)
}

#[test]
fn cancel_from_another_thread_ends_the_command() {
    let m = Marker::new();
    let spec = spec(&format!("echo started; {}", m.sleep()));
    let stop = StopSignal::new().expect("stop signal");
    let (outcome, out, _) = run_with_request(&spec, &stop, StopKind::Cancel);
    assert_eq!(outcome.termination, Termination::Cancelled);
    assert_eq!(outcome.termination.exit_code(), 247);
    assert_eq!(
        text(&out),
        "started\n\nJob cancellation was requested, exiting.\n"
    );
    assert!(m.living().is_empty());
}

/// CPU time (user + system, in clock ticks) the calling thread has used.
fn thread_cpu_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/stat").expect("thread stat");
    let rest = &text[text.rfind(')').expect("stat has a name") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields[n - 3].parse::<u64>().expect("numeric stat field");
    field(14) + field(15)
}

#[test]
fn cancel_is_ignored_without_busy_waiting_when_not_honoured() {
    let mut spec = spec("echo started; sleep 0.6; echo finished");
    spec.honour_cancel = false;
    let stop = StopSignal::new().expect("stop signal");
    let cpu_before = thread_cpu_ticks();
    let (outcome, out, requested_in_time) = run_with_request(&spec, &stop, StopKind::Cancel);
    let cpu_used = thread_cpu_ticks() - cpu_before;
    assert!(
        requested_in_time,
        "cancel was not requested while the command ran"
    );
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(text(&out), "started\nfinished\n");
    // A busy loop would burn ~60 ticks (100 Hz) over 0.6 s.
    assert!(
        cpu_used < 20,
        "runner used {cpu_used} ticks of CPU while waiting"
    );

    // The request is sticky: a command that honours cancel stops at once.
    let (outcome, out) = {
        let mut out = Vec::new();
        let spec = self::spec("echo never-cancelled; sleep 30");
        let outcome = run_command(&spec, &mut |c: &[u8]| out.extend_from_slice(c), &stop)
            .expect("command runs");
        (outcome, out)
    };
    assert_eq!(
        outcome.termination,
        Termination::Cancelled,
        "{}",
        text(&out)
    );
}

#[test]
fn shutdown_ends_the_command_with_its_line() {
    let m = Marker::new();
    let spec = spec(&format!("echo started; {}", m.sleep()));
    let stop = StopSignal::new().expect("stop signal");
    let (outcome, out, _) = run_with_request(&spec, &stop, StopKind::Shutdown);
    assert_eq!(outcome.termination, Termination::Shutdown);
    assert!(
        text(&out).ends_with("\nThe agent is shutting down: ending this phase.\n"),
        "{}",
        text(&out)
    );
    assert!(m.living().is_empty());
}

#[test]
fn a_command_that_outlives_shutdown_is_ended_after_its_budget() {
    // Cleanup does not honour a shutdown, but it may not run for ever once the agent is
    // stopping: after its budget it is ended like a timeout, and its whole tree dies.
    let m = Marker::new();
    let mut spec = spec(&format!("echo started; {} & {}", m.sleep(), m.sleep()));
    spec.honour_cancel = false;
    spec.honour_shutdown = false;
    spec.shutdown_budget = Some(Duration::from_millis(300));
    let stop = StopSignal::new().expect("stop signal");
    let (outcome, out, _) = run_with_request(&spec, &stop, StopKind::Shutdown);
    assert_eq!(outcome.termination, Termination::Shutdown);
    assert!(
        text(&out).contains("started\n\nThe agent is shutting down: ending this phase.\n"),
        "{}",
        text(&out)
    );
    assert!(m.living().is_empty());

    // Within its budget it runs to its end.
    let mut spec = self::spec("echo started; sleep 0.3; echo finished");
    spec.honour_shutdown = false;
    spec.shutdown_budget = Some(Duration::from_secs(60));
    let (outcome, out, _) = run_with_request(&spec, &stop, StopKind::Shutdown);
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert!(text(&out).ends_with("finished\n"), "{}", text(&out));
}

#[test]
fn kill_now_kills_at_once_even_when_stops_are_not_honoured() {
    become_subreaper().expect("subreaper");
    let m = Marker::new();
    let mut spec = spec(&format!("trap '' TERM; echo started; {}", m.sleep()));
    spec.grace_period = Duration::from_secs(60);
    spec.honour_cancel = false;
    spec.honour_shutdown = false;
    let stop = StopSignal::new().expect("stop signal");
    let (outcome, _, _) = run_with_request(&spec, &stop, StopKind::KillNow);
    assert_eq!(outcome.termination, Termination::Shutdown);
    assert_eq!(outcome.termination.exit_code(), 247);
    assert!(outcome.needed_sigkill);
    assert!(
        outcome.duration < Duration::from_secs(30),
        "KillNow waited for the grace period: {outcome:?}"
    );
    assert!(m.living().is_empty());
}

fn own_oom_score_adj() -> String {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .expect("own oom_score_adj")
        .trim()
        .to_owned()
}

#[test]
fn the_command_runs_with_the_configured_oom_score_adj() {
    let own = own_oom_score_adj();
    // 700 is above any value a test runner starts with (raising needs no privilege).
    let wanted = if own == "700" { 800 } else { 700 };
    let mut spec = spec("cat /proc/self/oom_score_adj; sh -c 'cat /proc/self/oom_score_adj'");
    spec.oom_score_adj = Some(wanted);
    let (outcome, out) = run(&spec);
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(text(&out), format!("{wanted}\n{wanted}\n"));

    spec.oom_score_adj = None;
    let (outcome, out) = run(&spec);
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(text(&out), format!("{own}\n{own}\n"));
    assert_eq!(
        own_oom_score_adj(),
        own,
        "the agent's own value is untouched"
    );
}

#[test]
fn a_refused_oom_score_adj_does_not_stop_the_command() {
    let own = own_oom_score_adj();
    let mut spec = spec("echo ran; cat /proc/self/oom_score_adj");
    spec.oom_score_adj = Some(5000);
    let (outcome, out) = run(&spec);
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(text(&out), format!("ran\n{own}\n"));
}

#[test]
fn exit_codes_are_taken_modulo_256() {
    let (outcome, _) = run(&spec("exit 3"));
    assert_eq!(outcome.termination, Termination::Exited(3));
    assert_eq!(outcome.termination.exit_code(), 3);
    assert!(!outcome.needed_sigkill);
    assert_eq!(outcome.stragglers_killed, 0);

    let (outcome, _) = run(&spec("exit 300"));
    assert_eq!(outcome.termination.exit_code(), 44);
}

#[test]
fn a_signal_death_is_reported_as_such() {
    let (outcome, _) = run(&spec("kill -SEGV $$"));
    assert_eq!(outcome.termination, Termination::Signaled(11));
    assert_eq!(outcome.termination.exit_code(), 245);
    assert!(!outcome.termination.killed_by_agent());
}

#[test]
fn binary_output_arrives_byte_exact() {
    let mut data = vec![0u8; 3_000_000];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("urandom"),
        &mut data,
    )
    .expect("random bytes");
    for b in &mut data {
        if *b == b'\n' {
            *b = 0xff;
        }
    }
    assert!(std::str::from_utf8(&data).is_err());
    let file = tempfile::NamedTempFile::new().expect("a temp file");
    std::fs::write(file.path(), &data).expect("write sample");
    let (outcome, out) = run(&spec(&format!("cat '{}'", file.path().display())));
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(out.len(), data.len());
    assert!(out == data, "output differs from the file");
}

#[test]
fn large_output_is_counted_exactly_in_bounded_chunks() {
    let stop = StopSignal::new().expect("stop signal");
    let (mut total, mut largest, mut nonzero) = (0usize, 0usize, false);
    let mut sink = |chunk: &[u8]| {
        total += chunk.len();
        largest = largest.max(chunk.len());
        nonzero |= chunk.iter().any(|&b| b != 0);
    };
    let outcome =
        run_command(&spec("head -c 50000000 /dev/zero"), &mut sink, &stop).expect("command runs");
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(total, 50_000_000);
    assert!(!nonzero);
    assert!(largest <= 256 * 1024, "chunk of {largest} bytes");
}

#[test]
fn stdout_and_stderr_share_one_ordered_stream() {
    let (outcome, out) = run(&spec("echo out; echo err >&2; echo out2"));
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(text(&out), "out\nerr\nout2\n");
}

#[test]
fn env_cwd_and_stdin() {
    let dir = std::env::temp_dir().canonicalize().expect("temp dir");
    let mut spec = spec(
        "printf '%s|%s|%s|' \"$TF_PROCESS_TEST\" \"$HOME\" \"${TESTFLINGER_PHASE_TOKEN:+token}\"; \
         pwd; cat; echo \"cat=$?\"",
    );
    spec.cwd = dir.clone();
    spec.env = vec![
        (
            OsString::from("TF_PROCESS_TEST"),
            OsString::from("a b\u{e9}"),
        ),
        (OsString::from("HOME"), OsString::from("/overridden")),
    ];
    let (outcome, out) = run(&spec);
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(
        text(&out),
        format!("a b\u{e9}|/overridden|token|{}\ncat=0\n", dir.display())
    );
}

#[test]
fn each_command_gets_its_own_token() {
    let spec = spec("printf %s \"$TESTFLINGER_PHASE_TOKEN\"");
    let (_, first) = run(&spec);
    let (_, second) = run(&spec);
    assert!(first.len() >= 16, "{}", text(&first));
    assert_ne!(first, second);
}

#[test]
fn a_missing_cwd_is_a_spawn_error() {
    let mut spec = spec("true");
    spec.cwd = PathBuf::from("/nonexistent/testflinger/run-dir");
    let stop = StopSignal::new().expect("stop signal");
    let result = run_command(&spec, &mut |_: &[u8]| {}, &stop);
    match result {
        Err(ProcessError::Spawn { cwd, .. }) => assert_eq!(cwd, spec.cwd),
        other => panic!("expected a spawn error, got {other:?}"),
    }
}

#[test]
fn concurrent_commands_do_not_disturb_each_other() {
    let started = Instant::now();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || {
                let (outcome, out) = run(&spec(&format!("echo {i}; exit {i}")));
                (i, outcome, out)
            })
        })
        .collect();
    for handle in handles {
        let (i, outcome, out) = handle.join().expect("thread");
        assert_eq!(outcome.termination, Termination::Exited(i));
        assert_eq!(text(&out), format!("{i}\n"));
        assert_eq!(outcome.stragglers_killed, 0);
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn absurd_durations_do_not_overflow() {
    let mut spec = spec("echo ok");
    spec.global_timeout = Some(Duration::MAX);
    spec.output_timeout = Some(Duration::MAX);
    spec.grace_period = Duration::MAX;
    spec.straggler_wait = Duration::MAX;
    let (outcome, out) = run(&spec);
    assert_eq!(outcome.termination, Termination::Exited(0));
    assert_eq!(text(&out), "ok\n");
}

#[test]
fn endless_output_into_a_slow_sink_is_stopped_whole_and_in_order() {
    // `yes` prints for ever; the sink takes 5 ms a chunk, so the reader's buffers and the
    // pipe stay full and the command is held back by them when its deadline comes.
    let marker = Marker::new();
    let line = format!("{}\n", marker.digits);
    let mut spec = spec(&format!("yes {}", marker.digits));
    spec.global_timeout = Some(Duration::from_secs(1));
    // On a thread, so that a runner that never gets back to its deadline fails the test
    // (the marker kills `yes` on the way out) instead of hanging it.
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let stop = StopSignal::new().expect("stop signal");
        let (mut out, mut chunks) = (Vec::new(), 0usize);
        let outcome = run_command(
            &spec,
            &mut |chunk: &[u8]| {
                out.extend_from_slice(chunk);
                chunks += 1;
                std::thread::sleep(Duration::from_millis(5));
            },
            &stop,
        )
        .expect("command runs");
        let _ = done.send((outcome, out, chunks));
    });
    let (outcome, out, chunks) = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the 1 s deadline did not end the command within 60 s");
    assert_eq!(outcome.termination, Termination::GlobalTimeout);
    assert!(
        marker.living().is_empty(),
        "a process of the phase survived"
    );
    // The output is the command's lines in order, with the stop line once where the
    // agent stopped it (what the command had printed before its end but the agent had not
    // read yet comes after it): nothing lost, nothing repeated.
    let stop_line = "\nERROR: Global timeout reached! (1s)\n";
    let text = text(&out);
    assert_eq!(text.matches(stop_line).count(), 1, "not one stop line");
    let printed = text.replacen(stop_line, "", 1);
    assert!(chunks > 10, "only {chunks} chunks");
    let whole = printed.len() / line.len();
    assert!(whole > 10, "only {whole} lines");
    assert_eq!(
        printed.as_bytes(),
        &line.repeat(whole + 1).as_bytes()[..printed.len()],
        "the output is not the command's lines in order"
    );
}
