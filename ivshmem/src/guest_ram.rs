//! Guest RAM shared with QEMU through a file.
//!
//! QEMU runs with `-object memory-backend-file,id=..,mem-path=<file>,share=on`
//! and `-machine memory-backend=..`, so guest RAM *is* this file. On the `pc`
//! machine, guest physical addresses map to file offsets as QEMU's
//! `pc_piix` lays them out:
//!
//! - RAM below 3.5 GiB: all of it at GPA 0, GPA == file offset;
//! - larger RAM: the first 3 GiB at GPA 0, the rest at GPA 4 GiB (file offset
//!   3 GiB onwards), above the PCI hole.
//!
//! The mapping is a vm-memory [`GuestMemoryMmap`], so virtio-queue (and
//! virtio-milk's engine) read the vrings through bounds-checked accessors.
//! Ranges the guest sees as ROM or MMIO (the legacy 640 KiB - 1 MiB hole)
//! are still backed here; the device never relies on them.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// `pc` keeps all RAM below 4 GiB when there is less than this much.
pub const PC_LOWMEM_LIMIT: u64 = 0xe000_0000;
/// Low RAM size on `pc` when RAM is at least [`PC_LOWMEM_LIMIT`].
pub const PC_LOWMEM_SPLIT: u64 = 0xc000_0000;
/// Where `pc` puts RAM above the PCI hole.
pub const PC_HIGHMEM_START: u64 = 0x1_0000_0000;

/// Guest RAM errors.
#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    /// The size is zero, not a whole number of MiB, or too large to map.
    #[error("guest RAM size {0:#x} must be a non-zero whole number of MiB")]
    BadSize(u64),
    /// Creating, sizing or opening the backing file failed.
    #[error("guest RAM file {0}: {1}")]
    File(PathBuf, io::Error),
    /// The file is smaller than the RAM it must back.
    #[error("guest RAM file {path} holds {have} bytes, need {want}")]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The RAM size.
        want: u64,
    },
    /// Mapping the file failed.
    #[error("mapping guest RAM: {0}")]
    Map(String),
}

/// The `(guest address, length, file offset)` ranges of `size` bytes of RAM
/// on QEMU's `pc` machine.
pub fn pc_layout(size: u64) -> Vec<(u64, u64, u64)> {
    if size < PC_LOWMEM_LIMIT {
        vec![(0, size, 0)]
    } else {
        vec![
            (0, PC_LOWMEM_SPLIT, 0),
            (PC_HIGHMEM_START, size - PC_LOWMEM_SPLIT, PC_LOWMEM_SPLIT),
        ]
    }
}

/// Guest RAM backed by a shared file, mapped into this process.
#[derive(Debug, Clone)]
pub struct GuestRam {
    path: PathBuf,
    size: u64,
    mem: GuestMemoryMmap,
}

fn check_size(size: u64) -> Result<(), GuestRamError> {
    if size == 0 || !size.is_multiple_of(1 << 20) || usize::try_from(size).is_err() {
        return Err(GuestRamError::BadSize(size));
    }
    Ok(())
}

impl GuestRam {
    /// Creates (or resizes) `path` to `size` bytes and maps it. QEMU then opens
    /// the same file as the guest's RAM. A new file is zero-filled.
    pub fn create(path: &Path, size: u64) -> Result<Self, GuestRamError> {
        check_size(size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| GuestRamError::File(path.into(), e))?;
        file.set_len(size)
            .map_err(|e| GuestRamError::File(path.into(), e))?;
        Self::map(path, file, size)
    }

    /// Maps an existing RAM file of at least `size` bytes.
    pub fn open(path: &Path, size: u64) -> Result<Self, GuestRamError> {
        check_size(size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| GuestRamError::File(path.into(), e))?;
        Self::map(path, file, size)
    }

    fn map(path: &Path, file: File, size: u64) -> Result<Self, GuestRamError> {
        let have = file
            .metadata()
            .map_err(|e| GuestRamError::File(path.into(), e))?
            .len();
        if have < size {
            return Err(GuestRamError::TooSmall {
                path: path.into(),
                have,
                want: size,
            });
        }
        let mut ranges = Vec::new();
        for (gpa, len, offset) in pc_layout(size) {
            let f = file
                .try_clone()
                .map_err(|e| GuestRamError::File(path.into(), e))?;
            // check_size bounded `size`, so each length fits usize.
            let len = usize::try_from(len).map_err(|_| GuestRamError::BadSize(size))?;
            ranges.push((GuestAddress(gpa), len, Some(FileOffset::new(f, offset))));
        }
        // vm-memory maps each range MAP_SHARED | MAP_NORESERVE read-write.
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| GuestRamError::Map(e.to_string()))?;
        Ok(GuestRam {
            path: path.into(),
            size,
            mem,
        })
    }

    /// The vm-memory view (cheap to clone: regions are reference counted).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True if `[gpa, gpa + len)` is inside guest RAM (one region).
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Ok(len) = usize::try_from(len) else {
            return false;
        };
        len > 0 && self.mem.check_range(GuestAddress(gpa), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use vm_memory::Bytes;

    #[test]
    fn gpa_is_the_file_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram");
        let ram = GuestRam::create(&p, 4 << 20).unwrap();
        // What the guest (QEMU) writes to the file appears at that GPA...
        let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start(0x12_3456)).unwrap();
        f.write_all(b"vring").unwrap();
        let mut buf = [0u8; 5];
        ram.memory()
            .read_slice(&mut buf, GuestAddress(0x12_3456))
            .unwrap();
        assert_eq!(&buf, b"vring");
        // ... and what the device writes at a GPA lands at that offset.
        ram.memory()
            .write_slice(b"used", GuestAddress(0x3f_fffc))
            .unwrap();
        f.seek(SeekFrom::Start(0x3f_fffc)).unwrap();
        let mut buf = [0u8; 4];
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"used");
    }

    #[test]
    fn ranges_outside_ram_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ram = GuestRam::create(&dir.path().join("ram"), 2 << 20).unwrap();
        assert!(ram.contains(0, 2 << 20));
        assert!(ram.contains((2 << 20) - 16, 16));
        assert!(!ram.contains((2 << 20) - 15, 16));
        assert!(!ram.contains(u64::MAX - 3, 16));
        assert!(!ram.contains(0, 0));
        assert!(!ram.contains(0, u64::MAX));
        assert!(ram.memory().read_obj::<u32>(GuestAddress(2 << 20)).is_err());
    }

    #[test]
    fn bad_sizes_and_short_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram");
        assert!(matches!(
            GuestRam::create(&p, 0),
            Err(GuestRamError::BadSize(0))
        ));
        assert!(matches!(
            GuestRam::create(&p, 4096),
            Err(GuestRamError::BadSize(4096))
        ));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        assert!(matches!(
            GuestRam::open(&p, 1 << 20),
            Err(GuestRamError::TooSmall { .. })
        ));
        assert!(matches!(
            GuestRam::open(&dir.path().join("none"), 1 << 20),
            Err(GuestRamError::File(..))
        ));
    }

    #[test]
    fn pc_splits_large_ram_around_the_pci_hole() {
        assert_eq!(pc_layout(256 << 20), vec![(0, 256 << 20, 0)]);
        assert_eq!(pc_layout(0xdff0_0000), vec![(0, 0xdff0_0000, 0)]);
        let big = 4u64 << 30;
        assert_eq!(
            pc_layout(big),
            vec![
                (0, 0xc000_0000, 0),
                (0x1_0000_0000, big - 0xc000_0000, 0xc000_0000)
            ]
        );
    }
}
