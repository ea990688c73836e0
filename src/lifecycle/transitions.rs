//! The transition table: the single source of the `impl` blocks that move a job from state
//! to state, of the [`TRANSITIONS`] constant the diagrams are drawn from, and of [`AnyJob`].

use super::states::*;
use super::{Job, PhaseRunner, Step};
use crate::phase::Phase;

/// What kind of edge a [`Transition`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeKind {
    /// The phase ran or was skipped and the job goes on.
    Forward,
    /// The phase (or a stop request before it) ended the forward path.
    Abort,
    /// Cleanup ran (or was skipped); the job is finished.
    Cleanup,
}

/// One edge of the job state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: &'static str,
    /// The `Job` method that takes this edge; also the Testflinger phase it runs.
    pub method: &'static str,
    pub to: &'static str,
    pub kind: EdgeKind,
}

macro_rules! transitions {
    (
        forward { $($from:ident => $method:ident ($phase:expr) => $to:ident,)* }
        cleanup { $($cfrom:ident,)* } => $cleaned:ident
    ) => {
        $(
            impl<R: PhaseRunner> Job<$from, R> {
                #[doc = concat!(
                    "Runs the ", stringify!($method), " phase (or records why it is skipped). ",
                    "Yields `Job<", stringify!($to), ">`, or `Job<Aborted>` when the phase ",
                    "or a stop request before it ends the forward path."
                )]
                #[must_use = "a job must be driven to cleanup"]
                pub fn $method(self) -> Step<$to, R> {
                    self.forward($phase)
                }
            }
        )*
        $(
            impl<R: PhaseRunner> Job<$cfrom, R> {
                /// Runs the cleanup phase (exactly once: it consumes the job) and finishes
                /// the job.
                #[must_use = "the cleaned job holds the outcome"]
                pub fn cleanup(self) -> Job<$cleaned, R> {
                    self.clean()
                }
            }
        )*

        /// Every edge of the job state machine, generated from the same table as the
        /// methods, in table order.
        pub const TRANSITIONS: &[Transition] = &[
            $(
                Transition {
                    from: stringify!($from),
                    method: stringify!($method),
                    to: stringify!($to),
                    kind: EdgeKind::Forward,
                },
                Transition {
                    from: stringify!($from),
                    method: stringify!($method),
                    to: "Aborted",
                    kind: EdgeKind::Abort,
                },
            )*
            $(
                Transition {
                    from: stringify!($cfrom),
                    method: "cleanup",
                    to: stringify!($cleaned),
                    kind: EdgeKind::Cleanup,
                },
            )*
        ];

        /// A job in any state, for code that stores a job or steps it generically.
        #[derive(Debug)]
        pub enum AnyJob<R> {
            $($from(Job<$from, R>),)*
            $($cfrom(Job<$cfrom, R>),)*
            $cleaned(Job<$cleaned, R>),
        }

        impl<R: PhaseRunner> AnyJob<R> {
            /// The state's name, as in [`TRANSITIONS`].
            pub fn state(&self) -> &'static str {
                match self {
                    $(AnyJob::$from(_) => stringify!($from),)*
                    $(AnyJob::$cfrom(_) => stringify!($cfrom),)*
                    AnyJob::$cleaned(_) => stringify!($cleaned),
                }
            }

            /// Takes the one edge available from the current state. A cleaned job stays
            /// cleaned.
            #[must_use = "a job must be driven to cleanup"]
            pub fn step(self) -> AnyJob<R> {
                match self {
                    $(AnyJob::$from(job) => job.$method().into(),)*
                    $(AnyJob::$cfrom(job) => AnyJob::$cleaned(job.cleanup()),)*
                    done @ AnyJob::$cleaned(_) => done,
                }
            }
        }

        $(
            impl<R: PhaseRunner> From<Step<$to, R>> for AnyJob<R> {
                fn from(step: Step<$to, R>) -> AnyJob<R> {
                    match step {
                        Step::Next(job) => AnyJob::$to(job),
                        Step::Aborted(job) => AnyJob::Aborted(job),
                    }
                }
            }
        )*
    };
}

transitions! {
    forward {
        Polled => setup(Phase::Setup) => Setup,
        Setup => provision(Phase::Provision) => Provisioned,
        Provisioned => firmware_update(Phase::FirmwareUpdate) => FirmwareUpdated,
        FirmwareUpdated => test(Phase::Test) => Tested,
        Tested => allocate(Phase::Allocate) => Allocated,
        Allocated => reserve(Phase::Reserve) => Reserved,
    }
    cleanup {
        Reserved,
        Aborted,
    } => Cleaned
}

/// Every state, in lifecycle order.
pub const STATES: &[&str] = &[
    Polled::NAME,
    Setup::NAME,
    Provisioned::NAME,
    FirmwareUpdated::NAME,
    Tested::NAME,
    Allocated::NAME,
    Reserved::NAME,
    Aborted::NAME,
    Cleaned::NAME,
];
