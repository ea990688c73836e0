//! The soak: short jobs back to back through the real binary against the fake server, with
//! faults injected (5xx, dropped connections, expired tokens, outages) and phase commands
//! whose trees fork, `setsid`, double-fork, clear their environment, ignore SIGTERM and
//! hold the output pipe. Shared by the soak test (tests/it/soak.rs) and the soak benchmark
//! (benches/soak.rs).
//!
//! Every `sleep` a job starts carries `1000.<soak marker><job number>` in its command line,
//! so the processes of one job are found (and, should any survive, killed) by what the soak
//! created, never by name. Jobs go in batches; between batches the agent is at rest (no
//! job, nothing queued), and its resident memory, open descriptors, threads and child
//! processes are read from `/proc`.

use crate::agent::{finished, queue, Agent};
use crate::fake_server::{FakeConfig, FakeServer, Route};
use crate::scratch::{living_carrying, KillByMarker, Scratch};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one job's phase commands do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Every phase echoes.
    Plain,
    /// The test leaves `artifacts/` to upload.
    Artifacts,
    /// The test forks a child and a grandchild that hold the output after it exits.
    Fork,
    /// The test starts a `setsid` escapee that holds the output.
    Setsid,
    /// The test double-forks: an orphan, adopted by the agent, holding the output.
    DoubleFork,
    /// The test leaves daemons that do not hold the output (`setsid`, `nohup`).
    Daemons,
    /// The test leaves an `env -i setsid` orphan: no phase token, another session.
    EnvCleared,
    /// The test leaves a child that ignores SIGTERM holding the output.
    HoldsIgnoringTerm,
    /// Setup fails: the job goes to cleanup.
    SetupFails,
    /// The test's tree ignores SIGTERM (in the group and in another session) and runs
    /// past the job's 1 s global timeout: SIGKILL after the grace period.
    IgnoresTermPastTimeout,
}

impl Kind {
    /// The kind of job number `n`.
    pub fn of(n: usize) -> Kind {
        if n % 200 == 199 {
            return Kind::IgnoresTermPastTimeout;
        }
        match n % 9 {
            0 => Kind::Plain,
            1 => Kind::Fork,
            2 => Kind::Setsid,
            3 => Kind::DoubleFork,
            4 => Kind::Daemons,
            5 => Kind::EnvCleared,
            6 => Kind::HoldsIgnoringTerm,
            7 => Kind::SetupFails,
            _ => Kind::Artifacts,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Artifacts => "artifacts",
            Kind::Fork => "fork",
            Kind::Setsid => "setsid",
            Kind::DoubleFork => "doublefork",
            Kind::Daemons => "daemons",
            Kind::EnvCleared => "envcleared",
            Kind::HoldsIgnoringTerm => "holdsignoring",
            Kind::SetupFails => "setupfails",
            Kind::IgnoresTermPastTimeout => "ignorespast",
        }
    }

    /// The phase scripts of this kind (sourced by `phase.sh`, `$T` is the job's marked
    /// sleep argument); phases without one just echo.
    fn scripts(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::Plain => &[],
            Kind::Artifacts => &[(
                "test",
                "mkdir -p artifacts; echo report > artifacts/report.txt; echo test ok\n",
            )],
            Kind::Fork => &[(
                "test",
                "sleep $T & sh -c \"sleep $T & wait\" & echo forked\n",
            )],
            Kind::Setsid => &[("test", "setsid sleep $T & echo escaped\n")],
            Kind::DoubleFork => &[("test", "( ( sleep $T & ) & ); echo double-forked\n")],
            Kind::Daemons => &[(
                "test",
                "setsid sleep $T >/dev/null 2>&1 </dev/null & nohup sleep $T >/dev/null 2>&1 & echo daemons\n",
            )],
            Kind::EnvCleared => &[(
                "test",
                "env -i setsid sleep $T >/dev/null 2>&1 </dev/null & echo env-cleared\n",
            )],
            Kind::HoldsIgnoringTerm => &[(
                "test",
                "sh -c \"trap '' TERM; exec sleep $T\" & echo held\n",
            )],
            Kind::SetupFails => &[("setup", "echo setup failed; exit 1\n")],
            Kind::IgnoresTermPastTimeout => &[(
                "test",
                "sh -c \"trap '' TERM; exec sleep $T\" & setsid sh -c \"trap '' TERM; exec sleep $T\" & echo ignoring; wait\n",
            )],
        }
    }

    /// The statuses the server must end up with.
    pub fn expected_status(self) -> Value {
        match self {
            Kind::SetupFails => json!({"setup": 1, "cleanup": 0}),
            Kind::IgnoresTermPastTimeout => json!({"setup": 0, "test": 247, "cleanup": 0}),
            _ => json!({"setup": 0, "test": 0, "cleanup": 0}),
        }
    }

    const ALL: [Kind; 10] = [
        Kind::Plain,
        Kind::Artifacts,
        Kind::Fork,
        Kind::Setsid,
        Kind::DoubleFork,
        Kind::Daemons,
        Kind::EnvCleared,
        Kind::HoldsIgnoringTerm,
        Kind::SetupFails,
        Kind::IgnoresTermPastTimeout,
    ];
}

/// The faults injected once job `n - 1` has finished, repeating every 200 jobs: each kind
/// once or twice (a failed request costs the agent its retry back-off, about a second).
fn inject(server: &FakeServer, n: usize) {
    match n % 200 {
        10 | 110 => server.fail_next(Route::ResultPost, 1, 500),
        30 | 130 => server.fail_next(Route::LogPost, 2, 503),
        50 | 150 => server.drop_next(Route::Any, 1),
        70 => {
            server.fail_next(Route::AgentDataGet, 1, 500);
            server.fail_next(Route::JobPoll, 1, 502);
        }
        90 | 170 => server.expire_all_tokens(),
        100 => {
            // An outage: every connection refused for a while. It starts between requests:
            // an answer cut after the server dequeued a job would lose that job for good
            // (no agent can ask for it again), which is the server's loss, not the agent's.
            server.go_down_between_requests();
            std::thread::sleep(Duration::from_millis(400));
            server.come_back();
        }
        188 => {
            server.drop_next(Route::ArtifactPost, 1);
            server.fail_next(Route::AgentDataPost, 1, 503);
        }
        _ => {}
    }
}

/// The agent's use of the machine at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Jobs finished so far.
    pub jobs: usize,
    pub rss_kib: u64,
    /// Open file descriptors (`/proc/<pid>/fd`), sockets included.
    pub fds: usize,
    /// Of which sockets (pooled keep-alive connections to the server).
    pub sockets: usize,
    /// Threads (`/proc/<pid>/task`).
    pub threads: usize,
    /// Child processes, zombies included.
    pub children: usize,
    /// CPU time the agent has used so far (user + system), in milliseconds.
    pub cpu_ms: u64,
}

/// What a soak run saw.
#[derive(Debug)]
pub struct SoakReport {
    /// At rest after each batch, the first after the first job.
    pub samples: Vec<Usage>,
    pub elapsed: Duration,
    /// Jobs whose final state or statuses on the server are not the expected ones.
    pub wrong: Vec<String>,
    /// Jobs with processes alive once the job had finished, and the processes' pids.
    pub survivors: Vec<(usize, Vec<i32>)>,
    /// Processes of the soak alive at the end.
    pub left_at_end: Vec<i32>,
    /// Jobs of the kind that runs past its timeout whose processes were seen alive, by
    /// their marker, while the job ran: the proof that the survivor check can see them.
    pub seen_alive: Vec<usize>,
    /// Requests answered with each status the faults produce (0: dropped; 401: expired
    /// token; 5xx).
    pub faults_seen: BTreeMap<u16, usize>,
    /// How many jobs of each kind ran.
    pub kinds: BTreeMap<Kind, usize>,
    /// Run directories or spooled reports left behind.
    pub leftover_dirs: Vec<String>,
}

impl SoakReport {
    pub fn baseline(&self) -> Usage {
        self.samples[0]
    }

    pub fn end(&self) -> Usage {
        self.samples[self.samples.len() - 1]
    }
}

fn kib_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map_or(0, |d| d.count())
}

fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| {
        dir.flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
            })
            .count()
    })
}

/// User + system CPU time of `pid`, in milliseconds (fields 14 and 15 of its stat, in
/// clock ticks of 10 ms on Linux).
fn cpu_ms(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = text.rfind(')').map_or("", |i| &text[i + 1..]);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum::<u64>() * 10
}

fn children(pid: u32) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            count += 1;
        }
    }
    count
}

/// The agent's usage now.
pub fn usage_now(pid: u32, jobs: usize) -> Usage {
    Usage {
        jobs,
        rss_kib: kib_field(pid, "VmRSS:"),
        fds: count_dir(&format!("/proc/{pid}/fd")),
        sockets: sockets(pid),
        threads: count_dir(&format!("/proc/{pid}/task")),
        children: children(pid),
        cpu_ms: cpu_ms(pid),
    }
}

/// The agent's usage at rest: the smallest of a few readings over half a second, so a
/// request or a poll in flight at one reading does not count; whatever stays allocated
/// shows in all of them.
fn usage_at_rest(pid: u32, jobs: usize) -> Usage {
    let mut least = usage_now(pid, jobs);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        let now = usage_now(pid, jobs);
        least = Usage {
            jobs,
            rss_kib: least.rss_kib.min(now.rss_kib),
            fds: least.fds.min(now.fds),
            sockets: least.sockets.min(now.sockets),
            threads: least.threads.min(now.threads),
            children: least.children.min(now.children),
            cpu_ms: now.cpu_ms,
        };
    }
    least
}

/// A soak of `jobs` jobs in batches of `batch` (the first batch is one job, for the
/// baseline); `on_sample` sees each sample as it is taken. Panics (with the agent's log
/// kept) if a batch does not finish within `batch_limit`.
pub fn run(
    jobs: usize,
    batch: usize,
    batch_limit: Duration,
    mut on_sample: impl FnMut(&Usage),
) -> SoakReport {
    let server = Arc::new(FakeServer::start_with(FakeConfig::default()));
    // On a tmpfs when there is one: the agent's durable writes (a dozen fsyncs a job)
    // then cost nothing, and the soak measures the agent, not the disk.
    let shm = Path::new("/dev/shm");
    let scratch = if shm.is_dir() {
        Scratch::new_in(shm, "soak")
    } else {
        Scratch::new("soak")
    };
    let name = format!("soak-{}", std::process::id());
    let marker = scratch.marker();
    let _kill_leftovers = KillByMarker::new(&marker);
    let phase_script = write_scripts(&scratch, &marker);
    let mut commands = String::from(
        "logging_level: INFO\ntermination_grace_period: 1\nstraggler_wait_ms: 50\npolling_interval: 1\n",
    );
    // Provision and the others have no command: skipped, as cheap as a phase gets.
    for phase in ["setup", "test", "cleanup"] {
        commands.push_str(&format!(
            "{phase}_command: phase={phase}; . {}\n",
            phase_script.display()
        ));
    }
    let agent = Agent::start(&server, &scratch, &name, &commands);
    let pid = agent.child.id();
    let started = Instant::now();

    // Faults follow progress: once job n - 1 has finished, job n's faults are injected.
    let finished_count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let faults = {
        let server = Arc::clone(&server);
        let finished_count = Arc::clone(&finished_count);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut next = 1;
            while !done.load(Ordering::SeqCst) {
                while next <= finished_count.load(Ordering::SeqCst) {
                    inject(&server, next);
                    next += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let mut ids: Vec<String> = Vec::with_capacity(jobs);
    let mut samples = Vec::new();
    let mut survivors = Vec::new();
    let mut seen_alive = Vec::new();
    let mut kinds = BTreeMap::new();
    let mut checked = 0;
    let mut size = 1;
    while ids.len() < jobs {
        let end = (ids.len() + size).min(jobs);
        for n in ids.len()..end {
            let kind = Kind::of(n);
            *kinds.entry(kind).or_insert(0) += 1;
            ids.push(server.submit_job(job(&name, n, kind)));
        }
        size = batch;
        let deadline = Instant::now() + batch_limit;
        // Each job, once finished on the server, has no process left.
        while checked < ids.len() {
            if finished(&server, &ids[checked]) {
                let alive: Vec<i32> = living_carrying(job_marker(&marker, checked).as_bytes())
                    .into_iter()
                    .map(|(pid, _)| pid)
                    .collect();
                if !alive.is_empty() {
                    survivors.push((checked, alive));
                }
                checked += 1;
                finished_count.store(checked, Ordering::SeqCst);
                continue;
            }
            let long = Kind::of(checked) == Kind::IgnoresTermPastTimeout;
            if long && seen_alive.last() != Some(&checked) {
                let running = living_carrying(job_marker(&marker, checked).as_bytes());
                if running.len() >= 2 {
                    seen_alive.push(checked);
                }
            }
            if Instant::now() >= deadline {
                done.store(true, Ordering::SeqCst);
                panic!(
                    "job {checked} ({:?}, {}) did not finish within {batch_limit:?}; the agent's log ends:\n{}\n{}",
                    Kind::of(checked),
                    ids[checked],
                    log_tail(&scratch, &name),
                    server.request_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        wait_at_rest(&server, &scratch, &name);
        let sample = usage_at_rest(pid, checked);
        on_sample(&sample);
        samples.push(sample);
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let _ = faults.join();

    let wrong = ids
        .iter()
        .enumerate()
        .filter_map(|(n, id)| {
            let state = server.job_state(id);
            let status = server.result_data(id)["status"].clone();
            let expected = Kind::of(n).expected_status();
            (state.as_deref() != Some("complete") || status != expected).then(|| {
                format!(
                    "job {n} ({:?}): state {state:?}, status {status}, expected {expected}",
                    Kind::of(n)
                )
            })
        })
        .collect();
    let mut faults_seen = BTreeMap::new();
    for request in server.requests() {
        if matches!(request.status, 0 | 401 | 500..=599) {
            *faults_seen.entry(request.status).or_insert(0) += 1;
        }
    }
    let leftover_dirs = ["run", "results"]
        .iter()
        .flat_map(|dir| {
            std::fs::read_dir(scratch.path(dir))
                .into_iter()
                .flatten()
                .flatten()
                // The agent's lock file is hidden.
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path().display().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let left_at_end = KillByMarker::new(&marker).living();
    drop(agent);
    SoakReport {
        samples,
        elapsed,
        wrong,
        survivors,
        left_at_end,
        seen_alive,
        faults_seen,
        kinds,
        leftover_dirs,
    }
}

/// The last lines of the agent's log.
fn log_tail(scratch: &Scratch, name: &str) -> String {
    let log = std::fs::read_to_string(Agent::stderr_path(scratch, name)).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(200)..].join("\n")
}

/// The job of number `n`.
fn job(name: &str, n: usize, kind: Kind) -> Value {
    let mut job = json!({
        "job_queue": queue(name),
        "test_data": {"test_cmds": format!("soak:{}:{n:05}:", kind.name())},
    });
    if kind == Kind::IgnoresTermPastTimeout {
        job["global_timeout"] = json!(1);
    }
    job
}

/// What every `sleep` of job `n` carries in its command line.
fn job_marker(marker: &str, n: usize) -> String {
    format!("1000.{marker}{n:05}")
}

/// `phase.sh`, sourced by the phase command's shell with `$phase` set: reads the job's
/// kind and number from `testflinger.json` (with shell builtins: a plain phase forks
/// nothing) and sources that kind's script for the phase, if it has one.
fn write_scripts(scratch: &Scratch, marker: &str) -> std::path::PathBuf {
    let kinds = scratch.path("kinds");
    for kind in Kind::ALL {
        let dir = kinds.join(kind.name());
        std::fs::create_dir_all(&dir).expect("scratch is writable");
        for (phase, script) in kind.scripts() {
            std::fs::write(dir.join(format!("{phase}.sh")), script).expect("write a script");
        }
    }
    let phase_sh = format!(
        "IFS= read -r job < testflinger.json\n\
         spec=${{job#*'\"test_cmds\":\"soak:'}}\n\
         kind=${{spec%%:*}}; spec=${{spec#*:}}; n=${{spec%%:*}}\n\
         T=1000.{marker}$n\n\
         script={kinds}/$kind/$phase.sh\n\
         if [ -f \"$script\" ]; then . \"$script\"; else echo \"$phase ok\"; fi\n",
        kinds = kinds.display()
    );
    scratch.write("phase.sh", &phase_sh)
}

/// The agent is between jobs with nothing queued: every run directory reported, its record
/// `waiting` with no job.
fn wait_at_rest(server: &FakeServer, scratch: &Scratch, name: &str) {
    let empty = |dir: &Path| {
        std::fs::read_dir(dir).map_or(true, |d| {
            d.flatten()
                .all(|e| e.file_name().to_string_lossy().starts_with('.'))
        })
    };
    let rested = server.wait_until(Duration::from_secs(60), |srv| {
        empty(&scratch.path("run"))
            && empty(&scratch.path("results"))
            && srv.agent_record(name).is_some_and(|r| {
                r["state"] == json!("waiting") && r["job_id"].as_str().unwrap_or("").is_empty()
            })
    });
    assert!(rested, "the agent did not come to rest between batches");
}
