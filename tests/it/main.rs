//! Integration tests, one binary with one module per behaviour.

/// The test fixtures (tests/support, the workspace's `testflinger-agent-test-support`), with
/// the agent binary's path as cargo gives it to this package's tests.
mod support {
    pub use testflinger_agent_test_support::*;

    pub mod agent {
        pub use testflinger_agent_test_support::agent::*;

        /// The agent binary, as cargo names it to this test (the fixtures find the same file
        /// at run time: `fake_server_selftest` checks that they agree).
        pub const BIN: &str = env!("CARGO_BIN_EXE_testflinger-agent");
    }
}

mod admin_state;
mod audit;
mod capture;
mod charm_metrics;
mod check_config;
mod crash_recovery;
mod daemon;
mod diagrams;
mod disk_full;
mod docs;
mod fake_server_selftest;
mod generated;
mod healthcheck;
mod http_client;
mod idle;
mod inputs;
mod lifecycle_paths;
mod metrics_endpoint;
mod outage;
mod packaging;
mod process_tree;
mod run_job;
mod soak;
mod spec;
mod state_reads;
mod stream_pipeline;
mod stream_props;
mod supervisord;
mod systemd;
mod tls;
