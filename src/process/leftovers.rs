//! Killing what a dead agent's phase left running: every process that carries the phase
//! token, whoever it was re-parented to (a restarted agent is not its ancestor, so it can
//! neither reap it nor rely on its process group alone: groups and pids are reused after a
//! reboot, the token is not).

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::sweep::{self, ProcStat};

/// How often the leftovers are rescanned while they are being ended.
const RESCAN: Duration = Duration::from_millis(10);
/// After SIGKILL, how long to wait for the kernel to finish them before giving up.
const KILL_BOUND: Duration = Duration::from_secs(5);

/// What [`kill_leftovers`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Distinct processes found alive and signalled.
    pub killed: usize,
    /// Of those, the members of the recorded process group.
    pub in_group: usize,
    /// SIGTERM was not enough within the grace period.
    pub needed_sigkill: bool,
    /// Processes still alive when it gave up (`KILL_BOUND` after SIGKILL): a process stuck
    /// in the kernel (uninterruptible sleep).
    pub survivors: usize,
}

/// Ends every living process whose environment holds `TESTFLINGER_PHASE_TOKEN=<token>`:
/// SIGTERM at once, SIGKILL to those still alive after `grace`, and waits until none is
/// alive (bounded). `pgid` is the group the phase ran in; only its members that carry the
/// token are touched (a reused group id never matches a fresh token), and they are counted
/// apart. Processes that appear meanwhile (a dying tree forking) are caught by the rescans.
pub fn kill_leftovers(token: &str, pgid: Option<i32>, grace: Duration) -> Leftovers {
    let entry = sweep::token_entry(token);
    let own_pid = std::process::id() as i32;
    let mut seen: Vec<(i32, u64)> = Vec::new();
    let mut done = Leftovers::default();
    let term_until = Instant::now() + grace;
    let mut kill_until: Option<Instant> = None;
    loop {
        let alive = carriers(&entry, own_pid);
        for stat in &alive {
            if !seen.contains(&(stat.pid, stat.starttime)) {
                seen.push((stat.pid, stat.starttime));
                done.killed += 1;
                if Some(stat.pgrp) == pgid {
                    done.in_group += 1;
                }
            }
            let signal = if kill_until.is_some() {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            };
            // Sent right after reading the process's environment: the pid is the one that
            // carries the token. ESRCH: it died in between.
            let _ = kill(Pid::from_raw(stat.pid), signal);
        }
        if alive.is_empty() {
            return done;
        }
        let now = Instant::now();
        match kill_until {
            None if now >= term_until => {
                done.needed_sigkill = true;
                kill_until = Some(now + KILL_BOUND);
                continue;
            }
            Some(until) if now >= until => {
                done.survivors = alive.len();
                log::warn!(
                    "{} process(es) carrying phase token {token} still alive {} s after SIGKILL",
                    alive.len(),
                    KILL_BOUND.as_secs()
                );
                return done;
            }
            _ => {}
        }
        std::thread::sleep(RESCAN);
    }
}

/// The living processes (zombies left out) whose environment holds `entry`.
fn carriers(entry: &[u8], own_pid: i32) -> Vec<ProcStat> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    let mut buf = Vec::with_capacity(4096);
    for item in dir.flatten() {
        let Some(pid) = item
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == own_pid {
            continue;
        }
        let Some(stat) = sweep::read_stat(pid, &mut buf) else {
            continue;
        };
        if !stat.is_alive() {
            continue;
        }
        buf.clear();
        let read = std::fs::File::open(format!("/proc/{pid}/environ"))
            .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut buf));
        if read.is_ok() && sweep::environ_has(&buf, entry) {
            found.push(stat);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn kills_token_carriers_including_a_sigterm_ignorer_and_an_escapee() {
        let token = format!("leftover-test-{}-{}", std::process::id(), line!());
        let mut shell = Command::new("/bin/sh")
            .arg("-c")
            .arg("trap '' TERM; setsid sleep 60 & sleep 60 & trap '' TERM; while :; do sleep 1; done")
            .env(sweep::TOKEN_VAR, &token)
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        let pgid = shell.id() as i32;
        let entry = sweep::token_entry(&token);
        let deadline = Instant::now() + Duration::from_secs(5);
        while carriers(&entry, std::process::id() as i32).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let done = kill_leftovers(&token, Some(pgid), Duration::from_millis(200));
        let _ = shell.wait();
        assert!(done.killed >= 3, "{done:?}");
        assert!(done.in_group >= 2, "{done:?}");
        assert!(done.needed_sigkill, "the shell ignores SIGTERM: {done:?}");
        assert_eq!(done.survivors, 0);
        assert!(carriers(&entry, std::process::id() as i32).is_empty());
    }

    #[test]
    fn nothing_to_kill_returns_at_once() {
        let started = Instant::now();
        let done = kill_leftovers("no-process-has-this-token", Some(1), Duration::from_secs(5));
        assert_eq!(done, Leftovers::default());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
