//! `mmio`: milk-vmm's virtio-mmio transport in front of the real virtio-milk device
//! (`MilkMmioDevice`, the one `milk-vmm --policy` uses), driven by arbitrary register reads
//! and writes of any width, at any offset, in any order, with queue notifications between.
//!
//! Properties: no panic or hang; the identification registers never change; the device is
//! activated only through DRIVER_OK after FEATURES_OK, with VERSION_1 negotiated; the
//! bad-access counter never goes down; a reset (or the end of the input) stops the runtime
//! thread an activation started.

use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use milk_vmm::devices::virtio::milk::MilkMmioDevice;
use milk_vmm::devices::virtio::mmio::{reg, MmioTransport, MMIO_MAGIC, MMIO_VERSION};
use milk_vmm::devices::virtio::{status, VIRTIO_F_VERSION_1};
use milk_vmm::devices::BusDevice;
use milk_vmm::memory::{create_guest_memory, GuestMemory};
use virtio_milk::runtime::RuntimeConfig;

use crate::input::Input;

/// Operations per input.
const MAX_OPS: usize = 256;

thread_local! {
    static MEM: GuestMemory = create_guest_memory(1 << 20).expect("guest memory");
}

/// Register offsets a driver uses (the fuzzer also gets arbitrary ones).
const REGS: [u64; 27] = [
    reg::MAGIC_VALUE,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID,
    reg::DEVICE_FEATURES,
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_STATUS,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_DRIVER_LOW,
    reg::QUEUE_DRIVER_HIGH,
    reg::QUEUE_DEVICE_LOW,
    reg::QUEUE_DEVICE_HIGH,
    reg::SHM_SEL,
    reg::SHM_LEN_LOW,
    reg::SHM_BASE_HIGH,
    reg::CONFIG_GENERATION,
    reg::CONFIG,
];

fn offset(inp: &mut Input<'_>) -> u64 {
    match inp.below(8) {
        0 => u64::from(inp.u16()),
        1 => reg::CONFIG + u64::from(inp.u8() % 24),
        _ => REGS[inp.below(REGS.len() as u32) as usize],
    }
}

fn width(inp: &mut Input<'_>) -> usize {
    match inp.below(8) {
        0 => 1,
        1 => 2,
        2 => 8,
        _ => 4,
    }
}

fn read32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// One input: a CPU-count byte, then register accesses until the input is used up.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let cpus = 1 + u32::from(inp.u8() & 1);
    let rcfg = RuntimeConfig {
        heartbeat: None,
        spin_budget: Some(Duration::ZERO),
        ..Default::default()
    };
    let Ok((dev, _control)) = MilkMmioDevice::new(
        cpus,
        "fifo",
        Box::new(|| milk_policies::by_name("fifo").expect("built-in policy")),
        rcfg,
    ) else {
        panic!("virtio-milk device for {cpus} CPUs");
    };
    let mem = MEM.with(Clone::clone);
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut t = MmioTransport::new(Box::new(dev), mem, irq).expect("transport");
    let nq = 2 * cpus as usize;
    let mut bad = 0;
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        let was_active = t.is_activated();
        let old_status = t.status();
        match inp.below(8) {
            0..=2 => {
                let off = offset(&mut inp);
                let mut b = vec![0u8; width(&mut inp)];
                t.read(off, &mut b);
            }
            3..=6 => {
                let off = offset(&mut inp);
                let w = width(&mut inp);
                let v = match inp.below(4) {
                    // Status values a driver writes, in and out of order.
                    0 => u64::from(
                        [
                            status::ACKNOWLEDGE,
                            status::ACKNOWLEDGE | status::DRIVER,
                            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
                            status::ACKNOWLEDGE
                                | status::DRIVER
                                | status::FEATURES_OK
                                | status::DRIVER_OK,
                            0,
                        ][inp.below(5) as usize],
                    ),
                    // Small values: selectors, queue sizes, page-aligned addresses.
                    1 => u64::from(inp.u8()) << (4 * inp.below(4)),
                    _ => inp.u64(),
                };
                t.write(off, &v.to_le_bytes()[..w]);
            }
            _ => t.process_queue(inp.below(nq as u32 + 1) as usize),
        }
        assert_eq!(read32(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(read32(&mut t, reg::VERSION), MMIO_VERSION);
        assert_eq!(read32(&mut t, reg::DEVICE_ID), 58, "device id changed");
        if t.is_activated() && !was_active {
            assert_eq!(old_status & status::FEATURES_OK, status::FEATURES_OK);
            assert_ne!(
                t.status() & status::DRIVER_OK,
                0,
                "activated without DRIVER_OK"
            );
            assert_ne!(t.acked_features() & VIRTIO_F_VERSION_1, 0);
        }
        assert!(t.bad_accesses() >= bad, "bad-access counter went down");
        bad = t.bad_accesses();
    }
}
