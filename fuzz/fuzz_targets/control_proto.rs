//! libFuzzer entry point of the `control_proto` target (`cargo xtask fuzz control_proto`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| milk_fuzz::control_proto::run(data));
