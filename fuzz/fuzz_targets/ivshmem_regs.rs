//! libFuzzer entry point of the `ivshmem_regs` target (`cargo xtask fuzz ivshmem_regs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| milk_fuzz::ivshmem_regs::run(data));
