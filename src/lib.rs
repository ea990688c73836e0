//! A hardened, drop-in replacement for the Testflinger agent.
//!
//! Layers, top to bottom (nothing calls upward): the daemon and `run-job` drive the
//! typestate [`lifecycle`]; each phase runs through the [`executor`], which uses the
//! [`process`] runner and a [`server::Server`]; [`config`] and [`job`] are the inputs.

pub mod config;
pub mod job;
pub mod lifecycle;
pub mod phase;
pub mod process;
pub mod server;
pub mod yaml;
