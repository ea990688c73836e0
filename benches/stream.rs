//! Live-output throughput beside its limit, into the same server:
//!
//! * daemon: the agent binary runs a job whose test phase prints SIZE bytes
//!   (`yes LINE | head -c SIZE`); time from the agent's start to the job complete;
//! * streamer alone: the library's `HttpServer` sends a log of the same bytes already on
//!   disk (no command competing for the CPU), from the note to the last fragment accepted;
//! * bare poster: the same bytes as 1 MiB fragments, each body built in one reused buffer
//!   and posted with the same HTTP client (ureq), one after the other on one connection,
//!   as fast as it can;
//! * with `TF_BENCH_SWEEP=1`, a sweep of the streamer alone over fragment sizes, with and
//!   without preparing the next fragment while one is on the wire.
//!
//! Alternating rounds; the fastest of each. The server holds exactly the bytes printed, in
//! order, after every daemon and streamer run (checked, printed).
//!
//! Run with `cargo bench --bench stream [-- SIZE_MB [ROUNDS]]` (default 200 MB, 3 rounds)
//! against the in-process fake server. With `TF_BENCH_SERVER=http://host:port` (and
//! `TF_BENCH_TOKEN_FILE=<refresh-token file>` when it wants a token), against that server
//! instead, e.g. a real Testflinger server on loopback; jobs go to queue `bench-stream`.
//! `TF_BENCH_RESET=<shell command>` is run before every run against it (e.g. the real-server
//! kit's `reset.sh`: a server whose store grows with every run slows down run by run).
//! `TF_BENCH_CONTENT=zeros`: the phase prints NUL bytes (`head -c SIZE /dev/zero`), the
//! worst case for escaping (six bytes of JSON a byte), instead of 100-byte lines.
//! `TF_BENCH_SWEEP=1024,4096` sweeps those sizes (KiB) only. `TF_BENCH_AGENT=<binary>`
//! runs another build of the agent in the daemon rounds (e.g. an older one, for a before and
//! after on the same machine). `TF_BENCH_DEBUG=1` says what
//! the server holds when a daemon run's output is not all there.
//!
//! Prints human text and one `FIGURE name=value unit=...` line per figure. Asserts nothing.

#[allow(dead_code)]
mod common;
use testflinger_agent_test_support as support;

use serde_json::{json, Value};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::fake_server::{FakeServer, Route, DEFAULT_REFRESH_TOKEN};
use support::scratch::Scratch;
use testflinger_agent::phase::Phase;
use testflinger_agent::server::http::{HttpServer, HttpSettings, FRAGMENT_SIZE};
use testflinger_agent::server::Server as _;

const BIN: &str = env!("CARGO_BIN_EXE_testflinger-agent");
/// The line the test phase prints (with its newline: 100 bytes).
const LINE: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
/// The bare poster's fragment size, as upstream sends serial logs.
const BARE_FRAGMENT: usize = 1024 * 1024;
const QUEUE: &str = "bench-stream";

fn figure(name: &str, value: f64, unit: &str) {
    println!("FIGURE {name}={value:.3} unit={unit}");
}

/// CPU time of the process's live-output threads (the streamer).
fn streamer_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("live-output"))
        })
        .map(|t| {
            common::stat_cpu_seconds(
                &std::fs::read_to_string(t.path().join("stat")).unwrap_or_default(),
            )
        })
        .sum()
}

/// The server the figures are taken against: a fresh fake server per run, or one at a URL.
enum Target {
    Fake,
    Url {
        url: String,
        token_file: Option<PathBuf>,
    },
}

/// One run's server.
struct Endpoint {
    fake: Option<FakeServer>,
    url: String,
    token_file: Option<PathBuf>,
}

impl Endpoint {
    fn open(target: &Target, scratch: &Scratch) -> Endpoint {
        match target {
            Target::Fake => {
                let fake = FakeServer::start();
                let token = scratch.write(
                    "token.json",
                    &json!({"refresh_token": DEFAULT_REFRESH_TOKEN}).to_string(),
                );
                Endpoint {
                    url: fake.url(),
                    fake: Some(fake),
                    token_file: Some(token),
                }
            }
            Target::Url { url, token_file } => {
                if let Some(reset) = std::env::var_os("TF_BENCH_RESET") {
                    let status = Command::new("sh")
                        .arg("-c")
                        .arg(&reset)
                        .stdout(Stdio::null())
                        .status();
                    if !status.as_ref().is_ok_and(|s| s.success()) {
                        eprintln!("TF_BENCH_RESET failed: {status:?}");
                    }
                }
                Endpoint {
                    fake: None,
                    url: url.clone(),
                    token_file: token_file.clone(),
                }
            }
        }
    }

    fn submit_job(&self) -> String {
        let job = json!({"job_queue": QUEUE, "test_data": {"test_cmds": "x"}});
        if let Some(fake) = &self.fake {
            return fake.submit_job(job);
        }
        let mut response = ureq::post(&format!("{}/v1/job", self.url))
            .send_json(&job)
            .expect("the server takes the job");
        let answer: Value = response
            .body_mut()
            .read_json()
            .expect("a job submission answers JSON");
        answer["job_id"]
            .as_str()
            .expect("a job submission answers a job_id")
            .to_string()
    }

    /// The text of the job's `output` log, rebuilt by the server.
    fn output_text(&self, id: &str) -> String {
        if let Some(fake) = &self.fake {
            return fake.log_text(id, "output");
        }
        let Ok(mut response) = ureq::get(&format!("{}/v1/result/{id}/log/output", self.url))
            .config()
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .call()
        else {
            return String::new();
        };
        let answer: Value = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_json()
            .unwrap_or(Value::Null);
        let mut text = String::new();
        if let Some(phases) = answer["output"].as_object() {
            for phase in [
                "setup",
                "provision",
                "firmware_update",
                "test",
                "allocate",
                "reserve",
                "cleanup",
            ] {
                text.push_str(
                    phases
                        .get(phase)
                        .and_then(|p| p["log_data"].as_str())
                        .unwrap_or(""),
                );
            }
        }
        text
    }

    /// An access token for the bare poster.
    fn bearer(&self) -> Option<String> {
        if let Some(fake) = &self.fake {
            return Some(fake.issue_access_token());
        }
        let text = std::fs::read_to_string(self.token_file.as_ref()?).ok()?;
        let token: Value = serde_json::from_str(&text).ok()?;
        let mut response = ureq::post(&format!("{}/v1/oauth2/refresh", self.url))
            .send_json(json!({"refresh_token": token["refresh_token"]}))
            .ok()?;
        let answer: Value = response.body_mut().read_json().ok()?;
        answer["access_token"].as_str().map(str::to_string)
    }

    /// The agent record's `job_id` (cheap to read on any server, unlike the job's result,
    /// which the real server rebuilds with all of its output).
    fn agent_job(&self, agent: &str) -> Option<String> {
        if let Some(fake) = &self.fake {
            return fake
                .agent_record(agent)
                .and_then(|r| r["job_id"].as_str().map(str::to_string));
        }
        let mut response = ureq::get(&format!("{}/v1/agents/data/{agent}", self.url))
            .call()
            .ok()?;
        let record: Value = response.body_mut().read_json().ok()?;
        record["job_id"].as_str().map(str::to_string)
    }

    /// The job's state, read from the head of its result.
    fn job_state(&self, id: &str) -> Option<String> {
        if let Some(fake) = &self.fake {
            return fake.job_state(id);
        }
        let mut response = ureq::get(&format!("{}/v1/result/{id}", self.url))
            .call()
            .ok()?;
        let mut head = Vec::new();
        // The real server sorts its keys: `job_state` comes before the test phase's log.
        let _ = response
            .body_mut()
            .as_reader()
            .take(256 * 1024)
            .read_to_end(&mut head);
        let text = String::from_utf8_lossy(&head);
        let after = text.split_once("\"job_state\"")?.1;
        let value = after
            .trim_start()
            .strip_prefix(':')?
            .trim_start()
            .strip_prefix('"')?;
        value.split_once('"').map(|(state, _)| state.to_string())
    }
}

/// One daemon run's figures.
struct DaemonRun {
    /// Agent start to job complete.
    secs: f64,
    cpu: f64,
    /// Of which the live-output threads.
    stream_cpu: f64,
    rss_kib: u64,
    fragments: Option<usize>,
    intact: bool,
}

fn daemon_run(target: &Target, data: &[u8]) -> DaemonRun {
    let scratch = Scratch::new("bench-stream");
    let server = Endpoint::open(target, &scratch);
    let agent_id = format!("bench-stream-{}", std::process::id());
    let id = server.submit_job();
    let command = if zeros() {
        format!("head -c {} /dev/zero", data.len())
    } else {
        format!("yes {LINE} | head -c {}", data.len())
    };
    let config = scratch.config(&format!(
        "agent_id: {agent_id}\nserver_address: {}\njob_queues: [{QUEUE}]\nlogging_quiet: true\n\
         polling_interval: 1\ntest_command: {command}\n",
        server.url,
    ));
    let started = Instant::now();
    let bin = std::env::var_os("TF_BENCH_AGENT").unwrap_or_else(|| BIN.into());
    let mut command = Command::new(bin);
    command.arg("-c").arg(config);
    if let Some(token) = &server.token_file {
        command.arg("--token-file").arg(token);
    }
    let mut agent = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the agent starts");
    // The agent record names the job while it runs and nothing once it is over.
    let deadline = started + Duration::from_secs(600);
    let mut seen = false;
    while Instant::now() < deadline {
        let job = server.agent_job(&agent_id);
        if job.as_deref() == Some(id.as_str()) {
            seen = true;
        } else if seen && job.as_deref() == Some("") {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = common::cpu_seconds(agent.id());
    let stream_cpu = streamer_cpu_seconds(agent.id());
    let rss_kib = common::status_kib(agent.id(), "VmHWM");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();
    let complete = server.job_state(&id).as_deref() == Some("complete");
    let fragments = server.fake.as_ref().map(|f| {
        f.requests()
            .iter()
            .filter(|r| r.route == Some(Route::LogPost))
            .count()
    });
    // The phase's log is the banner, then what the command printed.
    let printed = std::str::from_utf8(data).expect("the printed bytes are ASCII or NUL");
    let text = server.output_text(&id);
    let intact = complete && text.contains(printed) && text.len() < data.len() + 4096;
    if !intact && std::env::var_os("TF_BENCH_DEBUG").is_some() {
        eprintln!(
            "complete {complete}, {} bytes, starting {:?}",
            text.len(),
            text.chars().take(200).collect::<String>()
        );
    }
    DaemonRun {
        secs,
        cpu,
        stream_cpu,
        rss_kib,
        fragments,
        intact,
    }
}

/// The streamer alone: a log of `data` already on disk, noted at once, finished and
/// drained. Returns seconds from the note to the last fragment accepted, and whether the
/// server then holds exactly `data`.
fn streamer_run(
    target: &Target,
    data: &[u8],
    fragment_size: usize,
    prepare_ahead: bool,
) -> (f64, f64, bool) {
    let scratch = Scratch::new("bench-streamer");
    let server = Endpoint::open(target, &scratch);
    let mut settings = HttpSettings::new(&server.url, "bench-streamer");
    settings.token_file = server.token_file.clone();
    settings.fragment_size = fragment_size;
    settings.prepare_ahead = prepare_ahead;
    let client = HttpServer::new(settings);
    let id = server.submit_job();
    let log = scratch.path("test.log");
    std::fs::write(&log, data).expect("write the log");
    // The first request fetches a token: not part of the figure.
    let _ = client.agent_record();
    let started = Instant::now();
    client.output(&id, Phase::Test, &[], &log, data.len() as u64);
    client.finish_output(&id, Phase::Test);
    let drained = client.drain(&id, Duration::from_secs(600));
    let secs = started.elapsed().as_secs_f64();
    // This client's live-output threads (those of earlier clients have ended).
    let cpu = streamer_cpu_seconds(std::process::id());
    drop(client);
    let intact = drained && server.output_text(&id).as_bytes() == data;
    (secs, cpu, intact)
}

/// The bare poster: returns the seconds for all fragments.
fn bare_run(target: &Target, data: &[u8]) -> f64 {
    let scratch = Scratch::new("bench-bare");
    let server = Endpoint::open(target, &scratch);
    let bearer = server.bearer();
    // Any job id: the server stores fragments without looking the job up.
    let id = "00000000-0000-4000-8000-00000000b0a7";
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let endpoint = format!("{}/v1/result/{id}/log/output", server.url);
    let mut body = Vec::with_capacity(BARE_FRAGMENT * 2);
    let started = Instant::now();
    for (number, chunk) in data.chunks(BARE_FRAGMENT).enumerate() {
        body.clear();
        let text = std::str::from_utf8(chunk).expect("the printed bytes are ASCII or NUL");
        body.extend_from_slice(
            format!(
                "{{\"fragment_number\":{number},\"timestamp\":\"2026-01-05T10:00:00.000000+00:00\",\
                 \"phase\":\"test\",\"log_data\":"
            )
            .as_bytes(),
        );
        serde_json::to_writer(&mut body, text).expect("serialising to a Vec cannot fail");
        body.push(b'}');
        let mut request = agent
            .post(&endpoint)
            .header("Content-Type", "application/json");
        if let Some(token) = &bearer {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        match request.send(&body[..]) {
            Ok(response) if response.status().as_u16() == 200 => {
                let _ = response.into_body().read_to_vec();
            }
            Ok(response) => panic!("the bare poster got {}", response.status()),
            Err(e) => panic!("the bare poster failed: {e}"),
        }
    }
    started.elapsed().as_secs_f64()
}

/// Whether the phase prints NUL bytes (`TF_BENCH_CONTENT=zeros`).
fn zeros() -> bool {
    std::env::var("TF_BENCH_CONTENT").is_ok_and(|c| c == "zeros")
}

/// The bytes the test phase prints, `size` of them.
fn printed(size: u64) -> Vec<u8> {
    if zeros() {
        return vec![0; size as usize];
    }
    let mut out = Vec::with_capacity(size as usize);
    while (out.len() as u64) < size {
        out.extend_from_slice(LINE.as_bytes());
        out.push(b'\n');
    }
    out.truncate(size as usize);
    out
}

fn fastest(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(f64::INFINITY, f64::min)
}

/// The streamer alone with other fragment sizes, with and without preparing ahead:
/// alternating rounds, the fastest of each.
fn sweep(target: &Target, data: &[u8], rounds: u64) {
    // `TF_BENCH_SWEEP=1024,2048` (KiB) picks the sizes.
    let mut sizes: Vec<usize> = std::env::var("TF_BENCH_SWEEP")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kib| kib.trim().parse::<usize>().ok())
        .filter(|kib| *kib >= 16)
        .map(|kib| kib * 1024)
        .collect();
    if sizes.is_empty() {
        sizes = [256, 1024, 2048, 4096, 8192].map(|kib| kib * 1024).to_vec();
    }
    let mut best = vec![[f64::INFINITY; 2]; sizes.len()];
    for _ in 0..rounds {
        for (i, size) in sizes.iter().enumerate() {
            for (j, ahead) in [false, true].into_iter().enumerate() {
                let (secs, _, intact) = streamer_run(target, data, *size, ahead);
                if intact {
                    best[i][j] = best[i][j].min(secs);
                }
            }
        }
    }
    let mb = data.len() as f64 / 1e6;
    println!("streamer alone by fragment size, fastest of {rounds} alternating rounds:");
    for (size, [serial, ahead]) in sizes.iter().zip(&best) {
        let kib = size / 1024;
        println!(
            "  {kib:>5} KiB fragments: {:.1} MB/s one after the other, {:.1} MB/s preparing ahead",
            mb / serial,
            mb / ahead
        );
        figure(
            &format!("sweep_streamer_{kib}k_serial_mb_per_s"),
            mb / serial,
            "MB/s",
        );
        figure(
            &format!("sweep_streamer_{kib}k_ahead_mb_per_s"),
            mb / ahead,
            "MB/s",
        );
    }
}

fn main() {
    let mut numbers = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u64>().ok());
    let size_mb = numbers.next().unwrap_or(200);
    let rounds = numbers.next().unwrap_or(3).max(1);
    let size = size_mb * 1_000_000;
    let target = match std::env::var("TF_BENCH_SERVER") {
        Ok(url) => Target::Url {
            url,
            token_file: std::env::var_os("TF_BENCH_TOKEN_FILE").map(PathBuf::from),
        },
        Err(_) => Target::Fake,
    };
    let where_ = match &target {
        Target::Fake => "the fake server".to_string(),
        Target::Url { url, .. } => url.clone(),
    };
    let data = printed(size);
    let mb = size as f64 / 1e6;
    let mut daemon = Vec::new();
    let mut alone = Vec::new();
    let mut alone_cpu = Vec::new();
    let mut bare = Vec::new();
    let mut intact = true;
    for round in 1..=rounds {
        let run = daemon_run(&target, &data);
        println!(
            "round {round}: daemon {:.1} MB/s end to end ({:.2} s), agent CPU {:.2} s (live-output \
             threads {:.2} s), peak RSS {} KiB{}, server holds the output: {}",
            mb / run.secs,
            run.secs,
            run.cpu,
            run.stream_cpu,
            run.rss_kib,
            run.fragments.map_or(String::new(), |n| format!(", {n} log posts")),
            run.intact
        );
        intact &= run.intact;
        daemon.push(run);
        let (secs, cpu, ok) = streamer_run(&target, &data, FRAGMENT_SIZE, true);
        println!(
            "round {round}: streamer alone {:.1} MB/s ({secs:.2} s), its CPU {cpu:.2} s, server \
             holds the output: {ok}",
            mb / secs
        );
        intact &= ok;
        alone.push(secs);
        alone_cpu.push(cpu);
        let secs = bare_run(&target, &data);
        println!(
            "round {round}: bare poster {:.1} MB/s ({secs:.2} s)",
            mb / secs
        );
        bare.push(secs);
    }
    let best_daemon = fastest(daemon.iter().map(|r| r.secs));
    let best_alone = fastest(alone.iter().copied());
    let best_bare = fastest(bare.iter().copied());
    let gb = mb / 1000.0;
    let cpu_per_gb = fastest(daemon.iter().map(|r| r.cpu)) / gb;
    let stream_cpu_per_gb = fastest(daemon.iter().map(|r| r.stream_cpu)) / gb;
    let alone_cpu_per_gb = fastest(alone_cpu.iter().copied()) / gb;
    let rss = daemon.iter().map(|r| r.rss_kib).max().unwrap_or(0);
    println!(
        "{size_mb} MB into {where_}, fastest of {rounds} alternating rounds: daemon {:.1} MB/s end \
         to end ({:.2} of the bare poster), streamer alone {:.1} MB/s ({:.2}), bare poster {:.1} \
         MB/s; agent CPU {cpu_per_gb:.2} s per GB, of which live-output threads \
         {stream_cpu_per_gb:.2}; agent peak RSS {rss} KiB; every run delivered every byte in \
         order: {intact}",
        mb / best_daemon,
        best_bare / best_daemon,
        mb / best_alone,
        best_bare / best_alone,
        mb / best_bare,
    );
    figure("daemon_output_mb_per_s", mb / best_daemon, "MB/s");
    figure("streamer_alone_mb_per_s", mb / best_alone, "MB/s");
    figure("bare_poster_mb_per_s", mb / best_bare, "MB/s");
    figure("daemon_to_bare_ratio", best_bare / best_daemon, "ratio");
    figure(
        "streamer_alone_to_bare_ratio",
        best_bare / best_alone,
        "ratio",
    );
    figure("agent_cpu_s_per_gb", cpu_per_gb, "s/GB");
    figure("agent_stream_cpu_s_per_gb", stream_cpu_per_gb, "s/GB");
    figure("streamer_alone_cpu_s_per_gb", alone_cpu_per_gb, "s/GB");
    figure("agent_peak_rss_kib", rss as f64, "KiB");
    figure(
        "all_output_delivered",
        if intact { 1.0 } else { 0.0 },
        "bool",
    );
    if std::env::var_os("TF_BENCH_SWEEP").is_some_and(|v| v != "0") {
        sweep(&target, &data, rounds);
    }
}
