//! The virtio register file at the start of the ivshmem shared memory: a Rust
//! mirror of `struct virtio_ivshmem_regs` and `struct virtio_ivshmem_queue`
//! (canonical C: `guest-kernel/include/uapi/linux/virtio_ivshmem.h`; prose:
//! `docs/transport-ivshmem.md`).
//!
//! The structs below exist for their layout only (checked at compile time here
//! and against the C header by a test that compiles it). The live register file
//! is written by the guest while the host reads it, so it is never accessed
//! through Rust references: [`Regs`] reads and writes each field with an atomic
//! little-endian access at its offset.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::shm::SharedMem;

/// `VIRTIO_IVSHMEM_MAGIC`: "MILK" when read as bytes.
pub const MAGIC: u32 = 0x4b4c_494d;
/// `VIRTIO_IVSHMEM_VERSION`.
pub const VERSION: u32 = 1;
/// `VIRTIO_IVSHMEM_MAX_QUEUES`.
pub const MAX_QUEUES: usize = 128;
/// `VIRTIO_IVSHMEM_CONFIG_SIZE`.
pub const CONFIG_SIZE: usize = 192;
/// `VIRTIO_IVSHMEM_REGS_SIZE`.
pub const REGS_SIZE: usize = 0x1100;
/// `VIRTIO_IVSHMEM_VECTOR_CONFIG`: doorbell vector of register requests and
/// MSI-X vector of configuration changes.
pub const VECTOR_CONFIG: u16 = 0;

/// `VIRTIO_IVSHMEM_VECTOR_QUEUE(n)`: the vector of queue `n`.
pub const fn vector_queue(n: u16) -> u16 {
    1 + n
}

/// virtio device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; the device may use the queues.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and must be reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Layout mirror of `struct virtio_ivshmem_queue` (all fields little endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioIvshmemQueue {
    /// Device: largest queue size, 0 = no such queue.
    pub num_max: u16,
    /// Queue size chosen by the driver.
    pub num: u16,
    /// 1 = the device may use the queue.
    pub ready: u16,
    /// Reserved.
    pub reserved: u16,
    /// Guest physical address of the descriptor table.
    pub desc: u64,
    /// ... of the driver (available) ring.
    pub driver: u64,
    /// ... of the device (used) ring.
    pub device: u64,
}

/// Layout mirror of `struct virtio_ivshmem_regs` (all fields little endian).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VirtioIvshmemRegs {
    /// Device: [`MAGIC`].
    pub magic: u32,
    /// Device: [`VERSION`].
    pub version: u32,
    /// Device: virtio device ID.
    pub device_id: u32,
    /// Device: vendor ID.
    pub vendor_id: u32,
    /// Device: offered features.
    pub device_features: u64,
    /// Driver: accepted features.
    pub driver_features: u64,
    /// Driver; the device clears FEATURES_OK to refuse, writes 0 after a reset.
    pub status: u32,
    /// Device: config generation.
    pub config_generation: u32,
    /// Device: number of queues.
    pub num_queues: u32,
    /// Device: ivshmem peer ID the driver rings.
    pub host_peer: u32,
    /// Driver: bumped per request.
    pub req_seq: u32,
    /// Device: last request processed.
    pub ack_seq: u32,
    /// Device: valid bytes in `config`.
    pub config_size: u32,
    /// Reserved, 0.
    pub isr: u32,
    /// Device config space.
    pub config: [u8; CONFIG_SIZE],
    /// Queue slots.
    pub queues: [VirtioIvshmemQueue; MAX_QUEUES],
}

/// Offsets of the `struct virtio_ivshmem_regs` fields.
pub mod off {
    use super::VirtioIvshmemRegs as R;
    use std::mem::offset_of;

    /// `magic`.
    pub const MAGIC: usize = offset_of!(R, magic);
    /// `version`.
    pub const VERSION: usize = offset_of!(R, version);
    /// `device_id`.
    pub const DEVICE_ID: usize = offset_of!(R, device_id);
    /// `vendor_id`.
    pub const VENDOR_ID: usize = offset_of!(R, vendor_id);
    /// `device_features`.
    pub const DEVICE_FEATURES: usize = offset_of!(R, device_features);
    /// `driver_features`.
    pub const DRIVER_FEATURES: usize = offset_of!(R, driver_features);
    /// `status`.
    pub const STATUS: usize = offset_of!(R, status);
    /// `config_generation`.
    pub const CONFIG_GENERATION: usize = offset_of!(R, config_generation);
    /// `num_queues`.
    pub const NUM_QUEUES: usize = offset_of!(R, num_queues);
    /// `host_peer`.
    pub const HOST_PEER: usize = offset_of!(R, host_peer);
    /// `req_seq`.
    pub const REQ_SEQ: usize = offset_of!(R, req_seq);
    /// `ack_seq`.
    pub const ACK_SEQ: usize = offset_of!(R, ack_seq);
    /// `config_size`.
    pub const CONFIG_SIZE: usize = offset_of!(R, config_size);
    /// `isr`.
    pub const ISR: usize = offset_of!(R, isr);
    /// `config`.
    pub const CONFIG: usize = offset_of!(R, config);
    /// `queues`.
    pub const QUEUES: usize = offset_of!(R, queues);
}

/// Offsets of the `struct virtio_ivshmem_queue` fields inside one slot.
pub mod qoff {
    use super::VirtioIvshmemQueue as Q;
    use std::mem::offset_of;

    /// `num_max`.
    pub const NUM_MAX: usize = offset_of!(Q, num_max);
    /// `num`.
    pub const NUM: usize = offset_of!(Q, num);
    /// `ready`.
    pub const READY: usize = offset_of!(Q, ready);
    /// `reserved`.
    pub const RESERVED: usize = offset_of!(Q, reserved);
    /// `desc`.
    pub const DESC: usize = offset_of!(Q, desc);
    /// `driver`.
    pub const DRIVER: usize = offset_of!(Q, driver);
    /// `device`.
    pub const DEVICE: usize = offset_of!(Q, device);
}

// The same assertions the C header makes, plus every field offset it documents.
const _: () = {
    assert!(size_of::<VirtioIvshmemQueue>() == 32);
    assert!(size_of::<VirtioIvshmemRegs>() == REGS_SIZE);
    assert!(off::MAGIC == 0x00);
    assert!(off::VERSION == 0x04);
    assert!(off::DEVICE_ID == 0x08);
    assert!(off::VENDOR_ID == 0x0c);
    assert!(off::DEVICE_FEATURES == 0x10);
    assert!(off::DRIVER_FEATURES == 0x18);
    assert!(off::STATUS == 0x20);
    assert!(off::CONFIG_GENERATION == 0x24);
    assert!(off::NUM_QUEUES == 0x28);
    assert!(off::HOST_PEER == 0x2c);
    assert!(off::REQ_SEQ == 0x30);
    assert!(off::ACK_SEQ == 0x34);
    assert!(off::CONFIG_SIZE == 0x38);
    assert!(off::ISR == 0x3c);
    assert!(off::CONFIG == 0x40);
    assert!(off::QUEUES == 0x100);
    assert!(qoff::NUM_MAX == 0);
    assert!(qoff::NUM == 2);
    assert!(qoff::READY == 4);
    assert!(qoff::RESERVED == 6);
    assert!(qoff::DESC == 8);
    assert!(qoff::DRIVER == 16);
    assert!(qoff::DEVICE == 24);
    assert!(offset_of!(VirtioIvshmemRegs, queues) + MAX_QUEUES * 32 == REGS_SIZE);
};

/// Offset of queue slot `n` (caller checks `n < MAX_QUEUES`).
const fn queue_base(n: usize) -> usize {
    off::QUEUES + n * size_of::<VirtioIvshmemQueue>()
}

/// A snapshot of one queue slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSlot {
    /// `num_max`.
    pub num_max: u16,
    /// `num`.
    pub num: u16,
    /// `ready`.
    pub ready: u16,
    /// `desc`.
    pub desc: u64,
    /// `driver`.
    pub driver: u64,
    /// `device`.
    pub device: u64,
}

/// Typed, concurrency-safe access to the register file in a [`SharedMem`].
///
/// Every accessor is a single atomic little-endian load or store at the field's
/// offset: the other side (the guest through QEMU, or a test's fake driver)
/// writes the same memory at any time. Loads are `Acquire` and stores
/// `Release`, which gives the request protocol its ordering: the driver's
/// field writes are visible once its `req_seq` bump is, and the device's field
/// writes are visible before its `ack_seq` store.
#[derive(Clone, Debug)]
pub struct Regs {
    shm: Arc<SharedMem>,
}

macro_rules! field_u32 {
    ($get:ident, $set:ident, $off:expr, $doc:literal) => {
        #[doc = concat!("Reads `", $doc, "`.")]
        pub fn $get(&self) -> u32 {
            self.load32($off)
        }
        #[doc = concat!("Writes `", $doc, "`.")]
        pub fn $set(&self, v: u32) {
            self.store32($off, v)
        }
    };
}

macro_rules! field_u64 {
    ($get:ident, $set:ident, $off:expr, $doc:literal) => {
        #[doc = concat!("Reads `", $doc, "`.")]
        pub fn $get(&self) -> u64 {
            self.load64($off)
        }
        #[doc = concat!("Writes `", $doc, "`.")]
        pub fn $set(&self, v: u64) {
            self.store64($off, v)
        }
    };
}

impl Regs {
    /// Wraps a shared memory that holds at least [`REGS_SIZE`] bytes.
    pub fn new(shm: Arc<SharedMem>) -> Option<Self> {
        (shm.len() >= REGS_SIZE).then_some(Regs { shm })
    }

    /// The underlying shared memory.
    pub fn shm(&self) -> &Arc<SharedMem> {
        &self.shm
    }

    fn ptr(&self, offset: usize, size: usize) -> *mut u8 {
        // Offsets come from the constants above and are bounded by REGS_SIZE;
        // a bad one is a bug in this module, not guest input.
        assert!(offset + size <= REGS_SIZE && offset.is_multiple_of(size));
        // SAFETY: in bounds of the mapping (checked above; the mapping holds at
        // least REGS_SIZE bytes, checked in `new`).
        unsafe { self.shm.as_ptr().add(offset) }
    }

    fn load8(&self, offset: usize) -> u8 {
        // SAFETY: `ptr` returns an in-bounds pointer into a live shared mapping;
        // all accesses to it are atomic.
        unsafe { AtomicU8::from_ptr(self.ptr(offset, 1)) }.load(Ordering::Acquire)
    }

    fn store8(&self, offset: usize, v: u8) {
        // SAFETY: as in `load8`.
        unsafe { AtomicU8::from_ptr(self.ptr(offset, 1)) }.store(v, Ordering::Release)
    }

    fn load16(&self, offset: usize) -> u16 {
        // SAFETY: in bounds, 2-byte aligned (checked in `ptr`; the mapping is
        // page aligned), live, accessed atomically only.
        let v = unsafe { AtomicU16::from_ptr(self.ptr(offset, 2).cast()) }.load(Ordering::Acquire);
        u16::from_le(v)
    }

    fn store16(&self, offset: usize, v: u16) {
        // SAFETY: as in `load16`.
        unsafe { AtomicU16::from_ptr(self.ptr(offset, 2).cast()) }
            .store(v.to_le(), Ordering::Release)
    }

    fn load32(&self, offset: usize) -> u32 {
        // SAFETY: in bounds, 4-byte aligned, live, accessed atomically only.
        let v = unsafe { AtomicU32::from_ptr(self.ptr(offset, 4).cast()) }.load(Ordering::Acquire);
        u32::from_le(v)
    }

    fn store32(&self, offset: usize, v: u32) {
        // SAFETY: as in `load32`.
        unsafe { AtomicU32::from_ptr(self.ptr(offset, 4).cast()) }
            .store(v.to_le(), Ordering::Release)
    }

    fn load64(&self, offset: usize) -> u64 {
        // SAFETY: in bounds, 8-byte aligned, live, accessed atomically only.
        let v = unsafe { AtomicU64::from_ptr(self.ptr(offset, 8).cast()) }.load(Ordering::Acquire);
        u64::from_le(v)
    }

    fn store64(&self, offset: usize, v: u64) {
        // SAFETY: as in `load64`.
        unsafe { AtomicU64::from_ptr(self.ptr(offset, 8).cast()) }
            .store(v.to_le(), Ordering::Release)
    }

    field_u32!(magic, set_magic, off::MAGIC, "magic");
    field_u32!(version, set_version, off::VERSION, "version");
    field_u32!(device_id, set_device_id, off::DEVICE_ID, "device_id");
    field_u32!(vendor_id, set_vendor_id, off::VENDOR_ID, "vendor_id");
    field_u64!(
        device_features,
        set_device_features,
        off::DEVICE_FEATURES,
        "device_features"
    );
    field_u64!(
        driver_features,
        set_driver_features,
        off::DRIVER_FEATURES,
        "driver_features"
    );
    field_u32!(status, set_status, off::STATUS, "status");
    field_u32!(
        config_generation,
        set_config_generation,
        off::CONFIG_GENERATION,
        "config_generation"
    );
    field_u32!(num_queues, set_num_queues, off::NUM_QUEUES, "num_queues");
    field_u32!(host_peer, set_host_peer, off::HOST_PEER, "host_peer");
    field_u32!(req_seq, set_req_seq, off::REQ_SEQ, "req_seq");
    field_u32!(ack_seq, set_ack_seq, off::ACK_SEQ, "ack_seq");
    field_u32!(
        config_size,
        set_config_size,
        off::CONFIG_SIZE,
        "config_size"
    );
    field_u32!(isr, set_isr, off::ISR, "isr");

    /// Reads the whole config space.
    pub fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        for (i, b) in c.iter_mut().enumerate() {
            *b = self.load8(off::CONFIG + i);
        }
        c
    }

    /// Writes `bytes` at the start of the config space; returns false (and
    /// writes nothing) if they do not fit.
    pub fn write_config(&self, bytes: &[u8]) -> bool {
        if bytes.len() > CONFIG_SIZE {
            return false;
        }
        for (i, b) in bytes.iter().enumerate() {
            self.store8(off::CONFIG + i, *b);
        }
        true
    }

    /// Reads queue slot `n`; `None` if `n >= MAX_QUEUES`.
    pub fn queue(&self, n: usize) -> Option<QueueSlot> {
        if n >= MAX_QUEUES {
            return None;
        }
        let b = queue_base(n);
        Some(QueueSlot {
            num_max: self.load16(b + qoff::NUM_MAX),
            num: self.load16(b + qoff::NUM),
            ready: self.load16(b + qoff::READY),
            desc: self.load64(b + qoff::DESC),
            driver: self.load64(b + qoff::DRIVER),
            device: self.load64(b + qoff::DEVICE),
        })
    }

    /// Writes every field of queue slot `n` (and zeroes `reserved`); returns
    /// false if `n >= MAX_QUEUES`.
    pub fn set_queue(&self, n: usize, q: &QueueSlot) -> bool {
        if n >= MAX_QUEUES {
            return false;
        }
        let b = queue_base(n);
        self.store16(b + qoff::NUM_MAX, q.num_max);
        self.store16(b + qoff::NUM, q.num);
        self.store16(b + qoff::RESERVED, 0);
        self.store64(b + qoff::DESC, q.desc);
        self.store64(b + qoff::DRIVER, q.driver);
        self.store64(b + qoff::DEVICE, q.device);
        self.store16(b + qoff::READY, q.ready);
        true
    }

    /// Writes `ready` of queue slot `n`; returns false if `n >= MAX_QUEUES`.
    pub fn set_queue_ready(&self, n: usize, ready: u16) -> bool {
        if n >= MAX_QUEUES {
            return false;
        }
        self.store16(queue_base(n) + qoff::READY, ready);
        true
    }

    /// Zeroes the whole register file.
    pub fn clear(&self) {
        for o in (0..REGS_SIZE).step_by(8) {
            self.store64(o, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::SHM_SIZE;
    use std::path::PathBuf;
    use std::process::Command;

    fn regs() -> Regs {
        Regs::new(Arc::new(SharedMem::create(c"regs", SHM_SIZE).unwrap())).unwrap()
    }

    #[test]
    fn fields_land_little_endian_at_their_offsets() {
        let r = regs();
        r.set_magic(MAGIC);
        r.set_device_features(0x0102_0304_0506_0708);
        r.set_ack_seq(0xa1b2_c3d4);
        r.set_queue(
            3,
            &QueueSlot {
                num_max: 0x100,
                num: 0x40,
                ready: 1,
                desc: 0x1122_3344_5566_7788,
                driver: 2,
                device: 3,
            },
        );
        let raw = |o: usize, n: usize| -> Vec<u8> {
            // SAFETY: o + n <= REGS_SIZE <= SHM_SIZE, inside the live mapping.
            (0..n)
                .map(|i| unsafe { r.shm().as_ptr().add(o + i).read_volatile() })
                .collect()
        };
        assert_eq!(raw(0, 4), b"MILK");
        assert_eq!(raw(0x10, 8), [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(raw(0x34, 4), [0xd4, 0xc3, 0xb2, 0xa1]);
        let q3 = 0x100 + 3 * 32;
        assert_eq!(raw(q3, 8), [0, 1, 0x40, 0, 1, 0, 0, 0]);
        assert_eq!(
            raw(q3 + 8, 8),
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(r.queue(3).unwrap().desc, 0x1122_3344_5566_7788);
        assert!(r.queue(MAX_QUEUES).is_none());
        assert!(!r.set_queue(MAX_QUEUES, &QueueSlot::default()));
    }

    #[test]
    fn config_space_is_bounded() {
        let r = regs();
        assert!(r.write_config(&[1, 2, 3]));
        assert_eq!(&r.config()[..4], &[1, 2, 3, 0]);
        assert!(!r.write_config(&[0u8; CONFIG_SIZE + 1]));
        r.clear();
        assert_eq!(r.config(), [0u8; CONFIG_SIZE]);
        assert_eq!(r.magic(), 0);
    }

    fn header_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-kernel/include/uapi")
    }

    /// Every (name, offset, size) the Rust mirror claims, named as in C.
    fn rust_layout() -> Vec<(String, usize, usize)> {
        let mut v: Vec<(String, usize, usize)> = vec![
            ("sizeof:virtio_ivshmem_regs".into(), 0, REGS_SIZE),
            ("sizeof:virtio_ivshmem_queue".into(), 0, 32),
        ];
        let regs = [
            ("magic", off::MAGIC, 4),
            ("version", off::VERSION, 4),
            ("device_id", off::DEVICE_ID, 4),
            ("vendor_id", off::VENDOR_ID, 4),
            ("device_features", off::DEVICE_FEATURES, 8),
            ("driver_features", off::DRIVER_FEATURES, 8),
            ("status", off::STATUS, 4),
            ("config_generation", off::CONFIG_GENERATION, 4),
            ("num_queues", off::NUM_QUEUES, 4),
            ("host_peer", off::HOST_PEER, 4),
            ("req_seq", off::REQ_SEQ, 4),
            ("ack_seq", off::ACK_SEQ, 4),
            ("config_size", off::CONFIG_SIZE, 4),
            ("isr", off::ISR, 4),
            ("config", off::CONFIG, CONFIG_SIZE),
            ("queues", off::QUEUES, 32 * MAX_QUEUES),
        ];
        for (n, o, s) in regs {
            v.push((format!("virtio_ivshmem_regs.{n}"), o, s));
        }
        let q = [
            ("num_max", qoff::NUM_MAX, 2),
            ("num", qoff::NUM, 2),
            ("ready", qoff::READY, 2),
            ("reserved", qoff::RESERVED, 2),
            ("desc", qoff::DESC, 8),
            ("driver", qoff::DRIVER, 8),
            ("device", qoff::DEVICE, 8),
        ];
        for (n, o, s) in q {
            v.push((format!("virtio_ivshmem_queue.{n}"), o, s));
        }
        let consts = [
            ("VIRTIO_IVSHMEM_MAGIC", MAGIC as usize),
            ("VIRTIO_IVSHMEM_VERSION", VERSION as usize),
            ("VIRTIO_IVSHMEM_MAX_QUEUES", MAX_QUEUES),
            ("VIRTIO_IVSHMEM_CONFIG_SIZE", CONFIG_SIZE),
            ("VIRTIO_IVSHMEM_REGS_SIZE", REGS_SIZE),
            ("VIRTIO_IVSHMEM_VECTOR_CONFIG", VECTOR_CONFIG as usize),
            ("VIRTIO_IVSHMEM_VECTOR_QUEUE(5)", vector_queue(5) as usize),
        ];
        for (n, val) in consts {
            v.push((n.into(), val, 0));
        }
        v
    }

    /// The C program printing the same triples, generated from the Rust list so
    /// that every entry is checked.
    fn c_program(layout: &[(String, usize, usize)]) -> String {
        let mut c = String::from(
            "#include <stdio.h>\n#include <stddef.h>\n#include <linux/virtio_ivshmem.h>\n\
             #define F(s, f) printf(\"%s.%s %zu %zu\\n\", #s, #f, offsetof(struct s, f), \
             sizeof(((struct s *)0)->f))\n\
             #define C(x) printf(\"%s %llu 0\\n\", #x, (unsigned long long)(x))\n\
             int main(void) {\n\
             printf(\"sizeof:virtio_ivshmem_regs 0 %zu\\n\", sizeof(struct virtio_ivshmem_regs));\n\
             printf(\"sizeof:virtio_ivshmem_queue 0 %zu\\n\", sizeof(struct virtio_ivshmem_queue));\n",
        );
        for (name, _, _) in layout.iter().skip(2) {
            if let Some((s, f)) = name.split_once('.') {
                c.push_str(&format!("F({s}, {f});\n"));
            } else {
                c.push_str(&format!("C({name});\n"));
            }
        }
        c.push_str("return 0; }\n");
        c
    }

    #[test]
    fn layout_matches_the_c_header() {
        let hdr = header_dir();
        assert!(
            hdr.join("linux/virtio_ivshmem.h").is_file(),
            "missing header under {}",
            hdr.display()
        );
        let layout = rust_layout();
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("layout.c");
        let exe = dir.path().join("layout");
        std::fs::write(&src, c_program(&layout)).unwrap();
        let out = Command::new("gcc")
            .args(["-std=c11", "-Wall", "-Werror", "-I"])
            .arg(&hdr)
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .output()
            .expect("gcc runs");
        assert!(
            out.status.success(),
            "gcc failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(&exe).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let c: Vec<(String, usize, usize)> = text
            .lines()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (
                    w[0].to_string(),
                    w[1].parse().unwrap(),
                    w[2].parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(c.len(), layout.len());
        for (rust, c) in layout.iter().zip(&c) {
            assert_eq!(rust, c, "Rust layout differs from the C header");
        }
    }
}
