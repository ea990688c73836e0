//! Fuzz target: `testflinger_agent::fuzz_api::server_answer` on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| testflinger_agent::fuzz_api::server_answer(data));
