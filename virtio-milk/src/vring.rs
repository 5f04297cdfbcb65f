//! Device side of one split virtqueue, its ring memory translated once.
//!
//! [`DeviceRing`] holds host pointers to the descriptor table, the available ring and the
//! used ring of one queue, validated when the queue is activated: every ring lies whole
//! inside one mapped region of guest memory, suitably aligned. After that no ring access
//! goes through vm-memory's per-access address translation (which dominated an idle poll
//! of the old engine, docs/virtio-milk-loopback.md): indices are atomics on the mapping,
//! descriptors and ring entries are volatile reads, and every guest-controlled index is
//! reduced modulo the queue size or bounds-checked before it is used. Buffers the
//! descriptors point to are not part of the ring: the engine reads and writes them
//! through vm-memory, which checks every address.
//!
//! Used-ring updates are batched: [`DeviceRing::add_used`] writes the element,
//! [`DeviceRing::publish_used`] makes all elements added since visible with one release
//! store of `used.idx`.
//!
//! Ring metadata writes (used elements, `used.idx`, `avail_event`, used flags) do not go
//! through vm-memory's dirty bitmap; every guest memory of this workspace is
//! `GuestMemoryMmap<()>`, which has none.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend};

/// Descriptor flag: the chain continues in `next`.
const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: indirect table (VIRTIO_RING_F_INDIRECT_DESC, never offered).
const DESC_F_INDIRECT: u16 = 4;
/// Used ring flag: the device wants no kicks (without EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;
/// Avail ring flag: the driver wants no interrupts (without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One descriptor as read from the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// Next descriptor if `flags` has NEXT.
    pub next: u16,
}

impl Desc {
    /// Device-writable buffer.
    pub fn is_write_only(&self) -> bool {
        self.flags & DESC_F_WRITE != 0
    }

    /// The chain continues.
    pub fn has_next(&self) -> bool {
        self.flags & DESC_F_NEXT != 0
    }
}

/// Why a ring cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// Size or addresses invalid, or a ring not inside one mapped region.
    #[error("invalid ring layout")]
    Layout,
    /// `avail.idx` moved more than a ring ahead of the device.
    #[error("available index out of range")]
    AvailIndex,
    /// A chain head outside the descriptor table.
    #[error("bad head index")]
    BadHead,
}

/// Where the driver placed the rings of one queue, and its size.
#[derive(Clone, Copy, Debug)]
pub struct RingLayout {
    /// Queue size (power of two, 1..=`max_size`).
    pub size: u16,
    /// Descriptor table (16-byte aligned).
    pub desc_table: u64,
    /// Available ring (2-byte aligned).
    pub avail_ring: u64,
    /// Used ring (4-byte aligned).
    pub used_ring: u64,
}

/// Device side of one split virtqueue. See the module documentation.
pub struct DeviceRing {
    size: u16,
    desc: *const u8,
    avail: *mut u8,
    used: *mut u8,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
    /// `used.idx` as last stored.
    published_used: u16,
    /// `used.idx` when the driver was last asked whether it wants an interrupt.
    notified_used: u16,
}

// SAFETY: the raw pointers point into guest memory mapped for the whole life of the
// memory object that the owner of this ring keeps alongside it (QueueEngine owns both);
// the mapping is shared with the guest anyway, and every access through the pointers is
// atomic or volatile, so moving the ring to another thread adds no aliasing hazard.
unsafe impl Send for DeviceRing {}

fn host_range<M: GuestMemory>(mem: &M, addr: u64, len: usize) -> Option<*mut u8> {
    // One contiguous host mapping for the whole range, or nothing.
    let phys = mem.physical_memory()?;
    let slice = phys.get_slice(GuestAddress(addr), len).ok()?;
    if slice.len() != len {
        return None;
    }
    Some(slice.ptr_guard_mut().as_ptr())
}

impl DeviceRing {
    /// Validate `l` against `mem` and translate its rings once. The pointers stay valid
    /// as long as `mem` (and the regions it maps) lives: the caller must keep it.
    pub fn new<M: GuestMemory>(
        mem: &M,
        l: RingLayout,
        max_size: u16,
        event_idx: bool,
    ) -> Result<Self, RingError> {
        if l.size == 0 || !l.size.is_power_of_two() || l.size > max_size {
            return Err(RingError::Layout);
        }
        if !l.desc_table.is_multiple_of(16)
            || !l.avail_ring.is_multiple_of(2)
            || !l.used_ring.is_multiple_of(4)
        {
            return Err(RingError::Layout);
        }
        let n = usize::from(l.size);
        let desc = host_range(mem, l.desc_table, 16 * n).ok_or(RingError::Layout)?;
        let avail = host_range(mem, l.avail_ring, 6 + 2 * n).ok_or(RingError::Layout)?;
        let used = host_range(mem, l.used_ring, 6 + 8 * n).ok_or(RingError::Layout)?;
        Ok(DeviceRing {
            size: l.size,
            desc,
            avail,
            used,
            event_idx,
            next_avail: 0,
            next_used: 0,
            published_used: 0,
            notified_used: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Next available-ring index the device reads.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Next used-ring index the device writes.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Continue from these positions (validated by the caller).
    pub fn set_position(&mut self, next_avail: u16, next_used: u16) {
        self.next_avail = next_avail;
        self.next_used = next_used;
        self.published_used = next_used;
        self.notified_used = next_used;
    }

    fn avail_u16(&self, off: usize) -> &AtomicU16 {
        debug_assert!(off + 2 <= 6 + 2 * usize::from(self.size) && off.is_multiple_of(2));
        // SAFETY: `off` is inside the validated avail ring (callers pass 0, 2, 4 + 2*slot
        // with slot < size, or 4 + 2*size), the ring start is 2-aligned and so is `off`,
        // and the mapping outlives `self` (see `new`).
        unsafe { AtomicU16::from_ptr(self.avail.add(off).cast()) }
    }

    fn used_u16(&self, off: usize) -> &AtomicU16 {
        debug_assert!(off + 2 <= 6 + 8 * usize::from(self.size) && off.is_multiple_of(2));
        // SAFETY: as `avail_u16`, inside the validated used ring (0, 2 or 4 + 8*size),
        // 4-aligned start, even offset.
        unsafe { AtomicU16::from_ptr(self.used.add(off).cast()) }
    }

    /// The driver's `avail.idx` (acquire: entries and descriptors it published are visible).
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.avail_u16(2).load(Ordering::Acquire))
    }

    /// The driver posted chains the device has not taken.
    pub fn has_avail(&self) -> bool {
        self.avail_idx() != self.next_avail
    }

    /// `used.idx` as it is in guest memory.
    pub fn used_idx_in_memory(&self) -> u16 {
        u16::from_le(self.used_u16(2).load(Ordering::Acquire))
    }

    /// Take the next available chain head, if any. A head is returned as the driver wrote
    /// it (it may be out of range: [`Self::chain`] then yields nothing and
    /// [`Self::add_used`] refuses it).
    pub fn pop(&mut self) -> Result<Option<u16>, RingError> {
        let idx = self.avail_idx();
        let ahead = idx.wrapping_sub(self.next_avail);
        if ahead > self.size {
            return Err(RingError::AvailIndex);
        }
        if ahead == 0 {
            return Ok(None);
        }
        let slot = usize::from(self.next_avail % self.size);
        let head = u16::from_le(self.avail_u16(4 + 2 * slot).load(Ordering::Relaxed));
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Descriptor `i` (`None` if out of range).
    pub fn desc(&self, i: u16) -> Option<Desc> {
        if i >= self.size {
            return None;
        }
        // SAFETY: i < size, so the 16 bytes at 16*i are inside the validated descriptor
        // table; a volatile read of a byte array has no alignment requirement and the
        // guest may change the bytes at any time (they are copied, then interpreted).
        let raw: [u8; 16] =
            unsafe { std::ptr::read_volatile(self.desc.add(16 * usize::from(i)).cast()) };
        let u64le = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        Some(Desc {
            addr: u64le(&raw[0..8]),
            len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        })
    }

    /// The descriptors of the chain starting at `head`: at most `size` of them (a loop
    /// ends there), ending early at an out-of-range index or an indirect descriptor (not
    /// negotiated). If the last one yielded still has NEXT, the chain is broken.
    pub fn chain(&self, head: u16) -> Chain<'_> {
        Chain {
            ring: self,
            next: head,
            ttl: self.size,
        }
    }

    /// Return chain `head` with `len` bytes written; visible to the driver at the next
    /// [`Self::publish_used`].
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        if head >= self.size {
            return Err(RingError::BadHead);
        }
        let slot = usize::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        // SAFETY: slot < size, so the 8 bytes at 4 + 8*slot are inside the validated used
        // ring; volatile write of a byte array, no alignment requirement.
        unsafe { std::ptr::write_volatile(self.used.add(4 + 8 * slot).cast::<[u8; 8]>(), elem) };
        self.next_used = self.next_used.wrapping_add(1);
        Ok(())
    }

    /// Give up the used slot of a chain that cannot be returned (its head is out of range),
    /// so the used position stays within one ring of the avail position; the slot keeps
    /// whatever element it held and is published with the next [`Self::publish_used`].
    pub fn skip_used(&mut self) {
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Make every element added since the last call visible (one release store of
    /// `used.idx`). Returns whether anything was published.
    pub fn publish_used(&mut self) -> bool {
        if self.published_used == self.next_used {
            return false;
        }
        self.used_u16(2)
            .store(self.next_used.to_le(), Ordering::Release);
        self.published_used = self.next_used;
        true
    }

    /// Whether the driver wants an interrupt for what was published since the last call
    /// (EVENT_IDX `used_event`, else the avail ring's NO_INTERRUPT flag).
    pub fn needs_notification(&mut self) -> bool {
        // The used.idx store must be visible before the driver's flag is read.
        fence(Ordering::SeqCst);
        let new = self.published_used;
        let old = std::mem::replace(&mut self.notified_used, new);
        if self.event_idx {
            let off = 4 + 2 * usize::from(self.size);
            let event = u16::from_le(self.avail_u16(off).load(Ordering::Relaxed));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            u16::from_le(self.avail_u16(0).load(Ordering::Relaxed)) & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Ask the driver to kick for the next chain (EVENT_IDX `avail_event` = `next_avail`,
    /// else clear NO_NOTIFY). Returns true if chains arrived meanwhile (do not sleep).
    pub fn enable_notification(&mut self) -> bool {
        if self.event_idx {
            let off = 4 + 8 * usize::from(self.size);
            self.used_u16(off)
                .store(self.next_avail.to_le(), Ordering::Relaxed);
        } else {
            self.used_u16(0).store(0, Ordering::Relaxed);
        }
        // The store must be visible before avail.idx is read again.
        fence(Ordering::SeqCst);
        self.avail_idx() != self.next_avail
    }

    /// Stop asking for kicks: with EVENT_IDX `avail_event` is simply left behind; without
    /// it, set NO_NOTIFY.
    pub fn disable_notification(&mut self) {
        if !self.event_idx {
            self.used_u16(0)
                .store(USED_F_NO_NOTIFY.to_le(), Ordering::Relaxed);
        }
    }
}

/// Iterator over one descriptor chain ([`DeviceRing::chain`]).
pub struct Chain<'a> {
    ring: &'a DeviceRing,
    next: u16,
    ttl: u16,
}

impl Iterator for Chain<'_> {
    type Item = Desc;

    fn next(&mut self) -> Option<Desc> {
        if self.ttl == 0 {
            return None;
        }
        let d = self.ring.desc(self.next)?;
        if d.flags & DESC_F_INDIRECT != 0 {
            // Not negotiated: a chain using it is broken (the caller sees NEXT pending).
            self.ttl = 0;
            return None;
        }
        if d.has_next() {
            self.next = d.next;
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(d)
    }
}

/// Every region of guest memory with its host address, translated once: buffer reads and
/// writes that fall inside one region are bounds-checked here and copied with volatile
/// accesses, without vm-memory's per-access translation. The owner keeps the memory alive
/// (QueueEngine owns both) and falls back to vm-memory for anything this refuses.
pub struct HostRegions {
    /// (guest start, length, host start), sorted by guest start.
    regions: Vec<(u64, u64, *mut u8)>,
}

// SAFETY: as for DeviceRing: the pointers refer to mappings the owner keeps alive, and
// every access is a volatile copy, so moving the table between threads adds no hazard.
unsafe impl Send for HostRegions {}

impl HostRegions {
    /// The regions of `mem` that have a host mapping (none for memory behind an IOMMU).
    pub fn new<M: GuestMemory>(mem: &M) -> Self {
        use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};
        let mut regions = Vec::new();
        if let Some(phys) = mem.physical_memory() {
            for r in phys.iter() {
                if let Ok(p) = r.get_host_address(MemoryRegionAddress(0)) {
                    regions.push((r.start_addr().0, r.len(), p));
                }
            }
        }
        regions.sort_by_key(|r| r.0);
        HostRegions { regions }
    }

    fn host(&self, addr: u64, len: usize) -> Option<*mut u8> {
        let end = addr.checked_add(len as u64)?;
        let &(start, rlen, host) = self
            .regions
            .iter()
            .find(|&&(s, l, _)| addr >= s && addr - s < l)?;
        if end > start + rlen {
            return None;
        }
        // In range: addr - start < rlen, and the region maps rlen bytes at `host`.
        Some(host.wrapping_add((addr - start) as usize))
    }

    /// Copy `buf.len()` bytes at guest `addr` into `buf`; false if not inside one region.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(p) = self.host(addr, buf.len()) else {
            return false;
        };
        // SAFETY: `host` checked that the whole range lies in one mapped region, which the
        // owner keeps mapped; the guest accesses this memory concurrently, hence volatile.
        let s = unsafe { vm_memory::VolatileSlice::new(p, buf.len()) };
        s.copy_to(buf);
        true
    }

    /// Copy `data` to guest `addr`; false if not inside one region.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some(p) = self.host(addr, data.len()) else {
            return false;
        };
        // SAFETY: as in `read`.
        let s = unsafe { vm_memory::VolatileSlice::new(p, data.len()) };
        s.copy_from(data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const SIZE: u16 = 8;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn layout() -> RingLayout {
        RingLayout {
            size: SIZE,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        }
    }

    fn desc(m: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(0x1000 + 16 * u64::from(i));
        m.write_obj(addr, at).unwrap();
        m.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        m.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    fn post(m: &GuestMemoryMmap, slot: u16, head: u16, idx: u16) {
        m.write_obj(head, GuestAddress(0x2004 + 2 * u64::from(slot)))
            .unwrap();
        m.write_obj(idx, GuestAddress(0x2002)).unwrap();
    }

    #[test]
    fn layouts_outside_memory_misaligned_or_oddly_sized_are_refused() {
        let m = mem();
        let ok = layout();
        assert!(DeviceRing::new(&m, ok, 256, true).is_ok());
        for bad in [
            RingLayout { size: 0, ..ok },
            RingLayout { size: 6, ..ok },
            RingLayout { size: 512, ..ok },
            RingLayout {
                desc_table: 0x1008,
                ..ok
            },
            RingLayout {
                avail_ring: 0x2001,
                ..ok
            },
            RingLayout {
                used_ring: 0x3002,
                ..ok
            },
            // The used ring would end past the end of memory.
            RingLayout {
                used_ring: 0x10000 - 8,
                ..ok
            },
            RingLayout {
                desc_table: u64::MAX - 15,
                ..ok
            },
        ] {
            assert_eq!(
                DeviceRing::new(&m, bad, 256, true).err(),
                Some(RingError::Layout),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn loops_out_of_range_next_and_indirect_end_a_chain() {
        let m = mem();
        let r = DeviceRing::new(&m, layout(), 256, true).unwrap();
        // 0 -> 1 -> 0 -> ...: a loop ends after `size` descriptors, NEXT still set.
        desc(&m, 0, 0x8000, 64, DESC_F_NEXT, 1);
        desc(&m, 1, 0x8040, 64, DESC_F_NEXT, 0);
        let v: Vec<Desc> = r.chain(0).collect();
        assert_eq!(v.len(), usize::from(SIZE));
        assert!(v.last().unwrap().has_next());
        // next out of range: the chain ends with NEXT set.
        desc(&m, 2, 0x8000, 64, DESC_F_NEXT, 99);
        let v: Vec<Desc> = r.chain(2).collect();
        assert_eq!(v.len(), 1);
        assert!(v[0].has_next());
        // An indirect descriptor (never negotiated) is not followed.
        desc(&m, 3, 0x8000, 64, DESC_F_NEXT, 4);
        desc(&m, 4, 0x9000, 16, DESC_F_INDIRECT, 0);
        let v: Vec<Desc> = r.chain(3).collect();
        assert_eq!(v.len(), 1);
        assert!(v[0].has_next());
        // A head out of range yields nothing.
        assert_eq!(r.chain(SIZE).count(), 0);
    }

    #[test]
    fn avail_index_jumps_and_bad_heads_are_errors() {
        let m = mem();
        let mut r = DeviceRing::new(&m, layout(), 256, true).unwrap();
        assert_eq!(r.pop(), Ok(None));
        post(&m, 0, 5, 1);
        assert_eq!(r.pop(), Ok(Some(5)));
        assert_eq!(r.add_used(SIZE, 0), Err(RingError::BadHead));
        // The driver claims more than a ring of new entries.
        m.write_obj(1 + SIZE + 1, GuestAddress(0x2002)).unwrap();
        assert_eq!(r.pop(), Err(RingError::AvailIndex));
    }

    #[test]
    fn used_index_is_published_once_per_batch_and_event_idx_is_honoured() {
        let m = mem();
        let mut r = DeviceRing::new(&m, layout(), 256, true).unwrap();
        for i in 0..3 {
            r.add_used(i, 64).unwrap();
        }
        assert_eq!(r.used_idx_in_memory(), 0, "not visible before publish");
        assert!(r.publish_used());
        assert!(!r.publish_used(), "nothing new");
        assert_eq!(r.used_idx_in_memory(), 3);
        let id: u32 = m.read_obj(GuestAddress(0x3004 + 8 * 2)).unwrap();
        let len: u32 = m.read_obj(GuestAddress(0x3004 + 8 * 2 + 4)).unwrap();
        assert_eq!((id, len), (2, 64));
        // used_event = 1: crossing it (0 -> 3) wants an interrupt, the next batch does not.
        m.write_obj(1u16, GuestAddress(0x2004 + 2 * u64::from(SIZE)))
            .unwrap();
        assert!(r.needs_notification());
        r.add_used(3, 0).unwrap();
        r.publish_used();
        assert!(!r.needs_notification());
        // Arming avail_event writes next_avail and reports chains already posted.
        post(&m, 0, 1, 1);
        assert!(r.enable_notification());
        let ev: u16 = m
            .read_obj(GuestAddress(0x3004 + 8 * u64::from(SIZE)))
            .unwrap();
        assert_eq!(ev, 0);
    }

    #[test]
    fn region_table_copies_inside_one_region_only() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let t = HostRegions::new(&m);
        assert!(t.write(0x10, b"hello"));
        let mut b = [0u8; 5];
        assert!(t.read(0x10, &mut b));
        assert_eq!(&b, b"hello");
        // Straddles the two regions, or leaves memory: refused (the engine then asks
        // vm-memory, which handles the first and fails the second).
        assert!(!t.read(0xffe, &mut b));
        assert!(!t.read(0x1ffe, &mut b));
        assert!(!t.read(u64::MAX - 1, &mut b));
        assert!(!t.write(0x2000, b"x"));
    }
}
