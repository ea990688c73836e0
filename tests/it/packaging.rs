//! The Debian package's own files agree with the code: the example config loads and keeps
//! one agent's directories under the packaged ones, the packaged user is the one
//! `check-config` names, and every generated file is an asset of the package. (The .deb
//! itself is built and checked by `packaging/build-deb.sh` and `packaging/check-deb.sh`.)

use std::path::Path;
use testflinger_agent::cli::PACKAGE_USER;
use testflinger_agent::config::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

#[test]
fn the_example_config_loads_and_uses_the_packaged_directories() {
    let config = Config::load(&Path::new(ROOT).join("packaging/examples/agent.yaml"))
        .unwrap_or_else(|e| panic!("packaging/examples/agent.yaml: {e}"));
    let id = &config.agent_id;
    assert_eq!(
        config.execution_basedir,
        Path::new("/var/lib/testflinger-agent").join(id).join("run")
    );
    assert_eq!(
        config.results_basedir,
        Path::new("/var/lib/testflinger-agent")
            .join(id)
            .join("results")
    );
    assert_eq!(
        config.logging_basedir,
        Path::new("/var/log/testflinger-agent").join(id)
    );
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    // The unit reads /etc/testflinger-agent/<instance>.yaml: the example says so.
    let text = read("packaging/examples/agent.yaml");
    assert!(text.contains(&format!("/etc/testflinger-agent/{id}.yaml")));
    assert!(text.contains(&format!("testflinger-agent@{id}")));
}

#[test]
fn the_packaged_user_and_directories_match() {
    let sysusers = read("packaging/sysusers.conf");
    assert!(
        sysusers
            .lines()
            .any(|l| l.starts_with(&format!("u {PACKAGE_USER} "))),
        "{sysusers}"
    );
    let tmpfiles = read("packaging/tmpfiles.conf");
    for dir in [
        "/etc/testflinger-agent",
        "/var/lib/testflinger-agent",
        "/var/log/testflinger-agent",
    ] {
        assert!(
            tmpfiles.lines().any(|l| l.starts_with("d ")
                && l.split_whitespace().nth(1) == Some(dir)
                && l.contains(PACKAGE_USER)),
            "{dir} in {tmpfiles}"
        );
    }
}

#[test]
fn every_generated_file_is_a_package_asset() {
    let manifest = read("Cargo.toml");
    let deb = manifest
        .split("[package.metadata.deb]")
        .nth(1)
        .expect("Cargo.toml has [package.metadata.deb]");
    assert!(deb.contains("\"packaging/man/*.1\""), "{deb}");
    for entry in std::fs::read_dir(Path::new(ROOT).join("packaging/completions")).expect("dir") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            deb.contains(&format!("\"packaging/completions/{name}\"")),
            "packaging/completions/{name} is not in [package.metadata.deb] assets"
        );
    }
    for path in [
        "deploy/systemd/testflinger-agent@.service",
        "deploy/systemd/hardening.conf",
        "README.md",
        "docs/operating.md",
        "docs/migrating.md",
        "docs/configuration.md",
        "docs/auditing.md",
    ] {
        assert!(
            deb.contains(&format!("\"{path}\"")),
            "{path} is not an asset"
        );
        assert!(Path::new(ROOT).join(path).is_file(), "{path} is missing");
    }
}
