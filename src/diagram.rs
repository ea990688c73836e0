//! Renders state machines to Mermaid and DOT, deterministically (table order, no
//! timestamps). A leaf: each machine's own module builds its [`Machine`] from the table its
//! code runs on (`lifecycle::job_machine`, `process::command_machine`,
//! `daemon::daemon_machine`), and `audit` gathers them.

/// A state machine to draw: its states in order and its labelled edges.
#[derive(Clone, Debug)]
pub struct Machine {
    pub name: &'static str,
    pub title: &'static str,
    pub initial: &'static str,
    pub terminal: &'static str,
    pub states: Vec<&'static str>,
    pub edges: Vec<Edge>,
}

/// One edge of a [`Machine`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    pub from: String,
    pub label: String,
    pub to: String,
    /// Drawn dashed (the abort edges of the job lifecycle).
    pub dashed: bool,
}

impl Edge {
    pub fn new(from: &str, label: impl Into<String>, to: &str, dashed: bool) -> Edge {
        Edge {
            from: from.to_owned(),
            label: label.into(),
            to: to.to_owned(),
            dashed,
        }
    }
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

/// The path one run took through a machine, to draw over it: the edges in the order they
/// were taken (an edge taken twice appears twice). A step that is no edge of the machine
/// (same ends and label), such as crash recovery ending a job from wherever it was, is
/// drawn as an added edge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Path {
    pub steps: Vec<Edge>,
}

impl Machine {
    /// A machine from a `(from, event, to)` table, states in order of first appearance.
    pub fn from_table(
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
                .map(|(from, event, to)| Edge::new(from, *event, to, false))
                .collect(),
        }
    }

    /// The index of the machine's edge from `from` to `to` labelled `label`.
    fn edge_index(&self, from: &str, label: &str, to: &str) -> Option<usize> {
        self.edges
            .iter()
            .position(|e| e.from == from && e.to == to && e.label == label)
    }
}

/// Renders `machine` in `format`.
pub fn render(machine: &Machine, format: Format) -> String {
    render_path(machine, format, None)
}

/// One edge as drawn: the machine's edge, or a step the machine has no edge for; with the
/// step numbers at which the path took it (empty: not taken).
struct Drawn {
    edge: Edge,
    steps: Vec<usize>,
    added: bool,
}

/// Renders `machine` with `path` drawn over it: the edges taken are bold and carry the
/// step numbers (`1,4: setup()`), the others are faded, and steps without an edge in the
/// machine are added in red. `None` renders the plain machine.
pub fn render_path(machine: &Machine, format: Format, path: Option<&Path>) -> String {
    let mut drawn: Vec<Drawn> = machine
        .edges
        .iter()
        .map(|edge| Drawn {
            edge: edge.clone(),
            steps: Vec::new(),
            added: false,
        })
        .collect();
    if let Some(path) = path {
        for (n, step) in path.steps.iter().enumerate() {
            let found = machine
                .edge_index(&step.from, &step.label, &step.to)
                .filter(|_| !step.from.is_empty());
            match found {
                Some(i) => drawn[i].steps.push(n + 1),
                None => match drawn
                    .iter_mut()
                    .find(|d| d.added && d.edge.from == step.from && d.edge.to == step.to)
                {
                    Some(d) => d.steps.push(n + 1),
                    None => drawn.push(Drawn {
                        edge: step.clone(),
                        steps: vec![n + 1],
                        added: true,
                    }),
                },
            }
        }
    }
    let highlighted = path.is_some();
    match format {
        Format::Mermaid => mermaid(machine, &drawn, highlighted),
        Format::Dot => dot(machine, &drawn, highlighted),
    }
}

fn numbered(d: &Drawn) -> String {
    if d.steps.is_empty() {
        return d.edge.label.clone();
    }
    let steps: Vec<String> = d.steps.iter().map(usize::to_string).collect();
    format!("{}: {}", steps.join(","), d.edge.label)
}

/// A state the path entered (or, with no path, every state).
fn visited(drawn: &[Drawn], state: &str) -> bool {
    drawn
        .iter()
        .any(|d| !d.steps.is_empty() && (d.edge.to == state || d.edge.from == state))
}

fn mermaid(m: &Machine, drawn: &[Drawn], highlighted: bool) -> String {
    let mut out = format!(
        "---\ntitle: {}\n---\nstateDiagram-v2\n    [*] --> {}\n",
        m.title, m.initial
    );
    for d in drawn {
        // Mermaid's state diagrams cannot style one edge: a taken edge is marked by its
        // step numbers (and its states by their class), an added one by its label.
        let label = if d.added {
            format!("{} (not in the table)", numbered(d))
        } else {
            numbered(d)
        };
        out.push_str(&format!("    {} --> {}: {label}\n", d.edge.from, d.edge.to));
    }
    out.push_str(&format!("    {} --> [*]\n", m.terminal));
    if highlighted {
        out.push_str("    classDef taken font-weight:bold,stroke-width:3px\n");
        out.push_str("    classDef faded opacity:0.35\n");
        let (taken, faded): (Vec<&str>, Vec<&str>) =
            m.states.iter().partition(|s| visited(drawn, s));
        if !taken.is_empty() {
            out.push_str(&format!("    class {} taken\n", taken.join(",")));
        }
        if !faded.is_empty() {
            out.push_str(&format!("    class {} faded\n", faded.join(",")));
        }
    }
    out
}

fn dot(m: &Machine, drawn: &[Drawn], highlighted: bool) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n    label=\"{}\";\n    labelloc=t;\n    rankdir=TB;\n    node [shape=box, style=rounded];\n",
        m.name, m.title
    );
    for state in &m.states {
        let mut attrs = Vec::new();
        if *state == m.terminal {
            attrs.push("peripheries=2".to_owned());
        }
        if highlighted {
            if visited(drawn, state) {
                attrs.push("penwidth=2".to_owned());
            } else {
                attrs.push("color=\"gray75\", fontcolor=\"gray60\"".to_owned());
            }
        }
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" [{}]", attrs.join(", "))
        };
        out.push_str(&format!("    \"{state}\"{attrs};\n"));
    }
    for d in drawn {
        let mut style = String::new();
        if d.edge.dashed {
            style.push_str(", style=dashed");
        }
        if highlighted {
            style.push_str(match (d.added, d.steps.is_empty()) {
                (true, _) => ", penwidth=3, color=\"red\", fontcolor=\"red\"",
                (false, false) => ", penwidth=3",
                (false, true) => ", color=\"gray75\", fontcolor=\"gray60\"",
            });
        }
        out.push_str(&format!(
            "    \"{}\" -> \"{}\" [label=\"{}\"{style}];\n",
            d.edge.from,
            d.edge.to,
            numbered(d)
        ));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine::from_table(
            "m",
            "M",
            "a",
            "c",
            &[("a", "go", "b"), ("b", "go", "c"), ("a", "skip", "c")],
        )
    }

    #[test]
    fn plain_rendering_lists_every_edge_once() {
        let dot = render(&machine(), Format::Dot);
        assert!(dot.contains("\"a\" -> \"b\" [label=\"go\"];"));
        assert!(dot.contains("\"a\" -> \"c\" [label=\"skip\"];"));
        let mermaid = render(&machine(), Format::Mermaid);
        assert!(mermaid.contains("    a --> b: go\n"));
        assert!(!mermaid.contains("classDef"));
    }

    #[test]
    fn a_path_is_numbered_bold_and_the_rest_faded() {
        let path = Path {
            steps: vec![
                Edge::new("a", "go", "b", false),
                Edge::new("b", "go", "c", false),
            ],
        };
        let dot = render_path(&machine(), Format::Dot, Some(&path));
        assert!(
            dot.contains("\"a\" -> \"b\" [label=\"1: go\", penwidth=3];"),
            "{dot}"
        );
        assert!(
            dot.contains("\"b\" -> \"c\" [label=\"2: go\", penwidth=3];"),
            "{dot}"
        );
        assert!(
            dot.contains("\"a\" -> \"c\" [label=\"skip\", color=\"gray75\""),
            "{dot}"
        );
        let mermaid = render_path(&machine(), Format::Mermaid, Some(&path));
        assert!(mermaid.contains("    a --> b: 1: go\n"), "{mermaid}");
        assert!(mermaid.contains("class a,b,c taken"), "{mermaid}");
    }

    #[test]
    fn a_step_the_table_lacks_is_added_in_red() {
        let path = Path {
            steps: vec![
                Edge::new("b", "crash recovery", "a", false),
                // Same ends as an edge of the table, another label: not that edge.
                Edge::new("a", "crash recovery", "c", false),
            ],
        };
        let dot = render_path(&machine(), Format::Dot, Some(&path));
        assert!(
            dot.contains("\"b\" -> \"a\" [label=\"1: crash recovery\", penwidth=3, color=\"red\""),
            "{dot}"
        );
        assert!(
            dot.contains("\"a\" -> \"c\" [label=\"2: crash recovery\", penwidth=3, color=\"red\""),
            "{dot}"
        );
        assert!(dot.contains("\"a\" -> \"c\" [label=\"skip\", color=\"gray75\""));
        let mermaid = render_path(&machine(), Format::Mermaid, Some(&path));
        assert!(mermaid.contains("b --> a: 1: crash recovery (not in the table)"));
    }
}
