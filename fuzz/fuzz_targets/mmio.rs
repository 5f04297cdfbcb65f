//! libFuzzer entry point of the `mmio` target (`cargo xtask fuzz mmio`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| milk_fuzz::mmio::run(data));
