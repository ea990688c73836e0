//! A disk that fills up mid-job: the run directories live on a small tmpfs the test
//! mounts (as root; under CI the test fails rather than skips when it cannot). The phase
//! that cannot be recorded ends with exit code 100, its tree is ended, cleanup still runs,
//! what was recorded reaches the server, and the agent takes the next job only once the
//! disk has room again.

use crate::support::agent::{finished, queue, wait_for, Agent};
use crate::support::fake_server::FakeServer;
use crate::support::scratch::{KillByMarker, Scratch};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs mounted for one test; lazily unmounted on drop, even when the test fails.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax) at `path`; `None` when this user cannot
    /// (then the test is skipped, except under CI).
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
            .arg("tf-it-disk-full")
            .arg(path)
            .status()
            .is_ok_and(|status| status.success());
        if mounted {
            return Some(Tmpfs {
                path: path.to_path_buf(),
            });
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs at {} (the disk-full tests need root); CI must run them",
            path.display()
        );
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn yaml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

fn job(name: &str) -> serde_json::Value {
    json!({"job_queue": queue(name), "test_data": {"test_cmds": "x"}})
}

fn wait_local(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `test output line N` lines of `text`, checked to be 0, 1, 2, … with no gap.
fn numbered_lines(text: &str) -> usize {
    let mut next = 0;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("test output line ") {
            assert_eq!(n, next.to_string(), "a gap or a repeat in the output");
            next += 1;
        }
    }
    next
}

/// The test phase fills the disk while it prints without end (and leaves a `setsid`
/// escapee holding the pipe); cleanup removes the filler. The test phase is stopped with
/// 100 instead of running into its global timeout, the escapee is gone, cleanup ran once,
/// the recorded output reached the server whole, the next job runs normally.
#[test]
fn the_phase_that_fills_the_disk_ends_with_100_and_cleanup_frees_it() {
    let server = FakeServer::start();
    let s = Scratch::new("disk-full");
    let Some(disk) = Tmpfs::mount(&s.path("run"), "512k") else {
        return;
    };
    let name = format!("disk-full-{}", std::process::id());
    let marker = s.marker();
    let tree = KillByMarker::new(&marker);
    let count = s.path("cleanup-count");
    let filler = disk.path.join("filler");
    let test = format!(
        "dd if=/dev/zero of={f} bs=1k count=400 2>/dev/null; setsid sleep 1000.{marker}1 & i=0; while true; do echo \"test output line $i\"; i=$((i+1)); done",
        f = filler.display()
    );
    let cleanup = format!(
        "rm -f {f}; echo cleanup >> {c}; echo cleanup ran",
        f = filler.display(),
        c = count.display()
    );
    let config = format!(
        "global_timeout: 120\nsetup_command: echo setup ran\ntest_command: {}\ncleanup_command: {}\n",
        yaml_string(&test),
        yaml_string(&cleanup)
    );
    let _agent = Agent::start(&server, &s, &name, &config);
    let first = server.submit_job(job(&name));
    wait_for(&server, "the first job's outcome", |srv| {
        finished(srv, &first)
    });
    let status = server.result_data(&first)["status"].clone();
    let log = std::fs::read_to_string(Agent::stderr_path(&s, &name)).unwrap_or_default();
    assert_eq!(status["setup"], json!(0), "{status}");
    assert_eq!(status["test"], json!(100), "{status}\n{log}");
    assert_eq!(status["cleanup"], json!(0), "{status}");
    assert_eq!(server.job_state(&first).as_deref(), Some("complete"));
    assert!(
        log.contains("No space left on device"),
        "the agent's log names the cause:\n{log}"
    );
    wait_local("the escapee to be gone", Duration::from_secs(10), || {
        tree.living().is_empty()
    });
    assert_eq!(
        std::fs::read_to_string(&count).unwrap_or_default(),
        "cleanup\n",
        "cleanup ran once"
    );
    let output = server.log_text(&first, "output");
    let lines = numbered_lines(&output);
    assert!(
        lines > 100,
        "what the disk took reached the server ({lines} lines)"
    );
    assert!(
        output.contains("could not record"),
        "the job's output says why it ended:\n{}",
        &output[output.len().saturating_sub(2000)..]
    );
    assert!(output.contains("cleanup ran"), "cleanup's output is there");

    // Room again: the next job runs as usual.
    let second = server.submit_job(job(&name));
    wait_for(&server, "the second job's outcome", |srv| {
        finished(srv, &second)
    });
    let status = server.result_data(&second)["status"].clone();
    assert_eq!(status["setup"], json!(0), "{status}");
    assert_eq!(
        status["cleanup"],
        json!(0),
        "the second job ran whole: {status}"
    );
    assert_eq!(
        std::fs::read_to_string(&count)
            .unwrap_or_default()
            .lines()
            .count(),
        2
    );
}

/// The disk stays full past the job (cleanup frees nothing): the outcome file cannot be
/// written, so the report goes from memory; no job is taken while there is no room, and
/// the waiting job is taken once the test frees the disk.
#[test]
fn a_disk_that_stays_full_reports_from_memory_and_holds_the_next_job() {
    let server = FakeServer::start();
    let s = Scratch::new("disk-stays-full");
    let Some(disk) = Tmpfs::mount(&s.path("run"), "256k") else {
        return;
    };
    let name = format!("disk-stays-full-{}", std::process::id());
    let count = s.path("cleanup-count");
    let filler = disk.path.join("filler");
    // Only while `fill` exists (outside the tmpfs) does the test phase fill the disk.
    let fill = s.write("fill", "");
    let test = format!(
        "if [ -e {flag} ]; then dd if=/dev/zero of={f} bs=1k count=100000 2>/dev/null; i=0; while true; do echo \"test output line $i\"; i=$((i+1)); done; fi; echo test ran",
        flag = fill.display(),
        f = filler.display()
    );
    let cleanup = format!("echo cleanup >> {}", count.display());
    let config = format!(
        "global_timeout: 120\nsetup_command: echo setup ran\ntest_command: {}\ncleanup_command: {}\n",
        yaml_string(&test),
        yaml_string(&cleanup)
    );
    let _agent = Agent::start(&server, &s, &name, &config);
    let first = server.submit_job(job(&name));
    wait_for(&server, "the first job's outcome", |srv| {
        finished(srv, &first)
    });
    let status = server.result_data(&first)["status"].clone();
    let log_path = Agent::stderr_path(&s, &name);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(status["setup"], json!(0), "{status}");
    assert_eq!(status["test"], json!(100), "{status}\n{log}");
    assert_eq!(status["cleanup"], json!(0), "{status}\n{log}");
    assert_eq!(
        std::fs::read_to_string(&count).unwrap_or_default(),
        "cleanup\n",
        "cleanup ran once, with no room for its log"
    );
    assert!(
        server.log_text(&first, "output").contains("setup ran"),
        "what was recorded before the disk filled reached the server"
    );

    // The disk is still full: the next job waits on the server.
    let second = server.submit_job(job(&name));
    wait_local("the agent to notice", Duration::from_secs(30), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("cannot take a job"))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        server.job_state(&second).as_deref(),
        Some("waiting"),
        "no job is taken while the disk is full"
    );
    std::fs::remove_file(&fill).expect("the next test phase fills nothing");
    std::fs::remove_file(&filler).expect("free the disk");
    wait_for(&server, "the second job's outcome", |srv| {
        finished(srv, &second)
    });
    let status = server.result_data(&second)["status"].clone();
    assert_eq!(status["test"], json!(0), "{status}");
    assert_eq!(status["cleanup"], json!(0), "{status}");
    assert!(server.log_text(&second, "output").contains("test ran"));
}
