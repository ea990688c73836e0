//! What an auditor reads. Every state machine the agent runs on, each drawn from the table
//! its own code moves along ([`machines`], [`write_all`]); and one job's path through the
//! lifecycle, from the trail its journal keeps ([`explain_table`], [`explain_diagram`]).
//! The top layer beside `main`: it gathers from below and nothing imports it.

use crate::diagram::{self, Edge, Format, Machine};
use crate::journal::{Journal, TrailEntry, Why};
use std::path::{Path, PathBuf};

/// Every state machine, by name: the job lifecycle, one phase command and the daemon.
pub fn machines() -> Vec<Machine> {
    vec![
        crate::lifecycle::diagram::job_machine(),
        crate::process::command_machine(),
        crate::daemon::daemon_machine(),
    ]
}

/// Writes every machine in every format (Mermaid, DOT, the Markdown transition table)
/// into `dir`; returns the paths written.
pub fn write_all(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for machine in machines() {
        for format in Format::ALL {
            let path = dir.join(format!("{}.{}", machine.name, format.extension()));
            std::fs::write(&path, diagram::render(&machine, format))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The lifecycle edges a job's trail took, in order. The first entry (the job taken) is
/// the diagram's initial state, not an edge. A step the lifecycle table has no edge for
/// (crash recovery ends a job from wherever it was) keeps its cause as its label.
pub fn trail_path(journal: &Journal) -> diagram::Path {
    let machine = crate::lifecycle::diagram::job_machine();
    let steps = journal
        .trail
        .iter()
        .filter(|entry| !entry.from.is_empty())
        .map(|entry| {
            // Recovery is not the lifecycle's abort edge, even between the same states.
            let label = machine
                .edges
                .iter()
                .find(|e| e.from == entry.from && e.to == entry.to)
                .filter(|_| entry.why != Why::CrashRecovery)
                .map_or_else(|| step_label(entry), |e| e.label.clone());
            Edge::new(&entry.from, label, &entry.to, false)
        })
        .collect();
    diagram::Path { steps }
}

fn step_label(entry: &TrailEntry) -> String {
    match &entry.phase {
        Some(phase) => format!("{} ({phase})", entry.why.describe()),
        None => entry.why.describe().to_owned(),
    }
}

/// The job lifecycle with `journal`'s path drawn over it.
pub fn explain_diagram(journal: &Journal, format: Format) -> String {
    diagram::render_path(
        &crate::lifecycle::diagram::job_machine(),
        format,
        Some(&trail_path(journal)),
    )
}

/// The trail as a table: one row per transition, with its time, the states it left and
/// entered, the phase, why, the exit code and how the phase's command ended.
pub fn explain_table(journal: &Journal) -> String {
    let header = ["#", "at", "from", "to", "phase", "why", "exit", "command"];
    let rows: Vec<[String; 8]> = journal
        .trail
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            [
                i.to_string(),
                entry.at.clone(),
                if entry.from.is_empty() {
                    "-".to_owned()
                } else {
                    entry.from.clone()
                },
                entry.to.clone(),
                entry.phase.clone().unwrap_or_else(|| "-".to_owned()),
                entry.why.describe().to_owned(),
                entry
                    .exit_code
                    .map_or_else(|| "-".to_owned(), |code| code.to_string()),
                entry
                    .command
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), ToString::to_string),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = match &journal.check {
        Some(check) => check_heading(journal, check),
        None => format!(
            "job {} ({}, {})\n",
            journal.job_id,
            if journal.finished {
                "finished"
            } else {
                "not finished"
            },
            summary(journal)
        ),
    };
    out.push_str(&line(header.to_vec()));
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The heading of a device health check's trail: when it started, what it came to and
/// in how long, what asked for it, its last output line and where its output is.
fn check_heading(journal: &Journal, check: &crate::journal::CheckSummary) -> String {
    let started = journal.trail.first().map_or("?", |entry| entry.at.as_str());
    let mut out = format!(
        "health check started {started} ({}): {} in {:.1} s\n",
        check.why,
        check.result,
        // Milliseconds to seconds for the reader; the precision lost is below the shown one.
        check.duration_ms as f64 / 1000.0
    );
    out.push_str(&format!("last output line: {:?}\n", check.last_line));
    if let Some(log) = &check.log {
        out.push_str(&format!("output: {log}\n"));
    }
    out
}

/// One phrase for how the job went: its last state and, if any, what ended it early.
fn summary(journal: &Journal) -> String {
    let early = journal
        .trail
        .iter()
        .find(|e| e.to == "Aborted")
        .map(step_label);
    let recovered = journal.trail.iter().any(|e| e.why == Why::CrashRecovery);
    let mut text = format!("last state {}", journal.state);
    if let Some(early) = early {
        text.push_str(&format!("; aborted: {early}"));
    }
    if recovered {
        text.push_str("; ended by crash recovery");
    }
    text
}

/// How many kept trails [`where_trails_are`] names.
pub const TRAILS_SHOWN: usize = 5;

/// What `explain` says when `path` holds no trail: that every run directory the agent
/// leaves holds one, where the finished jobs' trails are kept (`trails_dir`, found from
/// `whence`), how many are there and the newest few, and this job's own if it is among
/// them. `trails` is [`crate::trails::list`] of `trails_dir`.
pub fn where_trails_are(
    path: &Path,
    trails_dir: &Path,
    whence: &str,
    trails: &std::io::Result<Vec<crate::trails::KeptTrail>>,
) -> String {
    let mut out = format!(
        "Each run directory the agent leaves (the daemon's and run-job's) holds its job's \
         trail in {}, and the trails of finished jobs are kept in <logging_basedir>/{}/.\n",
        crate::journal::JOURNAL_FILE,
        crate::trails::TRAILS_DIR
    );
    out.push_str(&format!(
        "Device health checks keep theirs beside their output in <logging_basedir>/{}/ \
         (explain takes that directory, for the newest, or a check's .trail.json).\n",
        crate::healthcheck::LOG_DIR
    ));
    let where_ = format!("{} ({whence})", trails_dir.display());
    let trails = match trails {
        Ok(trails) => trails,
        Err(err) => {
            out.push_str(&format!("Kept trails: cannot list {where_}: {err}\n"));
            return out;
        }
    };
    if trails.is_empty() {
        out.push_str(&format!("Kept trails: none in {where_}.\n"));
        return out;
    }
    out.push_str(&format!(
        "Kept trails: {} in {where_}; the newest:\n",
        trails.len()
    ));
    for trail in trails.iter().take(TRAILS_SHOWN) {
        out.push_str(&format!(
            "  {}  {}\n",
            crate::time::iso_at(trail.modified),
            trail.path.display()
        ));
    }
    // A run directory is named after its job: its trail may be kept.
    let job_id = path.file_name().map(|name| name.to_string_lossy());
    if let Some(own) = job_id.and_then(|id| trails.iter().find(|t| t.job_id() == id)) {
        out.push_str(&format!(
            "This job's trail is kept: testflinger-agent explain {}\n",
            own.path.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagram::render;

    /// The committed files in `state-diagrams/` are exactly what the code renders.
    #[test]
    fn committed_diagrams_are_up_to_date() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("state-diagrams");
        let mut stale = Vec::new();
        for machine in machines() {
            for format in Format::ALL {
                let path = dir.join(format!("{}.{}", machine.name, format.extension()));
                let committed = std::fs::read_to_string(&path).unwrap_or_default();
                if committed != render(&machine, format) {
                    stale.push(path.display().to_string());
                }
            }
        }
        assert!(
            stale.is_empty(),
            "state diagrams differ from the code: {}\nregenerate with: cargo run -- diagram --write state-diagrams",
            stale.join(", ")
        );
    }

    /// Every machine is drawn from the table its code moves along: each table edge is in
    /// its drawing, and the drawing has no other edge.
    #[test]
    fn every_machine_is_its_table() {
        let all = machines();
        let find = |name: &str| {
            all.iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("machine {name}"))
        };
        let daemon = find("daemon");
        assert_eq!(daemon.edges.len(), crate::daemon::DAEMON_TRANSITIONS.len());
        for (from, event, to) in crate::daemon::DAEMON_TRANSITIONS {
            assert!(daemon.edges.contains(&Edge::new(
                from.name(),
                event.label(),
                to.name(),
                false
            )));
        }
        let command = find("command");
        assert_eq!(
            command.edges.len(),
            crate::process::COMMAND_TRANSITIONS.len()
        );
        for (from, event, to) in crate::process::COMMAND_TRANSITIONS {
            assert!(command.edges.contains(&Edge::new(
                from.name(),
                event.label(),
                to.name(),
                false
            )));
        }
        let job = find("job-lifecycle");
        assert_eq!(job.edges.len(), crate::lifecycle::TRANSITIONS.len());
    }

    /// Every picture shows its table, each row exactly once: grouping, junctions and
    /// merged arrows lose nothing and add nothing.
    #[test]
    fn every_picture_shows_each_row_of_its_table_once() {
        for machine in machines() {
            let mut shown =
                diagram::drawing::expand(&machine, &diagram::drawing::drawing(&machine));
            let mut table: Vec<(String, String, String)> = machine
                .edges
                .iter()
                .map(|e| (e.from.clone(), e.label.clone(), e.to.clone()))
                .collect();
            shown.sort();
            table.sort();
            assert_eq!(shown, table, "{}", machine.name);
        }
    }

    /// The daemon's picture is grouped: no event is drawn more than twice, and the holds
    /// and the stop are drawn from boxes or a junction, not from each state.
    #[test]
    fn the_daemon_picture_draws_each_event_at_most_twice() {
        let daemon = crate::daemon::daemon_machine();
        let picture = diagram::drawing::drawing(&daemon);
        for (_, event, _) in crate::daemon::DAEMON_TRANSITIONS {
            let drawn = picture
                .arrows
                .iter()
                .filter(|a| a.labels.iter().any(|l| l == event.label()))
                .count();
            assert!(
                (1..=2).contains(&drawn),
                "{event:?} drawn {drawn} times: {picture:?}"
            );
        }
    }

    /// The newest few trails are named, this job's own is pointed at, and a directory
    /// that cannot be listed is said so.
    #[test]
    fn where_trails_are_names_the_newest_and_the_jobs_own() {
        use crate::trails::KeptTrail;
        let trails: Vec<KeptTrail> = (0..TRAILS_SHOWN + 2)
            .map(|i| KeptTrail {
                path: PathBuf::from(format!("/t/job-{i}.json")),
                modified: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000 - i as u64),
            })
            .collect();
        let text = where_trails_are(
            Path::new("/run/job-1"),
            Path::new("/t"),
            "from here",
            &Ok(trails),
        );
        assert!(
            text.contains("Kept trails: 7 in /t (from here); the newest:"),
            "{text}"
        );
        assert_eq!(
            text.matches("  1970-01-01T00:").count(),
            TRAILS_SHOWN,
            "{text}"
        );
        assert!(!text.contains("/t/job-6.json"), "{text}");
        assert!(
            text.ends_with("This job's trail is kept: testflinger-agent explain /t/job-1.json\n"),
            "{text}"
        );
        let none = where_trails_are(Path::new("/run/x"), Path::new("/t"), "w", &Ok(Vec::new()));
        assert!(none.contains("Kept trails: none in /t (w)."), "{none}");
        let failed = where_trails_are(
            Path::new("/run/x"),
            Path::new("/t"),
            "w",
            &Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
        );
        assert!(failed.contains("cannot list /t (w)"), "{failed}");
    }

    fn passing_journal() -> Journal {
        let mut journal = Journal::taken("j", "t0".into());
        for (phase, to) in [("setup", "Setup"), ("provision", "Provisioned")] {
            journal.transition("t".into(), to, Some(phase), Why::Exit, Some(0));
        }
        journal
    }

    #[test]
    fn the_path_follows_the_trail() {
        let path = trail_path(&passing_journal());
        let edges: Vec<(&str, &str)> = path
            .steps
            .iter()
            .map(|e| (e.from.as_str(), e.to.as_str()))
            .collect();
        assert_eq!(edges, [("Polled", "Setup"), ("Setup", "Provisioned")]);
        assert_eq!(path.steps[0].label, "setup()");
        let dot = explain_diagram(&passing_journal(), Format::Dot);
        assert!(
            dot.contains("\"Polled\" -> \"Setup\" [label=\"1: setup()\", penwidth=3];"),
            "{dot}"
        );
    }

    #[test]
    fn the_table_has_a_row_per_transition() {
        let mut journal = passing_journal();
        journal.annotate_last(crate::journal::CommandEnd {
            how: crate::journal::Ending::SigkillNeeded,
            escapees: 2,
            stragglers: 0,
        });
        let table = explain_table(&journal);
        assert_eq!(table.lines().count(), 2 + 3, "{table}");
        assert!(
            table.contains("SIGKILL needed, 2 escapee(s) ended"),
            "{table}"
        );
    }
}
