//! A daemon started through the real binary against the fake server, with its config in a
//! scratch directory; killed on drop (the tests kill its command trees by marker).

use super::fake_server::{FakeServer, DEFAULT_REFRESH_TOKEN};
use super::scratch::Scratch;
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_testflinger-agent");
pub const WAIT: Duration = Duration::from_secs(60);

/// A running agent daemon; killed (with its command trees, by marker) on drop.
pub struct Agent {
    pub child: Child,
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
        let files = write_daemon_files(server, scratch, name, commands);
        let log =
            std::fs::File::create(scratch.path(&format!("{name}-{}.stderr", std::process::id())))
                .expect("log file");
        let child = Command::new(BIN)
            .arg("-c")
            .arg(&files.config)
            .arg("--token-file")
            .arg(&files.token_file)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the daemon starts");
        Agent { child }
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
    }
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

pub fn queue(name: &str) -> String {
    format!("{name}-queue")
}
