//! The project's real guest (Linux under QEMU TCG on `pc`) with the transport:
//! the guest finds the ivshmem-doorbell device, our server served QEMU, and
//! guest RAM as we map it holds the kernel where the kernel says it is.
//!
//! What else is checked depends on the guest kernel's configuration (read from
//! the built kernel's `.config`):
//!
//! - `CONFIG_VIRTIO_IVSHMEM=y`: the guest transport driver binds, registers a
//!   virtio device with our device ID, and its requests (reset, ACKNOWLEDGE)
//!   are served;
//! - `CONFIG_DEVMEM=y`: guest user space plays the driver with busybox
//!   `devmem` on the BARs: reads the magic from BAR2, negotiates, sets up a
//!   queue, sets DRIVER_OK and rings the queue's doorbell; the host sees the
//!   activation and the kick on the right eventfd.

use std::path::Path;
use std::time::Duration;

use milk_harness::GuestSpec;
use milk_ivshmem::{
    DeviceInfo, EchoBackend, EchoEvent, IvshmemTransport, QueueConfig, TransportConfig,
};
use vm_memory::{Bytes, GuestAddress};

/// A device ID no guest driver claims, so only the transport talks to it.
const TEST_DEVICE_ID: u32 = 0xfffe;
const VERSION_1: u64 = 1 << 32;

/// Finds the PCI device, prints what the guest sees, and prints the virtio
/// devices. No double quotes: /init takes milk.run="..." up to the next one.
const PROBE: &str = "for d in /sys/bus/pci/devices/*;do \
[ $(cat $d/vendor)$(cat $d/device) = 0x1af40x1110 ]&&D=$d;done;\
[ ${#D} -gt 0 ]||exit 3;\
set -- $(sed -n 1p $D/resource);B0=$1;\
set -- $(sed -n 3p $D/resource);B2=$1;E2=$2;\
echo IVS-PCI rev=$(cat $D/revision) bar2=$((E2-B2+1)) msix=$(ls $D/msi_irqs 2>/dev/null|wc -l) \
cmd=$(dd if=$D/config bs=1 skip=4 count=1 2>/dev/null|od -An -tx1|tr -d ' ');\
for v in /sys/bus/virtio/devices/*;do [ -e $v/device ]&&\
echo IVS-VIRTIO dev=$(cat $v/device) vendor=$(cat $v/vendor) status=$(cat $v/status);done;";

/// Plays the driver with devmem (needs /dev/mem): reset, ACK|DRIVER,
/// VERSION_1 + FEATURES_OK, queue 0 (8 entries at 2 MiB), DRIVER_OK, kick.
const DEVMEM_DRIVER: &str = "[ -e /dev/mem ]||{ echo IVS-DEVMEM absent;exit 0; };\
m(){ devmem $((B2+$1)) 32 $2; };h(){ devmem $((B2+$1)) 16 $2; };\
P=$(($(m 0x2c)));\
rq(){ S=$(($(m 0x30)+1));m 0x30 $S;devmem $((B0+12)) 32 $((P<<16));i=0;\
while [ $(($(m 0x34))) != $S ]&&[ $i -lt 2000 ];do i=$((i+1));done; };\
echo IVS-MAGIC $(m 0);\
m 0x20 0;rq;m 0x20 3;rq;m 0x18 0;m 0x1c 1;m 0x20 11;rq;echo IVS-FEATURES-OK $(m 0x20);\
h 0x102 8;m 0x108 0x200000;m 0x10c 0;m 0x110 0x201000;m 0x114 0;m 0x118 0x202000;m 0x11c 0;h 0x104 1;rq;\
m 0x20 15;rq;echo IVS-DRIVER-OK $(m 0x20);\
devmem $((B0+12)) 32 $(((P<<16)|1));sleep 1;echo IVS-DONE;";

fn kconfig_has(config: &Path, opt: &str) -> bool {
    std::fs::read_to_string(config)
        .map(|t| t.lines().any(|l| l == format!("{opt}=y")))
        .unwrap_or(false)
}

/// Guest physical address and bytes of the kernel's `Linux version` banner,
/// from the vmlinux program headers (QEMU's PVH loader places each PT_LOAD
/// segment at its physical address).
fn banner_in_vmlinux(vmlinux: &Path) -> (u64, Vec<u8>) {
    let elf = std::fs::read(vmlinux).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let needle = b"Linux version 6.";
    let at = elf
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("banner in vmlinux");
    let end = at + elf[at..].iter().position(|&b| b == 0).unwrap();
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    for i in 0..usize::from(phnum) {
        let ph = phoff + i * usize::from(phentsize);
        let p_type = u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap());
        let (p_offset, p_paddr, p_filesz) = (u64_at(ph + 8), u64_at(ph + 24), u64_at(ph + 32));
        if p_type == 1 && (p_offset..p_offset + p_filesz).contains(&(at as u64)) {
            return (p_paddr + (at as u64 - p_offset), elf[at..end].to_vec());
        }
    }
    panic!("banner not in a PT_LOAD segment");
}

#[test]
fn real_guest_finds_the_device_and_reaches_the_host() {
    let _ = env_logger::builder().is_test(true).try_init();
    let kernel = milk_guest_kernel::ensure_built().expect("guest kernel builds");
    let initrd = milk_images::ensure_initramfs().expect("initramfs builds");
    // The project's guest kernel has all of these (guest-kernel/config/milk.config).
    for opt in ["CONFIG_VIRTIO_IVSHMEM", "CONFIG_DEVMEM", "CONFIG_ACPI"] {
        assert!(
            kconfig_has(&kernel.config, opt),
            "the guest kernel lacks {opt}=y"
        );
    }

    let dir = tempfile::tempdir_in(milk_ivshmem::qemu_args::runtime_dir()).unwrap();
    let info = DeviceInfo {
        device_id: TEST_DEVICE_ID,
        vendor_id: 0x1af4,
        features: VERSION_1,
        config: vec![],
        num_queues: 2,
        queue_max: 256,
    };
    let (backend, log) = EchoBackend::new();
    let t = IvshmemTransport::new(TransportConfig::in_dir(dir.path(), 256, info), backend)
        .expect("transport");
    let ram = t.guest_ram().clone();

    let mut spec = GuestSpec::new(&kernel.vmlinux);
    spec.initrd = Some(initrd);
    spec.cpus = 2;
    spec.timeout = Duration::from_secs(180);
    spec.cmdline = format!("milk.run=\"{PROBE}{DEVMEM_DRIVER}\"");
    t.qemu_args().apply(&mut spec);
    // x86 COMMAND_LINE_SIZE: a longer script would be cut silently.
    assert!(spec.full_cmdline().len() < 2048, "guest script too long");
    let handle = t.spawn().expect("transport thread");

    let out = milk_harness::run_qemu(&spec, &mut |l| println!("guest| {l}")).expect("guest ran");
    let t = handle.stop().expect("transport stopped");
    let stats = t.device().stats();
    println!("device stats: {stats:?}; guest run {:?}", out.elapsed);
    // Lines the script printed (the kernel also echoes the command line).
    let line = |p: &str| -> String {
        out.console
            .iter()
            .find(|l| l.starts_with(p))
            .cloned()
            .unwrap_or_else(|| panic!("no line starting with {p:?}"))
    };

    // The PCI device, with our 64 KiB shared memory as BAR2.
    let pci = line("IVS-PCI ");
    assert!(pci.contains("rev=0x01"), "{pci}");
    assert!(pci.contains("bar2=65536"), "{pci}");
    assert_eq!(out.result.map(|r| r.status), Some(0));

    // Guest RAM as we map it: the kernel's banner is at its physical address.
    let (gpa, banner) = banner_in_vmlinux(&kernel.vmlinux);
    let mut seen = vec![0u8; banner.len()];
    ram.memory()
        .read_slice(&mut seen, GuestAddress(gpa))
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&seen),
        String::from_utf8_lossy(&banner),
        "guest RAM at {gpa:#x}"
    );

    // The guest driver bound, allocated 1 + 2 MSI-X vectors, registered
    // our device and acknowledged it (no virtio driver claims 0xfffe).
    assert!(pci.contains("msix=3"), "{pci}");
    let v = line("IVS-VIRTIO ");
    assert!(
        v.contains("dev=0xfffe vendor=0x1af4 status=0x00000001"),
        "{v}"
    );
    assert!(stats.resets >= 1 && stats.requests >= 2, "{stats:?}");
    // MSI-X needs bus mastering, which the driver turned on.
    let cmd = pci
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cmd="))
        .and_then(|v| u16::from_str_radix(v.trim_start_matches("0x"), 16).ok());
    assert!(
        cmd.is_some_and(|c| c & 0x4 != 0),
        "PCI bus mastering on: {pci}"
    );

    // The doorbell through /dev/mem, as a driver would ring it.
    assert_eq!(line("IVS-MAGIC ").trim(), "IVS-MAGIC 0x4B4C494D");
    assert_eq!(
        line("IVS-FEATURES-OK ").trim(),
        "IVS-FEATURES-OK 0x0000000B"
    );
    assert_eq!(line("IVS-DRIVER-OK ").trim(), "IVS-DRIVER-OK 0x0000000F");
    let ev = log.events();
    assert!(
        ev.contains(&EchoEvent::Activated {
            features: VERSION_1,
            queues: vec![(
                0,
                QueueConfig {
                    size: 8,
                    desc: 0x20_0000,
                    driver: 0x20_1000,
                    device: 0x20_2000
                }
            )]
        }),
        "{ev:?}"
    );
    assert!(ev.contains(&EchoEvent::Kick(0)), "{ev:?}");
    assert!(!ev.contains(&EchoEvent::Kick(1)), "{ev:?}");
    line("IVS-DONE");
}

/// The guest's own virtio_milk driver and sched_ext bridge, over the guest
/// transport driver, over this transport, to virtio-milk's runtime with a
/// minimal FIFO policy.
#[cfg(feature = "virtio-milk")]
mod virtio_milk_guest {
    use std::collections::VecDeque;
    use std::time::Duration;

    use milk_harness::GuestSpec;
    use milk_ivshmem::milk::MilkBackend;
    use milk_ivshmem::{IvshmemTransport, TransportConfig};
    use virtio_milk::device::MilkDevice;
    use virtio_milk::policy::{Dispatcher, Gtid, Policy, PolicyEvent, SchedView, TaskState};
    use virtio_milk::runtime::RuntimeConfig;

    use super::kconfig_has;

    /// Runs the oldest runnable task on each free CPU it may use.
    #[derive(Default)]
    struct TinyFifo {
        q: VecDeque<Gtid>,
    }

    impl Policy for TinyFifo {
        fn name(&self) -> &str {
            "tiny-fifo"
        }
        fn attach(&mut self, view: &SchedView) {
            self.q = view
                .tasks
                .values()
                .filter(|t| t.state == TaskState::Runnable)
                .map(|t| t.gtid)
                .collect();
        }
        fn on_event(&mut self, ev: &PolicyEvent, _: &SchedView) {
            match *ev {
                PolicyEvent::TaskRunnable { gtid, .. } if !self.q.contains(&gtid) => {
                    self.q.push_back(gtid)
                }
                PolicyEvent::TaskBlocked { gtid, .. } | PolicyEvent::TaskDead(gtid) => {
                    self.q.retain(|&p| p != gtid)
                }
                _ => {}
            }
        }
        fn schedule(&mut self, d: &mut Dispatcher<'_>) {
            let free: Vec<u16> = d.view().free_cpus().collect();
            for cpu in free {
                let view = d.view();
                let pick = self.q.iter().position(|&p| {
                    view.task(p)
                        .is_some_and(|t| t.state == TaskState::Runnable && t.allows(cpu))
                });
                if let Some(i) = pick {
                    if let Some(gtid) = self.q.remove(i) {
                        let _ = d.run(gtid, cpu, 0);
                    }
                }
            }
        }
    }

    #[test]
    fn real_guest_virtio_milk_runs_over_the_transport() {
        let _ = env_logger::builder().is_test(true).try_init();
        let kernel = milk_guest_kernel::ensure_built().expect("guest kernel builds");
        let initrd = milk_images::ensure_initramfs().expect("initramfs builds");
        for opt in [
            "CONFIG_VIRTIO_IVSHMEM",
            "CONFIG_VIRTIO_MILK",
            "CONFIG_SCHED_EXT_MILK",
            "CONFIG_ACPI",
        ] {
            assert!(
                kconfig_has(&kernel.config, opt),
                "the guest kernel lacks {opt}=y"
            );
        }
        let cpus = 2;
        let dev = MilkDevice::new(
            cpus,
            Box::new(|| Box::new(TinyFifo::default()) as Box<dyn Policy>),
            RuntimeConfig::default(),
        )
        .unwrap();
        let backend = MilkBackend::new(dev);
        let info = backend.device_info();
        let dir = tempfile::tempdir_in(milk_ivshmem::qemu_args::runtime_dir()).unwrap();
        let t = IvshmemTransport::new(TransportConfig::in_dir(dir.path(), 256, info), backend)
            .expect("transport");

        let mut spec = GuestSpec::new(&kernel.vmlinux);
        spec.initrd = Some(initrd);
        spec.cpus = cpus;
        spec.timeout = Duration::from_secs(240);
        // PCICMD of the ivshmem device (bus mastering is what lets its MSI-X
        // messages reach the CPUs), then sched_ext's state, a workload and the
        // bridge's counters.
        spec.cmdline = "milk.run=\"for d in /sys/bus/pci/devices/*;do \
                        [ $(cat $d/vendor)$(cat $d/device) = 0x1af40x1110 ]&&D=$d;done;\
                        echo PCICMD $(dd if=$D/config bs=1 skip=4 count=2 2>/dev/null|od -An -tx1);\
                        sleep 1;echo SCX $(cat /sys/kernel/sched_ext/state) \
                        $(cat /sys/kernel/sched_ext/root/ops);milk-work -t 8 -r 3 -w 2000 -s 500;\
                        grep -r . /sys/kernel/milk\""
            .into();
        t.qemu_args().apply(&mut spec);
        let handle = t.spawn().expect("transport thread");
        let out =
            milk_harness::run_qemu(&spec, &mut |l| println!("guest| {l}")).expect("guest ran");
        let mut t = handle.stop().expect("transport stopped");
        // QEMU is gone: the disconnect reset the device and ended the run.
        let stats = t.device().stats();
        println!("device stats: {stats:?}; guest run {:?}", out.elapsed);
        let summaries = t.device_mut().backend_mut().control().summaries();
        for s in &summaries {
            println!("{s}");
        }
        assert_eq!(out.result.map(|r| r.status), Some(0), "workload failed");
        let cmd = out
            .console
            .iter()
            .find_map(|l| l.strip_prefix("PCICMD "))
            .and_then(|v| u8::from_str_radix(v.split_whitespace().next()?, 16).ok())
            .expect("PCICMD line");
        assert!(
            cmd & 0x4 != 0,
            "the guest's virtio_ivshmem driver left bus mastering off (PCI command \
             {cmd:#04x}): QEMU drops the device's MSI-X writes, so no queue interrupt \
             reaches the guest; the driver must call pci_set_master()"
        );
        assert!(
            out.console
                .iter()
                .any(|l| l.starts_with("SCX enabled milk")),
            "sched_ext not enabled with ops milk"
        );
        assert!(out.console.iter().any(|l| l.contains("bad=0")));
        assert_eq!(stats.activations, 1, "{stats:?}");
        assert_eq!(stats.needs_reset, 0, "{stats:?}");
        let s = summaries.first().expect("a runtime run ended");
        assert!(s.engine.records_in > 0, "no guest messages");
        assert!(s.metrics.decisions_run > 0, "no RUN decisions");
        assert_eq!(s.engine.malformed_total(), 0);
        assert!(s.engine.interrupts > 0);
    }
}
