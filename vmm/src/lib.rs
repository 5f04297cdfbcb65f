//! milk-vmm: a small rust-vmm based VMM that boots the MiLK guest under KVM,
//! with a virtio-mmio bus. The `milk-vmm` binary is a thin front over this
//! library and `milk-launcher` (engine choice, the QEMU TCG engine).
//!
//! Module map (Firecracker style):
//! - [`layout`]: every fixed guest address, IRQ and port.
//! - [`memory`]: memfd-backed guest RAM.
//! - [`boot`]: kernel/initramfs loading, zero page / PVH start info, e820, MP table.
//! - [`cmdline`]: kernel command line building.
//! - [`cpu`]: per-vCPU registers, page tables, CPUID, MSRs, LAPIC.
//! - [`devices`]: buses, COM1, i8042, virtio-mmio transport and devices.
//! - [`exit`]: why the VM stopped.

#![deny(missing_docs)]

pub mod boot;
pub mod cmdline;
pub mod cpu;
pub mod devices;
pub mod error;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod vcpu;
pub mod vmm;

pub use error::{exit_code, VmmError};
pub use exit::ExitReason;
pub use vmm::{Vm, VmConfig, VmOutcome};
