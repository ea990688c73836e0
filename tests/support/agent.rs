//! A daemon started through the real binary against the fake server, with its config in a
//! scratch directory; killed on drop (the tests kill its command trees by marker).

use crate::fake_server::{FakeServer, DEFAULT_REFRESH_TOKEN};
use crate::scratch::Scratch;
use serde_json::json;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The agent binary cargo built for the running test or bench: `testflinger-agent` in the
/// profile directory (`target/<profile>/`) that holds the `deps/` (tests, benches) or
/// `examples/` directory of the running executable. Cargo gives its path at compile time
/// (`CARGO_BIN_EXE_testflinger-agent`) only to the agent package's own tests and benches,
/// not to a library like this one; tests/it checks that both name the same file.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the running executable has a path");
        let found = exe
            .parent()
            .and_then(Path::parent)
            .map(|profile| profile.join("testflinger-agent"));
        match found {
            Some(path) if path.is_file() => path,
            _ => panic!(
                "no agent binary beside {} (expected target/<profile>/testflinger-agent: \
                 run the tests and benches through cargo)",
                exe.display()
            ),
        }
    })
}

pub const WAIT: Duration = Duration::from_secs(60);

/// A running agent daemon; killed (with its command trees, by marker) on drop.
pub struct Agent {
    pub child: Child,
    /// Where its stderr (the agent's log) goes, when known: printed when a test fails.
    pub log: Option<PathBuf>,
}

impl Agent {
    /// Starts the daemon with `commands` (YAML lines) against `server`.
    pub fn start(server: &FakeServer, scratch: &Scratch, name: &str, commands: &str) -> Agent {
        Agent::start_with(server, scratch, name, commands, &[])
    }

    /// Like [`Agent::start`], with more command-line arguments after `-c` and `--token-file`.
    pub fn start_with(
        server: &FakeServer,
        scratch: &Scratch,
        name: &str,
        commands: &str,
        extra_args: &[&str],
    ) -> Agent {
        Agent::spawn(server, scratch, name, commands, extra_args, &[])
    }

    /// Like [`Agent::start`], with environment variables for the daemon alone: `Some` sets
    /// one, `None` removes it. The test process's own environment is left alone.
    pub fn start_env(
        server: &FakeServer,
        scratch: &Scratch,
        name: &str,
        commands: &str,
        env: &[(&str, Option<&str>)],
    ) -> Agent {
        Agent::spawn(server, scratch, name, commands, &[], env)
    }

    /// Where the daemon started under `name` in `scratch` writes its stderr.
    pub fn stderr_path(scratch: &Scratch, name: &str) -> std::path::PathBuf {
        scratch.path(&format!("{name}-{}.stderr", std::process::id()))
    }

    fn spawn(
        server: &FakeServer,
        scratch: &Scratch,
        name: &str,
        commands: &str,
        extra_args: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Agent {
        let files = write_daemon_files(server, scratch, name, commands);
        let log_path = Agent::stderr_path(scratch, name);
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut args: Vec<OsString> = vec![
            "-c".into(),
            files.config.into(),
            "--token-file".into(),
            files.token_file.into(),
        ];
        args.extend(extra_args.iter().map(OsString::from));
        let mut agent = Agent::exec(&args, env, log);
        agent.log = Some(log_path);
        agent
    }

    /// Starts the binary with exactly `args`, `env` changed as in [`Agent::start_env`],
    /// stdin and stdout from /dev/null, stderr into `stderr`.
    pub fn exec(args: &[OsString], env: &[(&str, Option<&str>)], stderr: std::fs::File) -> Agent {
        let mut command = Command::new(bin());
        for (key, value) in env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the daemon starts");
        Agent { child, log: None }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the daemon");
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn stop(&mut self) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit()
    }

    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test explains itself: the agent's log, from its end.
        if std::thread::panicking() {
            if let Some(path) = &self.log {
                eprintln!(
                    "--- the agent's log ({}), last {LOG_TAIL_LINES} lines:\n{}",
                    path.display(),
                    log_tail(path, LOG_TAIL_LINES)
                );
            }
        }
    }
}

/// How much of an agent's log a failing test prints.
pub const LOG_TAIL_LINES: usize = 200;

/// The last `lines` lines of the file at `path` (empty when it cannot be read).
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The files a daemon reads: its config and its refresh-token file.
pub struct DaemonFiles {
    pub config: PathBuf,
    pub token_file: PathBuf,
}

/// Writes the config [`Agent::start`] uses (test defaults: fast polling, a 2 s
/// `termination_grace_period`, one queue `<name>-queue`, also advertised; a key in
/// `commands` replaces its default) and a token file the fake server accepts.
pub fn write_daemon_files(
    server: &FakeServer,
    scratch: &Scratch,
    name: &str,
    commands: &str,
) -> DaemonFiles {
    let token_file = scratch.write(
        "refresh_token",
        &json!({"refresh_token": DEFAULT_REFRESH_TOKEN, "obtained_at": "2026-11-27T00:00:00"})
            .to_string(),
    );
    let defaults = format!(
            "agent_id: {name}\nserver_address: {url}\njob_queues: [{name}-queue]\npolling_interval: 1\ncancel_check_interval: 1\noutput_post_interval: 1\ntermination_grace_period: 2\nadvertised_queues: {{{name}-queue: a test queue}}\nlogging_level: DEBUG\n",
            url = server.url()
        );
    // `commands` may override a default key.
    let overridden = |line: &&str| {
        let key = line.split(':').next().unwrap_or_default();
        commands.lines().any(|c| c.starts_with(&format!("{key}:")))
    };
    let kept: Vec<&str> = defaults.lines().filter(|l| !overridden(l)).collect();
    let config = scratch.config(&format!("{}\n{commands}", kept.join("\n")));
    DaemonFiles { config, token_file }
}

pub fn wait_for(server: &FakeServer, what: &str, mut condition: impl FnMut(&FakeServer) -> bool) {
    assert!(
        server.wait_until(WAIT, |s| condition(s)),
        "timed out waiting for {what}"
    );
}

pub fn finished(server: &FakeServer, id: &str) -> bool {
    matches!(
        server.job_state(id).as_deref(),
        Some("complete" | "cancelled")
    ) && server.result_data(id).get("status").is_some()
}

/// Cancels job `id` on the server, then waits until its cleanup has run (its cleanup
/// command prints `cleanup ran`) and its outcome is in.
pub fn cancel_and_wait_for_cleanup(server: &FakeServer, id: &str) {
    assert!(server.cancel_job(id), "the server cancels {id}");
    wait_for(server, "the cancelled job's cleanup and outcome", |srv| {
        srv.log_text(id, "output").contains("cleanup ran") && finished(srv, id)
    });
}

pub fn queue(name: &str) -> String {
    format!("{name}-queue")
}
