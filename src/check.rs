//! `check-config`'s operator checks: what the daemon needs at start-up, looked at without
//! changing anything. The directories (present and writable, or creatable), the
//! refresh-token file (readable, holds a token), the metrics port (free), and on request
//! the server (it answers, exchanges the refresh token, shows the agent's record). Each
//! check gives one line, ok or failed, and a failed line says what to fix.
//!
//! Nothing is left behind: a directory's writability is tried with a file created and
//! removed at once, an absent directory's creatability with a directory created and removed
//! in its nearest existing parent, the port is bound and closed, and the server is only
//! read from (the token exchange is the one POST, and it changes nothing on the server).

use crate::config::{Config, Key};
use crate::server::http::{HttpServer, HttpSettings};
use crate::server::{RefreshCheckError, TokenFileError};
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// What `check-config` was given beside the config file: the daemon's own options.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--token-file`; the daemon's default when `None`.
    pub token_file: Option<PathBuf>,
    /// `-p`/`--metrics-port`; the config key when `None`.
    pub metrics_port: Option<u16>,
    /// `--server`: contact the server too.
    pub server: bool,
}

/// How a check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Failed,
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Check {
    pub verdict: Verdict,
    /// What was checked, e.g. `execution_basedir /var/lib/testflinger-agent/dev01/run`.
    pub subject: String,
    /// What was found; for a failure, also what to do about it.
    pub detail: String,
}

impl Check {
    fn ok(subject: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            verdict: Verdict::Ok,
            subject: subject.into(),
            detail: detail.into(),
        }
    }

    fn failed(subject: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            verdict: Verdict::Failed,
            subject: subject.into(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Failed => "failed",
        };
        write!(f, "# {word:<7} {}: {}", self.subject, self.detail)
    }
}

/// Every check, and notes that are neither ok nor failed (what was not checked, and why).
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    /// The checks ran as root, who may write where the agent's user may not.
    pub as_root: bool,
}

impl Report {
    pub fn all_ok(&self) -> bool {
        self.checks.iter().all(|c| c.verdict == Verdict::Ok)
    }

    fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }
}

/// The report as printed after the effective config: YAML comments, so that the whole
/// output still loads as the config.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.as_root {
            writeln!(
                f,
                "# checks, as root: every directory is writable for root; to see what the \
                 agent's user can do, run check-config as that user (sudo -u {} ...)",
                crate::cli::PACKAGE_USER
            )?;
        } else {
            writeln!(f, "# checks")?;
        }
        for check in &self.checks {
            writeln!(f, "{check}")?;
        }
        for note in &self.notes {
            writeln!(f, "# note    {note}")?;
        }
        Ok(())
    }
}

/// Applies the daemon's options to `config` as the daemon does (the command line's token
/// file, or its default, replaces the config key; `-p` replaces metrics_endpoint_port),
/// then runs the checks. Returns the config the daemon would run with, and the report.
pub fn run(mut config: Config, options: &Options) -> (Config, Report) {
    let mut report = Report::default();
    let token_file = options
        .token_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::cli::DEFAULT_TOKEN_FILE));
    if let Some(key) = config.token_file.as_deref() {
        if Path::new(key) != token_file {
            report.note(format!(
                "the config key token_file ({key}) is not used: the daemon reads the refresh \
                 token from its --token-file option, {} here; give that option instead",
                token_file.display()
            ));
        }
    }
    config.set_token_file(&token_file);
    if let Some(port) = options.metrics_port {
        config.set_metrics_endpoint_port(port);
    }
    let user = current_user();
    report.as_root = user.root;
    for (key, dir) in [
        (Key::ExecutionBasedir, &config.execution_basedir),
        (Key::ResultsBasedir, &config.results_basedir),
        (Key::LoggingBasedir, &config.logging_basedir),
    ] {
        report.checks.push(check_dir(key.name(), dir, &user.name));
    }
    report
        .checks
        .push(check_lock(&config.execution_basedir, &config.agent_id));
    let token = check_token(&token_file, &user.name);
    let token_ok = token.verdict == Verdict::Ok;
    report.checks.push(token);
    match config.metrics_endpoint_port {
        Some(port) => report
            .checks
            .push(check_port(config.metrics_endpoint_address.as_deref(), port)),
        None => report
            .note("metrics endpoint: not served (no -p/--metrics-port, no metrics_endpoint_port)"),
    }
    if crate::healthcheck::HealthSettings::from_config(&config).is_some() {
        report.note(
            crate::healthcheck::describe_last(&config.logging_basedir).unwrap_or_else(|| {
                "health check: none has run yet (`testflinger-agent healthcheck -c CONFIG` runs one)"
                    .to_owned()
            }),
        );
    }
    if options.server {
        check_server(&config, &token_file, token_ok, &mut report);
    } else {
        report.note("server: not contacted; --server checks it answers and the token refreshes");
    }
    (config, report)
}

/// Whether an agent with this `agent_id` already runs on this host (it holds the lock in
/// `execution_basedir` that a second copy would exit 2 on).
fn check_lock(dir: &Path, agent_id: &str) -> Check {
    let subject = format!("agent_id {agent_id}");
    match crate::daemon::lock_holder(dir, agent_id) {
        Ok(None) => Check::ok(subject, "no agent with this id runs on this host"),
        Ok(Some(pid)) => Check::failed(
            subject,
            format!(
                "an agent with this id already runs here (pid {}); a second copy would exit 2: stop it first, or give this config another agent_id",
                pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
            ),
        ),
        // No execution_basedir yet, or unreadable: its own check says what to fix.
        Err(_) => Check::ok(subject, "no lock to look at yet"),
    }
}

/// Who runs the check, for the fix texts.
struct User {
    name: String,
    root: bool,
}

fn current_user() -> User {
    let uid = nix::unistd::geteuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    User {
        name,
        root: uid.is_root(),
    }
}

/// A name no agent file has, unique within this process.
fn probe_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        ".testflinger-check-config-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn check_dir(key: &'static str, dir: &Path, user: &str) -> Check {
    let subject = format!("{key} {}", dir.display());
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            let probe = dir.join(probe_name());
            let written = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe);
            match written {
                Ok(file) => {
                    drop(file);
                    if let Err(err) = fs::remove_file(&probe) {
                        return Check::failed(
                            subject,
                            format!("writable, but the test file {} could not be removed ({err}); remove it", probe.display()),
                        );
                    }
                    Check::ok(subject, "exists and is writable")
                }
                Err(err) => Check::failed(
                    subject,
                    format!(
                        "exists but user {user} cannot write in it ({err}); give it to the agent's \
                         user (chown -R {user} {}) or choose another directory (config key {key})",
                        dir.display()
                    ),
                ),
            }
        }
        Ok(_) => Check::failed(
            subject,
            format!(
                "exists and is not a directory; move it away or choose another path (config key {key})"
            ),
        ),
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => Check::failed(
            subject,
            format!(
                "user {user} cannot reach it ({err}): a parent directory is not searchable; let the \
                 agent's user through (chmod o+x on the parent) or choose another directory \
                 (config key {key})"
            ),
        ),
        Err(_) => check_creatable(key, dir, user, subject),
    }
}

/// An absent directory: can its nearest existing parent take a new directory?
fn check_creatable(key: &'static str, dir: &Path, user: &str, subject: String) -> Check {
    let parent = dir
        .ancestors()
        .skip(1)
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| fs::metadata(a).is_ok())
        .unwrap_or(Path::new("/"));
    if !parent.is_dir() {
        return Check::failed(
            subject,
            format!(
                "absent, and cannot be created: {} is not a directory; choose another path \
                 (config key {key})",
                parent.display()
            ),
        );
    }
    let probe = parent.join(probe_name());
    match fs::create_dir(&probe) {
        Ok(()) => {
            if let Err(err) = fs::remove_dir(&probe) {
                return Check::failed(
                    subject,
                    format!(
                        "creatable, but the test directory {} could not be removed ({err}); remove it",
                        probe.display()
                    ),
                );
            }
            Check::ok(
                subject,
                format!(
                    "absent; the agent creates it at start-up ({} is writable)",
                    parent.display()
                ),
            )
        }
        Err(err) => Check::failed(
            subject,
            format!(
                "absent, and user {user} cannot create it: {} is not writable ({err}); create it for \
                 the agent's user (install -d -o {user} {}) or choose another directory (config \
                 key {key})",
                parent.display(),
                dir.display()
            ),
        ),
    }
}

fn check_token(path: &Path, user: &str) -> Check {
    let subject = format!("token file {}", path.display());
    let shown = path.display();
    match crate::server::check_token_file(path) {
        Ok(()) => {
            let shared = fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0);
            let mut detail = String::from("readable, holds a refresh token");
            if shared {
                detail.push_str(&format!(
                    "; other users can read it too (chmod 600 {shown} keeps it to its owner)"
                ));
            }
            Check::ok(subject, detail)
        }
        Err(TokenFileError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Check::failed(
                subject,
                "absent; write the refresh token there as {\"refresh_token\": \"...\"} (the \
                 deployment tooling does), or give the daemon --token-file with the path it \
                 has; without it every request goes out without a token, which the current \
                 server refuses",
            )
        }
        Err(TokenFileError::Read { source, .. })
            if source.kind() == io::ErrorKind::PermissionDenied =>
        {
            Check::failed(
                subject,
                format!(
                    "user {user} cannot read it ({source}); give it to the agent's user (chown {user} \
                     {shown}; chmod 600 {shown})"
                ),
            )
        }
        Err(TokenFileError::Read { source, .. }) => {
            Check::failed(subject, format!("cannot be read ({source}); (option --token-file)"))
        }
        Err(TokenFileError::NotJson { reason, .. }) => Check::failed(
            subject,
            format!(
                "not a JSON object with a string \"refresh_token\" ({reason}); rewrite it as \
                 {{\"refresh_token\": \"...\"}}"
            ),
        ),
        Err(TokenFileError::Empty { .. }) => Check::failed(
            subject,
            "its \"refresh_token\" is empty; write the agent's refresh token in it",
        ),
    }
}

fn check_port(address: Option<&str>, port: u16) -> Check {
    let subject = format!("metrics port {port}");
    match crate::metrics::check_port(address, port) {
        Ok(_) if port == 0 => Check::ok(subject, "any free port is taken at start-up"),
        Ok(bound) => Check::ok(subject, format!("free on {bound}")),
        Err(err) => Check::failed(subject, err.to_string()),
    }
}

/// How long each request of the server checks may take.
const SERVER_CHECK_TIMEOUT: Duration = Duration::from_secs(15);

fn check_server(config: &Config, token_file: &Path, token_ok: bool, report: &mut Report) {
    let mut settings = HttpSettings::from_config(config);
    settings.retry.max_attempts = 1;
    settings.timeouts.default = SERVER_CHECK_TIMEOUT;
    settings.timeouts.refresh = SERVER_CHECK_TIMEOUT;
    settings.timeouts.health = SERVER_CHECK_TIMEOUT;
    let server = HttpServer::new(settings);
    let subject = format!("server {}", server.base_url());
    match server.probe() {
        Ok(status) => report
            .checks
            .push(Check::ok(subject, format!("answers (GET /v1: {status})"))),
        Err(err) => {
            report.checks.push(Check::failed(
                subject,
                format!(
                    "{err}; check server_address, and that this host reaches it (name, route, \
                     proxy, firewall)"
                ),
            ));
            report.note("token refresh and agent record: not checked, the server does not answer");
            return;
        }
    }
    if !token_ok {
        report.note("token refresh and agent record: not checked, the token file is not usable");
        return;
    }
    let refresh = check_refresh(&server, token_file);
    let refreshed = refresh.verdict == Verdict::Ok;
    report.checks.push(refresh);
    if refreshed {
        report.checks.push(check_record(&server, &config.agent_id));
    } else {
        report.note("agent record: not checked, there is no access token");
    }
}

fn check_refresh(server: &HttpServer, token_file: &Path) -> Check {
    let subject = "token refresh";
    let file = token_file.display();
    match server.check_refresh() {
        Ok(()) => Check::ok(
            subject,
            "the server gave an access token for the refresh token",
        ),
        Err(RefreshCheckError::Refused {
            status: 400,
            detail,
        }) => Check::failed(
            subject,
            format!(
                "{detail}; the refresh token is unknown, revoked or expired: have the deployment \
                 tooling write a current one to {file}"
            ),
        ),
        Err(RefreshCheckError::Refused {
            status: 404 | 405,
            detail,
        }) => Check::failed(
            subject,
            format!(
                "{detail}; this server has no token endpoint: check that server_address is the \
                 Testflinger server (with its path prefix, if any)"
            ),
        ),
        Err(RefreshCheckError::Refused { detail, .. }) => Check::failed(subject, detail),
        Err(RefreshCheckError::Unavailable(text)) => Check::failed(
            subject,
            format!("{text}; the server stopped answering, try again"),
        ),
        Err(err @ (RefreshCheckError::NoFile | RefreshCheckError::File(_))) => {
            Check::failed(subject, err.to_string())
        }
    }
}

fn check_record(server: &HttpServer, agent_id: &str) -> Check {
    let subject = format!("agent record {agent_id}");
    match server.read_agent_record() {
        Ok(Some(record)) => {
            let state = record.state.as_deref().unwrap_or("unknown");
            let comment = if record.comment.is_empty() {
                String::new()
            } else {
                format!(" ({:?})", record.comment)
            };
            Check::ok(subject, format!("readable, state {state}{comment}"))
        }
        Ok(None) => Check::ok(
            subject,
            "the server has none yet (404); the agent creates it when it starts",
        ),
        Err(err) => {
            let fix = if err.detail.starts_with("answered 403") {
                "; the server refuses this agent's requests: the client behind the refresh \
                 token needs the agent role"
            } else if err.detail.starts_with("answered 401") {
                "; the access token was refused: check the refresh token (token refresh above)"
            } else {
                ""
            };
            Check::failed(subject, format!("{err}{fix}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .expect("readable")
            .map(|e| e.expect("entry").path())
            .collect();
        found.sort();
        found
    }

    #[test]
    fn directories_present_absent_or_blocked() {
        let tmp = crate::testing::tempdir("check-dirs");
        let dir = tmp.path();
        fs::create_dir(dir.join("here")).expect("mkdir");
        fs::write(dir.join("file"), "x").expect("write");
        let present = check_dir("execution_basedir", &dir.join("here"), "me");
        assert_eq!(present.verdict, Verdict::Ok, "{present}");
        let absent = check_dir("results_basedir", &dir.join("a/b/c"), "me");
        assert_eq!(absent.verdict, Verdict::Ok, "{absent}");
        assert!(absent.detail.contains("creates it at start-up"), "{absent}");
        let file = check_dir("logging_basedir", &dir.join("file"), "me");
        assert_eq!(file.verdict, Verdict::Failed, "{file}");
        assert!(file.detail.contains("not a directory"), "{file}");
        let under_file = check_dir("logging_basedir", &dir.join("file/sub"), "me");
        assert_eq!(under_file.verdict, Verdict::Failed, "{under_file}");
        assert!(
            under_file.detail.contains("file is not a directory"),
            "{under_file}"
        );
        // Nothing was left behind.
        assert_eq!(entries(dir), vec![dir.join("file"), dir.join("here")]);
        assert!(entries(&dir.join("here")).is_empty());
    }

    #[test]
    fn the_report_is_yaml_comments() {
        let report = Report {
            checks: vec![Check::ok("a", "fine"), Check::failed("b", "broken; fix it")],
            notes: vec!["not checked".into()],
            as_root: false,
        };
        assert!(!report.all_ok());
        let text = report.to_string();
        assert_eq!(
            text,
            "# checks\n# ok      a: fine\n# failed  b: broken; fix it\n# note    not checked\n"
        );
        assert!(text.lines().all(|l| l.starts_with('#')));
    }
}
