//! `ivshmem_regs`: milk-ivshmem's register file and the device's request handling
//! (`Device::handle_request`), with the driver writing any field (device fields included) of
//! any width between requests, connecting and disconnecting.
//!
//! Properties: no panic; every request is acknowledged (`ack_seq` = the `req_seq` read
//! before it); a live device never shows DEVICE_NEEDS_RESET; what the device publishes is
//! never changed by the driver's scribbles; the backend is activated only with queues whose
//! rings lie in guest RAM, never twice without a reset in between.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use milk_ivshmem::backend::{Activation, Backend, BackendError, Interrupts};
use milk_ivshmem::device::{DeviceInfo, RequestOutcome, Session};
use milk_ivshmem::regs::{QueueSlot, Regs, REGS_SIZE};
use milk_ivshmem::shm::SharedMem;
use milk_ivshmem::{Device, GuestRam};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::input::Input;

const RAM: u64 = 2 << 20;
const SHM: usize = 0x2000;
const MAX_OPS: usize = 256;
const NUM_QUEUES: u16 = 4;

struct Shared {
    shm: Arc<SharedMem>,
    ram: GuestRam,
}

thread_local! {
    static SHARED: Shared = {
        let path = std::env::temp_dir().join(format!("milk-fuzz-ram-{}", std::process::id()));
        let ram = GuestRam::create(&path, RAM).expect("guest RAM file");
        // The mapping stays; the name is not needed.
        let _ = std::fs::remove_file(&path);
        Shared {
            shm: Arc::new(SharedMem::create(c"milk-fuzz", SHM).expect("shared memory")),
            ram,
        }
    };
}

/// A backend that checks what it is handed.
struct Probe {
    live: Arc<Mutex<bool>>,
}

impl Backend for Probe {
    fn activate(&mut self, a: Activation) -> Result<(), BackendError> {
        let mut live = self.live.lock().expect("probe lock");
        assert!(!*live, "backend activated twice without a reset");
        for q in &a.queues {
            let c = q.config;
            assert!(
                c.size.is_power_of_two(),
                "queue {} size {}",
                q.index,
                c.size
            );
            let n = u64::from(c.size);
            for (addr, len) in [
                (c.desc, 16 * n),
                (c.driver, 6 + 2 * n),
                (c.device, 6 + 8 * n),
            ] {
                assert!(
                    a.memory.check_range(GuestAddress(addr), len as usize),
                    "queue {} ring at {addr:#x}+{len:#x} outside guest RAM",
                    q.index
                );
            }
        }
        *live = true;
        Ok(())
    }

    fn reset(&mut self) {
        *self.live.lock().expect("probe lock") = false;
    }
}

fn session() -> Session {
    let fd = || EventFd::new(EFD_NONBLOCK).expect("eventfd");
    Session {
        kicks: (0..NUM_QUEUES).map(|_| fd()).collect(),
        interrupts: Interrupts::new((0..=NUM_QUEUES).map(|_| fd()).collect()),
    }
}

/// A store of `width` bytes at `off` of the register file, as the guest would make it.
fn scribble(shm: &SharedMem, off: usize, width: usize, v: u64) {
    let off = (off % REGS_SIZE) & !(width - 1);
    // SAFETY: off + width <= REGS_SIZE <= the mapping's length (Regs::new checked it), and
    // off is a multiple of width (the mapping is page aligned), so the atomic is aligned and
    // in bounds; the register file is only ever accessed atomically.
    unsafe {
        let p = shm.as_ptr().add(off);
        match width {
            1 => AtomicU8::from_ptr(p).store(v as u8, Ordering::Release),
            2 => AtomicU16::from_ptr(p.cast()).store(v as u16, Ordering::Release),
            4 => AtomicU32::from_ptr(p.cast()).store(v as u32, Ordering::Release),
            _ => AtomicU64::from_ptr(p.cast()).store(v, Ordering::Release),
        }
    }
}

/// One input: device info bytes, then driver operations until the input is used up.
pub fn run(data: &[u8]) {
    SHARED.with(|s| run_on(&mut Input::new(data), s));
}

fn run_on(inp: &mut Input<'_>, s: &Shared) {
    let info = DeviceInfo {
        device_id: 58,
        vendor_id: 0x4b4c_494d,
        features: (1 << 32) | u64::from(inp.u8()),
        config: {
            let n = usize::from(inp.u8() % 32);
            inp.bytes(n).to_vec()
        },
        num_queues: NUM_QUEUES,
        queue_max: 1 << inp.below(9),
    };
    let live = Arc::new(Mutex::new(false));
    let regs = Regs::new(s.shm.clone()).expect("register file");
    let drv = regs.clone();
    let mut dev = Device::new(
        info.clone(),
        0,
        regs,
        s.ram.clone(),
        Probe { live: live.clone() },
    )
    .expect("valid device info");
    if inp.bool() {
        dev.connect(session());
    }
    let ram_size = s.ram.size();
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.below(10) {
            0 | 1 => {
                let off = usize::from(inp.u16());
                let width = 1 << inp.below(4);
                scribble(&s.shm, off, width, inp.u64());
            }
            2 => drv.set_status(u32::from(inp.u8())),
            3 => drv.set_driver_features(if inp.bool() { info.features } else { inp.u64() }),
            4 => {
                let n = inp.below(u32::from(NUM_QUEUES) + 2) as usize;
                let base = if inp.bool() {
                    u64::from(inp.u16()) << 6
                } else {
                    inp.u64()
                };
                let stride = u64::from(inp.u16());
                let _ = drv.set_queue(
                    n,
                    &QueueSlot {
                        num_max: inp.u16(),
                        num: 1 << inp.below(16),
                        ready: u16::from(inp.u8() % 3),
                        desc: base,
                        driver: base.wrapping_add(stride),
                        device: base.wrapping_add(2 * stride) % (ram_size + 0x1000),
                    },
                );
            }
            5 => {
                let _ = drv.set_queue_ready(inp.below(6) as usize, u16::from(inp.u8() % 3));
            }
            6 => {
                let _ = drv.write_config(inp.bytes(8));
            }
            7 => match inp.below(3) {
                0 => dev.connect(session()),
                1 => dev.disconnect(),
                _ => {
                    let _ = dev.stats();
                }
            },
            _ => {
                let seq = drv.req_seq().wrapping_add(1);
                drv.set_req_seq(seq);
                let out = dev.handle_request();
                assert_eq!(
                    drv.ack_seq(),
                    seq,
                    "request {seq} not acknowledged ({out:?})"
                );
                if let RequestOutcome::Activated(_) = out {
                    assert!(*live.lock().expect("probe lock"));
                }
                if dev.is_live() {
                    assert_eq!(
                        drv.status() & milk_ivshmem::regs::status::DEVICE_NEEDS_RESET,
                        0,
                        "live device needs reset"
                    );
                }
            }
        }
        assert_eq!(dev.info(), &info, "device info changed");
        assert_eq!(
            dev.is_live(),
            *live.lock().expect("probe lock"),
            "live state disagrees"
        );
    }
}
