//! The config module's unit tests: loading, defaults, validation messages, the key table
//! and its renderings.

use super::*;
use proptest::prelude::*;
use serde_json::json;

const MINIMAL: &str =
    "agent_id: rpi4-001\nserver_address: https://testflinger.example.com\njob_queues: [rpi4]\n";

/// A config like the Python agent's documented example, with every key either agent
/// knows, including `advertised_images` in the list shape of the Python README.
const PYTHON_EXAMPLE: &str = r#"
agent_id: rpi4-001
identifier: lab2-rack3-rpi4-001
location: Lab 2, rack 3
polling_interval: 10
server_address: https://testflinger.example.com
execution_basedir: /home/ubuntu/testflinger/rpi4-001/run
logging_basedir: /home/ubuntu/testflinger/rpi4-001/logs
results_basedir: /home/ubuntu/testflinger/rpi4-001/results
logging_level: WARNING
logging_quiet: False
job_queues:
    - rpi4
    - rpi4-001
advertised_queues:
    rpi4: Raspberry Pi 4 Model B, 4 GiB
advertised_images:
    rpi4:
        - core22: "url: http://cdimage.example.com/core22.img.xz"
        - jammy: "url: http://cdimage.example.com/jammy.img.xz"
global_timeout: 43200
output_timeout: 8000
setup_command: echo Nothing needed for setup
provision_command: testflinger-device-connector muxpi provision -c /path/to/default.yaml testflinger.json
firmware_update_command: echo Updating device firmware to the latest version
allocate_command: testflinger-device-connector muxpi allocate -c /path/to/default.yaml testflinger.json
# You may want to run test_command in a container for a clean environment
test_command: testflinger-device-connector muxpi test -c /path/to/default.yaml testflinger.json
reserve_command: testflinger-device-connector muxpi reserve -c /path/to/default.yaml testflinger.json
cleanup_command: echo Consider removing containers here
provision_type: muxpi
output_bytes: 10485760
"#;

fn load(text: &str) -> Config {
    Config::from_yaml(text).unwrap_or_else(|e| panic!("{text}\n→ {e}"))
}

fn error(text: &str) -> String {
    match Config::from_yaml(text) {
        Ok(c) => panic!("accepted:\n{text}\n{c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn python_example_loads_unchanged() {
    let c = load(PYTHON_EXAMPLE);
    assert_eq!(c.agent_id, "rpi4-001");
    assert_eq!(c.identifier.as_deref(), Some("lab2-rack3-rpi4-001"));
    assert_eq!(c.location.as_deref(), Some("Lab 2, rack 3"));
    assert_eq!(c.job_queues, ["rpi4", "rpi4-001"]);
    assert_eq!(c.logging_level, log::LevelFilter::Warn);
    assert!(!c.logging_quiet);
    assert_eq!(c.global_timeout, Some(43200));
    assert_eq!(c.output_timeout, Some(8000));
    assert_eq!(c.provision_type.as_deref(), Some("muxpi"));
    assert_eq!(
        c.execution_basedir,
        Path::new("/home/ubuntu/testflinger/rpi4-001/run")
    );
    let queues = c.advertised_queues.as_ref().expect("advertised_queues");
    assert_eq!(queues["rpi4"], "Raspberry Pi 4 Model B, 4 GiB");
    let images = &c.advertised_images.as_ref().expect("advertised_images")["rpi4"];
    assert_eq!(images.len(), 2);
    assert_eq!(
        images["core22"],
        "url: http://cdimage.example.com/core22.img.xz"
    );
    assert_eq!(
        c.get("advertised_images"),
        Some(&json!({"rpi4": {
        "core22": "url: http://cdimage.example.com/core22.img.xz",
        "jammy": "url: http://cdimage.example.com/jammy.img.xz"}}))
    );
    for phase in Phase::ALL {
        assert!(c.command(phase).is_some(), "{phase}");
    }
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn map_shaped_images_load_too() {
    let c = load(&format!(
        "{MINIMAL}advertised_images:\n  rpi4:\n    core22: 'url: x'\n"
    ));
    assert_eq!(
        c.advertised_images.expect("images")["rpi4"]["core22"],
        "url: x"
    );
}

#[test]
fn every_default() {
    let c = load(MINIMAL);
    assert_eq!(c.polling_interval, 10);
    assert_eq!(c.execution_basedir, Path::new("/tmp/testflinger/run"));
    assert_eq!(c.logging_basedir, Path::new("/tmp/testflinger/logs"));
    assert_eq!(c.results_basedir, Path::new("/tmp/testflinger/results"));
    assert_eq!(c.logging_level, log::LevelFilter::Info);
    assert!(!c.logging_quiet);
    for phase in Phase::ALL {
        assert_eq!(c.command(phase), None, "{phase}");
        assert_eq!(c.get(phase.command_key()), Some(&json!("")));
    }
    assert_eq!(c.provision_type, None);
    assert_eq!(c.global_timeout, None);
    assert_eq!(c.output_timeout, None);
    assert_eq!(c.advertised_queues, None);
    assert_eq!(c.advertised_images, None);
    assert_eq!(c.identifier, None);
    assert_eq!(c.location, None);
    assert_eq!(c.output_bytes, 10_485_760);
    assert_eq!(c.token_file, None);
    assert_eq!(c.metrics_endpoint_port, None);
    assert_eq!(c.grace_period(), Duration::from_secs(10));
    assert_eq!(c.straggler_wait(), Duration::from_millis(2000));
    assert_eq!(c.cancel_check_period(), Duration::from_secs(10));
    assert_eq!(c.output_post_period(), Duration::from_secs(1));
    assert_eq!(c.polling_period(), Duration::from_secs(10));
    assert_eq!(c.oom_score_adj, 500);
    assert!(
        c.effective_yaml().contains("\noom_score_adj: 500\n"),
        "{}",
        c.effective_yaml()
    );
    // The table's defaults are what the config holds.
    for spec in KEYS {
        if let Some(default) = spec.default.to_value() {
            assert_eq!(c.get(spec.name), Some(&default), "{}", spec.name);
        } else if spec.default != Required {
            assert_eq!(c.get(spec.name), None, "{}", spec.name);
        }
    }
}

#[test]
fn null_means_absent_for_optional_keys() {
    let c = load(&format!(
        "{MINIMAL}polling_interval: ~\nprovision_type:\nglobal_timeout: null\n"
    ));
    assert_eq!(c.polling_interval, 10);
    assert_eq!(c.provision_type, None);
    assert_eq!(c.global_timeout, None);
}

#[test]
fn tuning_keys_are_read() {
    let c = load(&format!(
        "{MINIMAL}termination_grace_period: 0\nstraggler_wait_ms: 50\ncancel_check_interval: 2\noutput_post_interval: 5\npolling_interval: 0\n"
    ));
    assert_eq!(c.grace_period(), Duration::ZERO);
    assert_eq!(c.straggler_wait(), Duration::from_millis(50));
    assert_eq!(c.cancel_check_period(), Duration::from_secs(2));
    assert_eq!(c.output_post_period(), Duration::from_secs(5));
    assert_eq!(c.polling_interval, 0);
    for value in [-1000, -5, 0, 1000] {
        let c = load(&format!("{MINIMAL}oom_score_adj: {value}\n"));
        assert_eq!(c.oom_score_adj, value);
    }
    assert_eq!(
        error(&format!("{MINIMAL}oom_score_adj: high\n")),
        "config key oom_score_adj: expected a whole number from -1000 to 1000, found the string \"high\""
    );
}

#[test]
fn commands_that_are_blank_are_none() {
    let c = load(&format!(
        "{MINIMAL}setup_command: '   '\ntest_command: run-tests\n"
    ));
    assert_eq!(c.command(Phase::Setup), None);
    assert_eq!(c.command(Phase::Test), Some("run-tests"));
}

#[test]
fn logging_syslog_is_off_true_or_a_facility() {
    let c = load(MINIMAL);
    assert_eq!(c.logging_syslog, None);
    assert_eq!(c.logging_syslog_socket, PathBuf::from("/dev/log"));
    assert_eq!(c.get("logging_syslog"), Some(&json!(false)));
    for (value, facility) in [
        ("true", Some("daemon")),
        ("yes", Some("daemon")),
        ("false", None),
        ("off", None),
        ("user", Some("user")),
        ("LOCAL7", Some("local7")),
        ("daemon", Some("daemon")),
    ] {
        let c = load(&format!("{MINIMAL}logging_syslog: {value}\n"));
        assert_eq!(c.logging_syslog.as_deref(), facility, "{value}");
        // What check-config prints loads to the same setting.
        let again = Config::from_yaml(&c.effective_yaml()).expect("reloads");
        assert_eq!(again.logging_syslog, c.logging_syslog, "{value}");
    }
    let c = load(&format!(
        "{MINIMAL}logging_syslog: local0\nlogging_syslog_socket: /run/log.sock\n"
    ));
    assert_eq!(c.logging_syslog_socket, PathBuf::from("/run/log.sock"));
    assert_eq!(
        error(&format!("{MINIMAL}logging_syslog: kern\n")),
        "config key logging_syslog: must be true, false or one of user, daemon, local0, \
         local1, local2, local3, local4, local5, local6, local7, found \"kern\""
    );
    assert_eq!(
        error(&format!("{MINIMAL}logging_syslog: 3\n")),
        "config key logging_syslog: expected true, false or a syslog facility (user, \
         daemon, local0 to local7), found the integer 3"
    );
}

#[test]
fn unknown_keys_are_refused_with_a_suggestion() {
    let e = error(&format!("{MINIMAL}poling_interval: 5\n"));
    assert_eq!(
        e,
        "unknown config key poling_interval (did you mean polling_interval?)"
    );
    let e = error(&format!("{MINIMAL}Agent_ID: x\n"));
    assert!(e.contains("did you mean agent_id?"), "{e}");
    let e = error(&format!("{MINIMAL}frobnicate: 5\n"));
    assert_eq!(e, "unknown config key frobnicate");
}

#[test]
fn wrong_types_name_key_expected_and_found() {
    for (line, message) in [
        ("polling_interval: ten", "config key polling_interval: expected a whole number of seconds, found the string \"ten\""),
        ("polling_interval: 1.5", "config key polling_interval: expected a whole number of seconds, found the number 1.5"),
        ("logging_quiet: 3", "config key logging_quiet: expected true or false, found the integer 3"),
        ("logging_quiet: maybe", "config key logging_quiet: expected true or false, found the string \"maybe\""),
        ("provision_type: [a]", "config key provision_type: expected a string, found a list"),
        ("logging_level: 10", "config key logging_level: expected a log level name such as INFO, found the integer 10"),
        ("advertised_queues: [a]", "config key advertised_queues: expected a mapping of strings to strings, found a list"),
        ("advertised_queues: {q: 1}", "config key advertised_queues.q: expected a string, found the integer 1"),
        ("advertised_images: {q: {img: {url: x}}}", "config key advertised_images.q.img: expected a string, found a mapping"),
        ("advertised_images: {q: [x]}", "config key advertised_images.q[1]: expected a mapping of an image name to a string, found the string \"x\""),
        ("advertised_images: {q: 3}", "config key advertised_images.q: expected a mapping of image names to strings, found the integer 3"),
        ("straggler_wait_ms: '5'", "config key straggler_wait_ms: expected a whole number of milliseconds, found the string \"5\""),
        ("metrics_endpoint_port: true", "config key metrics_endpoint_port: expected a port number (0 to 65535), found the boolean true"),
    ] {
        assert_eq!(error(&format!("{MINIMAL}{line}\n")), message, "{line}");
    }
    let e = error("agent_id: 12\nserver_address: http://x\njob_queues: [q]\n");
    assert_eq!(
        e,
        "config key agent_id: expected a string, found the integer 12"
    );
    let e = error("agent_id: a\nserver_address: http://x\njob_queues: q\n");
    assert_eq!(
        e,
        "config key job_queues: expected a list of strings, found the string \"q\""
    );
    let e = error("agent_id: a\nserver_address: http://x\njob_queues: [q, 5]\n");
    assert_eq!(
        e,
        "config key job_queues[2]: expected a string, found the integer 5"
    );
    let e = error("agent_id: a\nserver_address: http://x\njob_queues: [q, '']\n");
    assert_eq!(e, "config key job_queues: item 2 is an empty string");
}

#[test]
fn yaml_11_booleans_are_accepted() {
    assert!(load(&format!("{MINIMAL}logging_quiet: yes\n")).logging_quiet);
    assert!(!load(&format!("{MINIMAL}logging_quiet: Off\n")).logging_quiet);
    assert!(load(&format!("{MINIMAL}logging_quiet: True\n")).logging_quiet);
}

#[test]
fn out_of_range_numbers_are_refused() {
    for (line, message) in [
        (
            "polling_interval: -1",
            "config key polling_interval: must be from 0 to 31536000, found -1",
        ),
        (
            "global_timeout: 0",
            "config key global_timeout: must be from 1 to 31536000, found 0",
        ),
        (
            "output_timeout: -5",
            "config key output_timeout: must be from 1 to 31536000, found -5",
        ),
        (
            "cancel_check_interval: 0",
            "config key cancel_check_interval: must be from 1 to 31536000, found 0",
        ),
        (
            "output_post_interval: 0",
            "config key output_post_interval: must be from 1 to 31536000, found 0",
        ),
        (
            "metrics_endpoint_port: 70000",
            "config key metrics_endpoint_port: must be from 0 to 65535, found 70000",
        ),
        (
            "output_bytes: -1",
            "config key output_bytes: must be 0 or more, found -1",
        ),
        (
            "polling_interval: 31536001",
            "config key polling_interval: must be from 0 to 31536000, found 31536001",
        ),
        (
            "straggler_wait_ms: 31536000001",
            "config key straggler_wait_ms: must be from 0 to 31536000000, found 31536000001",
        ),
        (
            "oom_score_adj: 2000",
            "config key oom_score_adj: must be from -1000 to 1000, found 2000",
        ),
        (
            "oom_score_adj: -1001",
            "config key oom_score_adj: must be from -1000 to 1000, found -1001",
        ),
    ] {
        assert_eq!(error(&format!("{MINIMAL}{line}\n")), message, "{line}");
    }
}

#[test]
fn missing_required_keys_are_named() {
    assert_eq!(
        error("server_address: http://x\njob_queues: [q]\n"),
        "config key agent_id is required but missing"
    );
    assert_eq!(
        error("agent_id: a\njob_queues: [q]\n"),
        "config key server_address is required but missing"
    );
    assert_eq!(
        error("agent_id: a\nserver_address: http://x\n"),
        "config key job_queues is required but missing"
    );
    assert_eq!(
        error("agent_id:\nserver_address: http://x\njob_queues: [q]\n"),
        "config key agent_id is required but missing"
    );
    assert_eq!(
        error("agent_id: a\nserver_address: ' '\njob_queues: [q]\n"),
        "config key server_address: must not be empty"
    );
}

#[test]
fn not_a_mapping_or_not_yaml() {
    assert_eq!(
        error(""),
        "config must be a mapping of keys to values, found null"
    );
    assert_eq!(
        error("- a\n- b\n"),
        "config must be a mapping of keys to values, found a list"
    );
    assert_eq!(
        error("just text"),
        "config must be a mapping of keys to values, found the string \"just text\""
    );
    let e = error("agent_id: [unclosed\n");
    assert!(e.starts_with("config is not valid YAML: "), "{e}");
    assert!(e.contains("line"), "{e}");
    let e = error(&format!("{MINIMAL}1: x\n"));
    assert!(
        e.contains("mapping keys must be strings") && e.contains("line 4"),
        "{e}"
    );
}

#[test]
fn unsafe_agent_ids_are_refused() {
    for id in [
        "''",
        "'.'",
        "'..'",
        "a/b",
        "'a b'",
        "\"a\\0b\"",
        "\"a\\tb\"",
        "'a?b'",
        "'a#b'",
        "'a%2F'",
    ] {
        let e = error(&format!(
            "agent_id: {id}\nserver_address: http://x\njob_queues: [q]\n"
        ));
        assert!(e.starts_with("config key agent_id: "), "{id}: {e}");
    }
    for id in ["rpi4-001", "dut_7.lab", "ÄgentÖ"] {
        load(&format!(
            "agent_id: {id}\nserver_address: http://x\njob_queues: [q]\n"
        ));
    }
}

#[test]
fn logging_level_names_and_fallback() {
    for (name, level) in [
        ("debug", log::LevelFilter::Debug),
        ("INFO", log::LevelFilter::Info),
        ("Warning", log::LevelFilter::Warn),
        ("WARN", log::LevelFilter::Warn),
        ("error", log::LevelFilter::Error),
        ("CRITICAL", log::LevelFilter::Error),
        ("NOTSET", log::LevelFilter::Trace),
    ] {
        let c = load(&format!("{MINIMAL}logging_level: {name}\n"));
        assert_eq!(c.logging_level, level, "{name}");
        assert!(c.warnings.is_empty(), "{name}");
    }
    let c = load(&format!("{MINIMAL}logging_level: LOUD\n"));
    assert_eq!(c.logging_level, log::LevelFilter::Info);
    assert!(c.warnings[0].contains("logging_level") && c.warnings[0].contains("LOUD"));
}

#[test]
fn empty_job_queues_load_with_a_warning() {
    let c = load("agent_id: a\nserver_address: http://x\njob_queues: []\n");
    assert!(c.job_queues.is_empty());
    assert!(c.warnings.iter().any(|w| w.contains("job_queues")));
}

#[test]
fn load_names_the_file() {
    let missing = Path::new("/nonexistent/testflinger-agent.conf");
    let e = Config::load(missing).expect_err("missing file").to_string();
    assert!(e.contains("/nonexistent/testflinger-agent.conf"), "{e}");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bad.conf");
    std::fs::write(&file, "agent_id: a\n").expect("write");
    let e = Config::load(&file).expect_err("incomplete").to_string();
    assert!(
        e.contains("bad.conf") && e.contains("server_address"),
        "{e}"
    );
    std::fs::write(&file, MINIMAL).expect("write");
    assert_eq!(Config::load(&file).expect("valid").agent_id, "rpi4-001");
}

#[test]
fn command_env_exports_string_keys_with_defaults() {
    let mut c = load(PYTHON_EXAMPLE);
    let env: BTreeMap<String, String> = c.command_env().into_iter().collect();
    assert_eq!(env["agent_id"], "rpi4-001");
    assert_eq!(env["provision_type"], "muxpi");
    assert_eq!(env["logging_level"], "WARNING");
    assert!(!env.contains_key("polling_interval"));
    assert!(!env.contains_key("job_queues"));
    assert!(!env.contains_key("logging_quiet"));
    let c2 = load(MINIMAL);
    let env2: BTreeMap<String, String> = c2.command_env().into_iter().collect();
    assert_eq!(env2["setup_command"], "");
    assert_eq!(env2["execution_basedir"], "/tmp/testflinger/run");
    assert!(!env2.contains_key("provision_type"));
    assert!(!env2.contains_key("token_file"));
    c.set_token_file(Path::new("/var/lib/testflinger-agent/refresh_token"));
    let env: BTreeMap<String, String> = c.command_env().into_iter().collect();
    assert_eq!(
        env["token_file"],
        "/var/lib/testflinger-agent/refresh_token"
    );
    c.set_metrics_endpoint_port(8000);
    assert_eq!(c.metrics_endpoint_port, Some(8000));
    assert!(!c
        .command_env()
        .iter()
        .any(|(k, _)| k == "metrics_endpoint_port"));
}

#[test]
fn effective_yaml_round_trips_in_table_order() {
    let mut c = load(PYTHON_EXAMPLE);
    c.set_token_file(Path::new("/tmp/token"));
    let text = c.effective_yaml();
    let again = load(&text);
    assert_eq!(again.effective, c.effective, "{text}");
    let keys: Vec<&str> = c.effective.keys().map(String::as_str).collect();
    let table: Vec<&str> = KEYS
        .iter()
        .map(|k| k.name)
        .filter(|k| keys.contains(k))
        .collect();
    assert_eq!(keys, table);
    assert!(text.starts_with("agent_id: rpi4-001\n"), "{text}");
    assert!(text.contains("token_file: /tmp/token"), "{text}");
}

#[test]
fn table_is_consistent() {
    let mut names: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), KEYS.len(), "duplicate key in KEYS");
    for phase in Phase::ALL {
        assert!(key_spec(phase.command_key()).is_some(), "{phase}");
    }
    let table = reference_table_markdown();
    assert_eq!(table.lines().count(), KEYS.len() + 2);
    for spec in KEYS {
        assert!(
            table.contains(&format!("| `{}` |", spec.name)),
            "{}",
            spec.name
        );
    }
}

#[test]
fn the_configuration_reference_holds_the_generated_table() {
    const START: &str = "<!-- config-table:start -->";
    const END: &str = "<!-- config-table:end -->";
    let fix = "regenerate it with `cargo run -- check-config --reference-table` and paste the \
               output between the markers";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let page = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; it must hold the config key table: {fix}",
            path.display()
        )
    });
    let start = page
        .find(START)
        .unwrap_or_else(|| panic!("{} has no `{START}` line: {fix}", path.display()));
    let end = page[start..]
        .find(END)
        .map(|i| start + i)
        .unwrap_or_else(|| {
            panic!(
                "{} has no `{END}` line after `{START}`: {fix}",
                path.display()
            )
        });
    let inside = page[start + START.len()..end].trim_matches('\n');
    assert!(
        inside == reference_table_markdown().trim_end(),
        "the config key table in {} differs from config::KEYS: {fix}",
        path.display()
    );
}

#[test]
fn each_key_is_its_row() {
    assert_eq!(Key::ALL.len(), KEYS.len());
    for (key, spec) in Key::ALL.iter().zip(KEYS) {
        assert_eq!(spec.key, *key, "{}", spec.name);
        assert_eq!(key.name(), spec.name);
        assert_eq!(key.spec().key, *key, "{}", spec.name);
        assert_eq!(key_spec(key.name()).map(|s| s.key), Some(*key));
    }
    for phase in Phase::ALL {
        assert_eq!(
            Key::command_of(phase).name(),
            phase.command_key(),
            "{phase}"
        );
    }
}

#[test]
fn typed_fields_hold_the_effective_values() {
    let c = load(&format!(
        "{MINIMAL}logging_format: Python\nlinks: {{a: b}}\ncontrol_host: {{h: p}}\n"
    ));
    assert_eq!(c.logging_format, LogFormat::Python);
    assert_eq!(load(MINIMAL).logging_format, LogFormat::Agent);
    assert_eq!(c.links, Some(BTreeMap::from([("a".into(), "b".into())])));
    assert_eq!(
        c.control_host,
        Some(BTreeMap::from([("h".into(), "p".into())]))
    );
    assert_eq!(load(MINIMAL).links, None);
    let c = load(PYTHON_EXAMPLE);
    for phase in Phase::ALL {
        assert_eq!(
            c.value(Key::command_of(phase)).and_then(Value::as_str),
            c.command(phase),
            "{phase}"
        );
    }
    assert_eq!(c.test_command, c.command(Phase::Test).expect("set"));
    assert_eq!(c.cleanup_command, "echo Consider removing containers here");
    assert_eq!(
        c.value(Key::AdvertisedQueues),
        Some(&json!({"rpi4": "Raspberry Pi 4 Model B, 4 GiB"}))
    );
    assert_eq!(c.value(Key::Links), None);
}

#[test]
fn edit_distance_basics() {
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(edit_distance("same", "same"), 0);
}

proptest! {
    /// Whatever optional string and non-string keys are set, `command_env` holds exactly
    /// the string-valued keys of the effective config, with their values.
    #[test]
    fn command_env_is_exactly_the_string_keys(
        picks in proptest::collection::vec(any::<bool>(), KEYS.len()),
        text in "[a-z0-9 /._-]{0,12}",
        number in 1u64..100_000,
    ) {
        let mut doc = Map::new();
        doc.insert("agent_id".into(), json!("agent-1"));
        doc.insert("server_address".into(), json!("http://x"));
        doc.insert("job_queues".into(), json!(["q"]));
        for (spec, pick) in KEYS.iter().zip(picks) {
            if !pick || spec.default == Required {
                continue;
            }
            let value = match spec.kind {
                Text | LogLevel => json!(text),
                Choice(words) => json!(words[number as usize % words.len()]),
                Seconds | Milliseconds | Count => json!(number),
                Port => json!(number % 65_536),
                OomScore => json!((number % 2001) as i64 - 1000),
                KeyType::Bool => json!(number % 2 == 0),
                TextList => json!([text]),
                TextMap => json!({"k": text}),
                ImageMap => json!({"q": {"img": text}}),
                Syslog if number % 3 == 0 => json!(number % 2 == 0),
                Syslog => json!(SYSLOG_FACILITIES[number as usize % SYSLOG_FACILITIES.len()]),
                AgentId => continue,
            };
            doc.insert(spec.name.to_owned(), value);
        }
        let text = yaml::to_string(&Value::Object(doc));
        let c = Config::from_yaml(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let env: BTreeMap<String, String> = c.command_env().into_iter().collect();
        let expected: BTreeMap<String, String> = KEYS
            .iter()
            .filter_map(|k| Some((k.name.to_owned(), c.get(k.name)?.as_str()?.to_owned())))
            .collect();
        prop_assert_eq!(&env, &expected);
        for spec in KEYS {
            let is_string = c.get(spec.name).is_some_and(Value::is_string);
            prop_assert_eq!(env.contains_key(spec.name), is_string, "{}", spec.name);
        }
    }
}
