//! The job lifecycle as a [`Machine`] to draw, from [`TRANSITIONS`], the table the typestate
//! methods are generated from. Rendering is [`crate::diagram`]'s.

use super::transitions::{EdgeKind, STATES, TRANSITIONS};
use crate::diagram::{Edge, Machine};
use crate::phase::Phase;

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
                Edge::new(t.from, label, t.to, t.kind == EdgeKind::Abort)
            })
            .collect(),
        groups: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagram::{render, Format};

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
