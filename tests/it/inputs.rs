//! Bad and odd inputs through the library API: every fuzz corpus and regression file
//! replayed on stable, and each class of bad config or job giving an error that names the
//! offending key or field.

use std::path::{Path, PathBuf};
use testflinger_agent::config::Config;
use testflinger_agent::fuzz_api;
use testflinger_agent::job::JobSpec;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files directly under `fuzz/<kind>/<target>/`, sorted; none if the folder is absent.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// A fuzz target's name and its `fuzz_api` function.
type Target = (&'static str, fn(&[u8]));

/// Feeds every corpus and artifact file of each fuzz target to its `fuzz_api` function.
#[test]
fn fuzz_corpus_and_regressions_replay() {
    let targets: [Target; 8] = [
        ("config", fuzz_api::config),
        ("job_json", fuzz_api::job_json),
        ("job_yaml", fuzz_api::job_yaml),
        ("mask", fuzz_api::mask),
        ("journal", fuzz_api::journal),
        ("attachments", fuzz_api::attachments),
        ("server_answer", fuzz_api::server_answer),
        ("device_files", fuzz_api::device_files),
    ];
    for (target, run) in targets {
        let corpus = inputs("corpus", target);
        assert!(
            corpus.len() >= 4,
            "fuzz/corpus/{target}/ should hold its seed files, found {}",
            corpus.len()
        );
        for file in corpus.iter().chain(&inputs("artifacts", target)) {
            let data = std::fs::read(file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(
                outcome.is_ok(),
                "fuzz_api::{target} panicked on {}",
                file.display()
            );
        }
    }
    // Every folder under fuzz/corpus is a known target (a new target needs a line above).
    if let Ok(entries) = std::fs::read_dir(fuzz_dir().join("corpus")) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                targets.iter().any(|(t, _)| *t == name),
                "fuzz/corpus/{name} has no replay in tests/it/inputs.rs"
            );
        }
    }
}

/// The seed configs that are meant to load do load, and those meant to fail do fail.
#[test]
fn seed_configs_load_or_fail_as_named() {
    let dir = fuzz_dir().join("corpus").join("config");
    for (file, loads) in [
        ("python-example.yaml", true),
        ("minimal.yaml", true),
        ("all-tuning-keys.yaml", true),
        ("unknown-key.yaml", false),
        ("wrong-type.yaml", false),
        ("unsafe-agent-id.yaml", false),
        ("missing-agent-id.yaml", false),
        ("int-key.yaml", false),
        ("malformed.yaml", false),
        ("empty.yaml", false),
    ] {
        let result = Config::load(&dir.join(file));
        assert_eq!(result.is_ok(), loads, "{file}: {result:?}");
    }
}

fn config_error(text: &str) -> String {
    match Config::from_yaml(text) {
        Ok(config) => panic!("config accepted:\n{text}\n{config:?}"),
        Err(e) => e.to_string(),
    }
}

const BASE: &str = "agent_id: agent-1\nserver_address: http://127.0.0.1:1\njob_queues: [q]\n";

#[test]
fn unknown_config_key_is_named() {
    let e = config_error(&format!("{BASE}output_timeut: 60\n"));
    assert!(e.contains("output_timeut"), "{e}");
    assert!(e.contains("did you mean output_timeout"), "{e}");
}

#[test]
fn wrong_config_types_name_the_key() {
    for (line, key, found) in [
        (
            "polling_interval: ten",
            "polling_interval",
            "the string \"ten\"",
        ),
        ("logging_quiet: 2", "logging_quiet", "the integer 2"),
        ("job_queues: rpi4", "job_queues", "the string \"rpi4\""),
        ("global_timeout: [1]", "global_timeout", "a list"),
        (
            "advertised_queues: x",
            "advertised_queues",
            "the string \"x\"",
        ),
        (
            "termination_grace_period: 1.5",
            "termination_grace_period",
            "the number 1.5",
        ),
    ] {
        let text = if key == "job_queues" {
            format!("agent_id: a\nserver_address: http://x\n{line}\n")
        } else {
            format!("{BASE}{line}\n")
        };
        let e = config_error(&text);
        assert!(e.contains(&format!("config key {key}:")), "{line}: {e}");
        assert!(e.contains(found), "{line}: {e}");
    }
    let e = config_error(&format!("{BASE}polling_interval: -3\n"));
    assert!(e.contains("polling_interval") && e.contains("-3"), "{e}");
}

#[test]
fn missing_required_config_keys_are_named() {
    for key in ["agent_id", "server_address", "job_queues"] {
        let text: String = BASE
            .lines()
            .filter(|l| !l.starts_with(key))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = config_error(&text);
        assert!(e.contains(key) && e.contains("required"), "{key}: {e}");
    }
}

#[test]
fn empty_and_unreadable_config_files() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let empty = dir.join("empty.conf");
    std::fs::write(&empty, "").expect("write");
    let e = Config::load(&empty).expect_err("empty config").to_string();
    assert!(e.contains("empty.conf") && e.contains("mapping"), "{e}");
    let e = Config::load(&dir.join("absent.conf"))
        .expect_err("absent")
        .to_string();
    assert!(e.contains("absent.conf"), "{e}");
}

fn job_json_error(text: &str) -> String {
    match JobSpec::from_json(text.as_bytes()) {
        Ok(job) => panic!("job accepted: {text}\n{job:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_jobs_name_the_field() {
    let e = job_json_error("{\"job_id\": \"j\", \"test_data\": ");
    assert!(e.contains("not valid JSON"), "{e}");
    let e = job_json_error("{\"job_id\": \"j\", \"output_timeout\": \"15m\"}");
    assert!(e.contains("output_timeout"), "{e}");
    let e = job_json_error("{\"job_id\": \"j\", \"provision_data\": [\"url\"]}");
    assert!(e.contains("provision_data"), "{e}");
    let e = job_json_error("{\"job_id\": \"j\", \"test_data\": {\"test_cmds\": 7}}");
    assert!(e.contains("test_data.test_cmds"), "{e}");
    let e = job_json_error("{\"job_id\": \"j\", \"test_data\": {\"secrets\": {\"X\": 1}}}");
    assert!(e.contains("test_data.secrets.X"), "{e}");
    let e = job_json_error("{\"job_id\": \"a/b\"}");
    assert!(e.contains("job_id") && e.contains("a/b"), "{e}");
    let e = job_json_error("{}");
    assert!(e.contains("job_id"), "{e}");

    let e = JobSpec::from_yaml("test_data:\n  test_cmds: [unclosed\n")
        .expect_err("malformed YAML")
        .to_string();
    assert!(e.contains("not valid YAML") && e.contains("line"), "{e}");
    let e = JobSpec::from_yaml("job_id: j\nreserve_data: 5\n")
        .expect_err("wrong type")
        .to_string();
    assert!(e.contains("reserve_data"), "{e}");
}

#[test]
fn empty_job_files_are_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    for name in ["empty.json", "blank.yaml"] {
        let path = dir.join(name);
        std::fs::write(&path, if name == "empty.json" { "" } else { "\n  \n" }).expect("write");
        let e = JobSpec::load(&path).expect_err("empty job").to_string();
        assert!(e.contains(name) && e.contains("empty"), "{e}");
    }
}
