//! Test fixtures shared by the integration tests.
