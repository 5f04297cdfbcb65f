//! Guest RAM: one memfd, mapped shared, split around the MMIO gap.
//!
//! Backing the whole guest RAM with a single memfd keeps it shareable: a
//! vhost-user backend (or any other process) can map the same file descriptor at
//! the offsets recorded in each region's [`FileOffset`].

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("memfd_create failed: {0}")]
    Memfd(std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size guest memory file to {size} bytes: {err}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// Underlying error.
        err: std::io::Error,
    },
    /// Mapping the regions failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
    /// The requested size is zero or not page aligned.
    #[error("invalid guest memory size {0:#x}")]
    InvalidSize(u64),
}

/// RAM regions (guest address, size) for a guest of `mem_size` bytes: everything
/// below the MMIO gap first, the rest starting at 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

/// End (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// Creates `mem_size` bytes of guest RAM backed by one memfd, mapped
/// `MAP_SHARED | MAP_NORESERVE` (pages are only allocated when touched).
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    if mem_size == 0 || !mem_size.is_multiple_of(crate::layout::PAGE_SIZE) {
        return Err(MemoryError::InvalidSize(mem_size));
    }
    let name = CString::new("milk-guest-ram").expect("static name has no NUL");
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid;
    // the return value is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_size)
        .map_err(|err| MemoryError::Truncate {
            size: mem_size,
            err,
        })?;
    let file = std::sync::Arc::new(file);
    let mut offset = 0u64;
    let ranges: Vec<_> = ram_regions(mem_size)
        .into_iter()
        .map(|(addr, size)| {
            let r = (
                addr,
                size as usize,
                Some(FileOffset::from_arc(file.clone(), offset)),
            );
            offset += size;
            r
        })
        .collect();
    Ok(GuestMemoryMmap::from_ranges_with_files(ranges)?)
}

/// Returns true when `[addr, addr+len)` lies inside RAM below the MMIO gap.
pub fn fits_low_ram(mem_size: u64, addr: GuestAddress, len: u64) -> bool {
    addr.checked_add(len)
        .is_some_and(|end| end.raw_value() <= low_ram_end(mem_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_is_one_region() {
        let r = ram_regions(256 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_gap() {
        let size = 4u64 << 30;
        let r = ram_regions(size);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, size);
        assert_eq!(low_ram_end(size), MMIO_GAP_START);
        assert_eq!(low_ram_end(64 << 20), 64 << 20);
    }

    #[test]
    fn memory_is_memfd_backed_and_shared() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let region = mem.iter().next().unwrap();
        let fo = region.file_offset().expect("memfd backing");
        assert_eq!(fo.start(), 0);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // The same bytes are visible through the file: the mapping is shared.
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        fo.file().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn split_memory_offsets_are_contiguous_in_file() {
        // Sparse: nothing is touched, so this costs no RAM.
        let size = MMIO_GAP_START + (64 << 20);
        let mem = create_guest_memory(size).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions[1].start_addr(), GuestAddress(MMIO_GAP_END));
        assert_eq!(regions[1].file_offset().unwrap().start(), MMIO_GAP_START);
        assert!(mem.write_obj(1u8, GuestAddress(MMIO_GAP_START)).is_err());
    }

    #[test]
    fn invalid_sizes_are_rejected() {
        assert!(matches!(
            create_guest_memory(0),
            Err(MemoryError::InvalidSize(0))
        ));
        assert!(create_guest_memory(4097).is_err());
    }

    #[test]
    fn fits_low_ram_checks_bounds() {
        let size = 32 << 20;
        assert!(fits_low_ram(size, GuestAddress(0), size));
        assert!(!fits_low_ram(size, GuestAddress(1), size));
        assert!(!fits_low_ram(size, GuestAddress(u64::MAX), 2));
    }
}
