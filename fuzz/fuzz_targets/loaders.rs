//! libFuzzer entry point of the `loaders` target (`cargo xtask fuzz loaders`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| milk_fuzz::loaders::run(data));
