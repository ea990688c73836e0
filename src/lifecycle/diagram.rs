//! Renders state machines to Mermaid and DOT, deterministically (table order, no
//! timestamps), for the committed files in `state-diagrams/`.

use super::transitions::{EdgeKind, STATES, TRANSITIONS};

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
                    EdgeKind::Abort => format!("{}() fails or stop", t.method),
                    EdgeKind::Cleanup => format!("{}()", t.method),
                };
                (t.from, label, t.to, t.kind == EdgeKind::Abort)
            })
            .collect(),
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
