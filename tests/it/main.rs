//! Integration tests, one binary with one module per behaviour.

#[path = "../support/mod.rs"]
#[allow(dead_code)]
mod support;

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
