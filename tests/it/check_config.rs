//! `check-config` as an operator runs it, through the real binary: every failure kind with
//! the fix its line gives, exit 2 on any failure and 0 when all is well, and nothing left
//! behind. `--server` runs against the fake server.

use crate::support::agent::BIN;
use crate::support::fake_server::{FakeServer, Route, DEFAULT_REFRESH_TOKEN};
use crate::support::loopback::free_port;
use crate::support::scratch::Scratch;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use testflinger_agent::config::Config;

/// The uid/gid the unprivileged runs use when the tests run as root (root may write
/// anywhere, so permission failures need another user).
const NOBODY: u32 = 65534;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The check line about `subject` (`# ok      subject: …`), whatever its verdict.
    fn line(&self, subject: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| {
                l.starts_with('#')
                    && l[1..]
                        .trim_start()
                        .split_once(' ')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with(subject))
            })
            .unwrap_or_else(|| panic!("no check line for {subject:?}:\n{}", self.stdout))
    }

    fn assert_ok(&self, subject: &str) {
        let line = self.line(subject);
        assert!(line.starts_with("# ok "), "{line}\n{}", self.stdout);
    }

    /// Asserts the line about `subject` failed and says each of `says`.
    fn assert_failed(&self, subject: &str, says: &[&str]) {
        let line = self.line(subject);
        assert!(line.starts_with("# failed "), "{line}\n{}", self.stdout);
        for needle in says {
            assert!(line.contains(needle), "{needle:?} missing from\n{line}");
        }
        assert_eq!(
            self.code,
            Some(2),
            "a failed check exits 2\n{}",
            self.stdout
        );
    }
}

/// Runs `check-config` with `args`; with `unprivileged` (the test's scratch) and when the
/// tests run as root, as [`NOBODY`], from a link to the binary in that scratch: the build's
/// own path may lie under a directory only root can enter (a clone in `mktemp -d`).
fn run(args: &[&std::ffi::OsStr], unprivileged: Option<&Scratch>) -> Run {
    let mut bin = PathBuf::from(BIN);
    let as_nobody = unprivileged.filter(|_| nix::unistd::geteuid().is_root());
    if let Some(scratch) = as_nobody {
        let link = scratch.path("testflinger-agent-bin");
        if !link.exists() && std::fs::hard_link(BIN, &link).is_err() {
            std::fs::copy(BIN, &link).expect("copy the binary for the unprivileged user");
        }
        bin = link;
    }
    let mut command = Command::new(&bin);
    command.arg("check-config").args(args);
    if as_nobody.is_some() {
        command.uid(NOBODY).gid(NOBODY);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("check-config runs");
    let run = Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// A config for `server_address` with the three directories given, and a token file that
/// the fake server accepts; returns their paths.
fn files(s: &Scratch, server_address: &str, dirs: [&Path; 3], extra: &str) -> (PathBuf, PathBuf) {
    let token = s.write(
        "refresh_token",
        &format!("{{\"refresh_token\": \"{DEFAULT_REFRESH_TOKEN}\"}}"),
    );
    let mut perms = std::fs::metadata(&token).expect("token").permissions();
    perms.set_mode(0o600);
    std::fs::set_permissions(&token, perms).expect("chmod");
    let config = s.write(
        "check.yaml",
        &format!(
            "agent_id: check-agent\nserver_address: {server_address}\njob_queues: [q]\n\
             execution_basedir: {}\nresults_basedir: {}\nlogging_basedir: {}\n{extra}",
            dirs[0].display(),
            dirs[1].display(),
            dirs[2].display()
        ),
    );
    (config, token)
}

#[test]
fn all_ok_against_the_server_leaves_nothing_behind_and_posts_nothing() {
    let server = FakeServer::start();
    let s = Scratch::new("check-ok");
    let (run_dir, results, logs) = (s.path("run"), s.path("spool/results"), s.path("logs"));
    let (config, token) = files(&s, &server.url(), [&run_dir, &results, &logs], "");
    let port = free_port().to_string();
    let out = run(
        &[
            os("-c"),
            config.as_os_str(),
            os("--token-file"),
            token.as_os_str(),
            os("-p"),
            os(&port),
            os("--server"),
        ],
        None,
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    for subject in [
        "execution_basedir",
        "results_basedir",
        "logging_basedir",
        "token file",
        "metrics port",
        "server",
        "token refresh",
        "agent record",
    ] {
        out.assert_ok(subject);
    }
    assert!(!out.stdout.contains("# failed"), "{}", out.stdout);
    assert!(
        out.line("execution_basedir")
            .contains("creates it at start-up"),
        "{}",
        out.stdout
    );
    // The directories were only tried, not made.
    for dir in [&run_dir, &results, &logs, &s.path("spool")] {
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }
    // Read-only towards the server: the health probe, the token exchange, the record.
    let routes: Vec<Option<Route>> = server.requests().into_iter().map(|r| r.route).collect();
    assert!(routes.contains(&Some(Route::Refresh)), "{routes:?}");
    assert!(
        routes.iter().all(|r| matches!(
            r,
            Some(Route::Health | Route::Refresh | Route::AgentDataGet)
        )),
        "{routes:?}"
    );
    assert!(server.agent_record("check-agent").is_none());
    // The output still loads as the effective config, with the daemon's options in it.
    let effective = Config::from_yaml(&out.stdout).expect("the output is the config");
    assert_eq!(
        effective.metrics_endpoint_port,
        Some(port.parse().expect("port"))
    );
    assert_eq!(effective.token_file.as_deref(), token.to_str());
}

#[test]
fn directory_failures_name_the_key_and_the_fix() {
    let s = Scratch::new("check-dirs");
    let file = s.write("a-file", "not a directory");
    let locked = s.path("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let (config, token) = files(
        &s,
        "http://127.0.0.1:9",
        [&file, &file.join("sub"), &locked.join("logs")],
        "",
    );
    // The token file must be readable by the unprivileged user.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run(
        &[
            os("-c"),
            config.as_os_str(),
            os("--token-file"),
            token.as_os_str(),
        ],
        Some(&s),
    );
    out.assert_failed(
        "execution_basedir",
        &[
            "exists and is not a directory",
            "config key execution_basedir",
        ],
    );
    out.assert_failed(
        "results_basedir",
        &[
            "a-file is not a directory",
            "choose another path",
            "config key results_basedir",
        ],
    );
    out.assert_failed(
        "logging_basedir",
        &[
            "cannot create it",
            "not writable",
            "install -d -o",
            "config key logging_basedir",
        ],
    );
    out.assert_ok("token file");
    // An existing directory the user cannot write in.
    let (config, _) = files(&s, "http://127.0.0.1:9", [&locked, &locked, &locked], "");
    let out = run(
        &[
            os("-c"),
            config.as_os_str(),
            os("--token-file"),
            token.as_os_str(),
        ],
        Some(&s),
    );
    out.assert_failed(
        "execution_basedir",
        &[
            "exists but",
            "cannot write in it",
            "chown -R",
            "config key execution_basedir",
        ],
    );
    assert_eq!(std::fs::read_dir(&locked).expect("readable").count(), 0);
}

#[test]
fn token_file_failures_say_how_to_write_it() {
    let s = Scratch::new("check-token");
    let dir = s.path("d");
    let (config, _) = files(&s, "http://127.0.0.1:9", [&dir, &dir, &dir], "");
    let check = |token: &Path, unprivileged: Option<&Scratch>| {
        run(
            &[
                os("-c"),
                config.as_os_str(),
                os("--token-file"),
                token.as_os_str(),
            ],
            unprivileged,
        )
    };
    let out = check(&s.path("absent"), None);
    out.assert_failed(
        "token file",
        &["absent", "{\"refresh_token\": \"...\"}", "--token-file"],
    );
    let out = check(&s.write("garbled", "refresh_token=abc"), None);
    out.assert_failed("token file", &["not a JSON object", "rewrite it as"]);
    let out = check(&s.write("empty", "{\"refresh_token\": \" \"}"), None);
    out.assert_failed(
        "token file",
        &["is empty", "write the agent's refresh token"],
    );
    let private = s.write("private", "{\"refresh_token\": \"x\"}");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    // Root reads it regardless; another user cannot.
    let out = check(&private, Some(&s));
    out.assert_failed("token file", &["cannot read it", "chown", "chmod 600"]);
    // Without --token-file the daemon's default is checked, and a config key that the
    // daemon would not use is pointed out.
    let (config, _) = files(
        &s,
        "http://127.0.0.1:9",
        [&dir, &dir, &dir],
        "token_file: /elsewhere\n",
    );
    let out = run(&[os("-c"), config.as_os_str()], None);
    assert!(
        out.line("token file")
            .contains(testflinger_agent::cli::DEFAULT_TOKEN_FILE),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("the config key token_file (/elsewhere) is not used"),
        "{}",
        out.stdout
    );
}

/// Another agent with the same id runs on this host (it holds the lock a second copy
/// would exit 2 on): the check names its pid; once it is gone the line is ok again.
#[test]
fn a_running_agent_with_the_same_id_is_named() {
    let s = Scratch::new("check-lock");
    let dir = s.path("d");
    std::fs::create_dir_all(&dir).expect("dir");
    let (config, token) = files(&s, "http://127.0.0.1:9", [&dir, &dir, &dir], "");
    let args = [
        os("-c"),
        config.as_os_str(),
        os("--token-file"),
        token.as_os_str(),
    ];
    let out = run(&args, None);
    out.assert_ok("agent_id check-agent");
    let lock = testflinger_agent::daemon::AgentLock::acquire(&dir, "check-agent").expect("lock");
    let out = run(&args, None);
    out.assert_failed(
        "agent_id check-agent",
        &[
            &format!("pid {}", std::process::id()),
            "stop it first",
            "another agent_id",
        ],
    );
    drop(lock);
    run(&args, None).assert_ok("agent_id check-agent");
}

#[test]
fn a_port_in_use_names_its_holder() {
    let s = Scratch::new("check-port");
    let dir = s.path("d");
    let holder = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let (config, token) = files(
        &s,
        "http://127.0.0.1:9",
        [&dir, &dir, &dir],
        &format!("metrics_endpoint_address: 127.0.0.1\nmetrics_endpoint_port: {port}\n"),
    );
    let out = run(
        &[
            os("-c"),
            config.as_os_str(),
            os("--token-file"),
            token.as_os_str(),
        ],
        None,
    );
    out.assert_failed(
        "metrics port",
        &[
            "address already in use",
            &format!("pid {}", std::process::id()),
            "choose another port",
            "metrics_endpoint_port",
        ],
    );
    // -p wins over the config key, as in the daemon.
    let free = free_port().to_string();
    let out = run(
        &[
            os("-c"),
            config.as_os_str(),
            os("--token-file"),
            token.as_os_str(),
            os("-p"),
            os(&free),
        ],
        None,
    );
    out.assert_ok(&format!("metrics port {free}"));
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    drop(holder);
}

#[test]
fn server_failures_say_what_to_fix() {
    let s = Scratch::new("check-server");
    let dir = s.path("d");
    // Nothing listens: the first check fails and the others are not tried.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (config, token) = files(&s, &closed, [&dir, &dir, &dir], "");
    let args = [
        os("-c"),
        config.as_os_str(),
        os("--token-file"),
        token.as_os_str(),
        os("--server"),
    ];
    let out = run(&args, None);
    out.assert_failed("server", &["GET /v1", "check server_address"]);
    assert!(
        out.stdout
            .contains("not checked, the server does not answer"),
        "{}",
        out.stdout
    );

    // A refresh token the server does not know.
    let server = FakeServer::start();
    let (config, token) = files(&s, &server.url(), [&dir, &dir, &dir], "");
    std::fs::write(&token, "{\"refresh_token\": \"revoked-long-ago\"}").expect("write");
    let args = [
        os("-c"),
        config.as_os_str(),
        os("--token-file"),
        token.as_os_str(),
        os("--server"),
    ];
    let out = run(&args, None);
    out.assert_ok("server");
    out.assert_failed(
        "token refresh",
        &[
            "answered 400",
            "unknown, revoked or expired",
            token.to_str().expect("utf-8"),
        ],
    );

    // The token is fine, but the server refuses the agent's request (twice: the agent
    // renews its token once after a 403 and replays).
    std::fs::write(
        &token,
        format!("{{\"refresh_token\": \"{DEFAULT_REFRESH_TOKEN}\"}}"),
    )
    .expect("write");
    server.fail_next(Route::AgentDataGet, 2, 403);
    let out = run(&args, None);
    out.assert_ok("token refresh");
    out.assert_failed("agent record", &["answered 403", "needs the agent role"]);

    // Once the fault is used up, all is well.
    let out = run(&args, None);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
}
