//! How a machine's table becomes the arrows of its picture, so that a reader sees each
//! event once where the table repeats it:
//!
//! - an event that takes every state of a [`Group`] to the same state is one arrow from the
//!   group (the largest group that fits; a group never stands for an arrow into itself);
//! - an event that still comes from three or more places into the same state meets at a
//!   junction (a dot in DOT, a small diamond in Mermaid): one unlabelled line from each
//!   place, one labelled arrow from the junction;
//! - arrows left between the same two ends are one arrow whose label lists the events.
//!
//! Nothing is added or lost: [`expand`] turns a drawing back into `(from, event, to)` rows,
//! and the tests (here and in `audit`) check that these are the table's rows, each once.

use super::Machine;

/// One end of an [`Arrow`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    State(String),
    /// A [`super::Group`], by name: the arrow stands for one from each of its states.
    Group(&'static str),
    /// The junction numbered so (from 1).
    Junction(usize),
}

/// One arrow of the picture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrow {
    pub from: Node,
    pub to: Node,
    /// The events, in table order; empty for a line into a junction.
    pub labels: Vec<String>,
    pub dashed: bool,
}

/// A machine's picture: its arrows, in the order of the table rows they come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drawing {
    pub arrows: Vec<Arrow>,
    pub junctions: usize,
}

/// From how many drawn places an event into one state goes through a junction.
pub const JUNCTION_FROM: usize = 3;

impl Machine {
    /// The states of the group named `name`, nested groups included, in the machine's
    /// state order. Unknown names give nothing.
    pub fn group_states(&self, name: &str) -> Vec<&'static str> {
        let mut found: Vec<&'static str> = Vec::new();
        let mut pending = vec![name];
        // Each group is opened at most once, so a group listed inside itself ends.
        let mut opened: Vec<&str> = Vec::new();
        while let Some(next) = pending.pop() {
            if opened.contains(&next) {
                continue;
            }
            opened.push(next);
            let Some(group) = self.groups.iter().find(|g| g.name == next) else {
                continue;
            };
            for member in group.members {
                if self.groups.iter().any(|g| g.name == *member) {
                    pending.push(member);
                } else if !found.contains(member) {
                    found.push(member);
                }
            }
        }
        self.states
            .iter()
            .copied()
            .filter(|s| found.contains(s))
            .collect()
    }

    /// The group directly holding `item` (a state or a group), if any.
    pub fn parent_group(&self, item: &str) -> Option<&'static str> {
        self.groups
            .iter()
            .find(|g| g.members.contains(&item))
            .map(|g| g.name)
    }
}

/// The picture of `machine`.
pub fn drawing(machine: &Machine) -> Drawing {
    // Larger groups first: an event from a group and its subgroup is drawn from the larger.
    let mut groups: Vec<(&'static str, Vec<&'static str>)> = machine
        .groups
        .iter()
        .map(|g| (g.name, machine.group_states(g.name)))
        .filter(|(_, states)| !states.is_empty())
        .collect();
    groups.sort_by_key(|(_, states)| std::cmp::Reverse(states.len()));

    let mut out = Drawing::default();
    let mut done: Vec<(&str, &str)> = Vec::new();
    for edge in &machine.edges {
        let key = (edge.label.as_str(), edge.to.as_str());
        if done.contains(&key) {
            continue;
        }
        done.push(key);
        let mut sources: Vec<&str> = machine
            .edges
            .iter()
            .filter(|e| e.label == edge.label && e.to == edge.to)
            .map(|e| e.from.as_str())
            .collect();
        let mut ends: Vec<Node> = Vec::new();
        for (name, states) in &groups {
            if !states.contains(&edge.to.as_str()) && states.iter().all(|s| sources.contains(s)) {
                sources.retain(|s| !states.contains(s));
                ends.push(Node::Group(name));
            }
        }
        // The remaining states before the groups, in table order.
        let mut drawn: Vec<Node> = sources
            .iter()
            .map(|s| Node::State((*s).to_owned()))
            .collect();
        drawn.extend(ends);
        let to = Node::State(edge.to.clone());
        if drawn.len() >= JUNCTION_FROM {
            out.junctions += 1;
            let junction = Node::Junction(out.junctions);
            for from in drawn {
                out.arrows.push(Arrow {
                    from,
                    to: junction.clone(),
                    labels: Vec::new(),
                    dashed: edge.dashed,
                });
            }
            out.arrows.push(Arrow {
                from: junction,
                to,
                labels: vec![edge.label.clone()],
                dashed: edge.dashed,
            });
        } else {
            for from in drawn {
                match out
                    .arrows
                    .iter_mut()
                    .find(|a| a.from == from && a.to == to && !a.labels.is_empty())
                {
                    Some(arrow) => arrow.labels.push(edge.label.clone()),
                    None => out.arrows.push(Arrow {
                        from,
                        to: to.clone(),
                        labels: vec![edge.label.clone()],
                        dashed: edge.dashed,
                    }),
                }
            }
        }
    }
    out
}

/// The states an arrow leaving `node` stands for.
fn sources(machine: &Machine, drawing: &Drawing, node: &Node, depth: usize) -> Vec<String> {
    match node {
        Node::State(s) => vec![s.clone()],
        Node::Group(name) => machine
            .group_states(name)
            .into_iter()
            .map(str::to_owned)
            .collect(),
        // A junction is fed by lines from states and groups only; `depth` bounds a
        // malformed drawing that feeds junctions into each other.
        Node::Junction(_) if depth > drawing.junctions => Vec::new(),
        Node::Junction(_) => drawing
            .arrows
            .iter()
            .filter(|a| a.to == *node)
            .flat_map(|a| sources(machine, drawing, &a.from, depth + 1))
            .collect(),
    }
}

/// The `(from, event, to)` rows a drawing shows, once per time it shows them.
pub fn expand(machine: &Machine, drawing: &Drawing) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    for arrow in &drawing.arrows {
        let Node::State(to) = &arrow.to else {
            continue;
        };
        for from in sources(machine, drawing, &arrow.from, 0) {
            for label in &arrow.labels {
                rows.push((from.clone(), label.clone(), to.clone()));
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagram::Group;

    fn rows(machine: &Machine) -> Vec<(String, String, String)> {
        machine
            .edges
            .iter()
            .map(|e| (e.from.clone(), e.label.clone(), e.to.clone()))
            .collect()
    }

    fn sorted(mut rows: Vec<(String, String, String)>) -> Vec<(String, String, String)> {
        rows.sort();
        rows
    }

    #[test]
    fn parallel_edges_become_one_arrow_with_every_event() {
        let m = Machine::from_table(
            "m",
            "M",
            "a",
            "b",
            &[("a", "x", "b"), ("a", "y", "b"), ("b", "z", "a")],
        );
        let d = drawing(&m);
        assert_eq!(d.arrows.len(), 2, "{d:?}");
        assert_eq!(d.arrows[0].labels, ["x", "y"]);
        assert_eq!(sorted(expand(&m, &d)), sorted(rows(&m)));
    }

    #[test]
    fn an_event_from_a_whole_group_is_one_arrow_and_never_into_the_group() {
        let m = Machine::from_table(
            "m",
            "M",
            "a",
            "z",
            &[
                ("a", "stop", "z"),
                ("b", "stop", "z"),
                ("c", "stop", "z"),
                ("a", "go", "b"),
                ("c", "go", "b"),
                // Every state of the group, into one of them: not drawn from the box.
                ("a", "stay", "a"),
                ("b", "stay", "a"),
            ],
        )
        .with_groups(vec![Group {
            name: "ab",
            members: &["a", "b"],
        }]);
        let d = drawing(&m);
        let stop: Vec<&Arrow> = d
            .arrows
            .iter()
            .filter(|a| a.labels.contains(&"stop".to_owned()))
            .collect();
        assert_eq!(stop.len(), 2, "the group and c: {d:?}");
        assert!(stop.iter().any(|a| a.from == Node::Group("ab")));
        // `stay` into a, a member: drawn from a and b, not from the group.
        assert!(d
            .arrows
            .iter()
            .all(|a| !(a.from == Node::Group("ab") && a.labels.contains(&"stay".to_owned()))));
        assert_eq!(sorted(expand(&m, &d)), sorted(rows(&m)));
    }

    #[test]
    fn three_sources_meet_at_a_junction_and_the_event_is_drawn_once() {
        let m = Machine::from_table(
            "m",
            "M",
            "a",
            "z",
            &[("a", "stop", "z"), ("b", "stop", "z"), ("c", "stop", "z")],
        );
        let d = drawing(&m);
        assert_eq!(d.junctions, 1);
        let labelled: Vec<&Arrow> = d.arrows.iter().filter(|a| !a.labels.is_empty()).collect();
        assert_eq!(labelled.len(), 1, "{d:?}");
        assert_eq!(labelled[0].from, Node::Junction(1));
        assert_eq!(sorted(expand(&m, &d)), sorted(rows(&m)));
    }

    #[test]
    fn nested_groups_count_their_subgroups_states_and_a_cycle_ends() {
        let m = Machine::from_table("m", "M", "a", "c", &[("a", "go", "b"), ("b", "go", "c")])
            .with_groups(vec![
                Group {
                    name: "outer",
                    members: &["a", "inner"],
                },
                Group {
                    name: "inner",
                    members: &["b", "outer"],
                },
            ]);
        assert_eq!(m.group_states("outer"), ["a", "b"]);
        assert_eq!(m.group_states("nothing"), Vec::<&str>::new());
        assert_eq!(m.parent_group("b"), Some("inner"));
    }
}
