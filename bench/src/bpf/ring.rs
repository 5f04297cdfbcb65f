//! User-space ends of the two BPF ring buffers, following the layout the
//! kernel exposes through mmap (kernel/bpf/ringbuf.c): a consumer-position
//! page, a producer-position page, then the data area mapped twice so a
//! record that wraps is contiguous. Each record has an 8-byte header whose
//! `len` carries BUSY (bit 31) and DISCARD (bit 30) flags.

use super::sys::{page_size, Mmap};
use crate::channel::ChanError;
use crate::msg::{Msg, MSG_SIZE};
use crate::sys::Fd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const BUSY: u32 = 1 << 31;
pub const DISCARD: u32 = 1 << 30;
pub const HDR: u64 = 8;

fn round8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Reads records a BPF program wrote into a BPF_MAP_TYPE_RINGBUF.
pub struct KernelRingConsumer {
    cons: Mmap,
    prod: Mmap,
    mask: u64,
    pos: u64,
}

impl KernelRingConsumer {
    /// Maps the consumer page read-write and producer page + data read-only.
    pub fn new(map: &Fd, size: usize) -> Result<Self, ChanError> {
        let pg = page_size();
        let cons = Mmap::map(map, pg, 0, libc::PROT_READ | libc::PROT_WRITE)?;
        let prod = Mmap::map(map, pg + 2 * size, pg, libc::PROT_READ)?;
        // SAFETY: the consumer page starts with the u64 consumer position.
        let pos = unsafe { (*cons.ptr.cast::<AtomicU64>()).load(Ordering::Acquire) };
        Ok(KernelRingConsumer {
            cons,
            prod,
            mask: size as u64 - 1,
            pos,
        })
    }

    fn producer_pos(&self) -> u64 {
        // SAFETY: the producer page starts with the u64 producer position,
        // written by the kernel with release semantics.
        unsafe { (*self.prod.ptr.cast::<AtomicU64>()).load(Ordering::Acquire) }
    }

    /// True if the next record is reserved and already committed.
    pub fn has_committed(&self) -> bool {
        if self.producer_pos() == self.pos {
            return false;
        }
        // SAFETY: the header at `pos` lies inside the data mapping.
        let len = unsafe {
            let hdr = self
                .prod
                .ptr
                .add(page_size() + (self.pos & self.mask) as usize);
            (*hdr.cast::<AtomicU32>()).load(Ordering::Acquire)
        };
        len & BUSY == 0
    }

    /// Consumes every committed record; 64-byte ones are appended to `out`,
    /// others are an error. Returns how many records were consumed.
    pub fn drain(&mut self, out: &mut Vec<Msg>) -> Result<usize, ChanError> {
        let prod = self.producer_pos();
        let mut n = 0;
        while self.pos < prod {
            let pg = page_size();
            // SAFETY: the header lies inside the (double-mapped) data area
            // that follows the producer page; `pos & mask` < size.
            let hdr = unsafe { self.prod.ptr.add(pg + (self.pos & self.mask) as usize) };
            // SAFETY: the header's first u32 is written by the kernel with
            // release semantics when the record is committed.
            let len = unsafe { (*hdr.cast::<AtomicU32>()).load(Ordering::Acquire) };
            if len & BUSY != 0 {
                break;
            }
            let data_len = (len & !(BUSY | DISCARD)) as u64;
            if len & DISCARD == 0 {
                if data_len as usize != MSG_SIZE {
                    return Err(ChanError::Protocol(format!(
                        "ringbuf record of {data_len} B"
                    )));
                }
                // SAFETY: the record body follows the header and, thanks to
                // the double mapping, is contiguous and inside the mapping.
                let body = unsafe { std::slice::from_raw_parts(hdr.add(HDR as usize), MSG_SIZE) };
                out.extend(Msg::from_slice(body));
            }
            self.pos += round8(data_len + HDR);
            n += 1;
            // SAFETY: the consumer page starts with the u64 consumer position,
            // which user space owns and the kernel reads.
            unsafe { (*self.cons.ptr.cast::<AtomicU64>()).store(self.pos, Ordering::Release) };
        }
        Ok(n)
    }
}

/// Writes records for a BPF program to drain from a BPF_MAP_TYPE_USER_RINGBUF.
pub struct UserRingProducer {
    cons: Mmap,
    prod: Mmap,
    size: u64,
    pos: u64,
}

impl UserRingProducer {
    /// Maps the consumer page read-only and producer page + data read-write.
    pub fn new(map: &Fd, size: usize) -> Result<Self, ChanError> {
        let pg = page_size();
        let cons = Mmap::map(map, pg, 0, libc::PROT_READ)?;
        let prod = Mmap::map(map, pg + 2 * size, pg, libc::PROT_READ | libc::PROT_WRITE)?;
        // SAFETY: the producer page starts with the u64 producer position.
        let pos = unsafe { (*prod.ptr.cast::<AtomicU64>()).load(Ordering::Acquire) };
        Ok(UserRingProducer {
            cons,
            prod,
            size: size as u64,
            pos,
        })
    }

    /// Appends one 64-byte record; false if the ring is full.
    pub fn try_push(&mut self, m: &Msg) -> bool {
        let total = round8(MSG_SIZE as u64 + HDR);
        // SAFETY: the consumer page starts with the u64 consumer position,
        // advanced by the kernel with release semantics.
        let cons = unsafe { (*self.cons.ptr.cast::<AtomicU64>()).load(Ordering::Acquire) };
        if self.pos - cons + total > self.size {
            return false;
        }
        let pg = page_size();
        // SAFETY: header + body lie inside the double-mapped data area.
        unsafe {
            let hdr = self
                .prod
                .ptr
                .add(pg + (self.pos & (self.size - 1)) as usize);
            let len = &*hdr.cast::<AtomicU32>();
            // Reserve: header marked busy, then publish the producer position
            // (the protocol libbpf's user_ring_buffer__reserve follows).
            len.store(MSG_SIZE as u32 | BUSY, Ordering::Relaxed);
            hdr.add(4).cast::<u32>().write(0);
            (*self.prod.ptr.cast::<AtomicU64>()).store(self.pos + total, Ordering::Release);
            std::ptr::copy_nonoverlapping(m.0.as_ptr(), hdr.add(HDR as usize), MSG_SIZE);
            // Commit: clearing BUSY with release makes the body visible.
            len.store(MSG_SIZE as u32, Ordering::Release);
        }
        self.pos += total;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::round8;

    #[test]
    fn record_size_rounds_to_eight() {
        assert_eq!(round8(64 + 8), 72);
        assert_eq!(round8(13), 16);
        assert_eq!(round8(16), 16);
    }
}
