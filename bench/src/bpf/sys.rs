//! Raw bpf(2) calls: map creation, program load, raw tracepoint attach, and
//! the mmap of ring buffer maps. No libbpf: the attr layouts below follow
//! `union bpf_attr` in include/uapi/linux/bpf.h.

use super::btf::FuncInfo;
use super::insn::Insn;
use crate::channel::ChanError;
use crate::sys::Fd;
use std::ffi::CString;

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_int = 17;

pub const MAP_TYPE_RINGBUF: u32 = 27;
pub const MAP_TYPE_USER_RINGBUF: u32 = 31;
pub const PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// Large enough for every command we use; the tail must be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_int, attr: &mut Attr) -> Result<Fd, std::io::Error> {
    // SAFETY: `attr` is a valid, zero-tailed bpf_attr buffer of the given size;
    // pointers stored inside it refer to live buffers owned by the caller.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(Fd(r as i32))
    }
}

/// Turns EPERM/ENOSYS/EINVAL from the kernel into an explanation for the table.
fn refused(what: &str, e: std::io::Error) -> ChanError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => ChanError::Unavailable(format!(
            "{what}: permission denied (needs CAP_BPF+CAP_PERFMON or root; kernel.unprivileged_bpf_disabled)"
        )),
        Some(libc::ENOSYS) => ChanError::Unavailable(format!("{what}: kernel built without CONFIG_BPF_SYSCALL")),
        Some(libc::EINVAL) => ChanError::Unavailable(format!("{what}: rejected by this kernel (EINVAL: too old?)")),
        _ => ChanError::Protocol(format!("{what}: {e}")),
    }
}

/// Creates a ring buffer map (`map_type` RINGBUF or USER_RINGBUF) of `bytes`.
pub fn ringbuf_create(map_type: u32, bytes: u32, name: &str) -> Result<Fd, ChanError> {
    let mut a = Attr::new();
    a.put_u32(0, map_type);
    a.put_u32(12, bytes); // max_entries: data size, power of two pages
    let n = name.as_bytes();
    let len = n.len().min(15);
    a.0[28..28 + len].copy_from_slice(&n[..len]); // map_name
    bpf(BPF_MAP_CREATE, &mut a).map_err(|e| refused("BPF_MAP_CREATE ringbuf", e))
}

/// Loads a raw-tracepoint program; on rejection the verifier log is included.
/// `btf` (fd + func_info records) is needed when the program has callbacks.
pub fn prog_load(
    insns: &[Insn],
    name: &str,
    btf: Option<(&Fd, &[FuncInfo])>,
) -> Result<Fd, ChanError> {
    let license = CString::new("GPL").unwrap_or_default();
    let mut log = vec![0u8; 1 << 16];
    let load = |log_level: u32, log: &mut [u8]| {
        let mut a = Attr::new();
        a.put_u32(0, PROG_TYPE_RAW_TRACEPOINT);
        a.put_u32(4, insns.len() as u32);
        a.put_u64(8, insns.as_ptr() as u64);
        a.put_u64(16, license.as_ptr() as u64);
        if log_level > 0 {
            // The kernel rejects a log buffer without a log level.
            a.put_u32(24, log_level);
            a.put_u32(28, log.len() as u32);
            a.put_u64(32, log.as_mut_ptr() as u64);
        }
        let n = name.as_bytes();
        let len = n.len().min(15);
        a.0[48..48 + len].copy_from_slice(&n[..len]); // prog_name
        if let Some((fd, funcs)) = btf {
            a.put_u32(72, fd.0 as u32); // prog_btf_fd
            a.put_u32(76, std::mem::size_of::<FuncInfo>() as u32);
            a.put_u64(80, funcs.as_ptr() as u64);
            a.put_u32(88, funcs.len() as u32);
        }
        bpf(BPF_PROG_LOAD, &mut a)
    };
    match load(0, &mut log) {
        Ok(fd) => Ok(fd),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            // Reload with the verifier log to say why.
            let _ = load(1, &mut log);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            if text.is_empty() {
                return Err(refused("BPF_PROG_LOAD", e));
            }
            Err(ChanError::Unavailable(format!(
                "verifier rejected {name} ({e}): {}",
                tail.join(" / ")
            )))
        }
        Err(e) => Err(refused("BPF_PROG_LOAD", e)),
    }
}

/// Attaches `prog` to raw tracepoint `tp`; the returned fd detaches on close.
pub fn raw_tracepoint_open(tp: &str, prog: &Fd) -> Result<Fd, ChanError> {
    let name = CString::new(tp).map_err(|_| ChanError::Protocol("tracepoint name".into()))?;
    let mut a = Attr::new();
    a.put_u64(0, name.as_ptr() as u64);
    a.put_u32(8, prog.0 as u32);
    bpf(BPF_RAW_TRACEPOINT_OPEN, &mut a)
        .map_err(|e| refused("BPF_RAW_TRACEPOINT_OPEN sys_enter", e))
}

/// A shared mapping, unmapped on drop.
pub struct Mmap {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: the mapping is plain shared memory; users synchronise through
// atomics on the positions, as the kernel's ring buffer protocol requires.
unsafe impl Send for Mmap {}

impl Mmap {
    /// mmap(2) `len` bytes of `fd` at `offset` with `prot`.
    pub fn map(fd: &Fd, len: usize, offset: usize, prot: libc::c_int) -> Result<Mmap, ChanError> {
        // SAFETY: a fresh shared mapping of a ring buffer map; the kernel
        // validates length, offset and protection against the map.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.0,
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ChanError::last_os("mmap ringbuf"));
        }
        Ok(Mmap { ptr: p.cast(), len })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: this mapping was created by `map` and is unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// System page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::insn::Asm;

    /// A program the verifier must refuse (R0 is never set before exit)
    /// becomes a row-level explanation, not a crash or a bare errno.
    #[test]
    fn rejected_program_explains_why() {
        let mut a = Asm::new();
        a.exit();
        let insns = a.finish().expect("assembles");
        match prog_load(&insns, "milk_bad", None) {
            Err(ChanError::Unavailable(why)) => {
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } == 0 {
                    assert!(why.contains("verifier rejected milk_bad"), "{why}");
                    assert!(why.contains("R0"), "verifier log missing: {why}");
                }
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
