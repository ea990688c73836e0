//! The `release` label of `phase_duration_seconds`: the DUT's `/etc/os-release`, read over
//! ssh after a successful provision (PROTOCOL §14.2), off the job's critical path.

use crate::outcome::DEVICE_INFO_FILE;
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The label when the DUT was asked but gave no usable answer.
pub const UNKNOWN: &str = "unknown";
/// The hard limit on one ssh query, as upstream.
pub const SSH_LIMIT: Duration = Duration::from_secs(30);
/// Each is passed as `-o <option>`, in this order.
const SSH_OPTIONS: [&str; 5] = [
    "StrictHostKeyChecking=no",
    "UserKnownHostsFile=/dev/null",
    "ConnectTimeout=10",
    "BatchMode=yes",
    "LogLevel=ERROR",
];
const REMOTE_COMMAND: &str = "cat /etc/os-release";
const STDOUT_CAP: usize = 64 * 1024;
const STDERR_CAP: usize = 4 * 1024;
const DEVICE_INFO_CAP: u64 = 1024 * 1024;
const POLL: Duration = Duration::from_millis(10);
/// How long ssh's pipes may stay open after it exited (a descendant holding them).
const PIPE_GRACE: Duration = Duration::from_secs(1);
const IP_KEY: &str = "device_info.device_ip in device-info.json";
const USER_KEY: &str = "the job's test_data.test_username";
/// Python's `str.splitlines` breaks.
const BREAKS: &str = "\n\r\x0b\x0c\x1c\x1d\x1e\u{85}\u{2028}\u{2029}";

/// Why no release was read; each becomes one warning.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{path}: {reason}; the release label stays empty")]
    DeviceInfo { path: String, reason: String },
    #[error("refusing to ssh with {value:?}: {why} (check {key}); release label {UNKNOWN}")]
    Refused {
        value: String,
        why: &'static str,
        key: &'static str,
    },
    #[error("querying /etc/os-release on {target}: {detail}; release label {UNKNOWN}")]
    Query { target: String, detail: String },
}

/// A running (or settled) query of the DUT's release; `Drop` kills and reaps the ssh.
pub struct ReleaseProbe {
    label: Arc<(Mutex<Option<String>>, Condvar)>,
    cancel: Option<mpsc::Sender<()>>,
    worker: Option<JoinHandle<()>>,
}

impl ReleaseProbe {
    /// Reads `device-info.json` in `rundir` and, when it names a device ip, queries the DUT
    /// as `test_username` (default `ubuntu`) with `ssh` from PATH. Finish the probe
    /// (`wait_label` or drop) before `process::reap_orphans`, which would reap the ssh.
    pub fn start(rundir: &Path, test_username: Option<&str>) -> ReleaseProbe {
        ReleaseProbe::start_from(Path::new("ssh"), rundir, test_username)
    }

    /// [`ReleaseProbe::start`] with another ssh program.
    pub fn start_from(program: &Path, rundir: &Path, test_username: Option<&str>) -> ReleaseProbe {
        match device_ip(rundir) {
            Ok(Some(ip)) => {
                let user = test_username.unwrap_or("ubuntu");
                ReleaseProbe::start_with(program, &ip, user, SSH_LIMIT)
            }
            Ok(None) => ReleaseProbe::settled(""),
            Err(e) => {
                log::warn!("{e}");
                let refused = matches!(e, ReleaseError::Refused { .. });
                ReleaseProbe::settled(if refused { UNKNOWN } else { "" })
            }
        }
    }

    /// Queries `user@ip` with `program` (an ssh), killing it after `limit`.
    pub fn start_with(program: &Path, ip: &str, user: &str, limit: Duration) -> ReleaseProbe {
        let checked = check(ip, true).and_then(|()| check(user, false));
        if let Err(e) = checked {
            log::warn!("{e}");
            return ReleaseProbe::settled(UNKNOWN);
        }
        let target = format!("{user}@{ip}");
        // Its own process group keeps ssh out of the agent's terminal signals. Only ssh is
        // killed (std has no killpg and nix stays in `process/`): with these options ssh
        // starts no helper; one that a user's ssh config adds (ProxyCommand) loses its
        // pipes when ssh dies, and PIPE_GRACE keeps it from holding the label back.
        let spawned = Command::new(program)
            .args(SSH_OPTIONS.iter().flat_map(|o| ["-o", o]))
            .args([&target, REMOTE_COMMAND])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound => " (is the openssh client installed?)",
                    _ => "",
                };
                let detail = format!("could not start {}: {e}{hint}", program.display());
                log::warn!("{}", ReleaseError::Query { target, detail });
                return ReleaseProbe::settled(UNKNOWN);
            }
        };
        let label = Arc::new((Mutex::new(None), Condvar::new()));
        let (cancel, cancelled) = mpsc::channel();
        let shared = Arc::clone(&label);
        let worker = thread::spawn(move || {
            let label = match supervise(child, &cancelled, limit) {
                Ok(label) => label,
                Err(detail) => {
                    log::warn!("{}", ReleaseError::Query { target, detail });
                    UNKNOWN.to_string()
                }
            };
            log::info!("DUT release label: {label}");
            *lock(&shared.0) = Some(label);
            shared.1.notify_all();
        });
        ReleaseProbe {
            label,
            cancel: Some(cancel),
            worker: Some(worker),
        }
    }

    fn settled(label: &str) -> ReleaseProbe {
        let label = Arc::new((Mutex::new(Some(label.to_string())), Condvar::new()));
        ReleaseProbe {
            label,
            cancel: None,
            worker: None,
        }
    }

    /// The label if the query has ended; never blocks.
    pub fn try_label(&self) -> Option<String> {
        lock(&self.label.0).clone()
    }

    /// The label, waiting at most `limit`; on expiry the ssh is killed and reaped and the
    /// label is `unknown`.
    pub fn wait_label(mut self, limit: Duration) -> String {
        let (slot, ready) = &*self.label;
        let waited = ready.wait_timeout_while(lock(slot), limit, |label| label.is_none());
        if let Some(label) = waited.map_or(None, |(label, _)| label.clone()) {
            return label;
        }
        self.stop();
        self.try_label().unwrap_or_else(|| UNKNOWN.to_string())
    }

    fn stop(&mut self) {
        let _ = self.cancel.take().map(|cancel| cancel.send(()));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Drop for ReleaseProbe {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits for ssh (killing and reaping it on cancel or after `limit`), then reads the label
/// from its output.
fn supervise(
    mut child: Child,
    cancelled: &mpsc::Receiver<()>,
    limit: Duration,
) -> Result<String, String> {
    let (stdout, stderr) = (
        reader(child.stdout.take(), STDOUT_CAP),
        reader(child.stderr.take(), STDERR_CAP),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for ssh: {e}")),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let why = match cancelled.recv_timeout(POLL.min(left)) {
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => continue,
            Err(mpsc::RecvTimeoutError::Timeout) => format!("no answer within {limit:?}"),
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                "the agent stopped waiting".into()
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{why}; killed ssh"));
    };
    let grace = Instant::now() + PIPE_GRACE;
    let finished =
        |reader: &Option<JoinHandle<_>>| reader.as_ref().is_none_or(JoinHandle::is_finished);
    while !(finished(&stdout) && finished(&stderr)) && Instant::now() < grace {
        thread::sleep(POLL);
    }
    let joined = |reader: Option<JoinHandle<_>>| match reader {
        Some(reader) if reader.is_finished() => reader.join().ok(),
        _ => None,
    };
    let (stdout, stderr) = (
        joined(stdout),
        joined(stderr).map(|(err, _)| err).unwrap_or_default(),
    );
    if !status.success() {
        return Err(format!(
            "ssh ended with {status}: {}",
            String::from_utf8_lossy(&stderr).trim()
        ));
    }
    match stdout {
        None => Err("ssh exited but its output stayed open".to_string()),
        Some((_, true)) => Err(format!("more than {STDOUT_CAP} bytes of output")),
        Some((bytes, false)) => String::from_utf8(bytes)
            .map(|text| release_label(&text))
            .map_err(|_| "the output is not UTF-8".to_string()),
    }
}

/// A thread that reads up to `cap` bytes of `pipe`, then drains the rest; it says whether
/// there was more.
fn reader(
    pipe: Option<impl Read + Send + 'static>,
    cap: usize,
) -> Option<JoinHandle<(Vec<u8>, bool)>> {
    let mut pipe = pipe?;
    Some(thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.by_ref().take(cap as u64).read_to_end(&mut bytes);
        let more = std::io::copy(&mut pipe, &mut std::io::sink()).unwrap_or(0);
        (bytes, more > 0)
    }))
}

/// `device_info.device_ip` from `device-info.json`: `None` when the file, the key or the
/// value is missing (null, `""`); a refusal when the ip is not a string.
fn device_ip(rundir: &Path) -> Result<Option<String>, ReleaseError> {
    let path = rundir.join(DEVICE_INFO_FILE);
    let bad = |reason: String| ReleaseError::DeviceInfo {
        path: path.display().to_string(),
        reason,
    };
    let mut text = Vec::new();
    match std::fs::File::open(&path) {
        Ok(file) => file
            .take(DEVICE_INFO_CAP)
            .read_to_end(&mut text)
            .map_err(|e| bad(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    parse_device_ip(&text, &path.display().to_string())
}

/// [`device_ip`] of the content `text` of `device-info.json` (at most its first MiB);
/// `path` names the file in errors.
pub fn parse_device_ip(text: &[u8], path: &str) -> Result<Option<String>, ReleaseError> {
    let bad = |reason: String| ReleaseError::DeviceInfo {
        path: path.to_owned(),
        reason,
    };
    let value: Value = serde_json::from_slice(text).map_err(|e| bad(format!("not JSON ({e})")))?;
    let info = match value.get("device_info") {
        _ if !value.is_object() => return Err(bad("not a JSON object".to_string())),
        None | Some(Value::Null) => return Ok(None),
        Some(info) if !info.is_object() => return Err(bad("device_info is not an object".into())),
        Some(info) => info,
    };
    match info.get("device_ip") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(ip)) => Ok(Some(ip.clone()).filter(|ip| !ip.is_empty())),
        Some(other) => Err(ReleaseError::Refused {
            value: other.to_string(),
            why: "not a string",
            key: IP_KEY,
        }),
    }
}

/// Refuses an ip (`is_ip`) or a user that ssh could read as an option or that would change
/// the destination: only letters, digits and `. _ -` (and `: %` in an ip), no leading `-`.
pub(crate) fn check(value: &str, is_ip: bool) -> Result<(), ReleaseError> {
    let (extra, key) = if is_ip {
        ("._-:%", IP_KEY)
    } else {
        ("._-", USER_KEY)
    };
    let why = if value.is_empty() {
        "empty"
    } else if value.starts_with('-') {
        "starts with '-'"
    } else if value.len() > 253 {
        "longer than 253 bytes"
    } else if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
    {
        "only letters, digits and . _ - (and : % in an ip) are allowed"
    } else {
        return Ok(());
    };
    let value = value.to_string();
    Err(ReleaseError::Refused { value, why, key })
}

/// The label for an os-release text: `Core <VERSION_ID>` on Ubuntu Core, else the first
/// point release of VERSION_ID in VERSION (PRETTY_NAME when VERSION is absent), else
/// VERSION_ID; `unknown` without a VERSION_ID.
pub fn release_label(os_release: &str) -> String {
    let info = parse_os_release(os_release);
    let field = |key: &str| info.get(key).copied();
    let version_id = field("VERSION_ID").unwrap_or_default();
    if version_id.is_empty() {
        return UNKNOWN.to_string();
    }
    if field("NAME").unwrap_or_default().contains("Ubuntu Core") {
        return format!("Core {version_id}");
    }
    let version = field("VERSION").or(field("PRETTY_NAME")).unwrap_or("");
    // `<VERSION_ID>.<digits>` at the first position where it occurs (ASCII digits only).
    let point = version.char_indices().find_map(|(at, _)| {
        let rest = version[at..].strip_prefix(version_id)?.strip_prefix('.')?;
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        (digits > 0).then(|| &version[at..at + version_id.len() + 1 + digits])
    });
    point.unwrap_or(version_id).to_string()
}

/// `KEY=value` lines (split like Python's `splitlines`), trimmed, with `"` stripped from
/// both ends of the value; lines without `=` are skipped and a later key wins.
fn parse_os_release(text: &str) -> HashMap<&str, &str> {
    let pairs = text
        .split(|c| BREAKS.contains(c))
        .filter_map(|line| line.trim().split_once('='));
    pairs
        .map(|(key, value)| (key, value.trim_matches('"')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const NOBLE: &str =
        "NAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nVERSION=\"24.04.1 LTS (Noble Numbat)\"";
    const HANG: &str = "exec sleep 1000.$MARK";

    /// A temp dir with a fake ssh that records its runs, argv and pid, then runs `body`. On
    /// drop it kills that pid if the process still carries its mark, and removes the dir.
    struct Fake(PathBuf, String);

    impl Fake {
        fn new(body: &str) -> Fake {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mark = format!("{}{n:04}", std::process::id());
            let dir = std::env::temp_dir().join(format!("tf-release-{mark}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir is writable");
            let d = dir.display();
            let script = format!("#!/bin/sh\nMARK={mark}\necho ran >> {d}/marker\nprintf '%s\\n' \"$@\" > {d}/argv\necho $$ > {d}/pid\n{body}\n");
            std::fs::write(dir.join("ssh.src"), script).expect("write fake ssh");
            // Copied by a child process: a write descriptor held by this multi-threaded test
            // process could leak into another test's fork and make exec fail with ETXTBSY.
            let (src, ssh) = (dir.join("ssh.src"), dir.join("ssh"));
            let installed = Command::new("install")
                .arg("-m755")
                .args([src, ssh])
                .status();
            assert!(installed.is_ok_and(|s| s.success()), "install the fake ssh");
            Fake(dir, mark)
        }
        fn read(&self, name: &str) -> Option<String> {
            std::fs::read_to_string(self.0.join(name)).ok()
        }
        fn pid(&self) -> Option<String> {
            Some(self.read("pid")?.trim().to_string()).filter(|p| !p.is_empty())
        }
        /// The label for a run directory whose `device-info.json` is `text` (none: absent).
        fn label(&self, text: Option<&str>, user: Option<&str>) -> String {
            if let Some(text) = text {
                std::fs::write(self.0.join(DEVICE_INFO_FILE), text).expect("write device-info");
            }
            ReleaseProbe::start_from(&self.0.join("ssh"), &self.0, user).wait_label(SSH_LIMIT)
        }
        fn start(&self, limit: Duration) -> ReleaseProbe {
            ReleaseProbe::start_with(&self.0.join("ssh"), "10.0.0.1", "ubuntu", limit)
        }
        fn wait_for_pid(&self) -> String {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.pid() {
                    Some(pid) => return pid,
                    None => assert!(Instant::now() < deadline, "the fake ssh never started"),
                }
                thread::sleep(POLL);
            }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let ours = |pid: &String| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(&self.1)
            };
            if let Some(pid) = self.pid().filter(ours) {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn info(ip: &str) -> String {
        format!(r#"{{"device_info": {{"device_ip": {ip}, "other": 1}}}}"#)
    }

    #[test]
    fn labels_follow_the_os_release_fields() {
        let cases = [
            (
                "NAME=\"Ubuntu Core\"\nVERSION_ID=\"22\"\nVERSION=\"22\"",
                "Core 22",
            ),
            (NOBLE, "24.04.1"),
            (
                "NAME=Ubuntu\nVERSION_ID=22.04\nVERSION=\"22.04 LTS (Jammy)\"",
                "22.04",
            ),
            (
                "VERSION_ID=\"22.04\"\nPRETTY_NAME=\"Ubuntu 22.04.5 LTS\"",
                "22.04.5",
            ),
            (
                "VERSION_ID=22.04\nVERSION=\nPRETTY_NAME=\"Ubuntu 22.04.5\"",
                "22.04",
            ),
            ("VERSION_ID=11\nVERSION=\"v111.2 then 11.30\"", "11.2"),
            ("VERSION_ID=\"20.04\"\nVERSION=20.04.6x", "20.04.6"),
            ("NAME=\"Ubuntu Core\"\nVERSION_ID=\"\"", "unknown"),
            ("VERSION_ID=\nVERSION=\"24.04.1\"", "unknown"),
            (
                "  VERSION_ID=\"24.04\"  \r\n\n\njunk\n=\nVERSION=24.04.2",
                "24.04.2",
            ),
            ("VERSION_ID='24.04'", "'24.04'"),
            ("VERSION_ID =24.04", "unknown"),
            ("VERSION_ID=1\nVERSION_ID=2", "2"),
            ("", "unknown"),
            ("\u{0}\u{ff}=\u{7}\n==\n\"", "unknown"),
        ];
        for (text, want) in cases {
            assert_eq!(release_label(text), want, "for {text:?}");
        }
        let huge = "\u{fffd}=\"".repeat(1 << 18) + "\nVERSION=1.2\n\0\n";
        assert_eq!(release_label(&huge), "unknown");
    }

    #[test]
    fn no_usable_device_ip_runs_no_ssh() {
        let empty = [
            None,
            Some("{not json"),
            Some("[1]"),
            Some("{}"),
            Some(r#"{"device_info": 1}"#),
        ];
        let cases = empty.map(|text| (text.map(str::to_string), None, ""));
        let unknown = [
            "42",
            r#""-p22""#,
            r#""-oProxyCommand=x""#,
            r#""a b""#,
            r#""u@h""#,
            r#""h\nx""#,
        ];
        let cases = cases
            .into_iter()
            .chain(["null", r#""""#].map(|ip| (Some(info(ip)), None, "")));
        let cases = cases.chain(unknown.map(|ip| (Some(info(ip)), None, "unknown")));
        let users = ["-lroot", "-oProxyCommand=x", "a b", "a@b", ""];
        let cases =
            cases.chain(users.map(|user| (Some(info("\"10.0.0.1\"")), Some(user), "unknown")));
        for (text, user, want) in cases {
            let fake = Fake::new("echo VERSION_ID=1");
            assert_eq!(
                fake.label(text.as_deref(), user),
                want,
                "for {text:?} and {user:?}"
            );
            assert_eq!(
                fake.read("marker"),
                None,
                "ssh ran for {text:?} and {user:?}"
            );
        }
    }

    #[test]
    fn asks_the_dut_with_upstream_options() {
        let fake = Fake::new(&format!("cat <<'EOF'\n{NOBLE}\nEOF"));
        assert_eq!(
            fake.label(Some(&info("\"10.1.2.3\"")), Some("tester")),
            "24.04.1"
        );
        let want = "-o\nStrictHostKeyChecking=no\n-o\nUserKnownHostsFile=/dev/null\n-o\nConnectTimeout=10\n-o\nBatchMode=yes\n-o\nLogLevel=ERROR\ntester@10.1.2.3\ncat /etc/os-release\n";
        assert_eq!(fake.read("argv").as_deref(), Some(want));
        let fake = Fake::new("echo VERSION_ID=9");
        assert_eq!(fake.label(Some(&info("\"fe80::1%eth0\"")), None), "9");
        let argv = fake.read("argv").unwrap_or_default();
        assert!(argv.lines().any(|l| l == "ubuntu@fe80::1%eth0"), "{argv}");
    }

    #[test]
    fn failures_give_unknown() {
        let bodies = [
            "echo 'Permission denied (publickey).' >&2; exit 255",
            "printf 'VERSION_ID=\\377\\n'",
            "head -c 200000 /dev/zero | tr '\\0' a; echo; echo VERSION_ID=1",
            "kill -9 $$",
        ];
        for body in bodies {
            let fake = Fake::new(body);
            assert_eq!(
                fake.start(SSH_LIMIT).wait_label(SSH_LIMIT),
                "unknown",
                "for {body:?}"
            );
            assert_eq!(
                fake.read("marker").as_deref(),
                Some("ran\n"),
                "for {body:?}"
            );
        }
        let missing = Path::new("/nonexistent/tf-release/ssh");
        let probe = ReleaseProbe::start_with(missing, "h", "u", SSH_LIMIT);
        assert_eq!(probe.wait_label(SSH_LIMIT), "unknown");
    }

    #[test]
    fn a_hanging_ssh_is_killed_and_reaped() {
        let short = Duration::from_millis(200);
        for (wait, limit) in [(short, SSH_LIMIT), (SSH_LIMIT, short)] {
            let fake = Fake::new(HANG);
            let probe = fake.start(limit);
            let pid = fake.wait_for_pid();
            if limit == SSH_LIMIT {
                assert_eq!(probe.try_label(), None);
                // Its own process group: field 5 of /proc/<pid>/stat (after "(comm)").
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let pgrp = stat.rsplit(") ").next().and_then(|f| f.split(' ').nth(2));
                assert_eq!(pgrp, Some(pid.as_str()), "{stat}");
            }
            let started = Instant::now();
            assert_eq!(probe.wait_label(wait), "unknown");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{:?}",
                started.elapsed()
            );
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "pid {pid} is left"
            );
        }
        let fake = Fake::new(HANG);
        let probe = fake.start(SSH_LIMIT);
        let pid = fake.wait_for_pid();
        drop(probe);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived the drop"
        );
    }
}
