//! The daemon: takes jobs from a Testflinger server and runs them, one at a time.

mod states;

pub use states::DAEMON_TRANSITIONS;
