//! The daemon: takes jobs from a Testflinger server and runs them, one at a time.

mod delivery;
mod health;
mod job;
mod lock;
mod recovery;
mod run;
mod spool;
mod startup;
mod states;

pub use delivery::{deliver, DeliverError};
pub use lock::{holder as lock_holder, AgentLock, LockError};
pub use recovery::{begin_recovery, conclude_recovery, RecoveryStart, MAX_CLEANUP_ATTEMPTS};
pub use run::{Daemon, DaemonError, DaemonExit};
pub use states::{
    daemon_machine, DaemonEvent, DaemonMachine, DaemonState, NoEdge, DAEMON_TRANSITIONS,
};
