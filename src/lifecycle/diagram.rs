//! Renders state machines to Mermaid and DOT, deterministically (table order, no
//! timestamps), for the committed files in `state-diagrams/`.

use super::transitions::{EdgeKind, STATES, TRANSITIONS};
use crate::phase::Phase;

/// A state machine to draw: its states in order and its labelled edges.
#[derive(Clone, Debug)]
pub struct Machine {
    pub name: &'static str,
    pub title: &'static str,
    pub initial: &'static str,
    pub terminal: &'static str,
    pub states: Vec<&'static str>,
    /// (from, label, to, dashed)
    pub edges: Vec<(&'static str, String, &'static str, bool)>,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Mermaid,
    Dot,
}

impl Format {
    /// The file extension used in `state-diagrams/`.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Mermaid => "mmd",
            Format::Dot => "dot",
        }
    }
}

/// The job lifecycle, from [`TRANSITIONS`].
pub fn job_machine() -> Machine {
    Machine {
        name: "job-lifecycle",
        title: "Job lifecycle (typestate: one type per state)",
        initial: "Polled",
        terminal: "Cleaned",
        states: STATES.to_vec(),
        edges: TRANSITIONS
            .iter()
            .map(|t| {
                let label = match t.kind {
                    EdgeKind::Forward => format!("{}()", t.method),
                    EdgeKind::Abort => abort_label(t.method),
                    EdgeKind::Cleanup => format!("{}()", t.method),
                };
                (t.from, label, t.to, t.kind == EdgeKind::Abort)
            })
            .collect(),
    }
}

/// Why a forward transition can end in `Aborted` (PROTOCOL §5.4): a failing test phase does
/// not abort, only its timeout, cancellation, shutdown, a recovery failure or the agent
/// failing to record it does.
fn abort_label(method: &str) -> String {
    let fails = Phase::from_name(method).is_some_and(Phase::failure_aborts);
    if fails {
        format!("{method}() fails, times out or is stopped")
    } else {
        format!("{method}() times out, is stopped, exits 46 or cannot be recorded")
    }
}

/// Renders `machine` in `format`.
pub fn render(machine: &Machine, format: Format) -> String {
    match format {
        Format::Mermaid => mermaid(machine),
        Format::Dot => dot(machine),
    }
}

fn mermaid(m: &Machine) -> String {
    let mut out = format!(
        "---\ntitle: {}\n---\nstateDiagram-v2\n    [*] --> {}\n",
        m.title, m.initial
    );
    for (from, label, to, _) in &m.edges {
        out.push_str(&format!("    {from} --> {to}: {label}\n"));
    }
    out.push_str(&format!("    {} --> [*]\n", m.terminal));
    out
}

fn dot(m: &Machine) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n    label=\"{}\";\n    labelloc=t;\n    rankdir=TB;\n    node [shape=box, style=rounded];\n",
        m.name, m.title
    );
    for state in &m.states {
        let shape = if *state == m.terminal {
            " [peripheries=2]"
        } else {
            ""
        };
        out.push_str(&format!("    \"{state}\"{shape};\n"));
    }
    for (from, label, to, dashed) in &m.edges {
        let style = if *dashed { ", style=dashed" } else { "" };
        out.push_str(&format!(
            "    \"{from}\" -> \"{to}\" [label=\"{label}\"{style}];\n"
        ));
    }
    out.push_str("}\n");
    out
}

/// A machine from a `(from, event, to)` table, states in order of first appearance.
pub fn table_machine(
    name: &'static str,
    title: &'static str,
    initial: &'static str,
    terminal: &'static str,
    table: &[(&'static str, &'static str, &'static str)],
) -> Machine {
    let mut states: Vec<&'static str> = Vec::new();
    for (from, _, to) in table {
        for state in [*from, *to] {
            if !states.contains(&state) {
                states.push(state);
            }
        }
    }
    Machine {
        name,
        title,
        initial,
        terminal,
        states,
        edges: table
            .iter()
            .map(|(from, event, to)| (*from, (*event).to_owned(), *to, false))
            .collect(),
    }
}

/// Every state machine the project draws, by name: the job lifecycle, one phase command
/// ([`crate::process::COMMAND_TRANSITIONS`]) and the daemon
/// ([`crate::daemon::DAEMON_TRANSITIONS`]).
pub fn machines() -> Vec<Machine> {
    vec![
        job_machine(),
        table_machine(
            "command",
            "One phase command (process group)",
            "running",
            "exited",
            crate::process::COMMAND_TRANSITIONS,
        ),
        table_machine(
            "daemon",
            "The agent daemon",
            "starting",
            "stopped",
            crate::daemon::DAEMON_TRANSITIONS,
        ),
    ]
}

/// Writes every machine in every format into `dir`; returns the paths written.
pub fn write_all(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for machine in machines() {
        for format in [Format::Mermaid, Format::Dot] {
            let path = dir.join(format!("{}.{}", machine.name, format.extension()));
            std::fs::write(&path, render(&machine, format))?;
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed files in `state-diagrams/` are exactly what the code renders.
    #[test]
    fn committed_diagrams_are_up_to_date() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("state-diagrams");
        let mut stale = Vec::new();
        for machine in machines() {
            for format in [Format::Mermaid, Format::Dot] {
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

    /// The README embeds the job lifecycle diagram as the code renders it.
    #[test]
    fn readme_embeds_the_current_diagram() {
        let readme = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"),
        )
        .unwrap_or_default();
        let expected = format!(
            "<!-- diagram:job-lifecycle:start -->\n```mermaid\n{}```\n<!-- diagram:job-lifecycle:end -->",
            render(&job_machine(), Format::Mermaid)
        );
        assert!(
            readme.contains(&expected),
            "README.md does not embed the current job diagram; paste the output of\n  cargo run -- diagram --format mermaid\nbetween the diagram:job-lifecycle markers"
        );
    }

    #[test]
    fn renders_every_edge() {
        let m = job_machine();
        let mermaid = render(&m, Format::Mermaid);
        let dot = render(&m, Format::Dot);
        for t in TRANSITIONS {
            assert!(mermaid.contains(&format!("{} --> {}", t.from, t.to)));
            assert!(dot.contains(&format!("\"{}\" -> \"{}\"", t.from, t.to)));
        }
    }
}
