//! The daemon's state machine: its states, the events that move it, and
//! [`DAEMON_TRANSITIONS`], the one table both the loop and the diagram read. The loop never
//! sets a state: it fires an event, and the state it enters is the table's.

use crate::diagram::{Group, Machine};

/// Where the daemon is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonState {
    /// Reading its record on the server before posting anything.
    Starting,
    /// Polling for jobs.
    Waiting,
    /// Running a job.
    Busy,
    /// Held offline: by an administrator, the offline marker file, or its own exit 46.
    Offline,
    /// Held in maintenance by an administrator.
    Maintenance,
    /// Running the device health check (`healthcheck_command`), outside any job.
    Checking,
    /// Held in `maintenance` by its own failed health check, which it re-runs with a
    /// back-off; a pass releases it, and so does an administrator.
    HeldByCheck,
    /// Asked to restart (SIGUSR1 or the server's `restart`): posts `restart`, exits 1.
    Restarting,
    /// Stopping with a job under way: its phase ended, cleanup and the report follow.
    Draining,
    /// Gone (or about to be).
    Stopped,
}

impl DaemonState {
    pub const ALL: [DaemonState; 10] = [
        DaemonState::Starting,
        DaemonState::Waiting,
        DaemonState::Busy,
        DaemonState::Offline,
        DaemonState::Maintenance,
        DaemonState::Checking,
        DaemonState::HeldByCheck,
        DaemonState::Restarting,
        DaemonState::Draining,
        DaemonState::Stopped,
    ];

    /// The name in the diagram, the health endpoint and the log.
    pub fn name(self) -> &'static str {
        match self {
            DaemonState::Starting => "starting",
            DaemonState::Waiting => "waiting",
            DaemonState::Busy => "busy",
            DaemonState::Offline => "offline",
            DaemonState::Maintenance => "maintenance",
            DaemonState::Checking => "checking",
            DaemonState::HeldByCheck => "held_by_check",
            DaemonState::Restarting => "restarting",
            DaemonState::Draining => "draining",
            DaemonState::Stopped => "stopped",
        }
    }
}

/// What happened, as the loop tells the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonEvent {
    /// The record was read at start-up and does not hold the agent.
    CameUp,
    /// Held offline: the server's state (an administrator's, or the agent's own after exit
    /// 46), or the offline marker file.
    HeldOffline,
    /// Held in maintenance by the server's state.
    HeldMaintenance,
    /// The hold is over (the server's state is no longer offline or maintenance, the
    /// marker file is gone).
    Released,
    /// `GET /v1/job` handed out a job.
    JobTaken,
    /// The job ended and was reported or spooled.
    JobDone,
    /// A restart was asked for (SIGUSR1, the server's `restart`).
    RestartAsked,
    /// SIGTERM or SIGINT.
    Stop,
    /// The job under way when the stop came ended and was reported or spooled.
    Drained,
    /// `restart` was posted; the process exits 1 for its supervisor to start it again.
    Exited,
    /// A health check is due: at start-up, after failing provisions or exit 46, on the
    /// idle interval, on SIGUSR2, or a retry of a failed one.
    CheckDue,
    /// The health check passed.
    CheckPassed,
    /// The health check failed or timed out.
    CheckFailed,
}

impl DaemonEvent {
    pub const ALL: [DaemonEvent; 13] = [
        DaemonEvent::CameUp,
        DaemonEvent::HeldOffline,
        DaemonEvent::HeldMaintenance,
        DaemonEvent::Released,
        DaemonEvent::JobTaken,
        DaemonEvent::JobDone,
        DaemonEvent::RestartAsked,
        DaemonEvent::Stop,
        DaemonEvent::Drained,
        DaemonEvent::Exited,
        DaemonEvent::CheckDue,
        DaemonEvent::CheckPassed,
        DaemonEvent::CheckFailed,
    ];

    /// The label of the event's edges.
    pub fn label(self) -> &'static str {
        match self {
            DaemonEvent::CameUp => "record read, not held",
            DaemonEvent::HeldOffline => "held offline (server state, marker file, exit 46)",
            DaemonEvent::HeldMaintenance => "held in maintenance (server state)",
            DaemonEvent::Released => "hold lifted",
            DaemonEvent::JobTaken => "job taken",
            DaemonEvent::JobDone => "job reported or spooled",
            DaemonEvent::RestartAsked => "restart asked (SIGUSR1, server state restart)",
            DaemonEvent::Stop => "SIGTERM/SIGINT",
            DaemonEvent::Drained => "cleanup ran, outcome reported or spooled",
            DaemonEvent::Exited => "restart posted, exit 1",
            DaemonEvent::CheckDue => {
                "health check due (start-up, provision failures, exit 46, interval, SIGUSR2, retry)"
            }
            DaemonEvent::CheckPassed => "health check passed",
            DaemonEvent::CheckFailed => "health check failed or timed out",
        }
    }
}

use DaemonEvent as E;
use DaemonState as S;

/// Every edge the daemon can take: `(from, event, to)`. A request to hold, release or
/// restart that comes during a job is carried out after it, hence the edges out of `busy`;
/// so is a health check a job calls for (its provision failed once too often, or a phase
/// exited 46). A check never starts while draining or restarting: those lead only to
/// `stopped`.
pub const DAEMON_TRANSITIONS: &[(DaemonState, DaemonEvent, DaemonState)] = &[
    (S::Starting, E::CameUp, S::Waiting),
    (S::Starting, E::HeldOffline, S::Offline),
    (S::Starting, E::HeldMaintenance, S::Maintenance),
    (S::Starting, E::Stop, S::Stopped),
    (S::Starting, E::CheckDue, S::Checking),
    (S::Waiting, E::JobTaken, S::Busy),
    (S::Waiting, E::HeldOffline, S::Offline),
    (S::Waiting, E::HeldMaintenance, S::Maintenance),
    (S::Waiting, E::RestartAsked, S::Restarting),
    (S::Waiting, E::Stop, S::Stopped),
    (S::Waiting, E::CheckDue, S::Checking),
    (S::Busy, E::JobDone, S::Waiting),
    (S::Busy, E::HeldOffline, S::Offline),
    (S::Busy, E::HeldMaintenance, S::Maintenance),
    (S::Busy, E::RestartAsked, S::Restarting),
    (S::Busy, E::Stop, S::Draining),
    (S::Busy, E::CheckDue, S::Checking),
    (S::Offline, E::Released, S::Waiting),
    (S::Offline, E::HeldMaintenance, S::Maintenance),
    (S::Offline, E::RestartAsked, S::Restarting),
    (S::Offline, E::Stop, S::Stopped),
    (S::Maintenance, E::Released, S::Waiting),
    (S::Maintenance, E::HeldOffline, S::Offline),
    (S::Maintenance, E::Stop, S::Stopped),
    (S::Checking, E::CheckPassed, S::Waiting),
    (S::Checking, E::CheckFailed, S::HeldByCheck),
    (S::Checking, E::Stop, S::Stopped),
    (S::HeldByCheck, E::CheckDue, S::Checking),
    (S::HeldByCheck, E::Released, S::Waiting),
    (S::HeldByCheck, E::HeldMaintenance, S::Maintenance),
    (S::HeldByCheck, E::HeldOffline, S::Offline),
    (S::HeldByCheck, E::Stop, S::Stopped),
    (S::Draining, E::Drained, S::Stopped),
    (S::Restarting, E::Exited, S::Stopped),
];

/// The daemon's current state; it moves only along [`DAEMON_TRANSITIONS`].
#[derive(Debug)]
pub struct DaemonMachine {
    state: DaemonState,
}

/// An event the table has no edge for from the current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoEdge {
    pub from: DaemonState,
    pub event: DaemonEvent,
}

impl std::fmt::Display for NoEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no daemon edge from {} on \"{}\"",
            self.from.name(),
            self.event.label()
        )
    }
}

impl Default for DaemonMachine {
    fn default() -> Self {
        DaemonMachine {
            state: DaemonState::Starting,
        }
    }
}

impl DaemonMachine {
    pub fn state(&self) -> DaemonState {
        self.state
    }

    /// Takes the edge `event` labels from the current state, and returns the state it
    /// leads to; an event without an edge changes nothing and is an error.
    pub fn fire(&mut self, event: DaemonEvent) -> Result<DaemonState, NoEdge> {
        let to = DAEMON_TRANSITIONS
            .iter()
            .find(|(from, on, _)| *from == self.state && *on == event)
            .map(|(_, _, to)| *to)
            .ok_or(NoEdge {
                from: self.state,
                event,
            })?;
        self.state = to;
        Ok(to)
    }
}

/// How the daemon's states are boxed in its picture (presentation only: the edges are
/// [`DAEMON_TRANSITIONS`]'s). `held`: the two holds, left together on "hold lifted" and
/// on a stop; `active`: where a hold can start; `ready`: where a restart is taken.
pub const DAEMON_GROUPS: &[Group] = &[
    Group {
        name: "active",
        members: &["starting", "ready"],
    },
    Group {
        name: "ready",
        members: &["waiting", "busy"],
    },
    Group {
        name: "held",
        members: &["offline", "maintenance"],
    },
    Group {
        name: "own health check",
        members: &["checking", "held_by_check"],
    },
];

/// The daemon machine to draw, from [`DAEMON_TRANSITIONS`], states in the order a job
/// goes through them.
pub fn daemon_machine() -> Machine {
    let table: Vec<(&'static str, &'static str, &'static str)> = DAEMON_TRANSITIONS
        .iter()
        .map(|(from, event, to)| (from.name(), event.label(), to.name()))
        .collect();
    let mut machine =
        Machine::from_table("daemon", "The agent daemon", "starting", "stopped", &table)
            .with_groups(DAEMON_GROUPS.to_vec());
    machine.states = DaemonState::ALL.iter().map(|s| s.name()).collect();
    machine
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_edge_per_state_and_event() {
        for (i, a) in DAEMON_TRANSITIONS.iter().enumerate() {
            for b in &DAEMON_TRANSITIONS[i + 1..] {
                assert!(
                    !(a.0 == b.0 && a.1 == b.1),
                    "two edges from {:?} on {:?}",
                    a.0,
                    a.1
                );
            }
        }
    }

    #[test]
    fn every_state_is_reachable_and_every_state_can_stop() {
        let mut seen = vec![DaemonState::Starting];
        let mut i = 0;
        while i < seen.len() {
            for (from, _, to) in DAEMON_TRANSITIONS {
                if *from == seen[i] && !seen.contains(to) {
                    seen.push(*to);
                }
            }
            i += 1;
        }
        for state in DaemonState::ALL {
            assert!(seen.contains(&state), "{state:?} unreachable");
            // From every state a SIGTERM leads to stopped (directly or by draining).
            let mut at = state;
            for _ in 0..3 {
                if at == DaemonState::Stopped {
                    break;
                }
                at = DAEMON_TRANSITIONS
                    .iter()
                    .find(|(from, event, _)| {
                        *from == at
                            && matches!(
                                event,
                                DaemonEvent::Stop | DaemonEvent::Drained | DaemonEvent::Exited
                            )
                    })
                    .map(|(_, _, to)| *to)
                    .unwrap_or_else(|| panic!("{at:?} has no way to stop"));
            }
            assert_eq!(at, DaemonState::Stopped, "from {state:?}");
        }
    }

    #[test]
    fn the_machine_follows_the_table_and_refuses_the_rest() {
        let mut m = DaemonMachine::default();
        assert_eq!(
            m.fire(DaemonEvent::JobTaken).map_err(|e| e.from),
            Err(DaemonState::Starting)
        );
        assert_eq!(
            m.state(),
            DaemonState::Starting,
            "a refused event changes nothing"
        );
        assert_eq!(m.fire(DaemonEvent::CameUp), Ok(DaemonState::Waiting));
        assert_eq!(m.fire(DaemonEvent::JobTaken), Ok(DaemonState::Busy));
        assert_eq!(m.fire(DaemonEvent::Stop), Ok(DaemonState::Draining));
        assert!(m.fire(DaemonEvent::JobTaken).is_err());
        assert_eq!(m.fire(DaemonEvent::Drained), Ok(DaemonState::Stopped));
        assert!(m.fire(DaemonEvent::Stop).is_err(), "stopped is the end");
    }

    /// Every (state, event) pair: the machine takes exactly the table's edge, or refuses and
    /// stays where it was.
    #[test]
    fn every_state_and_event_follows_the_table() {
        for from in DaemonState::ALL {
            for event in DaemonEvent::ALL {
                let mut m = DaemonMachine { state: from };
                let edge = DAEMON_TRANSITIONS
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event);
                match (m.fire(event), edge) {
                    (Ok(to), Some((_, _, want))) => assert_eq!(to, *want),
                    (Err(no), None) => {
                        assert_eq!(no, NoEdge { from, event });
                        assert_eq!(m.state(), from, "a refused event changes nothing");
                    }
                    (got, want) => panic!("{from:?} on {event:?}: {got:?} against {want:?}"),
                }
            }
        }
    }

    /// The health check's rules, on the table: it starts only where no job runs and the
    /// agent is neither draining nor restarting; it ends in a pass, a failure or a stop; the
    /// agent's own hold leads to a job only through `waiting`; an administrator's hold is
    /// never left for `checking` (only the administrator lifts it).
    #[test]
    fn health_check_edges_keep_their_rules() {
        use DaemonState as S;
        for (from, event, to) in DAEMON_TRANSITIONS {
            if *to == S::Checking {
                assert_eq!(*event, DaemonEvent::CheckDue, "{from:?}");
                assert!(
                    matches!(from, S::Starting | S::Waiting | S::Busy | S::HeldByCheck),
                    "a check from {from:?}"
                );
            }
            if *from == S::Checking {
                assert!(
                    matches!(
                        event,
                        DaemonEvent::CheckPassed | DaemonEvent::CheckFailed | DaemonEvent::Stop
                    ),
                    "{event:?} during a check"
                );
            }
            if *event == DaemonEvent::JobTaken {
                assert_eq!(*from, S::Waiting, "jobs are taken from waiting only");
            }
            if matches!(event, DaemonEvent::CheckPassed | DaemonEvent::CheckFailed) {
                assert_eq!(*from, S::Checking);
            }
        }
        for held in [
            S::Maintenance,
            S::Offline,
            S::Draining,
            S::Restarting,
            S::Stopped,
        ] {
            assert!(
                !DAEMON_TRANSITIONS
                    .iter()
                    .any(|(f, _, t)| *f == held && *t == S::Checking),
                "{held:?} must not start a check"
            );
        }
        // Every new edge is in the table.
        for edge in [
            (S::Starting, DaemonEvent::CheckDue, S::Checking),
            (S::Waiting, DaemonEvent::CheckDue, S::Checking),
            (S::Busy, DaemonEvent::CheckDue, S::Checking),
            (S::Checking, DaemonEvent::CheckPassed, S::Waiting),
            (S::Checking, DaemonEvent::CheckFailed, S::HeldByCheck),
            (S::Checking, DaemonEvent::Stop, S::Stopped),
            (S::HeldByCheck, DaemonEvent::CheckDue, S::Checking),
            (S::HeldByCheck, DaemonEvent::Released, S::Waiting),
            (S::HeldByCheck, DaemonEvent::HeldMaintenance, S::Maintenance),
            (S::HeldByCheck, DaemonEvent::HeldOffline, S::Offline),
            (S::HeldByCheck, DaemonEvent::Stop, S::Stopped),
        ] {
            assert!(DAEMON_TRANSITIONS.contains(&edge), "{edge:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Random event sequences: the machine is always in a state the table names, a
        /// state reached by an accepted event is its edge's target, and a check is never
        /// entered straight from a hold an administrator set.
        #[test]
        fn random_events_stay_on_the_table(events in proptest::collection::vec(0usize..13, 0..60)) {
            let mut m = DaemonMachine::default();
            for i in events {
                let event = DaemonEvent::ALL[i];
                let from = m.state();
                if let Ok(to) = m.fire(event) {
                    proptest::prop_assert!(DAEMON_TRANSITIONS.contains(&(from, event, to)));
                    if to == DaemonState::Checking {
                        proptest::prop_assert!(!matches!(from, DaemonState::Maintenance | DaemonState::Offline));
                    }
                } else {
                    proptest::prop_assert_eq!(m.state(), from);
                }
                proptest::prop_assert!(DaemonState::ALL.contains(&m.state()));
            }
        }
    }
}
