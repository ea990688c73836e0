//! The host charm's command line (`-c FILE -p PORT`) and the Prometheus metrics it scrapes,
//! through the real binary against the fake server: values and labels after real jobs,
//! `/health`, and a port already in use.

use crate::support::agent::{finished, queue, wait_for, write_daemon_files, Agent};
use crate::support::fake_server::{FakeConfig, FakeServer, Route};
use crate::support::loopback::{free_port, http_get as get};
use crate::support::scratch::Scratch;
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};
use serde_json::json;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::net::{TcpListener, TcpStream};

type Exposition = MetricsExposition<PrometheusType, PrometheusValue>;

/// A daemon started with exactly the charm's arguments (`-c FILE -p PORT`), `env` added;
/// killed on drop.
fn start_charm(
    config: &std::path::Path,
    port: u16,
    stderr: std::fs::File,
    env: &[(&str, Option<&str>)],
) -> Agent {
    let args: Vec<OsString> = vec![
        "-c".into(),
        config.into(),
        "-p".into(),
        port.to_string().into(),
    ];
    let mut env = env.to_vec();
    env.push(("TESTFLINGER_AGENT_STARTUP_FAILURE_DELAY", Some("0")));
    Agent::exec(&args, &env, stderr)
}

fn scrape(port: u16) -> Exposition {
    let (status, body) = get(port, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(status, 200, "{body}");
    parse_prometheus(&body).unwrap_or_else(|err| panic!("invalid exposition ({err:?}):\n{body}"))
}

/// Every sample of a counter family: sorted `label=value` pairs → value.
fn counters(e: &Exposition, name: &str) -> BTreeMap<Vec<(String, String)>, f64> {
    let family = e
        .families
        .get(name)
        .unwrap_or_else(|| panic!("no {name}; have {:?}", e.families.keys()));
    assert_eq!(family.family_type, PrometheusType::Counter, "{name}");
    let mut names = family.get_label_names().to_vec();
    names.sort();
    family
        .iter_samples()
        .map(|s| {
            let set = s.get_labelset().expect("labels");
            let labels = names
                .iter()
                .map(|n| (n.clone(), set.get_label_value(n).unwrap_or("").to_owned()))
                .collect();
            let PrometheusValue::Counter(c) = &s.value else {
                panic!("{name}: not a counter sample");
            };
            (labels, c.value.as_f64())
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn the_charms_command_line_serves_the_python_metrics_after_three_jobs() {
    let server = FakeServer::start_with(FakeConfig {
        require_auth: false,
        ..FakeConfig::default()
    });
    let s = Scratch::new("charm-metrics");
    let name = format!("charm-{}", std::process::id());
    // Provision fails when the job asks for it; the test phase exits 46 when asked to.
    let commands = "identifier: cid-7\nsetup_command: echo setup\nprovision_command: |\n  if grep -q please-fail testflinger.json; then exit 1; fi\n  echo provisioned\ntest_command: |\n  if grep -q please-46 testflinger.json; then exit 46; fi\n  echo tested\ncleanup_command: echo cleanup\n";
    let files = write_daemon_files(&server, &s, &name, commands);
    let port = free_port();
    let stderr = std::fs::File::create(s.path("agent.stderr")).expect("stderr file");
    let _agent = start_charm(&files.config, port, stderr, &[]);
    wait_for(&server, "the agent to poll", |srv| {
        srv.request_count(&Route::JobPoll) >= 1
    });

    let (status, health) = get(port, "/health").expect("health answers");
    assert_eq!(status, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).expect("health is JSON");
    assert_eq!(health["state"], "waiting", "{health}");

    let job = |marker: &str| {
        json!({
            "job_queue": queue(&name),
            "provision_data": {"url": marker},
            "test_data": {"test_cmds": marker},
        })
    };
    for marker in ["all-good", "please-fail", "please-46"] {
        let id = server.submit_job(job(marker));
        wait_for(&server, marker, |srv| finished(srv, &id));
    }
    // The last job took the device offline (exit 46); its metrics are recorded by then.
    wait_for(&server, "offline after exit 46", |srv| {
        srv.agent_record(&name)
            .is_some_and(|r| r["state"] == "offline")
    });

    let e = scrape(port);
    let agent = [("agent_id", name.as_str())];
    assert_eq!(
        counters(&e, "jobs_total"),
        BTreeMap::from([(pairs(&agent), 3.0)])
    );
    assert_eq!(
        counters(&e, "failures_total"),
        BTreeMap::from([
            (
                pairs(&[("agent_id", name.as_str()), ("test_phase", "provision")]),
                1.0
            ),
            (
                pairs(&[("agent_id", name.as_str()), ("test_phase", "test")]),
                1.0
            ),
        ])
    );
    assert_eq!(
        counters(&e, "recovery_failures_total"),
        BTreeMap::from([(pairs(&agent), 1.0)])
    );

    // Phase durations: every phase the job loop reached, skipped ones at 0 s; cleanup is
    // not observed (as in the Python agent).
    let durations = &e.families["phase_duration_seconds"];
    assert_eq!(durations.family_type, PrometheusType::Histogram);
    let mut counts = BTreeMap::new();
    for sample in durations.iter_samples() {
        let set = sample.get_labelset().expect("labels");
        assert_eq!(set.get_label_value("agent_id"), Some(name.as_str()));
        assert_eq!(set.get_label_value("identifier"), Some("cid-7"));
        assert_eq!(set.get_label_value("release"), Some(""));
        let phase = set.get_label_value("test_phase").expect("phase").to_owned();
        let PrometheusValue::Histogram(h) = &sample.value else {
            panic!("not a histogram sample");
        };
        // Each of these phases takes well under a minute: all in the first bucket.
        let first = h.buckets.first().expect("buckets");
        assert_eq!(first.upper_bound, 60.0);
        assert_eq!(Some(first.count.as_f64() as u64), h.count, "{phase}");
        counts.insert(phase, h.count.unwrap_or_default());
    }
    let expected: BTreeMap<String, u64> = [
        ("setup", 3),
        ("provision", 3),
        ("firmware_update", 2),
        ("test", 2),
        ("allocate", 1),
        ("reserve", 1),
    ]
    .into_iter()
    .map(|(p, n)| (p.to_owned(), n))
    .collect();
    assert_eq!(counts, expected);

    // Ours, beside them.
    let info = &e.families["testflinger_agent_info"];
    let sample = info.iter_samples().next().expect("one info sample");
    assert_eq!(
        sample
            .get_labelset()
            .expect("labels")
            .get_label_value("version"),
        Some(env!("CARGO_PKG_VERSION"))
    );
    for family in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "testflinger_agent_phase_commands_killed_total",
        "testflinger_agent_spooled_jobs",
        "testflinger_agent_output_backlog_bytes",
    ] {
        assert!(e.families.contains_key(family), "{family} is exposed");
    }
}

/// The metric names docs/operating.md's metrics table lists, with its Type column.
fn documented_families() -> Vec<(String, String)> {
    let guide = include_str!("../../docs/operating.md");
    let table = guide
        .split_once("| Metric | Type | Labels | Counts |")
        .expect("docs/operating.md has the metrics table")
        .1;
    let mut names = Vec::new();
    for row in table.lines().skip(2) {
        let Some(row) = row.strip_prefix("| ") else {
            break;
        };
        let (names_cell, rest) = row.split_once(" | ").expect("a table row has cells");
        let kind = rest.split(" | ").next().unwrap_or_default().to_owned();
        for name in names_cell.split(", ") {
            names.push((name.trim_matches('`').to_owned(), kind.clone()));
        }
    }
    assert!(names.len() > 10, "{names:?}");
    names
}

/// An idle agent's first scrape declares every family (HELP and TYPE), before any job or
/// failure: `failures_total` and `phase_duration_seconds` included, as the Python agent's
/// client does, so dashboards and `absent()` alerts see them at once. The names are the ones
/// docs/operating.md documents, and the scrape has no family it does not.
#[test]
fn an_idle_agents_first_scrape_declares_every_documented_family() {
    let server = FakeServer::start_with(FakeConfig {
        require_auth: false,
        ..FakeConfig::default()
    });
    let s = Scratch::new("charm-idle");
    let name = format!("charm-idle-{}", std::process::id());
    let files = write_daemon_files(&server, &s, &name, "test_command: echo x\n");
    let port = free_port();
    let stderr = std::fs::File::create(s.path("agent.stderr")).expect("stderr file");
    let mut agent = start_charm(&files.config, port, stderr, &[]);
    wait_for(&server, "the agent to poll", |srv| {
        srv.request_count(&Route::JobPoll) >= 1
    });
    let (status, text) = get(port, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(status, 200, "{text}");
    let e = parse_prometheus(&text)
        .unwrap_or_else(|err| panic!("invalid exposition ({err:?}):\n{text}"));
    let documented = documented_families();
    for (family, kind) in &documented {
        let found = e
            .families
            .get(family)
            .unwrap_or_else(|| panic!("no {family} in the first scrape:\n{text}"));
        assert!(!found.help.is_empty(), "{family} has a HELP line");
        let want = match found.family_type {
            PrometheusType::Counter => "counter",
            PrometheusType::Gauge => "gauge",
            PrometheusType::Histogram => "histogram",
            _ => "other",
        };
        assert!(
            kind.contains(want),
            "{family} is a {want}, docs/operating.md says {kind:?}"
        );
        assert!(
            text.contains(&format!("# TYPE {family} {want}\n")),
            "{family} has its TYPE line:\n{text}"
        );
    }
    for (family, expected) in [("failures_total", 0), ("phase_duration_seconds", 0)] {
        assert_eq!(
            e.families[family].iter_samples().count(),
            expected,
            "{family}: declared, no sample before any phase ran"
        );
    }
    let undocumented: Vec<&String> = e
        .families
        .keys()
        .filter(|k| !documented.iter().any(|(d, _)| d == *k))
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/operating.md: {undocumented:?}"
    );
    assert_eq!(agent.stop(), Some(0));
}

/// A hundred clients each sent half a request head to the agent's metrics port and wait.
/// A job still runs through to its outcome, and a scrape in the middle of it is answered
/// (the endpoint's thread waits on none of them, and the job loop never waits on it).
#[test]
fn slow_metrics_clients_neither_block_a_scrape_nor_a_job() {
    let server = FakeServer::start_with(FakeConfig {
        require_auth: false,
        ..FakeConfig::default()
    });
    let s = Scratch::new("charm-slow");
    let name = format!("charm-slow-{}", std::process::id());
    let files = write_daemon_files(
        &server,
        &s,
        &name,
        "setup_command: echo setup\ntest_command: echo tested\ncleanup_command: echo cleanup\n",
    );
    let port = free_port();
    let stderr = std::fs::File::create(s.path("agent.stderr")).expect("stderr file");
    let mut agent = start_charm(&files.config, port, stderr, &[]);
    wait_for(&server, "the agent to poll", |srv| {
        srv.request_count(&Route::JobPoll) >= 1
    });
    let slow: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: sl")
                .expect("sends half a head");
            stream
        })
        .collect();
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "test_data": {"test_cmds": "x"},
    }));
    let e = scrape(port);
    assert!(e.families.contains_key("jobs_total"));
    wait_for(&server, "the job's outcome", |srv| finished(srv, &id));
    let result = server.result_data(&id);
    assert_eq!(result["status"]["setup"], 0, "{result}");
    assert_eq!(result["status"]["test"], 0, "{result}");
    assert_eq!(
        counters(&scrape(port), "jobs_total").values().sum::<f64>(),
        1.0
    );
    drop(slow);
    assert_eq!(agent.stop(), Some(0));
}

#[test]
fn a_metrics_port_in_use_stops_the_start_naming_the_port_before_any_post() {
    let server = FakeServer::start_with(FakeConfig {
        require_auth: false,
        ..FakeConfig::default()
    });
    let s = Scratch::new("charm-port");
    let name = format!("charm-port-{}", std::process::id());
    let files = write_daemon_files(&server, &s, &name, "test_command: echo x\n");
    // Held where the agent binds by default: all interfaces.
    let holder = TcpListener::bind(("0.0.0.0", 0)).expect("a port to hold");
    let port = holder.local_addr().expect("addr").port();
    let stderr_path = s.path("agent.stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut agent = start_charm(&files.config, port, stderr, &[]);
    let status = agent.child.wait().expect("exits");
    let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains(&format!(":{port}")), "names the port: {text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "names the holder: {text}"
    );
    assert!(
        server.agent_posts(&name).is_empty(),
        "nothing was posted to the server"
    );
    assert_eq!(server.request_count(&Route::AgentDataGet), 0);
    drop(holder);
}

#[test]
fn the_release_label_comes_from_the_provisioned_device() {
    let server = FakeServer::start_with(FakeConfig {
        require_auth: false,
        ..FakeConfig::default()
    });
    let s = Scratch::new("charm-release");
    let name = format!("charm-release-{}", std::process::id());
    // A stand-in for ssh on the agent's PATH: it records its arguments and answers with
    // the os-release of an Ubuntu point release.
    let bin = s.path("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let argv = s.path("ssh-argv");
    let fake = bin.join("ssh");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$@\" > {}\nprintf 'NAME=\"Ubuntu\"\\nVERSION_ID=\"24.04\"\\nVERSION=\"24.04.1 LTS (Noble Numbat)\"\\n'\n",
            argv.display()
        ),
    )
    .expect("fake ssh");
    let mut perms = std::fs::metadata(&fake).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&fake, perms).expect("chmod");
    let commands = "provision_command: |\n  echo '{\"device_info\": {\"device_ip\": \"10.20.30.40\"}}' > device-info.json\ntest_command: echo tested\n";
    let files = write_daemon_files(&server, &s, &name, commands);
    let port = free_port();
    let stderr = std::fs::File::create(s.path("agent.stderr")).expect("stderr file");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let _agent = start_charm(
        &files.config,
        port,
        stderr,
        &[("PATH", Some(path.as_str()))],
    );
    let id = server.submit_job(json!({
        "job_queue": queue(&name),
        "provision_data": {"url": "x"},
        "test_data": {"test_cmds": "x", "test_username": "tester"},
    }));
    wait_for(&server, "the job", |srv| finished(srv, &id));
    let argv = std::fs::read_to_string(&argv).expect("the fake ssh ran");
    assert!(
        argv.contains("tester@10.20.30.40 cat /etc/os-release"),
        "{argv}"
    );
    assert!(argv.contains("BatchMode=yes"), "{argv}");
    // The label of every phase from provision on; setup ran before it: "".
    let e = scrape(port);
    let durations = &e.families["phase_duration_seconds"];
    let mut labels = BTreeMap::new();
    for sample in durations.iter_samples() {
        let set = sample.get_labelset().expect("labels");
        labels.insert(
            set.get_label_value("test_phase").unwrap_or("").to_owned(),
            set.get_label_value("release").unwrap_or("?").to_owned(),
        );
    }
    assert_eq!(
        labels.get("setup").map(String::as_str),
        Some(""),
        "{labels:?}"
    );
    for phase in [
        "provision",
        "firmware_update",
        "test",
        "allocate",
        "reserve",
    ] {
        assert_eq!(
            labels.get(phase).map(String::as_str),
            Some("24.04.1"),
            "{phase}: {labels:?}"
        );
    }
}
