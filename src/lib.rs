//! A hardened, drop-in replacement for the Testflinger agent.
//!
//! Layers, top to bottom (nothing calls upward): [`run_job`] (and the daemon) drive the
//! typestate [`lifecycle`]; each phase runs through the [`executor`], which uses the
//! [`process`] runner and a [`server::Server`]; [`config`] and [`job`] are the inputs and
//! [`outcome`] the result files. [`cli`] (the command line's definition) and [`check`]
//! (`check-config`'s operator checks) serve `src/main.rs` only.
//!
//! `PROTOCOL §x.y` in comments and tests cites section x.y of `docs/protocol.md`, the
//! specification this agent implements (`tests/it/spec.rs` checks that every cited section
//! exists); `docs/architecture.md` describes the layers and modules.

pub mod artifacts;
pub mod attachments;
pub mod audit;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod diagram;
pub mod executor;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_api;
pub mod healthcheck;
pub mod job;
pub mod journal;
pub mod lifecycle;
pub mod logging;
pub mod mask;
pub mod metrics;
pub mod notify;
pub mod outcome;
pub mod pagebuf;
pub mod phase;
pub mod process;
pub mod release;
pub mod run_job;
pub mod server;
pub mod signals;
#[cfg(test)]
mod testing;
pub mod time;
pub mod trails;
pub mod yaml;
