//! `loaders`: milk-vmm's own boot path on arbitrary files: `VmConfig::validate` (the checks
//! before any engine starts), `boot::load_kernel` (ELF with or without a PVH note, bzImage,
//! through linux-loader), `boot::load_initrd` above it, and the boot information
//! (`write_boot_info`: MP table, e820, zero page or PVH start info) for what was loaded.
//!
//! Properties: no panic, a clear error for a bad file; a kernel that loads ends inside
//! guest RAM; an initramfs that loads lies above
//! the kernel's initial footprint and inside RAM.

use std::path::{Path, PathBuf};

use milk_vmm::boot::{load_initrd, load_kernel, write_boot_info, write_cmdline};
use milk_vmm::cmdline::build_cmdline;
use milk_vmm::memory::{create_guest_memory, GuestMemory};
use milk_vmm::VmConfig;

use crate::input::Input;

/// Guest RAM (the VMM's minimum is 8 MiB).
const MEM_SIZE: u64 = 16 << 20;

struct Files {
    mem: GuestMemory,
    kernel: PathBuf,
    initrd: PathBuf,
}

thread_local! {
    static FILES: Files = {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let pid = std::process::id();
        Files {
            mem: create_guest_memory(MEM_SIZE).expect("guest memory"),
            kernel: dir.join(format!("milk-fuzz-{pid}-kernel")),
            initrd: dir.join(format!("milk-fuzz-{pid}-initrd")),
        }
    };
}

/// The shape the fuzzer starts a kernel file from (it can still write anything).
fn kernel_bytes(inp: &mut Input<'_>) -> Vec<u8> {
    let shape = inp.u8();
    let len = usize::from(inp.u16());
    let mut k = inp.bytes(len).to_vec();
    match shape % 4 {
        // ELF magic, then the input.
        1 => {
            k.splice(0..0, *b"\x7fELF");
        }
        // bzImage: the input, padded to hold "HdrS" at 0x202.
        2 => {
            if k.len() < 0x206 {
                k.resize(0x206, 0);
            }
            k[0x202..0x206].copy_from_slice(b"HdrS");
        }
        _ => {}
    }
    k
}

/// One input: kernel shape and bytes, then initramfs bytes and a few parameters.
pub fn run(data: &[u8]) {
    FILES.with(|f| run_on(&mut Input::new(data), f));
}

fn run_on(inp: &mut Input<'_>, f: &Files) {
    let kernel = kernel_bytes(inp);
    let flags = inp.u8();
    let cpus = 1 + u32::from(inp.u8() % 4);
    let initrd = inp.rest();
    std::fs::write(&f.kernel, &kernel).expect("write kernel file");
    let with_initrd = flags & 1 != 0;
    if with_initrd {
        std::fs::write(&f.initrd, initrd).expect("write initrd file");
    }
    let mut cfg = VmConfig::new(&f.kernel);
    cfg.cpus = cpus;
    cfg.memory_mib = (MEM_SIZE >> 20) as u32;
    cfg.initrd = with_initrd.then(|| f.initrd.clone());
    let valid = cfg.validate();
    let force_linux64 = flags & 2 != 0;
    let loaded = match load_kernel(&f.mem, &f.kernel, force_linux64) {
        Ok(k) => k,
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
            return;
        }
    };
    assert!(
        valid.is_ok() || with_initrd,
        "kernel loads but validate refused it: {valid:?}"
    );
    assert!(
        loaded.end <= MEM_SIZE + (1 << 32),
        "kernel end {:#x}",
        loaded.end
    );
    assert!(loaded.init_end >= loaded.end);
    let info = if with_initrd {
        match load_initrd(&f.mem, MEM_SIZE, &loaded, &f.initrd) {
            Ok(i) => {
                assert!(i.addr >= loaded.init_end, "initrd overlaps the kernel");
                assert!(i.addr + i.size <= MEM_SIZE, "initrd past RAM");
                Some(i)
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let cmdline = build_cmdline("console=ttyS0", &[]).expect("fixed command line");
    let len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    write_cmdline(&f.mem, &cmdline).expect("command line fits");
    let _ = write_boot_info(&f.mem, MEM_SIZE, cpus, &loaded, len, info);
}
