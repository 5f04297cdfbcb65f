//! Boot information handed to the kernel: the e820 memory map, the Linux zero
//! page (`struct boot_params`) for the 64-bit boot protocol and the PVH
//! `hvm_start_info` for the PVH entry point.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, MAX_E820_ENTRIES, MMIO_GAP_END, MMIO_GAP_START,
    PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Where the initramfs was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdInfo {
    /// Guest address (page aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Errors writing the boot information.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// The guest is too small for the fixed layout.
    #[error("guest memory of {0:#x} bytes is below the minimum layout")]
    MemoryTooSmall(u64),
    /// linux-loader failed to write the structures.
    #[error("cannot write boot parameters: {0}")]
    Write(#[from] linux_loader::configurator::Error),
}

/// The guest memory map for `mem_size` bytes of RAM:
/// low RAM below the EBDA, the EBDA/BIOS area reserved up to 1 MiB, RAM from
/// 1 MiB to the MMIO gap (or the end of RAM) and any RAM above 4 GiB.
pub fn e820_entries(mem_size: u64) -> Result<Vec<E820Entry>, ParamsError> {
    if mem_size <= HIMEM_START {
        return Err(ParamsError::MemoryTooSmall(mem_size));
    }
    let mut v = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    v.push(E820Entry {
        addr: HIMEM_START,
        size: low_end - HIMEM_START,
        kind: E820_RAM,
    });
    if mem_size > MMIO_GAP_START {
        v.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    debug_assert!(v.len() <= MAX_E820_ENTRIES);
    Ok(v)
}

/// Builds the zero page for the 64-bit Linux boot protocol. `hdr` is the setup
/// header read from a bzImage (None for an ELF vmlinux).
pub fn build_zero_page(
    hdr: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdInfo>,
    e820: &[E820Entry],
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(h) = hdr {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
        params.ext_ramdisk_image = (i.addr >> 32) as u32;
        params.ext_ramdisk_size = (i.size >> 32) as u32;
    }
    let mut table = [boot_e820_entry::default(); 128];
    for (slot, e) in table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_table = table;
    params.e820_entries = e820.len().min(table.len()) as u8;
    params
}

/// Writes the zero page at [`ZERO_PAGE_START`].
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    params: &boot_params,
) -> Result<(), ParamsError> {
    let bp = BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<M>(&bp, mem)?;
    Ok(())
}

/// Builds the PVH start info and its memory map / module list.
pub fn build_pvh_info(
    initrd: Option<InitrdInfo>,
    e820: &[E820Entry],
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Vec<hvm_modlist_entry>,
) {
    let memmap: Vec<_> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<_> = initrd
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: 0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    (info, memmap, modules)
}

/// Writes the PVH start info at [`PVH_INFO_START`] (memory map and modules at
/// their fixed addresses).
pub fn write_pvh_info<M: GuestMemoryBackend>(
    mem: &M,
    info: &hvm_start_info,
    memmap: &[hvm_memmap_table_entry],
    modules: &[hvm_modlist_entry],
) -> Result<(), ParamsError> {
    let mut bp = BootParams::new::<hvm_start_info>(info, GuestAddress(PVH_INFO_START));
    bp.set_sections::<hvm_memmap_table_entry>(memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        bp.set_modules::<hvm_modlist_entry>(modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<M>(&bp, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn e820_small_guest() {
        let e = e820_entries(256 << 20).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(e[1].kind, E820_RESERVED);
        assert_eq!(e[1].addr + e[1].size, HIMEM_START);
        assert_eq!(
            e[2],
            E820Entry {
                addr: 0x10_0000,
                size: (256 << 20) - 0x10_0000,
                kind: E820_RAM
            }
        );
        let ram: u64 = e
            .iter()
            .filter(|x| x.kind == E820_RAM)
            .map(|x| x.size)
            .sum();
        assert_eq!(ram, (256 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn e820_guest_above_4g_skips_the_gap() {
        let size = 6u64 << 30;
        let e = e820_entries(size).unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(e[2].addr + e[2].size, MMIO_GAP_START);
        assert_eq!(e[3].addr, 1 << 32);
        assert_eq!(e[3].size, size - MMIO_GAP_START);
        for w in e.windows(2) {
            assert!(
                w[0].addr + w[0].size <= w[1].addr,
                "entries sorted, disjoint"
            );
        }
    }

    #[test]
    fn e820_rejects_tiny_memory() {
        assert!(e820_entries(HIMEM_START).is_err());
    }

    #[test]
    fn zero_page_fields() {
        let e = e820_entries(64 << 20).unwrap();
        let initrd = InitrdInfo {
            addr: 0x300_0000,
            size: 0x1234,
        };
        let p = build_zero_page(None, 42, Some(initrd), &e);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.kernel_alignment }, 0x0100_0000);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        let t = p.e820_table;
        assert_eq!({ t[2].addr }, HIMEM_START);
        assert_eq!({ t[2].r#type }, E820_RAM);
        assert_eq!({ t[3].size }, 0);
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let hdr = setup_header {
            setup_sects: 27,
            version: 0x020f,
            kernel_alignment: 0x20_0000,
            loadflags: 1,
            ..Default::default()
        };
        let p = build_zero_page(Some(hdr), 10, None, &e820_entries(64 << 20).unwrap());
        assert_eq!({ p.hdr.setup_sects }, 27);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn zero_page_written_at_fixed_address() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let p = build_zero_page(None, 5, None, &e820_entries(16 << 20).unwrap());
        write_zero_page(&mem, &p).unwrap();
        // boot_flag lives at offset 0x1fe of the zero page.
        let flag: u16 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe)).unwrap();
        assert_eq!(flag, 0xaa55);
        let n: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn pvh_start_info() {
        let e = e820_entries(128 << 20).unwrap();
        let initrd = InitrdInfo {
            addr: 0x700_0000,
            size: 0x10_0000,
        };
        let (info, memmap, modules) = build_pvh_info(Some(initrd), &e);
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(memmap[1].type_, E820_RESERVED);
        assert_eq!(modules[0].paddr, 0x700_0000);

        let mem = crate::memory::create_guest_memory(128 << 20).unwrap();
        write_pvh_info(&mem, &info, &memmap, &modules).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, 0x336e_c578);
        let second: u64 = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!(second, EBDA_START);
        let mod_addr: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(mod_addr, 0x700_0000);
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let (info, _, modules) = build_pvh_info(None, &e820_entries(64 << 20).unwrap());
        assert_eq!(info.nr_modules, 0);
        assert_eq!(info.modlist_paddr, 0);
        assert!(modules.is_empty());
    }
}
