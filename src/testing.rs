//! What the unit tests share (compiled for `cargo test` only).

/// A fresh directory named `tf-<name>-<random>` under the system's temp dir, removed when
/// the guard drops, even when the test fails.
pub(crate) fn tempdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tf-{name}-"))
        .tempdir()
        .expect("the system's temp dir is writable")
}
