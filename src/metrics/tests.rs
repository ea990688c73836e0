//! Tests of the metrics' values, types and labels, read back through a validating parser of
//! the Prometheus text format.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricFamily, MetricsExposition, PrometheusType, PrometheusValue};

use super::*;

type Exposition = MetricsExposition<PrometheusType, PrometheusValue>;
type Family = MetricFamily<PrometheusType, PrometheusValue>;
/// Label name and value pairs, sorted by name (the parser does not keep exposition order).
type LabelPairs = Vec<(String, String)>;

fn parse(text: &str) -> Exposition {
    match parse_prometheus(text) {
        Ok(exposition) => exposition,
        Err(err) => panic!("not valid Prometheus text ({err:?}):\n{text}"),
    }
}

fn family<'a>(exposition: &'a Exposition, name: &str) -> &'a Family {
    exposition
        .families
        .get(name)
        .unwrap_or_else(|| panic!("no family {name}; have {:?}", exposition.families.keys()))
}

/// Each sample's labels and value.
fn samples(family: &Family) -> BTreeMap<LabelPairs, PrometheusValue> {
    let names = label_names(family);
    family
        .iter_samples()
        .map(|s| {
            let set = s.get_labelset().expect("label set");
            let labels = names
                .iter()
                .map(|n| {
                    let v = set.get_label_value(n).expect("every label has a value");
                    (n.clone(), v.to_string())
                })
                .collect();
            (labels, s.value.clone())
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> LabelPairs {
    let mut pairs: LabelPairs = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    pairs.sort();
    pairs
}

/// A family's label names, sorted.
fn label_names(family: &Family) -> Vec<String> {
    let mut names = family.get_label_names().to_vec();
    names.sort();
    names
}

fn counter(value: &PrometheusValue) -> f64 {
    match value {
        PrometheusValue::Counter(c) => c.value.as_f64(),
        other => panic!("expected a counter sample, found {other:?}"),
    }
}

fn gauge(value: &PrometheusValue) -> f64 {
    match value {
        PrometheusValue::Gauge(g) => g.as_f64(),
        other => panic!("expected a gauge sample, found {other:?}"),
    }
}

/// A family's type, label names and `labels -> value` as plain numbers (counters, gauges).
fn numbers(
    exposition: &Exposition,
    name: &str,
    kind: PrometheusType,
) -> (Vec<String>, BTreeMap<LabelPairs, f64>) {
    let f = family(exposition, name);
    assert_eq!(f.family_type, kind, "type of {name}");
    assert!(!f.help.is_empty(), "{name} has a HELP line");
    let values = samples(f)
        .into_iter()
        .map(|(l, v)| {
            let n = match kind {
                PrometheusType::Counter => counter(&v),
                _ => gauge(&v),
            };
            (l, n)
        })
        .collect();
    (label_names(f), values)
}

fn known_sequence() -> Metrics {
    let m = Metrics::new("agent-1", "cid-42");
    for _ in 0..3 {
        m.job_taken();
    }
    m.phase_failed("provision");
    m.phase_failed("provision");
    m.phase_failed("test");
    m.recovery_failed();
    m.phase_duration("setup", 0, "");
    m.phase_duration("provision", 610, "");
    m.phase_duration("test", 59, "24.04.1");
    m.phase_duration("test", 7200, "24.04.1");
    m.phase_duration("test", 20_000, "24.04.1");
    m.command_killed(KillCause::GlobalTimeout);
    m.command_killed(KillCause::GlobalTimeout);
    m.command_killed(KillCause::Cancel);
    m.escapees_killed(3);
    m.escapees_killed(2);
    m.set_spooled_jobs(4);
    m.set_spooled_jobs(2);
    m.set_output_backlog_bytes(1000);
    m.set_output_backlog_bytes(512);
    m.request_failed("job_poll");
    m.request_failed("result");
    m.request_failed("job_poll");
    m.token_refreshed();
    m
}

#[test]
fn python_agent_metrics_have_their_names_types_labels_and_values() {
    let text = known_sequence().render();
    let e = parse(&text);

    let (names, values) = numbers(&e, "jobs_total", PrometheusType::Counter);
    assert_eq!(names, ["agent_id"]);
    assert_eq!(
        values,
        BTreeMap::from([(labels(&[("agent_id", "agent-1")]), 3.0)])
    );

    let (names, values) = numbers(&e, "failures_total", PrometheusType::Counter);
    assert_eq!(names, ["agent_id", "test_phase"]);
    assert_eq!(
        values,
        BTreeMap::from([
            (
                labels(&[("agent_id", "agent-1"), ("test_phase", "provision")]),
                2.0
            ),
            (
                labels(&[("agent_id", "agent-1"), ("test_phase", "test")]),
                1.0
            ),
        ])
    );

    let (names, values) = numbers(&e, "recovery_failures_total", PrometheusType::Counter);
    assert_eq!(names, ["agent_id"]);
    assert_eq!(
        values,
        BTreeMap::from([(labels(&[("agent_id", "agent-1")]), 1.0)])
    );
}

#[test]
fn phase_duration_is_a_histogram_with_the_python_buckets() {
    let e = parse(&known_sequence().render());
    let f = family(&e, "phase_duration_seconds");
    assert_eq!(f.family_type, PrometheusType::Histogram);
    assert_eq!(
        label_names(f),
        ["agent_id", "identifier", "release", "test_phase"]
    );
    let all = samples(f);
    let key = |phase: &str, release: &str| {
        labels(&[
            ("agent_id", "agent-1"),
            ("test_phase", phase),
            ("identifier", "cid-42"),
            ("release", release),
        ])
    };
    assert_eq!(
        all.keys().cloned().collect::<Vec<_>>(),
        [
            key("provision", ""),
            key("setup", ""),
            key("test", "24.04.1")
        ]
    );
    let bounds = [
        60.0,
        120.0,
        300.0,
        600.0,
        1800.0,
        3600.0,
        7200.0,
        14400.0,
        f64::INFINITY,
    ];
    for (phase, release, cumulative, sum, count) in [
        ("setup", "", [1, 1, 1, 1, 1, 1, 1, 1, 1], 0.0, 1),
        ("provision", "", [0, 0, 0, 0, 1, 1, 1, 1, 1], 610.0, 1),
        ("test", "24.04.1", [1, 1, 1, 1, 1, 1, 2, 2, 3], 27_259.0, 3),
    ] {
        let PrometheusValue::Histogram(h) = &all[&key(phase, release)] else {
            panic!("{phase}: not a histogram sample");
        };
        let got: Vec<(f64, f64)> = h
            .buckets
            .iter()
            .map(|b| (b.upper_bound, b.count.as_f64()))
            .collect();
        let want: Vec<(f64, f64)> = bounds
            .iter()
            .zip(cumulative)
            .map(|(b, c)| (*b, f64::from(c)))
            .collect();
        assert_eq!(got, want, "{phase} buckets");
        assert_eq!(
            h.sum.as_ref().map(|s| s.as_f64()),
            Some(sum),
            "{phase} _sum"
        );
        assert_eq!(h.count, Some(count), "{phase} _count");
    }
}

#[test]
fn agent_metrics_have_their_names_types_labels_and_values() {
    let e = parse(&known_sequence().render());

    let (names, values) = numbers(
        &e,
        "testflinger_agent_phase_commands_killed_total",
        PrometheusType::Counter,
    );
    assert_eq!(names, ["cause"]);
    assert_eq!(
        values,
        BTreeMap::from([
            (labels(&[("cause", "cancel")]), 1.0),
            (labels(&[("cause", "global_timeout")]), 2.0),
            (labels(&[("cause", "output_timeout")]), 0.0),
            (labels(&[("cause", "shutdown")]), 0.0),
        ])
    );

    for (name, kind, want) in [
        (
            "testflinger_agent_escapees_killed_total",
            PrometheusType::Counter,
            5.0,
        ),
        (
            "testflinger_agent_token_refreshes_total",
            PrometheusType::Counter,
            1.0,
        ),
        ("testflinger_agent_spooled_jobs", PrometheusType::Gauge, 2.0),
        (
            "testflinger_agent_output_backlog_bytes",
            PrometheusType::Gauge,
            512.0,
        ),
    ] {
        let (names, values) = numbers(&e, name, kind);
        assert!(names.is_empty(), "{name} has no labels: {names:?}");
        assert_eq!(values, BTreeMap::from([(Vec::new(), want)]), "{name}");
    }

    let (names, values) = numbers(
        &e,
        "testflinger_agent_server_request_failures_total",
        PrometheusType::Counter,
    );
    assert_eq!(names, ["endpoint"]);
    assert_eq!(
        values,
        BTreeMap::from([
            (labels(&[("endpoint", "job_poll")]), 2.0),
            (labels(&[("endpoint", "result")]), 1.0),
        ])
    );

    let (names, values) = numbers(&e, "testflinger_agent_info", PrometheusType::Gauge);
    assert_eq!(names, ["agent_id", "version"]);
    assert_eq!(
        values,
        BTreeMap::from([(
            labels(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("agent_id", "agent-1")
            ]),
            1.0
        )])
    );
}

#[test]
fn a_fresh_agent_exposes_zeros_for_known_label_sets_only() {
    let e = parse(&Metrics::new("fresh", "").render());
    let zero = |name| {
        let (_, values) = numbers(&e, name, PrometheusType::Counter);
        assert!(values.values().all(|v| *v == 0.0), "{name}: {values:?}");
        values.len()
    };
    assert_eq!(zero("jobs_total"), 1);
    assert_eq!(zero("recovery_failures_total"), 1);
    assert_eq!(zero("testflinger_agent_phase_commands_killed_total"), 4);
    assert_eq!(zero("testflinger_agent_escapees_killed_total"), 1);
    // Label sets known only at run time: the family is declared (HELP and TYPE, as the
    // Python agent's client does), its samples come with the first observation.
    for (declared, kind) in [
        ("failures_total", PrometheusType::Counter),
        ("phase_duration_seconds", PrometheusType::Histogram),
        (
            "testflinger_agent_server_request_failures_total",
            PrometheusType::Counter,
        ),
    ] {
        let f = family(&e, declared);
        assert_eq!(f.family_type, kind, "type of {declared}");
        assert!(!f.help.is_empty(), "{declared} has a HELP line");
        assert_eq!(f.iter_samples().count(), 0, "{declared} before any sample");
    }
}

/// Every family the agent defines is in the first scrape, with its HELP and TYPE lines,
/// before anything was recorded; and nothing else is.
#[test]
fn every_family_is_declared_before_any_observation() {
    let text = Metrics::new("fresh", "").render();
    let e = parse(&text);
    let want = [
        ("jobs_total", PrometheusType::Counter),
        ("failures_total", PrometheusType::Counter),
        ("recovery_failures_total", PrometheusType::Counter),
        ("phase_duration_seconds", PrometheusType::Histogram),
        (
            "testflinger_agent_phase_commands_killed_total",
            PrometheusType::Counter,
        ),
        (
            "testflinger_agent_escapees_killed_total",
            PrometheusType::Counter,
        ),
        ("testflinger_agent_spooled_jobs", PrometheusType::Gauge),
        (
            "testflinger_agent_output_backlog_bytes",
            PrometheusType::Gauge,
        ),
        (
            "testflinger_agent_server_request_failures_total",
            PrometheusType::Counter,
        ),
        (
            "testflinger_agent_token_refreshes_total",
            PrometheusType::Counter,
        ),
        (
            "testflinger_agent_healthcheck_runs_total",
            PrometheusType::Counter,
        ),
        (
            "testflinger_agent_healthcheck_last_success_timestamp_seconds",
            PrometheusType::Gauge,
        ),
        (
            "testflinger_agent_consecutive_provision_failures",
            PrometheusType::Gauge,
        ),
        ("testflinger_agent_info", PrometheusType::Gauge),
        ("process_resident_memory_bytes", PrometheusType::Gauge),
        ("process_virtual_memory_bytes", PrometheusType::Gauge),
        ("process_cpu_seconds_total", PrometheusType::Counter),
        ("process_open_fds", PrometheusType::Gauge),
        ("process_max_fds", PrometheusType::Gauge),
        ("process_start_time_seconds", PrometheusType::Gauge),
    ];
    for (name, kind) in &want {
        let f = family(&e, name);
        assert_eq!(f.family_type, *kind, "type of {name}");
        assert!(!f.help.is_empty(), "{name} has a HELP line");
        assert!(
            text.contains(&format!("\n# HELP {name} "))
                || text.starts_with(&format!("# HELP {name} ")),
            "{name} has its own HELP line in the text:\n{text}"
        );
    }
    let mut have: Vec<&str> = e.families.keys().map(String::as_str).collect();
    have.sort_unstable();
    let mut listed: Vec<&str> = want.iter().map(|(n, _)| *n).collect();
    listed.sort_unstable();
    assert_eq!(have, listed, "families in a fresh scrape");
}

#[test]
fn no_created_samples_are_exposed() {
    let e = parse(&known_sequence().render());
    let created: Vec<&String> = e
        .families
        .keys()
        .filter(|k| k.ends_with("_created"))
        .collect();
    assert!(created.is_empty(), "{created:?}");
}

#[test]
fn process_metrics_are_present_and_plausible() {
    let e = parse(&Metrics::new("a", "").render());
    let one = |name, kind| {
        let (names, values) = numbers(&e, name, kind);
        assert!(names.is_empty(), "{name}: {names:?}");
        assert_eq!(values.len(), 1, "{name}: {values:?}");
        values.into_values().next().expect("one sample")
    };
    let rss = one("process_resident_memory_bytes", PrometheusType::Gauge);
    let vsz = one("process_virtual_memory_bytes", PrometheusType::Gauge);
    let open = one("process_open_fds", PrometheusType::Gauge);
    let max = one("process_max_fds", PrometheusType::Gauge);
    let cpu = one("process_cpu_seconds_total", PrometheusType::Counter);
    let start = one("process_start_time_seconds", PrometheusType::Gauge);
    assert!(rss > 0.0 && vsz >= rss, "rss {rss}, vsz {vsz}");
    assert!(open > 0.0 && max >= open, "open {open}, max {max}");
    assert!(cpu >= 0.0, "cpu {cpu}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    assert!(
        start > now - 86_400.0 && start <= now + 1.0,
        "start {start}, now {now}"
    );
}

#[test]
fn label_values_are_escaped() {
    let odd = "lab \"one\"\\back\nline";
    let m = Metrics::new(odd, "");
    m.phase_failed("te\"st");
    let e = parse(&m.render());
    let (_, values) = numbers(&e, "failures_total", PrometheusType::Counter);
    // The parser hands values back as written; unescaping them must give the originals.
    let unescape = |s: &str| {
        s.replace("\\n", "\n")
            .replace("\\\"", "\"")
            .replace("\\\\", "\\")
    };
    let got: Vec<LabelPairs> = values
        .keys()
        .map(|l| l.iter().map(|(k, v)| (k.clone(), unescape(v))).collect())
        .collect();
    assert_eq!(
        got,
        [labels(&[("agent_id", odd), ("test_phase", "te\"st")])]
    );
}

#[test]
fn kill_causes_have_distinct_label_values() {
    let names: Vec<&str> = KillCause::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        ["global_timeout", "output_timeout", "cancel", "shutdown"]
    );
}

#[test]
fn recording_from_many_threads_loses_nothing() {
    let m = Metrics::new("a", "");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..1000 {
                    m.job_taken();
                    m.request_failed("log");
                    let _ = m.render();
                }
            });
        }
    });
    let e = parse(&m.render());
    let (_, jobs) = numbers(&e, "jobs_total", PrometheusType::Counter);
    let (_, failed) = numbers(
        &e,
        "testflinger_agent_server_request_failures_total",
        PrometheusType::Counter,
    );
    assert_eq!(jobs.values().copied().collect::<Vec<_>>(), [4000.0]);
    assert_eq!(failed.values().copied().collect::<Vec<_>>(), [4000.0]);
}

fn health_json(h: &Health) -> (bool, serde_json::Value) {
    let (ok, body) = h.report();
    (
        ok,
        serde_json::from_str(&body).expect("health body is JSON"),
    )
}

#[test]
fn health_reports_state_and_goes_stalled_without_beats() {
    let h = Health::new();
    h.set_state("provision", "job-7");
    h.beat();
    let (ok, body) = health_json(&h);
    assert!(ok, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["state"], "provision");
    assert_eq!(body["job_id"], "job-7");
    assert!(
        body["last_cycle_seconds_ago"]
            .as_f64()
            .is_some_and(|s| s >= 0.0),
        "{body}"
    );

    h.set_stall_limit(Duration::from_millis(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    let stalled = loop {
        let (ok, body) = health_json(&h);
        if !ok {
            break body;
        }
        assert!(Instant::now() < deadline, "never stalled: {body}");
        std::thread::yield_now();
    };
    assert_eq!(stalled["status"], "stalled");
    assert_eq!(stalled["state"], "provision");

    h.set_stall_limit(Duration::from_secs(3600));
    h.beat();
    assert!(h.report().0, "a beat within the limit is healthy again");
}

#[test]
fn a_request_waiting_past_the_call_limit_is_named_and_logged_once() {
    let h = Health::new();
    h.beat();
    let (ok, body) = health_json(&h);
    assert!(ok, "{body}");
    assert_eq!(body["waiting_for"], serde_json::Value::Null);

    let guard = h.call_started("GET /v1/agents/data/a1");
    let (ok, body) = health_json(&h);
    assert!(ok, "a request within the limit is no stall: {body}");
    assert_eq!(body["waiting_for"], "GET /v1/agents/data/a1");

    h.set_call_stall(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(5));
    let (ok, body) = health_json(&h);
    assert!(!ok, "{body}");
    assert_eq!(body["status"], "stalled");
    assert_eq!(body["waiting_for"], "GET /v1/agents/data/a1");
    assert!(body["waiting_seconds"].as_f64().is_some(), "{body}");

    // Logged once, however often the watch looks.
    assert_eq!(h.log_stalled_calls(Duration::from_millis(1)), 1);
    assert_eq!(h.log_stalled_calls(Duration::from_millis(1)), 0);

    drop(guard);
    let (ok, body) = health_json(&h);
    assert!(ok, "the request ended: {body}");
    assert_eq!(body["waiting_for"], serde_json::Value::Null);
}

#[test]
fn the_oldest_of_several_requests_is_the_one_named() {
    let h = Health::new();
    let first = h.call_started("POST /v1/result/j1/log/output");
    std::thread::sleep(Duration::from_millis(2));
    let second = h.call_started("GET /v1/result/j1");
    assert_eq!(
        h.oldest_call().map(|(what, _)| what),
        Some("POST /v1/result/j1/log/output".to_string())
    );
    drop(first);
    assert_eq!(
        h.oldest_call().map(|(what, _)| what),
        Some("GET /v1/result/j1".to_string())
    );
    drop(second);
    assert!(h.oldest_call().is_none());
}

/// The watch sleeps until a request is due rather than polling: with a request that
/// becomes due in 50 ms, one call waits for it and logs it.
#[test]
fn the_watch_wakes_when_a_request_becomes_due() {
    let h = Health::new();
    h.set_call_stall(Duration::from_millis(50));
    let _guard = h.call_started("GET /v1/job?queue=q");
    let started = Instant::now();
    let mut logged = 0;
    while logged == 0 && started.elapsed() < Duration::from_secs(10) {
        logged = h.log_stalled_calls(Duration::from_secs(10));
    }
    assert_eq!(logged, 1);
}

#[test]
fn install_keeps_the_first_instance() {
    let first = install(Metrics::new("first", ""));
    let second = install(Metrics::new("second", ""));
    assert!(std::ptr::eq(first, second));
    assert_eq!(second.agent_id(), first.agent_id());
    assert!(get().is_some_and(|m| std::ptr::eq(m, first)));
}
