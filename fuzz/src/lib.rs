//! Coverage-guided fuzz targets for everything a guest (or a control-socket client, or a
//! user's files) can hand the MiLK host. Each target is a function over arbitrary bytes
//! that drives the real code and panics only when a property is broken:
//!
//! | target | drives |
//! |---|---|
//! | [`records`] | `virtio_milk::protocol::parse_record` on raw records, both directions |
//! | [`queue_engine`] | `virtio_milk::queue::QueueEngine` over guest memory the input writes |
//! | [`runtime`] | `virtio_milk::runtime::Runtime` fed valid-format event sequences, invariants after each step |
//! | [`mmio`] | milk-vmm's virtio-mmio transport: register reads and writes in any order |
//! | [`ivshmem_regs`] | milk-ivshmem's register file and request handling |
//! | [`loaders`] | milk-vmm's kernel and initramfs loaders and boot-info writers on arbitrary files |
//! | [`config`] | milk-vmm's kernel command-line building and the policy spec parser |
//! | [`control_proto`] | the control socket's request parser (`milk_control::proto`) |
//!
//! `cargo xtask fuzz TARGET` builds the libFuzzer binaries in `fuzz_targets/` with
//! sanitizer-coverage instrumentation; `cargo test -p milk-fuzz` replays the committed
//! corpus (`fuzz/corpus/TARGET/`) through the same functions without instrumentation.

pub mod config;
pub mod control_proto;
pub mod gen;
pub mod input;
pub mod ivshmem_regs;
pub mod loaders;
pub mod mmio;
pub mod queue_engine;
pub mod records;
pub mod runtime;

/// A fuzz target: name and entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, in the order `cargo xtask test` runs them.
pub const TARGETS: &[Target] = &[
    ("records", records::run),
    ("queue_engine", queue_engine::run),
    ("runtime", runtime::run),
    ("mmio", mmio::run),
    ("ivshmem_regs", ivshmem_regs::run),
    ("loaders", loaders::run),
    ("config", config::run),
    ("control_proto", control_proto::run),
];

/// The entry point of target `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
