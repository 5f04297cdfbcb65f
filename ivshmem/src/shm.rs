//! The ivshmem shared memory: a memfd, mapped shared into this process, whose
//! descriptor QEMU receives and exposes to the guest as BAR2.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Size of the shared memory: the register file rounded up to a power of two
/// (PCI BAR sizes are powers of two).
pub const SHM_SIZE: usize = 64 * 1024;

/// A shared mapping of a memfd (or any file) of a fixed size.
///
/// Both the host and the guest (through QEMU) write it concurrently: it is only
/// ever accessed through raw pointers with atomic operations (see
/// [`crate::regs::Regs`]), never through Rust references to its contents.
#[derive(Debug)]
pub struct SharedMem {
    file: File,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access
// goes through atomic operations, so handing it to another thread is sound.
unsafe impl Send for SharedMem {}
// SAFETY: as above: concurrent access is by atomics only.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// Creates a zero-filled memfd of `len` bytes and maps it.
    pub fn create(name: &CStr, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shared memory size is zero",
            ));
        }
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no
        // other memory-safety requirement.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len as u64)?;
        Self::map(file, len)
    }

    /// Maps the first `len` bytes of `file` shared (e.g. a memfd received from
    /// an ivshmem server). The file must be at least `len` bytes long.
    pub fn map(file: File, len: usize) -> io::Result<Self> {
        let file_len = file.metadata()?.len();
        if len == 0 || file_len < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot map {len} bytes of a {file_len}-byte file"),
            ));
        }
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL) of a
        // descriptor we own, at least `len` bytes long; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(SharedMem { file, ptr, len })
    }

    /// Start of the mapping (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backing file (e.g. to send to QEMU or to map a second time).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl AsFd for SharedMem {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `map`, which nothing
        // can use after this value is dropped (accessors borrow `self`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_of_one_memfd_see_each_others_writes() {
        let a = SharedMem::create(c"t", SHM_SIZE).unwrap();
        let b = SharedMem::map(a.file().try_clone().unwrap(), SHM_SIZE).unwrap();
        assert_ne!(a.as_ptr(), b.as_ptr());
        // SAFETY: both pointers are inside live mappings of SHM_SIZE bytes.
        unsafe {
            a.as_ptr().add(100).write_volatile(0x5a);
            assert_eq!(b.as_ptr().add(100).read_volatile(), 0x5a);
        }
    }

    #[test]
    fn refuses_to_map_beyond_the_file() {
        let a = SharedMem::create(c"t", 4096).unwrap();
        let e = SharedMem::map(a.file().try_clone().unwrap(), 8192).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(SharedMem::create(c"t", 0).is_err());
    }
}
