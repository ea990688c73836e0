//! `run-job` through the real binary: the shipped examples, the run directory it leaves,
//! the summary, exit codes, bad input, timeouts, secrets and process trees.

use crate::support::scratch::{KillByMarker, Scratch};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_testflinger-agent");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub(crate) fn run_job(config: &Path, job: &Path) -> Output {
    Command::new(BIN)
        .arg("run-job")
        .arg("-c")
        .arg(config)
        .arg(job)
        .output()
        .expect("the binary runs")
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn outcome(rundir: &Path) -> serde_json::Value {
    let bytes = std::fs::read(rundir.join("testflinger-outcome.json")).expect("outcome exists");
    serde_json::from_slice(&bytes).expect("outcome is JSON")
}

#[test]
fn shipped_example_runs_every_phase_and_leaves_the_python_agents_files() {
    let s = Scratch::new("example");
    let out = run_job(
        &s.example_config("examples/agent.yaml"),
        &Path::new(ROOT).join("examples/job.yaml"),
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("* Starting testflinger test phase on example-agent *"));
    assert!(stdout.contains("2 tests passed"));
    assert!(stdout.contains("job succeeded"));
    let rundir = s.rundir();
    assert_eq!(
        files_in(&rundir),
        [
            ".agent-journal-live.json",
            ".agent-journal.json",
            "artifacts",
            "cleanup.log",
            "device-connector-error.json",
            "firmware_update.log",
            "provision.log",
            "setup.log",
            "test.log",
            "testflinger-outcome.json",
            "testflinger.json"
        ]
    );
    assert_eq!(
        files_in(&rundir.join("artifacts")),
        ["finished-at.txt", "uname.txt"]
    );
    assert_eq!(
        outcome(&rundir),
        serde_json::json!({"status": {"setup": 0, "provision": 0, "firmware_update": 0, "test": 0, "cleanup": 0}})
    );
    let job: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rundir.join("testflinger.json")).expect("job file"))
            .expect("job file is JSON");
    assert_eq!(job["job_queue"], "example");
    assert_eq!(
        job["job_id"].as_str(),
        rundir.file_name().and_then(|n| n.to_str())
    );
    let test_log = std::fs::read_to_string(rundir.join("test.log")).expect("test log");
    assert!(test_log.starts_with("****"), "banner first: {test_log}");
    assert!(test_log.contains("2 tests passed"));
    // The summary names every phase with how it ended.
    for line in [
        "setup            ran          0",
        "allocate         skipped",
        "job has no reserve_data",
    ] {
        assert!(stdout.contains(line), "summary lacks {line:?}:\n{stdout}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(rundir.join("testflinger.json"))
            .expect("meta")
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "testflinger.json is owner-only");
}

#[test]
fn failing_provision_example_stops_before_test_but_cleans_up() {
    let s = Scratch::new("provfail");
    let out = run_job(
        &s.example_config("examples/failing/agent.yaml"),
        &Path::new(ROOT).join("examples/failing/job-provision-fails.yaml"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let rundir = s.rundir();
    assert!(!rundir.join("test.log").exists(), "test must not run");
    assert!(rundir.join("cleanup.log").exists(), "cleanup runs");
    assert_eq!(
        outcome(&rundir)["status"],
        serde_json::json!({"setup": 0, "provision": 1, "cleanup": 0})
    );
    assert!(text(&out.stdout).contains("job failed: provision_fail in provision"));
}

#[test]
fn hanging_test_example_hits_the_output_timeout_and_kills_the_tree() {
    let s = Scratch::new("hang");
    let out = run_job(
        &s.example_config("examples/failing/agent.yaml"),
        &Path::new(ROOT).join("examples/failing/job-test-hangs.yaml"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let rundir = s.rundir();
    let log = std::fs::read_to_string(rundir.join("test.log")).expect("test log");
    assert!(
        log.contains("\nERROR: Output timeout reached! (3s)\n"),
        "{log}"
    );
    assert_eq!(outcome(&rundir)["status"]["test"], 247);
    assert_eq!(
        outcome(&rundir)["status"]["cleanup"],
        0,
        "a failed test does not stop cleanup"
    );
    assert!(text(&out.stdout).contains("output timeout"));
}

#[test]
fn global_timeout_aborts_and_no_process_of_the_phase_survives() {
    let s = Scratch::new("global");
    let marker = s.marker();
    // A plain child, a grandchild, a setsid escapee and a double-forked daemon, all
    // carrying the marker in their command line, plus a shell that ignores SIGTERM.
    let config = s.config(&format!(
        "agent_id: it-global\nserver_address: http://127.0.0.1:9\njob_queues: [q]\ntermination_grace_period: 1\n\
setup_command: |\n  trap '' TERM\n  sleep 1000.{m}1 &\n  sh -c 'sleep 1000.{m}2' &\n  setsid sleep 1000.{m}3 &\n  ( ( sleep 1000.{m}4 & ) & )\n  ( env -i setsid sleep 1000.{m}5 & )\n  echo started\n  wait\n\
cleanup_command: echo cleaned\n",
        m = marker
    ));
    let job = s.write("job.yaml", "job_queue: q\nglobal_timeout: 1\n");
    let guard = KillByMarker::new(&marker);
    let out = run_job(&config, &job);
    assert_eq!(out.status.code(), Some(1));
    let rundir = s.rundir();
    let log = std::fs::read_to_string(rundir.join("setup.log")).expect("setup log");
    assert!(log.contains("started"));
    assert!(
        log.contains("\nERROR: Global timeout reached! (1s)\n"),
        "{log}"
    );
    assert_eq!(
        outcome(&rundir)["status"],
        serde_json::json!({"setup": 247, "cleanup": 0})
    );
    assert_eq!(
        guard.living(),
        Vec::<i32>::new(),
        "processes of the phase survived"
    );
}

#[test]
fn exit_46_aborts_and_marks_the_device_offline() {
    let s = Scratch::new("recovery");
    let agent = format!("it-recovery-{}", std::process::id());
    let config = s.config(&format!(
        "agent_id: {agent}\nserver_address: http://127.0.0.1:9\njob_queues: [q]\nsetup_command: exit 46\ntest_command: echo never\ncleanup_command: echo cleaned\n"
    ));
    let job = s.write("job.yaml", "job_queue: q\ntest_data: {test_cmds: x}\n");
    let marker = PathBuf::from(format!("/tmp/TESTFLINGER-DEVICE-OFFLINE-{agent}"));
    let _ = std::fs::remove_file(&marker);
    let out = run_job(&config, &job);
    let created = marker.exists();
    let _ = std::fs::remove_file(&marker);
    assert_eq!(out.status.code(), Some(1));
    assert!(created, "offline marker {} created", marker.display());
    let rundir = s.rundir();
    assert!(!rundir.join("test.log").exists());
    assert_eq!(
        outcome(&rundir)["status"],
        serde_json::json!({"setup": 46, "cleanup": 0})
    );
    assert!(text(&out.stdout).contains("recovery_fail"));
}

#[test]
fn environment_secrets_and_raw_bytes() {
    let s = Scratch::new("env");
    let config = s.config(
        "agent_id: it-env\nserver_address: http://127.0.0.1:9\njob_queues: [q]\nprovision_type: noprovision\nglobal_timeout: 300\n\
test_command: |\n  echo \"agent=$agent_id type=$provision_type gt=${global_timeout-unset} secret=$API_TOKEN\"\n  printf 'no newline \\377\\376'\n",
    );
    let job = s.write(
        "job.json",
        r#"{"job_id": "00000000-0000-4000-8000-000000000046", "job_queue": "q", "test_data": {"test_cmds": "x", "secrets": {"API_TOKEN": "hunter2-s3cret"}}}"#,
    );
    let out = run_job(&config, &job);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rundir = s.rundir();
    assert!(rundir.ends_with("00000000-0000-4000-8000-000000000046"));
    let log = std::fs::read(rundir.join("test.log")).expect("test log");
    let log_text = text(&log);
    assert!(
        log_text.contains("agent=it-env type=noprovision gt=unset secret=**"),
        "{log_text}"
    );
    assert!(
        !log_text.contains("hunter2"),
        "the secret is masked in the log"
    );
    assert!(
        !text(&out.stdout).contains("hunter2"),
        "and on the terminal"
    );
    assert!(log.ends_with(b"no newline \xff\xfe"), "bytes kept exactly");
    // The job file keeps the secret (the connector needs it) and is owner-only.
    let job_file = std::fs::read_to_string(rundir.join("testflinger.json")).expect("job file");
    assert!(job_file.contains("hunter2-s3cret"));
}

#[test]
fn bad_input_exits_2_with_a_clear_message_and_no_panic() {
    let s = Scratch::new("bad");
    let good_job = s.write("job.yaml", "job_queue: q\n");
    let base = "agent_id: a\nserver_address: http://127.0.0.1:9\njob_queues: [q]\n";
    let n = AtomicU32::new(0);
    let config = |body: &str| {
        let path = s.config(body);
        let renamed = s.path(&format!("agent-{}.yaml", n.fetch_add(1, Ordering::Relaxed)));
        std::fs::rename(&path, &renamed).expect("rename");
        renamed
    };
    let cases: Vec<(PathBuf, PathBuf, &str)> = vec![
        (
            config(&format!("{base}polling_intervall: 5\n")),
            good_job.clone(),
            "polling_intervall",
        ),
        (
            config(&format!("{base}polling_interval: ten\n")),
            good_job.clone(),
            "polling_interval",
        ),
        (
            config(&format!(
                "{base}cancel_check_interval: 18446744073709551615\n"
            )),
            good_job.clone(),
            "cancel_check_interval",
        ),
        (
            config("server_address: http://x\njob_queues: [q]\n"),
            good_job.clone(),
            "agent_id",
        ),
        (s.write("empty.yaml", ""), good_job.clone(), "empty"),
        (
            config(base),
            s.write("bad.json", "{\"job_id\": \"x\", "),
            "job",
        ),
        (
            config(base),
            s.write("bad.yaml", "job_queue: [unclosed\n"),
            "job",
        ),
        (config(base), s.write("empty-job.yaml", ""), "empty"),
        (
            config(base),
            s.write("evil.json", "{\"job_id\": \"../../etc\"}"),
            "job_id",
        ),
        (config(base), s.path("missing.yaml"), "missing.yaml"),
    ];
    for (config, job, needle) in cases {
        let out = run_job(&config, &job);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{needle}: {stderr}");
        assert!(
            stderr.contains(needle),
            "message names {needle:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!s.path("run").join("..").join("etc").exists());
}

#[test]
fn check_config_prints_the_effective_config_or_the_error() {
    let s = Scratch::new("check");
    let config = s.config("agent_id: a\nserver_address: http://127.0.0.1:9\njob_queues: [q]\n");
    let token = s.write("refresh_token", "{\"refresh_token\": \"t\"}");
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(&config)
        .arg("--token-file")
        .arg(&token)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("polling_interval: 10"), "{stdout}");
    assert!(stdout.contains("logging_level: INFO"), "{stdout}");
    assert!(stdout.contains("\noom_score_adj: 500\n"), "{stdout}");
    let bad = s.write("bad.yaml", "agent_id: [not, a, string]\n");
    let out = Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("agent_id"));
}

/// Where `run-job`'s standard output goes in [`run_job_to`].
#[derive(Clone, Copy, Debug)]
enum Stdout {
    /// A pseudo-terminal in raw mode (no newline translation): what it shows is exactly
    /// what `run-job` wrote.
    Terminal,
    DevNull,
    /// A regular file opened for append (`run-job >> file`, which `sendfile` refuses to
    /// write to: the copy goes through a buffer), after a line already in it: someone may
    /// read it later, nobody watches it.
    File,
}

/// Runs `run-job` with its standard output on `stdout`; returns its exit code, what
/// reached standard output (empty for `/dev/null`) and its standard error.
fn run_job_to(
    config: &Path,
    job: &Path,
    stdout: Stdout,
    scratch: &Scratch,
) -> (Option<i32>, Vec<u8>, String) {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut cmd = Command::new(BIN);
    cmd.arg("run-job").arg("-c").arg(config).arg(job);
    cmd.stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    match stdout {
        Stdout::DevNull => {
            cmd.stdout(std::process::Stdio::null());
            let out = cmd.output().expect("the binary runs");
            (out.status.code(), Vec::new(), text(&out.stderr))
        }
        Stdout::File => {
            let path = scratch.path("stdout.bin");
            std::fs::write(&path, "already here\n").expect("stdout file");
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("stdout file");
            cmd.stdout(file);
            let out = cmd.output().expect("the binary runs");
            let printed = std::fs::read(&path).expect("stdout file");
            let printed = printed
                .strip_prefix(b"already here\n")
                .expect("what was in the file stays first")
                .to_vec();
            (out.status.code(), printed, text(&out.stderr))
        }
        Stdout::Terminal => {
            let (mut master, slave) = {
                let (mut master, mut slave) = (-1, -1);
                // SAFETY: openpty writes two descriptors through valid pointers to locals;
                // the name, termios and window size pointers may be null.
                let r = unsafe {
                    libc::openpty(
                        &mut master,
                        &mut slave,
                        std::ptr::null_mut(),
                        std::ptr::null(),
                        std::ptr::null(),
                    )
                };
                assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
                // SAFETY: both descriptors were just opened for us and are owned by nobody
                // else; the termios is written by tcgetattr before it is read.
                unsafe {
                    let mut raw: libc::termios = std::mem::zeroed();
                    assert_eq!(libc::tcgetattr(slave, &mut raw), 0);
                    libc::cfmakeraw(&mut raw);
                    assert_eq!(libc::tcsetattr(slave, libc::TCSANOW, &raw), 0);
                    (
                        std::fs::File::from(OwnedFd::from_raw_fd(master)),
                        OwnedFd::from_raw_fd(slave),
                    )
                }
            };
            cmd.stdout(slave);
            let mut child = cmd.spawn().expect("the binary runs");
            // `cmd` holds the parent's copy of the terminal's slave side until dropped: the
            // master reads EIO once the child and its commands have closed theirs.
            drop(cmd);
            let reader = std::thread::spawn(move || {
                let mut printed = Vec::new();
                let mut buf = [0u8; 65536];
                loop {
                    match master.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => printed.extend_from_slice(&buf[..n]),
                        Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break, // EIO: no slave side left open
                    }
                }
                printed
            });
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            let status = child.wait().expect("run-job ends");
            let printed = reader.join().expect("the terminal reader ends");
            (status.code(), printed, stderr)
        }
    }
}

/// The phase banner `run-job` writes before a command's output.
fn banner_of(phase: &str, agent: &str) -> Vec<u8> {
    let text = format!("Starting testflinger {phase} phase on {agent}");
    let row = "*".repeat(text.len() + 4);
    format!("{row}\n* {text} *\n{row}\n").into_bytes()
}

/// With and without a secret, on a terminal and on `/dev/null`: `test.log` holds the
/// banner and then exactly the command's bytes (random, not UTF-8, from stdout and stderr
/// in turn, the last without a newline), masked where the secret was printed, and the
/// terminal shows exactly `test.log` before the summary. Without a secret the command's
/// standard output is `test.log` itself; with one it is the agent's pipe.
#[test]
fn the_log_and_the_terminal_hold_exactly_the_commands_bytes() {
    const SECRET: &str = "s3cret-value-never-shown";
    for (secret, stdout) in [
        (false, Stdout::Terminal),
        (false, Stdout::DevNull),
        (false, Stdout::File),
        (true, Stdout::Terminal),
        (true, Stdout::DevNull),
    ] {
        let what = format!("secret {secret}, stdout {stdout:?}");
        let s = Scratch::new(&format!("exact-{secret}-{stdout:?}"));
        let reference = s.path("reference.bin");
        let made = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c 300000 /dev/urandom > {}",
                reference.display()
            ))
            .status()
            .expect("sh runs");
        assert!(made.success());
        let random = std::fs::read(&reference).expect("the reference bytes");
        let r = reference.display();
        // What the command prints: a line naming its stdout, 100 kB on stdout, the secret
        // (when there is one, from the environment), 100 kB on stderr, then the last
        // 100 kB on stdout, ending without a newline.
        let config = s.config(&format!(
            "agent_id: it-exact\nserver_address: http://127.0.0.1:9\njob_queues: [q]\n\
test_command: |\n  echo \"stdout is $(readlink /proc/$$/fd/1)\"\n  head -c 100000 {r}\n  printf 'key=%s;' \"$API_TOKEN\"\n  tail -c +100001 {r} | head -c 100000 >&2\n  tail -c +200001 {r}\n"
        ));
        let job = if secret {
            s.write(
                "job.yaml",
                &format!(
                    "job_queue: q\ntest_data: {{test_cmds: x, secrets: {{API_TOKEN: {SECRET}}}}}\n"
                ),
            )
        } else {
            s.write("job.yaml", "job_queue: q\ntest_data: {test_cmds: x}\n")
        };
        let (code, printed, stderr) = run_job_to(&config, &job, stdout, &s);
        assert_eq!(code, Some(0), "{what}: {stderr}");
        let log = std::fs::read(s.rundir().join("test.log")).expect("test log");
        let banner = banner_of("test", "it-exact");
        assert!(log.starts_with(&banner), "{what}: the banner first");
        let first_line_end = log[banner.len()..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|at| banner.len() + at + 1)
            .expect("the command's first line");
        let first_line = text(&log[banner.len()..first_line_end]);
        if secret {
            assert!(
                first_line.starts_with("stdout is pipe:"),
                "{what}: {first_line}"
            );
        } else {
            assert!(
                first_line.trim_end().ends_with("/test.log"),
                "{what}: {first_line}"
            );
        }
        let key = if secret {
            [&b"key="[..], crate_replacement(SECRET).as_bytes(), b";"].concat()
        } else {
            b"key=;".to_vec()
        };
        let expected = [&random[..100_000], &key, &random[100_000..]].concat();
        assert!(
            log[first_line_end..] == expected[..],
            "{what}: test.log holds {} bytes after the first line, {} expected",
            log.len() - first_line_end,
            expected.len()
        );
        assert!(
            !log.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{what}: the secret is not in the log"
        );
        match stdout {
            Stdout::DevNull => assert!(printed.is_empty()),
            _ => {
                assert!(
                    printed.starts_with(&log),
                    "{what}: the terminal shows test.log first ({} bytes printed, log {})",
                    printed.len(),
                    log.len()
                );
                assert!(
                    printed[log.len()..].starts_with(b"\nphase "),
                    "{what}: then the summary: {}",
                    text(&printed[log.len()..])
                );
            }
        }
    }
}

/// `**` and the first six hex digits of the SHA-256 of `secret` and `**`, computed by
/// `sha256sum` (not by the agent's own code).
fn crate_replacement(secret: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("printf '%s' '{secret}' | sha256sum"))
        .output()
        .expect("sha256sum runs");
    format!("**{}**", &text(&out.stdout)[..6])
}

/// A command that writes its log itself and stays quiet for less than the output timeout,
/// but longer than the agent's pauses between looks at the log, is not stopped: the
/// agent looks at the log before it takes the timeout as reached. Standard output is a
/// file, so the agent looks no more often than once a second while the log is quiet.
#[test]
fn direct_capture_sees_late_output_before_the_output_timeout() {
    let s = Scratch::new("late-output");
    let config = s.config(
        "agent_id: it-late\nserver_address: http://127.0.0.1:9\njob_queues: [q]\n\
test_command: |\n  echo \"stdout is $(readlink /proc/$$/fd/1)\"\n  sleep 3.5\n  echo second line\n  sleep 1.5\n  echo third line\n",
    );
    let job = s.write(
        "job.yaml",
        "job_queue: q\noutput_timeout: 4\ntest_data: {test_cmds: x}\n",
    );
    let (code, printed, stderr) = run_job_to(&config, &job, Stdout::File, &s);
    let log = text(&std::fs::read(s.rundir().join("test.log")).expect("test log"));
    assert_eq!(code, Some(0), "{log}\n{stderr}");
    assert!(
        log.contains("/test.log\nsecond line\nthird line\n"),
        "{log}"
    );
    assert!(!log.contains("Output timeout"), "{log}");
    assert!(text(&printed).starts_with(&log), "{}", text(&printed));
}
