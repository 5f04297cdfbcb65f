//! libFuzzer entry point of the `records` target (`cargo xtask fuzz records`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| milk_fuzz::records::run(data));
