//! Integration tests, one binary with one module per behaviour.

#[path = "../support/mod.rs"]
#[allow(dead_code)]
mod support;

mod admin_state;
mod charm_metrics;
mod crash_recovery;
mod daemon;
mod fake_server_selftest;
mod http_client;
mod inputs;
mod metrics_endpoint;
mod process_tree;
mod run_job;
mod stream_props;
mod supervisord;
mod tls;
