//! Minimal hand-built BTF: the kernel requires `func_info` (one BTF FUNC per
//! subprogram) before it accepts a program whose callback is passed to a
//! helper such as bpf_user_ringbuf_drain. Two static functions suffice:
//! `long milk_main(void *ctx)` and `long milk_cb(void *sample, void *ctx)`.

use crate::channel::ChanError;
use crate::sys::Fd;

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const INT_SIGNED: u32 = 1;
const BPF_BTF_LOAD: libc::c_int = 18;

/// Type id of `milk_main` and of `milk_cb` in [`two_funcs`].
pub const MAIN_FUNC_ID: u32 = 4;
pub const CB_FUNC_ID: u32 = 6;

/// `struct bpf_func_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FuncInfo {
    pub insn_off: u32,
    pub type_id: u32,
}

fn info(kind: u32, vlen: u32) -> u32 {
    (kind << 24) | vlen
}

/// Builds the BTF blob (header, type section, string section).
pub fn two_funcs() -> Vec<u8> {
    let strings: &[u8] = b"\0long\0ctx\0milk_main\0sample\0milk_cb\0";
    let off = |s: &str| -> u32 {
        let needle = format!("\0{s}\0");
        strings
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .map(|p| p as u32 + 1)
            .unwrap_or(0)
    };
    let words: Vec<u32> = vec![
        // 1: long
        off("long"),
        info(KIND_INT, 0),
        8,
        (INT_SIGNED << 24) | 64,
        // 2: void *
        0,
        info(KIND_PTR, 0),
        0,
        // 3: long (void *ctx)
        0,
        info(KIND_FUNC_PROTO, 1),
        1,
        off("ctx"),
        2,
        // 4: static milk_main
        off("milk_main"),
        info(KIND_FUNC, 0),
        3,
        // 5: long (void *sample, void *ctx)
        0,
        info(KIND_FUNC_PROTO, 2),
        1,
        off("sample"),
        2,
        off("ctx"),
        2,
        // 6: static milk_cb
        off("milk_cb"),
        info(KIND_FUNC, 0),
        5,
    ];
    let types: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.push(1); // version
    b.push(0); // flags
    b.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
    b.extend_from_slice(&0u32.to_le_bytes()); // type_off
    b.extend_from_slice(&(types.len() as u32).to_le_bytes());
    b.extend_from_slice(&(types.len() as u32).to_le_bytes()); // str_off
    b.extend_from_slice(&(strings.len() as u32).to_le_bytes());
    b.extend_from_slice(&types);
    b.extend_from_slice(strings);
    b
}

/// Loads a BTF blob into the kernel.
pub fn load(blob: &[u8]) -> Result<Fd, ChanError> {
    let mut attr = [0u64; 16];
    attr[0] = blob.as_ptr() as u64; // btf
    attr[2] = blob.len() as u64; // btf_size (u32) | btf_log_size (u32) = 0
                                 // SAFETY: `attr` is a zero-tailed bpf_attr for BPF_BTF_LOAD whose `btf`
                                 // pointer refers to `blob`, alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_BTF_LOAD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(ChanError::Unavailable(format!("BPF_BTF_LOAD refused: {e}")));
    }
    Ok(Fd(r as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_sections_are_consistent() {
        let b = two_funcs();
        assert_eq!(&b[0..2], &[0x9f, 0xeb]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let (type_len, str_off, str_len) = (u32_at(12), u32_at(16), u32_at(20));
        assert_eq!(type_len, str_off);
        assert_eq!(b.len(), 24 + (str_off + str_len) as usize);
        // The string section starts with NUL and names our two functions.
        let strs = &b[24 + str_off as usize..];
        assert_eq!(strs[0], 0);
        assert!(strs.windows(9).any(|w| w == b"milk_main"));
    }
}
