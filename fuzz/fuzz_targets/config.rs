//! libFuzzer entry point of the `config` target (`cargo xtask fuzz config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| milk_fuzz::config::run(data));
