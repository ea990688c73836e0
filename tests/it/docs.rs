//! The operator's guides (`docs/`) against the code, so that they cannot drift: the tables
//! the code defines are copies of its rendering (`UPDATE_GENERATED=1 cargo test --test it
//! docs::` rewrites them), every `testflinger-agent` command line they show parses, every
//! metric they name exists, and the supervisord settings they quote are the shipped file's.
//! The auditor's guide embeds every state machine's Mermaid diagram and transition table
//! as the code renders them.
//! The configuration reference (`docs/configuration.md`) holds the key table as `KEYS`
//! renders it (`src/config.rs` checks that copy). `bench/README.md`'s performance table is
//! the rendering of `bench/results.json`, the JSON of a full run of `bench/all.sh`.
//! The README, the newcomer's page, keeps its two commands and links each reader on; every
//! relative link in these pages names a file of the repository.

use clap::Parser;
use std::path::Path;
use testflinger_agent::cli::{self, Cli};
use testflinger_agent::config;
use testflinger_agent::diagram::{render, Format};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const UPDATE_VAR: &str = "UPDATE_GENERATED";
const GUIDES: [&str; 4] = [
    "README.md",
    "docs/operating.md",
    "docs/migrating.md",
    "docs/auditing.md",
];

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Checks (or with `UPDATE_GENERATED=1` rewrites) the text between `<!-- NAME:start -->`
/// and `<!-- NAME:end -->` in `path`.
fn check_block(path: &str, name: &str, generated: &str) {
    let start = format!("<!-- {name}:start -->\n");
    let end = format!("<!-- {name}:end -->");
    let text = read(path);
    let from = text
        .find(&start)
        .unwrap_or_else(|| panic!("{path} has no `{}` line", start.trim_end()))
        + start.len();
    let to = from
        + text[from..]
            .find(&end)
            .unwrap_or_else(|| panic!("{path} has no `{end}` line after the start"));
    if &text[from..to] == generated {
        return;
    }
    if std::env::var_os(UPDATE_VAR).is_some_and(|v| v == "1") {
        let updated = format!("{}{generated}{}", &text[..from], &text[to..]);
        std::fs::write(Path::new(ROOT).join(path), updated).expect("the file is writable");
        return;
    }
    panic!(
        "the {name} table in {path} differs from what renders it; regenerate with: \
         {UPDATE_VAR}=1 cargo test --test it docs::"
    );
}

#[test]
fn the_exit_status_table_is_the_codes() {
    check_block(
        "docs/operating.md",
        "exit-statuses",
        &cli::exit_status_table_markdown(),
    );
}

/// `docs/auditing.md` embeds each machine's Mermaid diagram (rendered by the forge) and
/// its transition table, as `state-diagrams/` holds them.
#[test]
fn the_auditing_guide_embeds_every_diagram_and_table() {
    for machine in testflinger_agent::audit::machines() {
        check_block(
            "docs/auditing.md",
            &format!("diagram:{}", machine.name),
            &format!("```mermaid\n{}```\n", render(&machine, Format::Mermaid)),
        );
        check_block(
            "docs/auditing.md",
            &format!("transitions:{}", machine.name),
            &render(&machine, Format::Table),
        );
    }
}

#[test]
fn the_migration_table_is_the_config_keys() {
    check_block(
        "docs/migrating.md",
        "migration-table",
        &config::migration_table_markdown(),
    );
    let table = config::migration_table_markdown();
    for spec in config::KEYS {
        assert!(
            table.contains(&format!("| `{}` |", spec.name)),
            "{}",
            spec.name
        );
    }
}

/// The logical lines (`\` continuations joined) of the fenced `sh` blocks of `text`.
fn shell_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut inside = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            inside = line == "```sh";
            continue;
        }
        if !inside {
            continue;
        }
        match line.trim_end().strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(line);
                lines.push(std::mem::take(&mut pending));
            }
        }
    }
    lines
}

#[test]
fn every_command_line_shown_parses() {
    let mut seen = 0;
    for path in GUIDES {
        for line in shell_lines(&read(path)) {
            let line = line.split(" #").next().unwrap_or_default().trim();
            let line = line.strip_prefix("sudo -u testflinger ").unwrap_or(line);
            if !line.starts_with("testflinger-agent ") {
                continue;
            }
            // The command's own arguments end at the first pipe or redirection.
            let args: Vec<&str> = line
                .split_whitespace()
                .take_while(|word| !matches!(*word, "|" | ">" | ">>" | "&&" | ";"))
                .collect();
            if let Err(err) = Cli::try_parse_from(&args) {
                panic!("{path}: `{line}` does not parse:\n{err}");
            }
            seen += 1;
        }
        // Inline commands too: `testflinger-agent …` in backticks.
        for span in read(path).split('`').skip(1).step_by(2) {
            if let Some(rest) = span.strip_prefix("testflinger-agent ") {
                if rest.contains('<') || rest.contains("...") || rest.contains('…') {
                    continue;
                }
                let args: Vec<&str> = std::iter::once("testflinger-agent")
                    .chain(rest.split_whitespace())
                    .collect();
                let parsed = Cli::try_parse_from(&args);
                // CONFIG and JOB placeholders are file names to clap; `--machine NAME`
                // and `--format mermaid|dot` are written for a person.
                if rest.contains('|') {
                    continue;
                }
                if let Err(err) = parsed {
                    panic!("{path}: `{span}` does not parse:\n{err}");
                }
                seen += 1;
            }
        }
    }
    assert!(seen >= 6, "only {seen} command lines found in the guides");
}

#[test]
fn every_metric_named_exists() {
    // Families with labels show only once they have a sample: give each one.
    let metrics = testflinger_agent::metrics::Metrics::new("a", "b");
    metrics.phase_failed("test");
    metrics.phase_duration("test", 1, "");
    metrics.request_failed("token");
    let rendered = metrics.render();
    let text = read("docs/operating.md");
    let mut named = 0;
    for span in text.split('`').skip(1).step_by(2) {
        // `rate(name[5m])` names a metric too.
        let word = span
            .trim_start_matches("rate(")
            .split(['[', '{', ' ', ','])
            .next()
            .unwrap_or_default();
        let is_metric = word.starts_with("testflinger_agent_")
            || [
                "jobs_total",
                "failures_total",
                "recovery_failures_total",
                "phase_duration_seconds",
            ]
            .contains(&word);
        if !is_metric {
            continue;
        }
        let family = word.strip_suffix("_total").unwrap_or(word);
        assert!(
            rendered.contains(&format!("# TYPE {family} "))
                || rendered.contains(&format!("# TYPE {word} ")),
            "docs/operating.md names {word}, which the agent does not export:\n{rendered}"
        );
        named += 1;
    }
    assert!(named >= 8, "only {named} metrics named");
}

#[test]
fn the_supervisord_settings_quoted_are_the_shipped_ones() {
    let shipped = read("deploy/supervisord/testflinger-agent.conf");
    let setting = |key: &str| -> Option<String> {
        shipped
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
    };
    let text = read("docs/migrating.md");
    let here = text
        .split("## The charm's supervisord file")
        .nth(1)
        .expect("migrating.md has the supervisord section");
    let mut quoted = 0;
    for line in here.lines().filter(|l| l.starts_with("| `")) {
        // The "Here" column: the third cell.
        let Some(cell) = line.split('|').nth(3) else {
            continue;
        };
        for span in cell.split('`').skip(1).step_by(2) {
            let Some((key, value)) = span.split_once('=') else {
                continue;
            };
            assert_eq!(
                setting(key).as_deref(),
                Some(value),
                "docs/migrating.md says {key}={value}; deploy/supervisord/testflinger-agent.conf differs"
            );
            quoted += 1;
        }
    }
    assert!(quoted >= 6, "only {quoted} settings quoted");
}

/// A figure's value as `bench/README.md` shows it: three significant digits or so, `×` for a ratio.
fn shown(value: f64, unit: &str) -> String {
    let size = value.abs();
    let whole = value.fract() == 0.0 && matches!(unit, "processes" | "requests");
    let text = if whole || size >= 100.0 {
        format!("{value:.0}")
    } else if size >= 10.0 {
        format!("{value:.1}")
    } else if size >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    };
    if unit == "ratio" {
        format!("{text}×")
    } else {
        format!("{text} {unit}")
    }
}

/// `bench/README.md`'s performance table, rendered from the suite's JSON.
fn performance_table(results: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_else(|| panic!("bench/results.json: `{key}` is not a string in {v}"))
            .to_string()
    };
    let cell = |s: String| s.replace('|', "\\|");
    let host = &results["host"];
    let mut out = format!(
        "Generated from `bench/results.json`, the JSON of a {} run of `bench/all.sh` on {} \
         ({} build, {} cores, kernel {}, load average {} before measuring; tmpfs: {}).",
        text(results, "mode"),
        text(results, "date"),
        text(results, "build"),
        host["cores"],
        text(host, "kernel"),
        text(host, "load_before"),
        text(results, "tmpfs"),
    );
    let note = text(results, "note");
    if !note.is_empty() {
        out.push_str(&format!(" {note}"));
    }
    out.push_str(
        "\nTargets are issue 10's; a row \"the limit\" is the physical limit the row above \
         or below is measured against in the same run.\n\n\
         | What | Figure | Target | Met? | Command |\n|---|---|---|---|---|\n",
    );
    let figures = results["figures"]
        .as_array()
        .expect("bench/results.json has a `figures` array");
    for figure in figures {
        let value = figure["value"]
            .as_f64()
            .unwrap_or_else(|| panic!("bench/results.json: a figure without a number: {figure}"));
        let target = text(figure, "target");
        let met = match figure["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {met} | `{}` |\n",
            cell(text(figure, "label")),
            shown(value, &text(figure, "unit")),
            if target.is_empty() {
                "—".to_string()
            } else {
                cell(target)
            },
            text(figure, "source"),
        ));
    }
    out
}

fn bench_results() -> serde_json::Value {
    serde_json::from_str(&read("bench/results.json")).expect("bench/results.json is JSON")
}

#[test]
fn the_performance_table_is_bench_results_json() {
    check_block(
        "bench/README.md",
        "performance",
        &performance_table(&bench_results()),
    );
}

/// The committed figures come from a whole full run: every figure present, none missing,
/// no producer failed.
#[test]
fn bench_results_json_is_a_complete_full_run() {
    let results = bench_results();
    assert_eq!(
        results["mode"], "full",
        "bench/results.json is from a --smoke run"
    );
    for key in ["missing", "problems", "failed_producers"] {
        assert_eq!(
            results[key].as_array().map(Vec::len),
            Some(0),
            "bench/results.json: `{key}` is not an empty list: {}",
            results[key]
        );
    }
    let figures = results["figures"].as_array().expect("a figures array");
    assert!(figures.len() >= 40, "only {} figures", figures.len());
    for figure in figures {
        assert!(
            figure["value"].as_f64().is_some_and(f64::is_finite),
            "{figure}"
        );
    }
}

/// The README's two commands, exactly as a newcomer is to type them, each in a `sh` block.
#[test]
fn the_readme_shows_the_two_commands() {
    let lines = shell_lines(&read("README.md"));
    for command in [
        "cargo run --release -- run-job -c examples/agent.yaml examples/job.yaml",
        "cargo test",
    ] {
        assert!(
            lines.iter().any(|line| line.trim() == command),
            "README.md has no `sh` line `{command}`"
        );
    }
}

/// The README sends each reader to one page: every one of them is linked.
#[test]
fn the_readme_links_every_readers_page() {
    let readme = read("README.md");
    for page in [
        "docs/operating.md",
        "docs/auditing.md",
        "docs/architecture.md",
        "docs/migrating.md",
        "docs/configuration.md",
        "bench/README.md",
    ] {
        assert!(
            readme.contains(&format!("]({page})")),
            "README.md does not link {page}"
        );
    }
}

/// The targets of the Markdown links `[text](target)` in `text` that stay in the
/// repository: no scheme, no bare `#anchor`; the anchor is cut off.
fn relative_links(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for (i, _) in text.match_indices("](") {
        let rest = &text[i + 2..];
        let Some(end) = rest.find(')') else {
            continue;
        };
        let target = &rest[..end];
        if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
            continue;
        }
        let path = target.split('#').next().unwrap_or_default();
        if !path.is_empty() {
            targets.push(path.to_owned());
        }
    }
    targets
}

/// Every relative link of the README, the pages under `docs/` and `bench/README.md` names
/// a file or folder that exists (anchors into the specification and the architecture are
/// checked by `spec::`).
#[test]
fn every_relative_link_names_a_file() {
    let root = Path::new(ROOT);
    let mut pages = vec!["README.md".to_owned(), "bench/README.md".to_owned()];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/ is a folder") {
        let name = entry.expect("a docs/ entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".md") {
            pages.push(format!("docs/{name}"));
        }
    }
    let mut seen = 0;
    let mut broken = Vec::new();
    for page in &pages {
        let dir = Path::new(page).parent().unwrap_or(Path::new(""));
        for target in relative_links(&read(page)) {
            seen += 1;
            if !root.join(dir).join(&target).exists() {
                broken.push(format!("{page}: {target}"));
            }
        }
    }
    assert!(seen >= 10, "only {seen} relative links found");
    assert!(
        broken.is_empty(),
        "links to nothing:\n{}",
        broken.join("\n")
    );
}

/// The link scan itself, on made-up text: it finds relative targets, cuts anchors and
/// leaves web addresses and in-page anchors alone.
#[test]
fn the_link_scan_finds_relative_targets() {
    let text = "[a](docs/x.md) [b](https://e.org/y.md) [c](#here) [d](../README.md#top) [e](x)";
    assert_eq!(relative_links(text), ["docs/x.md", "../README.md", "x"]);
}
