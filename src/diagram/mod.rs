//! Renders state machines to Mermaid, DOT and a Markdown transition table,
//! deterministically (table order, no timestamps). A leaf: each machine's own module builds
//! its [`Machine`] from the table its code runs on (`lifecycle::job_machine`,
//! `process::command_machine`, `daemon::daemon_machine`), and `audit` gathers them.
//!
//! The pictures group what the table repeats ([`drawing`]); the transition table lists
//! every row as it is; the path one job took ([`render_path`]) is drawn edge by edge.

pub mod drawing;

use drawing::{Arrow, Drawing, Node};

/// A state machine to draw: its states in order and its labelled edges.
#[derive(Clone, Debug)]
pub struct Machine {
    pub name: &'static str,
    pub title: &'static str,
    pub initial: &'static str,
    pub terminal: &'static str,
    pub states: Vec<&'static str>,
    pub edges: Vec<Edge>,
    /// Boxes drawn around states, for the picture only (see [`drawing`]).
    pub groups: Vec<Group>,
}

/// A named set of states (or of other groups) drawn as one box: a composite state in
/// Mermaid, a cluster in DOT. An event that takes each of its states to the same state is
/// drawn once, from the box. It changes how the table is drawn, never the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// One word (a Mermaid id), different from every state's name.
    pub name: &'static str,
    pub members: &'static [&'static str],
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
    /// The transition table in Markdown: one row per `(from, event, to)`.
    Table,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Mermaid, Format::Dot, Format::Table];

    /// The file extension used in `state-diagrams/`.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Mermaid => "mmd",
            Format::Dot => "dot",
            Format::Table => "md",
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
            groups: Vec::new(),
        }
    }

    /// The same machine drawn with `groups`.
    pub fn with_groups(mut self, groups: Vec<Group>) -> Machine {
        self.groups = groups;
        self
    }

    /// The index of the machine's edge from `from` to `to` labelled `label`.
    fn edge_index(&self, from: &str, label: &str, to: &str) -> Option<usize> {
        self.edges
            .iter()
            .position(|e| e.from == from && e.to == to && e.label == label)
    }
}

/// Renders `machine` in `format`: the pictures grouped as [`drawing`] says, the table
/// row by row.
pub fn render(machine: &Machine, format: Format) -> String {
    let picture = drawing::drawing(machine);
    match format {
        Format::Mermaid => mermaid_drawing(machine, &picture),
        Format::Dot => dot_drawing(machine, &picture),
        Format::Table => transition_table(machine),
    }
}

/// The transition table in Markdown: every edge of the machine, in table order.
pub fn transition_table(machine: &Machine) -> String {
    let cell = |text: &str| text.replace('|', "\\|");
    let mut out = format!(
        "{}: every transition, in the order of the code's table (start: `{}`, end: `{}`).\n\n\
         | From | Event | To |\n|---|---|---|\n",
        machine.title, machine.initial, machine.terminal
    );
    for edge in &machine.edges {
        out.push_str(&format!(
            "| `{}` | {} | `{}` |\n",
            cell(&edge.from),
            cell(&edge.label),
            cell(&edge.to)
        ));
    }
    out
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
/// machine are added in red. `None` renders the plain machine. Every edge is drawn on its
/// own (no grouping), so that each carries its own step numbers.
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
        Format::Table => transition_table(machine),
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

/// `text` inside DOT double quotes.
fn dot_quoted(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The outermost group holding `state`, if any.
fn outermost_group(m: &Machine, state: &str) -> Option<&'static str> {
    let mut group = m.parent_group(state)?;
    // Bounded: a group listed inside itself has no outermost one.
    for _ in 0..m.groups.len() {
        match m.parent_group(group) {
            Some(parent) => group = parent,
            None => return Some(group),
        }
    }
    Some(group)
}

/// The state a DOT arrow from a group leaves (the line is clipped at the group's box): the
/// group's first state for an arrow back up to a state before the group, else its last.
fn dot_anchor(m: &Machine, group: &str, to: &Node) -> String {
    let states = m.group_states(group);
    let position = |s: &str| m.states.iter().position(|x| *x == s);
    let upward = match to {
        Node::State(to) => match (position(to), states.first().and_then(|s| position(s))) {
            (Some(to), Some(first)) => to < first,
            _ => false,
        },
        _ => false,
    };
    let anchor = if upward {
        states.first()
    } else {
        states.last()
    };
    anchor.map_or_else(|| group.to_owned(), |s| (*s).to_owned())
}

fn dot_node(m: &Machine, state: &str, indent: &str) -> String {
    let attrs = if state == m.terminal {
        " [peripheries=2]"
    } else {
        ""
    };
    format!("{indent}\"{}\"{attrs};\n", dot_quoted(state))
}

fn dot_cluster(m: &Machine, group: &str, depth: usize, out: &mut String) {
    let indent = "    ".repeat(depth);
    out.push_str(&format!(
        "{indent}subgraph \"cluster_{name}\" {{\n{indent}    label=\"{name}\";\n{indent}    style=\"rounded,dashed\";\n",
        name = dot_quoted(group)
    ));
    let members = m
        .groups
        .iter()
        .find(|g| g.name == group)
        .map_or(&[][..], |g| g.members);
    for member in members {
        if m.groups.iter().any(|g| g.name == *member) {
            // Bounded by the nesting of the code's groups; a cycle is not drawn twice.
            if depth <= m.groups.len() && *member != group {
                dot_cluster(m, member, depth + 1, out);
            }
        } else {
            out.push_str(&dot_node(m, member, &format!("{indent}    ")));
        }
    }
    out.push_str(&format!("{indent}}}\n"));
}

/// A DOT end of an arrow whose other end is `other`: its node and, for a group, the
/// cluster its line is clipped at.
fn dot_end(m: &Machine, node: &Node, other: &Node) -> (String, Option<String>) {
    match node {
        Node::State(s) => (s.clone(), None),
        Node::Group(g) => (dot_anchor(m, g, other), Some(format!("cluster_{g}"))),
        Node::Junction(n) => (format!("junction {n}"), None),
    }
}

fn dot_drawing(m: &Machine, d: &Drawing) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n    label=\"{}\";\n    labelloc=t;\n    rankdir=TB;\n",
        dot_quoted(m.name),
        dot_quoted(m.title)
    );
    if !m.groups.is_empty() {
        out.push_str("    compound=true;\n    newrank=true;\n");
    }
    out.push_str("    node [shape=box, style=rounded];\n");
    let mut drawn_groups: Vec<&str> = Vec::new();
    for state in &m.states {
        match outermost_group(m, state) {
            None => out.push_str(&dot_node(m, state, "    ")),
            Some(group) if !drawn_groups.contains(&group) => {
                drawn_groups.push(group);
                dot_cluster(m, group, 1, &mut out);
            }
            Some(_) => {}
        }
    }
    for n in 1..=d.junctions {
        out.push_str(&format!(
            "    \"junction {n}\" [shape=point, width=0.08, label=\"\"];\n"
        ));
    }
    for arrow in &d.arrows {
        out.push_str(&dot_arrow(m, arrow));
    }
    out.push_str("}\n");
    out
}

fn dot_arrow(m: &Machine, arrow: &Arrow) -> String {
    let (from, ltail) = dot_end(m, &arrow.from, &arrow.to);
    let (to, lhead) = dot_end(m, &arrow.to, &arrow.from);
    let mut attrs = Vec::new();
    if arrow.labels.is_empty() {
        attrs.push("arrowhead=none".to_owned());
    } else {
        let lines: Vec<String> = arrow.labels.iter().map(|l| dot_quoted(l)).collect();
        attrs.push(format!("label=\"{}\"", lines.join("\\n")));
    }
    if let Some(cluster) = ltail {
        attrs.push(format!("ltail=\"{}\"", dot_quoted(&cluster)));
    }
    if let Some(cluster) = lhead {
        attrs.push(format!("lhead=\"{}\"", dot_quoted(&cluster)));
    }
    if arrow.dashed {
        attrs.push("style=dashed".to_owned());
    }
    format!(
        "    \"{}\" -> \"{}\" [{}];\n",
        dot_quoted(&from),
        dot_quoted(&to),
        attrs.join(", ")
    )
}

/// The front matter (the title quoted: a `:` in it would end the YAML key) and the start.
fn mermaid_header(m: &Machine) -> String {
    format!(
        "---\ntitle: \"{}\"\n---\nstateDiagram-v2\n    [*] --> {}\n",
        m.title.replace('\\', "\\\\").replace('"', "\\\""),
        m.initial
    )
}

fn mermaid_end(node: &Node) -> String {
    match node {
        Node::State(s) => s.clone(),
        Node::Group(g) => (*g).to_owned(),
        Node::Junction(n) => format!("junction{n}"),
    }
}

fn mermaid_composite(m: &Machine, group: &str, depth: usize, out: &mut String) {
    let indent = "    ".repeat(depth);
    out.push_str(&format!("{indent}state {group} {{\n"));
    let members = m
        .groups
        .iter()
        .find(|g| g.name == group)
        .map_or(&[][..], |g| g.members);
    for member in members {
        if m.groups.iter().any(|g| g.name == *member) {
            if depth <= m.groups.len() && *member != group {
                mermaid_composite(m, member, depth + 1, out);
            }
        } else {
            out.push_str(&format!("{indent}    {member}\n"));
        }
    }
    out.push_str(&format!("{indent}}}\n"));
}

fn mermaid_drawing(m: &Machine, d: &Drawing) -> String {
    let mut out = mermaid_header(m);
    let mut drawn_groups: Vec<&str> = Vec::new();
    for state in &m.states {
        if let Some(group) = outermost_group(m, state) {
            if !drawn_groups.contains(&group) {
                drawn_groups.push(group);
                mermaid_composite(m, group, 1, &mut out);
            }
        }
    }
    for n in 1..=d.junctions {
        out.push_str(&format!("    state junction{n} <<choice>>\n"));
    }
    for arrow in &d.arrows {
        let (from, to) = (mermaid_end(&arrow.from), mermaid_end(&arrow.to));
        if arrow.labels.is_empty() {
            out.push_str(&format!("    {from} --> {to}\n"));
        } else {
            out.push_str(&format!(
                "    {from} --> {to}: {}\n",
                arrow.labels.join("<br>")
            ));
        }
    }
    out.push_str(&format!("    {} --> [*]\n", m.terminal));
    out
}

fn mermaid(m: &Machine, drawn: &[Drawn], highlighted: bool) -> String {
    let mut out = mermaid_header(m);
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
