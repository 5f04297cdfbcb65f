//! Loading the kernel, initramfs and command line, and writing the boot
//! information the kernel expects.
//!
//! Two entry paths are supported:
//! - **PVH**: an ELF `vmlinux` with a `XEN_ELFNOTE_PHYS32_ENTRY` note is entered
//!   in 32-bit protected mode, paging off, with `%ebx` pointing at an
//!   `hvm_start_info`.
//! - **Linux 64-bit boot protocol**: a bzImage (entered at `startup_64`, 0x200
//!   past the protected-mode kernel) or an ELF without a PVH note (entered at
//!   `e_entry`), in long mode with identity-mapped page tables and `%rsi`
//!   pointing at the zero page.

pub mod mptable;
pub mod params;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{CMDLINE_START, HIMEM_START, PAGE_SIZE};
use crate::memory::low_ram_end;
pub use params::{E820Entry, InitrdInfo};

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = start info.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, `%rsi` = zero page.
    Linux64,
}

/// Kernel image format detected from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF executable (vmlinux or a freestanding guest).
    Elf,
    /// bzImage with a Linux setup header.
    BzImage,
}

/// Result of loading a kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Detected format.
    pub format: KernelFormat,
    /// Entry protocol.
    pub mode: EntryMode,
    /// Entry point (guest physical).
    pub entry: GuestAddress,
    /// First byte past the loaded image.
    pub end: u64,
    /// First byte past the memory the kernel uses before it reads the memory
    /// map: `end` for an ELF (already decompressed; `_end` covers BSS and
    /// brk), the decompression buffer's end for a bzImage (see
    /// [`bzimage_init_end`]). The initramfs goes above this.
    pub init_end: u64,
    /// bzImage setup header.
    pub setup_header: Option<setup_header>,
}

/// Errors while loading boot artifacts.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened/read.
    #[error("cannot read kernel {path}: {err}")]
    KernelIo {
        /// Path given by the user.
        path: String,
        /// Underlying error.
        err: std::io::Error,
    },
    /// The kernel is neither a valid ELF nor a bzImage, or does not fit.
    #[error("kernel {path} is not a loadable x86_64 ELF or bzImage: {err}")]
    KernelFormat {
        /// Path given by the user.
        path: String,
        /// Loader error.
        err: linux_loader::loader::Error,
    },
    /// The kernel is empty or too short to contain a header.
    #[error("kernel {0} is too short to be an ELF or bzImage")]
    KernelTooShort(String),
    /// The kernel's image (with its zero-filled part) ends past guest RAM.
    #[error("kernel {path} needs guest memory up to {end:#x}, past the end of RAM")]
    KernelTooLarge {
        /// Path given by the user.
        path: String,
        /// First byte past the image.
        end: u64,
    },
    /// The initramfs cannot be opened/read.
    #[error("cannot read initramfs {path}: {err}")]
    InitrdIo {
        /// Path given by the user.
        path: String,
        /// Underlying error.
        err: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of low RAM.
    #[error("initramfs of {size} bytes does not fit in guest memory ({free} bytes free above the kernel)")]
    InitrdTooLarge {
        /// Initramfs size.
        size: u64,
        /// Bytes available.
        free: u64,
    },
    /// The command line could not be written.
    #[error("cannot write kernel command line: {0}")]
    Cmdline(linux_loader::loader::Error),
    /// Writing zero page / start info failed.
    #[error(transparent)]
    Params(#[from] params::ParamsError),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// Detects the kernel format from the first bytes of the file.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.len() >= 4 && head[0..4] == [0x7f, b'E', b'L', b'F'] {
        return Some(KernelFormat::Elf);
    }
    // Setup header magic "HdrS" at offset 0x202.
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Loads the kernel at `path` into guest memory. An ELF with a PVH note is
/// entered through PVH unless `force_linux64` asks for the 64-bit boot
/// protocol at `e_entry` (vmlinux's `startup_64`).
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    force_linux64: bool,
) -> Result<LoadedKernel, BootError> {
    let p = path.display().to_string();
    let io = |err| BootError::KernelIo {
        path: p.clone(),
        err,
    };
    let mut file = File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a directory",
        )));
    }
    let mut head = vec![0u8; 0x400];
    let n = read_up_to(&mut file, &mut head).map_err(io)?;
    head.truncate(n);
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let format = match detect_format(&head) {
        Some(f) => f,
        None if n < 4 => return Err(BootError::KernelTooShort(p)),
        None => {
            return Err(BootError::KernelFormat {
                path: p,
                err: linux_loader::loader::Error::Elf(
                    linux_loader::loader::elf::Error::InvalidElfMagicNumber,
                ),
            })
        }
    };
    let fmt_err = |err| BootError::KernelFormat {
        path: p.clone(),
        err,
    };
    let loaded = load_image(mem, &mut file, format, force_linux64).map_err(fmt_err)?;
    // linux-loader writes the file-backed bytes only; the zero-filled part of an ELF
    // segment (p_memsz) must fit in RAM too, or the guest's BSS lies outside its memory.
    let last = loaded.end.checked_sub(1);
    if last.is_none_or(|a| !mem.address_in_range(GuestAddress(a))) {
        return Err(BootError::KernelTooLarge {
            path: p,
            end: loaded.end,
        });
    }
    Ok(loaded)
}

fn load_image<M: GuestMemoryBackend>(
    mem: &M,
    file: &mut File,
    format: KernelFormat,
    force_linux64: bool,
) -> Result<LoadedKernel, linux_loader::loader::Error> {
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START)))?;
            let (mode, entry) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) if !force_linux64 => {
                    (EntryMode::Pvh, addr)
                }
                _ => (EntryMode::Linux64, r.kernel_load),
            };
            Ok(LoadedKernel {
                format,
                mode,
                entry,
                end: r.kernel_end,
                init_end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START)))?;
            let init_end = r
                .setup_header
                .map(|h| bzimage_init_end(r.kernel_load.0, &h))
                .unwrap_or(r.kernel_end)
                .max(r.kernel_end);
            Ok(LoadedKernel {
                format,
                mode: EntryMode::Linux64,
                // startup_64 is 0x200 into the protected-mode kernel.
                entry: GuestAddress(r.kernel_load.0 + 0x200),
                end: r.kernel_end,
                init_end,
                setup_header: r.setup_header,
            })
        }
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// First byte past the memory a bzImage loaded at `load_addr` needs until
/// it reads the memory map: the boot protocol's `init_size` bytes from the
/// kernel's runtime start, which is `pref_address` for a non-relocatable
/// kernel and otherwise the load address rounded up to `kernel_alignment`,
/// but not below `pref_address` (LOAD_PHYSICAL_ADDR: the decompressor's
/// `head_64.S` never extracts lower). The decompressor copies itself to the
/// end of this buffer and decompresses the kernel in it, so an initramfs
/// placed only above the image's end could be overwritten.
pub fn bzimage_init_end(load_addr: u64, h: &setup_header) -> u64 {
    let pref = h.pref_address;
    let align = u64::from(h.kernel_alignment).max(1);
    let start = if h.relocatable_kernel != 0 {
        load_addr.div_ceil(align).saturating_mul(align).max(pref)
    } else {
        pref.max(load_addr)
    };
    start.saturating_add(u64::from(h.init_size))
}

/// Chooses where the initramfs goes: page aligned at the top of RAM below the
/// MMIO gap (and below `addr_max` when the kernel limits it), above the kernel.
pub fn initrd_placement(
    mem_size: u64,
    kernel_end: u64,
    size: u64,
    addr_max: Option<u64>,
) -> Result<u64, BootError> {
    let mut top = low_ram_end(mem_size);
    if let Some(max) = addr_max.filter(|m| *m != 0) {
        top = top.min(max.saturating_add(1));
    }
    let floor = kernel_end.max(HIMEM_START);
    let free = top.saturating_sub(floor);
    if size == 0 || size > free {
        return Err(BootError::InitrdTooLarge { size, free });
    }
    let addr = (top - size) & !(PAGE_SIZE - 1);
    if addr < floor {
        return Err(BootError::InitrdTooLarge { size, free });
    }
    Ok(addr)
}

/// Loads the initramfs at `path` above the kernel.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<InitrdInfo, BootError> {
    let p = path.display().to_string();
    let io = |err| BootError::InitrdIo {
        path: p.clone(),
        err,
    };
    let mut file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if meta.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a directory",
        )));
    }
    let size = meta.len();
    let addr_max = kernel.setup_header.map(|h| u64::from(h.initrd_addr_max));
    let addr = initrd_placement(mem_size, kernel.init_end, size, addr_max)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    Ok(InitrdInfo { addr, size })
}

/// Writes the command line at [`CMDLINE_START`].
pub fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &Cmdline) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::Cmdline)
}

/// Writes everything the kernel reads at boot besides its image: the MP table
/// and the zero page (64-bit protocol) or PVH start info.
pub fn write_boot_info<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    num_cpus: u32,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdInfo>,
) -> Result<(), BootError> {
    mptable::setup_mptable(mem, num_cpus)?;
    let e820 = params::e820_entries(mem_size)?;
    match kernel.mode {
        EntryMode::Pvh => {
            let (info, memmap, modules) = params::build_pvh_info(initrd, &e820);
            params::write_pvh_info(mem, &info, &memmap, &modules)?;
        }
        EntryMode::Linux64 => {
            let zp = params::build_zero_page(kernel.setup_header, cmdline_len, initrd, &e820);
            params::write_zero_page(mem, &zp)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn header(pref: u64, align: u32, relocatable: u8, init_size: u32) -> setup_header {
        setup_header {
            pref_address: pref,
            kernel_alignment: align,
            relocatable_kernel: relocatable,
            init_size,
            ..Default::default()
        }
    }

    #[test]
    fn bzimage_init_end_covers_the_decompression_buffer() {
        // The usual x86_64 kernel: relocatable, 2 MiB alignment, 16 MiB
        // LOAD_PHYSICAL_ADDR; loaded at 1 MiB it runs from 16 MiB.
        let h = header(0x100_0000, 0x20_0000, 1, 0x300_0000);
        assert_eq!(bzimage_init_end(HIMEM_START, &h), 0x100_0000 + 0x300_0000);
        // Loaded above pref_address: rounded up to the alignment.
        assert_eq!(bzimage_init_end(0x210_0000, &h), 0x220_0000 + 0x300_0000);
        // Not relocatable: always pref_address.
        let fixed = header(0x100_0000, 0x20_0000, 0, 0x100_0000);
        assert_eq!(bzimage_init_end(HIMEM_START, &fixed), 0x200_0000);
        // A zero alignment does not divide by zero.
        assert_eq!(
            bzimage_init_end(HIMEM_START, &header(0, 0, 1, 0x1000)),
            HIMEM_START + 0x1000
        );
    }

    #[test]
    fn initrd_goes_above_init_size_not_just_the_image() {
        // A 10 MiB image at 1 MiB that needs 48 MiB from 16 MiB: an initramfs
        // that would fit right above the image must go above 64 MiB.
        let h = header(0x100_0000, 0x20_0000, 1, 0x300_0000);
        let image_end = HIMEM_START + (10 << 20);
        let init_end = bzimage_init_end(HIMEM_START, &h).max(image_end);
        let mem = 72 << 20;
        let size = 16 << 20;
        assert!(initrd_placement(mem, image_end, size, None).unwrap() < init_end);
        assert!(initrd_placement(mem, init_end, size, None).is_err());
        let a = initrd_placement(mem, init_end, 4 << 20, None).unwrap();
        assert!(a >= init_end);
    }

    #[test]
    fn detects_formats() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"garbage"), None);
        assert_eq!(detect_format(b""), None);
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let mem = 256u64 << 20;
        let a = initrd_placement(mem, 0x200_0000, 0x1800, None).unwrap();
        assert_eq!(a, mem - 0x2000);
        assert_eq!(a % PAGE_SIZE, 0);
    }

    #[test]
    fn initrd_respects_addr_max_and_gap() {
        let a = initrd_placement(8 << 30, 0x200_0000, 0x1000, Some(0x37ff_ffff)).unwrap();
        assert_eq!(a, 0x3800_0000 - 0x1000);
        let b = initrd_placement(8 << 30, 0x200_0000, 0x1000, None).unwrap();
        assert_eq!(b, crate::layout::MMIO_GAP_START - 0x1000);
    }

    #[test]
    fn initrd_too_large_is_rejected() {
        let mem = 64u64 << 20;
        let err = initrd_placement(mem, 0x200_0000, mem, None).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }));
        // Exactly the free space fits, one more page does not.
        let free = mem - 0x200_0000;
        assert!(initrd_placement(mem, 0x200_0000, free, None).is_ok());
        assert!(initrd_placement(mem, 0x200_0000, free + 1, None).is_err());
        assert!(initrd_placement(mem, 0x200_0000, 0, None).is_err());
    }

    /// A 64-bit ELF with one PT_LOAD of 16 file bytes at 1 MiB and `memsz` bytes in memory.
    fn elf_with_memsz(memsz: u64) -> Vec<u8> {
        let mut e = vec![0u8; 0x90];
        e[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut e[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&0x80u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&memsz.to_le_bytes()); // p_memsz
        e
    }

    /// Fuzz finding (loaders): an ELF whose segment's p_memsz reaches past guest RAM loaded
    /// "successfully" (linux-loader only writes the file bytes), with the kernel's end far
    /// outside memory.
    #[test]
    fn kernels_larger_than_ram_are_refused() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.elf");
        File::create(&ok)
            .unwrap()
            .write_all(&elf_with_memsz(0x1000))
            .unwrap();
        let k = load_kernel(&mem, &ok, false).unwrap();
        assert_eq!(k.end, 0x10_1000);
        let big = dir.path().join("big.elf");
        File::create(&big)
            .unwrap()
            .write_all(&elf_with_memsz(0x5c5c_5c5c_5c5c))
            .unwrap();
        let e = load_kernel(&mem, &big, false).unwrap_err();
        assert!(
            matches!(e, BootError::KernelTooLarge { end, .. } if end == 0x10_0000 + 0x5c5c_5c5c_5c5c),
            "{e}"
        );
    }

    #[test]
    fn corrupt_kernels_are_errors() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        File::create(&empty).unwrap();
        assert!(matches!(
            load_kernel(&mem, &empty, false),
            Err(BootError::KernelTooShort(_))
        ));
        let junk = dir.path().join("junk");
        File::create(&junk)
            .unwrap()
            .write_all(&[0x55u8; 4096])
            .unwrap();
        assert!(matches!(
            load_kernel(&mem, &junk, false),
            Err(BootError::KernelFormat { .. })
        ));
        // ELF magic followed by garbage.
        let bad_elf = dir.path().join("bad.elf");
        let mut data = vec![0u8; 256];
        data[..4].copy_from_slice(b"\x7fELF");
        File::create(&bad_elf).unwrap().write_all(&data).unwrap();
        assert!(matches!(
            load_kernel(&mem, &bad_elf, false),
            Err(BootError::KernelFormat { .. })
        ));
        assert!(matches!(
            load_kernel(&mem, dir.path(), false),
            Err(BootError::KernelIo { .. })
        ));
        assert!(matches!(
            load_kernel(&mem, &dir.path().join("missing"), false),
            Err(BootError::KernelIo { .. })
        ));
    }
}
