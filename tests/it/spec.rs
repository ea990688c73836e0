//! The specification and the architecture page against what cites them: every `§x.y` in
//! `src/`, `tests/`, `benches/` and `fuzz/fuzz_targets/` names a heading of
//! `docs/protocol.md`, and every link to `docs/protocol.md#…` or `docs/architecture.md#…`
//! (in those folders, the READMEs and `docs/`) names a heading of that page.
//!
//! A citation is `§` followed by a section number (`§5`, `§5.4`); several may share a line
//! (`§5.4/§5.5`, `§1-§3`). `§` after `RFC <number>` cites that RFC and is not checked, nor
//! is the placeholder `§x.y`, nor this file (its self-test holds made-up citations).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SPEC: &str = "docs/protocol.md";
const ARCHITECTURE: &str = "docs/architecture.md";
/// The folders whose `.rs` files may cite the specification.
const CITING: [&str; 4] = ["src", "tests", "benches", "fuzz/fuzz_targets"];

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every file under `dir` (recursively) whose name ends with `ext`, sorted.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().ends_with(ext) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The section numbers of `markdown`'s `##` and `###` headings: `## 5. States` gives `5`,
/// `### 5.4 Failure` gives `5.4`.
fn section_numbers(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|line| {
            let title = line
                .strip_prefix("### ")
                .or_else(|| line.strip_prefix("## "))?;
            let number: String = title
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let number = number.trim_end_matches('.');
            (!number.is_empty()).then(|| number.to_string())
        })
        .collect()
}

/// The section numbers `text` cites with `§`, each with its 1-based line number.
fn citations(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        for (at, _) in line.match_indices('§') {
            let before = line[..at].trim_end();
            let rfc = before
                .rsplit_once(' ')
                .map_or(before, |(head, _)| head)
                .ends_with("RFC");
            if rfc && before.ends_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            let after = line[at + '§'.len_utf8()..].trim_start();
            // `§x.y` is how the docs write "a section": a placeholder, not a citation.
            if after.starts_with('x') {
                continue;
            }
            let number: String = after
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            // A trailing dot ends the sentence, not the number.
            found.push((index + 1, number.trim_end_matches('.').to_string()));
        }
    }
    found
}

/// The anchor GitHub gives a heading: lower case, punctuation dropped (letters, digits,
/// `-` and `_` kept), spaces turned into `-`.
fn anchor(title: &str) -> String {
    title
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of every heading of `markdown`.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut inside_fence = false;
    let mut found = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            inside_fence = !inside_fence;
            continue;
        }
        if inside_fence {
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            found.insert(anchor(&line[hashes..]));
        }
    }
    found
}

/// The anchors `text` links to on `page` (`page#anchor`, also written `../page#anchor` or
/// with the page's file name alone), each with its line number.
fn links_to(text: &str, page: &str) -> Vec<(usize, String)> {
    let name = page.rsplit('/').next().unwrap_or(page);
    let needle = format!("{name}#");
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        for (at, _) in line.match_indices(&needle) {
            let target: String = line[at + needle.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            found.push((index + 1, target));
        }
    }
    found
}

/// Each citation in `sources` (path, text) that is not a section of `spec`, as
/// `path:line: §number`.
fn missing_citations(spec: &BTreeSet<String>, sources: &[(String, String)]) -> Vec<String> {
    let mut missing = Vec::new();
    for (path, text) in sources {
        for (line, number) in citations(text) {
            if !spec.contains(&number) {
                missing.push(format!("{path}:{line}: §{number}"));
            }
        }
    }
    missing
}

/// The `.rs` files that may cite the specification, as (path relative to the root, text).
fn citing_sources() -> Vec<(String, String)> {
    let root = Path::new(ROOT);
    CITING
        .iter()
        .flat_map(|dir| files(&root.join(dir), ".rs"))
        .filter(|path| !path.ends_with("tests/it/spec.rs"))
        .map(|path| {
            let shown = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            let text = read(&path);
            (shown, text)
        })
        .collect()
}

#[test]
fn the_specification_numbers_its_sections() {
    let spec = section_numbers(&read(&Path::new(ROOT).join(SPEC)));
    // The sections the code has always cited: a renumbering would break them all.
    for number in ["1", "1.1", "3.11", "5.4", "5.6", "9.2", "14.3", "15.2"] {
        assert!(spec.contains(number), "{SPEC} has no section {number}");
    }
    assert!(spec.len() > 60, "{SPEC} lists only {} sections", spec.len());
}

#[test]
fn every_cited_section_exists() {
    let spec = section_numbers(&read(&Path::new(ROOT).join(SPEC)));
    let sources = citing_sources();
    let cited: usize = sources.iter().map(|(_, text)| citations(text).len()).sum();
    // The code cites the specification some eighty times; finding none means the scan broke.
    assert!(cited > 50, "found only {cited} citations of {SPEC}");
    let missing = missing_citations(&spec, &sources);
    assert!(
        missing.is_empty(),
        "these cite a section that {SPEC} does not have:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_link_into_the_specification_and_the_architecture_names_a_heading() {
    let root = Path::new(ROOT);
    let mut texts = citing_sources();
    for path in files(&root.join("docs"), ".md")
        .into_iter()
        .chain([root.join("README.md"), root.join("bench/README.md")])
    {
        let shown = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let text = read(&path);
        texts.push((shown, text));
    }
    let mut broken = Vec::new();
    let mut seen = 0;
    for page in [SPEC, ARCHITECTURE] {
        let headings = anchors(&read(&root.join(page)));
        for (path, text) in &texts {
            for (line, target) in links_to(text, page) {
                seen += 1;
                if !headings.contains(&target) {
                    broken.push(format!("{path}:{line}: {page}#{target}"));
                }
            }
        }
    }
    assert!(seen > 0, "no link into {SPEC} or {ARCHITECTURE} was found");
    assert!(
        broken.is_empty(),
        "these link to a heading that does not exist:\n{}",
        broken.join("\n")
    );
}

/// The checks themselves, on made-up text: a missing section and a broken anchor are found,
/// an RFC's section is not taken for ours.
#[test]
fn the_checks_find_what_is_wrong() {
    let spec = section_numbers("# T\n## 1. One\n### 1.1 Base\n### 1.2 Two, more\n## 2. X\n");
    assert_eq!(
        spec.into_iter().collect::<Vec<_>>(),
        ["1", "1.1", "1.2", "2"]
    );
    let spec = section_numbers("## 1. One\n### 1.1 Base\n### 5.4 Failure\n");
    let sources = vec![(
        "src/x.rs".to_string(),
        "// PROTOCOL §1.1 and §5.4/§9.9.\n// see §1-§3 (RFC 9112 §2.2), §x.y, §?\n".to_string(),
    )];
    assert_eq!(
        missing_citations(&spec, &sources),
        ["src/x.rs:1: §9.9", "src/x.rs:2: §3", "src/x.rs:2: §"]
    );
    assert_eq!(
        anchor(" 3.1 `GET /v1` — health probe"),
        "31-get-v1--health-probe"
    );
    let page = anchors("## 5.4 Failure, abort and exit codes\n```\n# not a heading\n```\n");
    assert!(page.contains("54-failure-abort-and-exit-codes"));
    assert!(!page.contains("not-a-heading"));
    let links = links_to(
        "[a](docs/protocol.md#54-failure-abort-and-exit-codes) [b](protocol.md#nope)",
        SPEC,
    );
    assert_eq!(
        links,
        [
            (1, "54-failure-abort-and-exit-codes".to_string()),
            (1, "nope".to_string())
        ]
    );
}
