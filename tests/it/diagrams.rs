//! The committed state diagrams as Graphviz draws them: each `state-diagrams/*.dot` renders
//! to SVG, and in Graphviz's own layout (`dot -Tplain`: node positions and edge splines)
//! no event is drawn twice from the same box into the same state, no two arrows join the
//! same two nodes, and at most [`MAX_CROSSINGS`] edges cross, counted both by Graphviz
//! (`dot -v`) and from the drawn splines. The SVGs are left in
//! `target/tmp/state-diagrams/` to look at.
//!
//! Needs `dot` (Debian package `graphviz`): under CI (the variable CI set, as `.ci/run`
//! does) its absence fails the tests; elsewhere they are skipped, loudly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use testflinger_agent::audit;
use testflinger_agent::diagram::Machine;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The most edge crossings a diagram may have.
// A handful: the daemon's picture has 4 since the health check's two states joined it (it
// had 6, and labels drawn up to 5 times, before the pictures were grouped).
const MAX_CROSSINGS: usize = 5;

fn dot_installed() -> bool {
    crate::support::tools::installed("dot", "-V", "Graphviz dot", "graphviz")
}

/// `dot ARGS` on `source`: its standard output and standard error.
fn run_dot(source: &str, args: &[&str]) -> (String, String) {
    let mut child = Command::new("dot")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dot runs (checked by dot_installed)");
    let mut stdin = child.stdin.take().expect("stdin was piped");
    // A thread writes, so that a large output cannot block dot against our write.
    let source = source.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(source.as_bytes()));
    let out = child.wait_with_output().expect("dot ends");
    writer
        .join()
        .expect("the writer thread does not panic")
        .expect("dot reads its input");
    assert!(
        out.status.success(),
        "dot {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The committed DOT files, with the machine each is drawn from.
fn committed() -> Vec<(Machine, String)> {
    audit::machines()
        .into_iter()
        .map(|m| {
            let path = Path::new(ROOT).join(format!("state-diagrams/{}.dot", m.name));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            (m, text)
        })
        .collect()
}

/// Splits a `-Tplain` line into words; a quoted word loses its quotes and escapes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == ' ' {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => word.push('\n'),
                        Some(other) => word.push(other),
                        None => {}
                    },
                    c => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push(word);
    }
    out
}

/// One edge as Graphviz laid it out.
#[derive(Debug)]
struct LaidEdge {
    tail: String,
    head: String,
    /// The events of its label, one per line.
    events: Vec<String>,
    /// The spline's control points.
    points: Vec<(f64, f64)>,
}

fn laid_edges(plain: &str) -> Vec<LaidEdge> {
    let mut edges = Vec::new();
    for line in plain.lines() {
        let w = words(line);
        if w.first().map(String::as_str) != Some("edge") {
            continue;
        }
        let n: usize = w[3].parse().expect("the point count is a number");
        let number = |s: &String| s.parse::<f64>().expect("a coordinate is a number");
        let points = (0..n)
            .map(|i| (number(&w[4 + 2 * i]), number(&w[5 + 2 * i])))
            .collect();
        let rest = &w[4 + 2 * n..];
        // With a label: label x y style color; without: style color.
        let events = if rest.len() == 5 {
            rest[0].lines().map(str::to_owned).collect()
        } else {
            Vec::new()
        };
        edges.push(LaidEdge {
            tail: w[1].clone(),
            head: w[2].clone(),
            events,
            points,
        });
    }
    edges
}

/// The spline as a polyline: each cubic Bézier piece sampled at 24 points.
fn polyline(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = vec![points[0]];
    for piece in points[1..].chunks_exact(3) {
        let p0 = *out.last().expect("starts with a point");
        let [p1, p2, p3] = [piece[0], piece[1], piece[2]];
        for step in 1..=24 {
            let t = f64::from(step) / 24.0;
            let u = 1.0 - t;
            let at = |a: f64, b: f64, c: f64, d: f64| {
                u * u * u * a + 3.0 * u * u * t * b + 3.0 * u * t * t * c + t * t * t * d
            };
            out.push((at(p0.0, p1.0, p2.0, p3.0), at(p0.1, p1.1, p2.1, p3.1)));
        }
    }
    out
}

/// Whether segments `a-b` and `c-d` cross. Half-open (a point exactly on a line counts as
/// on one side), so that a crossing at a sample point shared by two pieces counts once.
fn segments_cross(a: (f64, f64), b: (f64, f64), c: (f64, f64), d: (f64, f64)) -> bool {
    let side = |p: (f64, f64), q: (f64, f64), r: (f64, f64)| {
        (q.0 - p.0) * (r.1 - p.1) - (q.1 - p.1) * (r.0 - p.0)
    };
    let (d1, d2) = (side(c, d, a), side(c, d, b));
    let (d3, d4) = (side(a, b, c), side(a, b, d));
    (d1 > 0.0) != (d2 > 0.0) && (d3 > 0.0) != (d4 > 0.0)
}

/// How many times drawn edges cross, counting only edges with no node in common (edges
/// meeting at a node touch there by design).
fn crossings(edges: &[LaidEdge]) -> usize {
    let lines: Vec<Vec<(f64, f64)>> = edges.iter().map(|e| polyline(&e.points)).collect();
    let mut count = 0;
    for i in 0..edges.len() {
        for j in i + 1..edges.len() {
            let (a, b) = (&edges[i], &edges[j]);
            if [&a.tail, &a.head]
                .iter()
                .any(|n| **n == b.tail || **n == b.head)
            {
                continue;
            }
            for s in lines[i].windows(2) {
                for t in lines[j].windows(2) {
                    if segments_cross(s[0], s[1], t[0], t[1]) {
                        count += 1;
                    }
                }
            }
        }
    }
    count
}

/// Graphviz's own count: the last `mincross NAME: N crossings` line of `dot -v`.
fn graphviz_crossings(verbose: &str, name: &str) -> usize {
    let prefix = format!("mincross {name}: ");
    verbose
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("dot -v printed no `{prefix}N crossings` line:\n{verbose}"))
}

/// The box a node is drawn in: its outermost group, else the node itself.
fn outer_box(machine: &Machine, node: &str) -> String {
    let mut at = node.to_owned();
    for _ in 0..=machine.groups.len() {
        match machine.parent_group(&at) {
            Some(parent) => at = parent.to_owned(),
            None => break,
        }
    }
    at
}

fn svg_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("state-diagrams");
    std::fs::create_dir_all(&dir).expect("the target directory is writable");
    dir
}

#[test]
fn every_dot_file_renders_to_svg_with_each_state() {
    if !dot_installed() {
        return;
    }
    for (machine, source) in committed() {
        let (svg, _) = run_dot(&source, &["-Tsvg"]);
        assert!(
            svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "{}: {svg}",
            machine.name
        );
        for state in &machine.states {
            assert!(
                svg.contains(&format!("<title>{state}</title>")),
                "{}: no node {state} in the SVG",
                machine.name
            );
        }
        let path = svg_dir().join(format!("{}.svg", machine.name));
        std::fs::write(&path, &svg).expect("the target directory is writable");
    }
}

#[test]
fn no_event_is_drawn_twice_between_the_same_boxes() {
    if !dot_installed() {
        return;
    }
    for (machine, source) in committed() {
        let (plain, _) = run_dot(&source, &["-Tplain"]);
        let edges = laid_edges(&plain);
        assert!(!edges.is_empty(), "{}: no edges in\n{plain}", machine.name);
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        let mut drawn: Vec<(String, &str, &str)> = Vec::new();
        for edge in &edges {
            let pair = (edge.tail.as_str(), edge.head.as_str());
            assert!(
                !pairs.contains(&pair),
                "{}: two arrows {} -> {} (they should be one with both events)",
                machine.name,
                edge.tail,
                edge.head
            );
            pairs.push(pair);
            for event in &edge.events {
                let key = (outer_box(&machine, &edge.tail), event.as_str(), pair.1);
                assert!(
                    !drawn.contains(&key),
                    "{}: \"{event}\" drawn twice from {} into {}",
                    machine.name,
                    key.0,
                    key.2
                );
                drawn.push(key);
            }
        }
        // And no event in more than two places of one picture.
        for (_, event, _) in &drawn {
            let times = drawn.iter().filter(|(_, e, _)| e == event).count();
            assert!(
                times <= 2,
                "{}: \"{event}\" drawn {times} times",
                machine.name
            );
        }
    }
}

#[test]
fn few_edges_cross() {
    if !dot_installed() {
        return;
    }
    for (machine, source) in committed() {
        let (plain, verbose) = run_dot(&source, &["-v", "-Tplain"]);
        let by_graphviz = graphviz_crossings(&verbose, machine.name);
        let drawn = crossings(&laid_edges(&plain));
        let _ = writeln!(
            std::io::stderr(),
            "{}: {by_graphviz} crossing(s) by Graphviz's count, {drawn} in the drawn splines",
            machine.name
        );
        assert!(
            by_graphviz <= MAX_CROSSINGS && drawn <= MAX_CROSSINGS,
            "{}: {by_graphviz} crossings by Graphviz's count, {drawn} drawn (at most \
             {MAX_CROSSINGS})",
            machine.name
        );
    }
}

/// The crossing count sees a crossing: two edges drawn as an X.
#[test]
fn the_crossing_count_counts_an_x() {
    let edge = |tail: &str, head: &str, points: Vec<(f64, f64)>| LaidEdge {
        tail: tail.into(),
        head: head.into(),
        events: Vec::new(),
        points,
    };
    let x = [
        edge(
            "a",
            "b",
            vec![(0.0, 0.0), (1.0, 1.0), (2.0, 2.0), (3.0, 3.0)],
        ),
        edge(
            "c",
            "d",
            vec![(0.0, 3.0), (1.0, 2.0), (2.0, 1.0), (3.0, 0.0)],
        ),
    ];
    assert_eq!(crossings(&x), 1);
    // Edges meeting at a node are not counted.
    let v = [
        edge(
            "a",
            "b",
            vec![(0.0, 0.0), (1.0, 1.0), (2.0, 2.0), (3.0, 3.0)],
        ),
        edge(
            "a",
            "d",
            vec![(0.0, 3.0), (1.0, 2.0), (2.0, 1.0), (3.0, 0.0)],
        ),
    ];
    assert_eq!(crossings(&v), 0);
    let plain = "graph 1 2 2\nnode a 1 1 1 1 a solid box black lightgrey\n\
                 edge \"junction 1\" b 4 0 0 1 1 2 2 3 3 \"x\\ny\" 1.5 1.5 solid black\n\
                 edge a b 4 0 0 1 1 2 2 3 3 solid black\nstop\n";
    let edges = laid_edges(plain);
    assert_eq!(edges.len(), 2);
    assert_eq!(edges[0].tail, "junction 1");
    assert_eq!(edges[0].events, ["x", "y"]);
    assert!(edges[1].events.is_empty());
}
