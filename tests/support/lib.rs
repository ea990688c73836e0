//! Test fixtures shared by the integration tests (tests/it), the benches and
//! examples/fake-server.rs: a crate of the workspace, compiled once for all of them.

pub mod agent;
pub mod fake_server;
pub mod http_wire;
pub mod iso_time;
pub mod loopback;
pub mod multipart;
pub mod schema;
pub mod scratch;
pub mod soak;
pub mod tls_front;
pub mod tools;
