//! Fuzz target: `testflinger_agent::fuzz_api::device_files` on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| testflinger_agent::fuzz_api::device_files(data));
