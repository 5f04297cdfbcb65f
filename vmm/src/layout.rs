//! Guest physical memory layout and fixed resource assignments (x86_64).
//!
//! Everything the VMM places at a fixed guest address or claims as a fixed
//! resource (IRQ line, I/O port) is defined here, so the whole map can be read in
//! one place:
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data area (left zero)
//! 0x0000_0500  boot GDT (5 entries)                     BOOT_GDT_START
//! 0x0000_0540  boot IDT (empty)                         BOOT_IDT_START
//! 0x0000_6000  PVH hvm_start_info                       PVH_INFO_START
//! 0x0000_6040  PVH module list (initramfs)              PVH_MODLIST_START
//! 0x0000_6100  PVH memory map                           PVH_MEMMAP_START
//! 0x0000_7000  Linux zero page (boot_params)            ZERO_PAGE_START
//! 0x0000_8ff0  initial stack pointer                    BOOT_STACK_POINTER
//! 0x0000_9000  PML4                                     PML4_START
//! 0x0000_a000  PDPT                                     PDPTE_START
//! 0x0000_b000  4 page directories, 2 MiB pages, 4 GiB   PDE_START
//! 0x0002_0000  kernel command line (2 KiB)              CMDLINE_START
//! 0x0009_fc00  MP table (EBDA), reserved to 1 MiB       MPTABLE_START
//! 0x0010_0000  high memory: kernel (ELF p_paddr / bzImage code32_start)
//! ...          initramfs, at the top of low RAM, page aligned
//! 0xd000_0000  MMIO gap start: virtio-mmio slots, 4 KiB each
//! 0xfec0_0000  IOAPIC
//! 0xfee0_0000  local APIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than MMIO_GAP_START bytes
//! ```

/// Page size used for alignment of guest structures.
pub const PAGE_SIZE: u64 = 0x1000;

/// Boot GDT: null, 32-bit code, 64-bit code (0x10 = __BOOT_CS), data (0x18 =
/// __BOOT_DS), TSS.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries of the boot GDT.
pub const BOOT_GDT_ENTRIES: usize = 5;
/// Empty boot IDT (the guest installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x540;

/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Largest number of memory map entries the VMM writes (PVH and zero page).
pub const MAX_E820_ENTRIES: usize = 128;

/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer for the boot CPU (grows down into 0x8000..0x8ff0).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Level-4 page map of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// First of [`BOOT_PD_COUNT`] page directories of the boot identity mapping.
pub const PDE_START: u64 = 0xb000;
/// Number of page directories: each maps 1 GiB with 2 MiB pages, so the boot
/// identity map covers the low 4 GiB (RAM below the gap and the MMIO gap).
pub const BOOT_PD_COUNT: u64 = 4;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including the terminating NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the extended BIOS data area, where the MP table lives. RAM below it is
/// reported as usable, [EBDA_START, HIMEM_START) as reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of the legacy region: RAM usable by the kernel starts again here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the MMIO gap below 4 GiB (no RAM between here and 4 GiB).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Guest address of the first virtio-mmio device slot.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio slots (bounded by the free IOAPIC pins).
pub const VIRTIO_MMIO_MAX_DEVICES: usize = (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize;

/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Identity-map page for VMX real-mode emulation (must be out of RAM).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
/// TSS area for VMX real-mode emulation (3 pages after the identity-map page).
pub const KVM_TSS_START: u64 = 0xfeff_d000;

/// Legacy COM1 port base.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports of a 16550 UART.
pub const COM_PORT_SIZE: u16 = 8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 keyboard controller data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 keyboard controller command/status port (we decode 0x60..=0x64).
pub const I8042_PORT_SIZE: u16 = 5;
/// First IRQ handed to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable IRQ (IOAPIC with 24 pins).
pub const IRQ_MAX: u32 = 23;

/// Smallest guest RAM accepted (the boot structures and a tiny guest fit easily).
pub const MIN_MEMORY_MIB: u32 = 8;
/// Largest guest RAM accepted, independent of the host size (further capped by
/// the host's physical memory at run time).
pub const MAX_MEMORY_MIB: u32 = 1024 * 1024;
/// Largest number of vCPUs (MP table APIC IDs are 8 bit and the IOAPIC takes the
/// ID after the last CPU).
pub const MAX_VCPUS: u32 = 64;

/// Guest address of virtio-mmio slot `index`.
pub const fn virtio_mmio_addr(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE
}

/// IRQ line of virtio-mmio slot `index`.
pub const fn virtio_mmio_irq(index: usize) -> u32 {
    VIRTIO_IRQ_BASE + index as u32
}

// The fixed map is checked at compile time: boot structures must not overlap,
// the boot page tables must cover the MMIO gap, and the device window must sit
// below the IOAPIC.
const _: () = {
    assert!(BOOT_GDT_START + 8 * BOOT_GDT_ENTRIES as u64 <= BOOT_IDT_START);
    assert!(PVH_INFO_START + 56 <= PVH_MODLIST_START);
    assert!(PVH_MODLIST_START + 32 <= PVH_MEMMAP_START);
    assert!(PVH_MEMMAP_START + 24 * MAX_E820_ENTRIES as u64 <= ZERO_PAGE_START);
    assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER - 0x800);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDPTE_START == PML4_START + PAGE_SIZE);
    assert!(PDE_START == PDPTE_START + PAGE_SIZE);
    assert!(PDE_START + BOOT_PD_COUNT * PAGE_SIZE <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(MPTABLE_START < HIMEM_START);
    assert!(BOOT_PD_COUNT * 512 * (2 << 20) >= MMIO_GAP_END);
    assert!(MMIO_GAP_START.is_multiple_of(2 << 20));
    assert!(IOAPIC_START < APIC_START && APIC_START < KVM_IDENTITY_MAP_START);
    assert!(KVM_TSS_START + 3 * PAGE_SIZE <= MMIO_GAP_END);
    assert!(COM1_IRQ < VIRTIO_IRQ_BASE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_slots() {
        assert_eq!(virtio_mmio_addr(0), MMIO_GAP_START);
        assert_eq!(virtio_mmio_addr(2), 0xd000_2000);
        let last = virtio_mmio_addr(VIRTIO_MMIO_MAX_DEVICES - 1) + VIRTIO_MMIO_SIZE;
        assert!(last <= IOAPIC_START);
        assert_eq!(VIRTIO_MMIO_MAX_DEVICES, 19);
    }

    #[test]
    fn irq_assignment() {
        assert_eq!(virtio_mmio_irq(0), 5);
        assert_eq!(virtio_mmio_irq(VIRTIO_MMIO_MAX_DEVICES - 1), IRQ_MAX);
    }
}
