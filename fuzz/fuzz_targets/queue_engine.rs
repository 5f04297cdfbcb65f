//! libFuzzer entry point of the `queue_engine` target (`cargo xtask fuzz queue_engine`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| milk_fuzz::queue_engine::run(data));
