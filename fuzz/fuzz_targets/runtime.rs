//! libFuzzer entry point of the `runtime` target (`cargo xtask fuzz runtime`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| milk_fuzz::runtime::run(data));
