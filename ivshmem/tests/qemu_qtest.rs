//! The transport against real QEMU, driven through QEMU's qtest protocol
//! (`-qtest stdio`): no guest code runs; the test plays firmware and guest
//! driver with port I/O and physical memory accesses, so it checks exactly
//! what QEMU does with our server, shared memory, eventfds and RAM file:
//!
//! - QEMU accepts the handshake and exposes the shared memory as BAR2 (magic);
//! - guest RAM written by QEMU appears in our mapping at GPA == file offset,
//!   and the other way round;
//! - doorbell writes on BAR0 reach the right host eventfd (register requests on
//!   vector 0, queue kicks on vector 1 + n);
//! - the host writing the guest's eventfd for vector v makes QEMU send MSI-X
//!   message v (aimed at RAM here, so the test can see it);
//! - QEMU exiting resets the backend.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use milk_ivshmem::regs::{off, qoff, status as st, MAGIC};
use milk_ivshmem::{
    DeviceInfo, EchoBackend, EchoEvent, IvshmemTransport, QueueConfig, TransportConfig,
};
use vm_memory::{Bytes, GuestAddress};

const QEMU: &str = "qemu-system-x86_64";
const BAR0: u64 = 0xe000_0000;
const BAR1: u64 = 0xe000_1000;
const BAR2: u64 = 0xe001_0000;
const DOORBELL: u64 = BAR0 + 12;
const MSI_ADDR: u64 = 0x20_0000;
const VERSION_1: u64 = 1 << 32;

struct Qtest {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Drop for Qtest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qtest {
    fn start(args: &[String]) -> Qtest {
        let mut child = Command::new(QEMU)
            .args(args)
            // -S: no guest code runs (this QEMU build has no qtest
            // accelerator, so the CPUs would otherwise run the firmware,
            // which reprograms the BARs this test places).
            .args([
                "-S",
                "-qtest",
                "stdio",
                "-qtest-log",
                "/dev/null",
                "-display",
                "none",
                "-nodefaults",
                "-no-user-config",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Qtest {
            child,
            stdin,
            lines,
        }
    }

    fn cmd(&mut self, c: &str) -> u64 {
        writeln!(self.stdin, "{c}").expect("qtest write");
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no qtest answer to {c:?}"));
            if l.starts_with("IRQ") {
                continue;
            }
            let rest = l
                .strip_prefix("OK")
                .unwrap_or_else(|| panic!("qtest {c:?}: {l}"));
            let v = rest.trim();
            return if v.is_empty() {
                0
            } else {
                u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
            };
        }
    }

    fn readl(&mut self, a: u64) -> u32 {
        self.cmd(&format!("readl {a:#x}")) as u32
    }
    fn writel(&mut self, a: u64, v: u32) {
        self.cmd(&format!("writel {a:#x} {v:#x}"));
    }
    fn writew(&mut self, a: u64, v: u16) {
        self.cmd(&format!("writew {a:#x} {v:#x}"));
    }
    fn writeq(&mut self, a: u64, v: u64) {
        self.cmd(&format!("writeq {a:#x} {v:#x}"));
    }
    fn readq(&mut self, a: u64) -> u64 {
        self.cmd(&format!("readq {a:#x}"))
    }

    fn cfg_addr(dev: u32, reg: u32) -> u32 {
        0x8000_0000 | (dev << 11) | (reg & 0xfc)
    }
    fn cfg_readl(&mut self, dev: u32, reg: u32) -> u32 {
        self.cmd(&format!("outl 0xcf8 {:#x}", Self::cfg_addr(dev, reg)));
        self.cmd("inl 0xcfc") as u32
    }
    fn cfg_writel(&mut self, dev: u32, reg: u32, v: u32) {
        self.cmd(&format!("outl 0xcf8 {:#x}", Self::cfg_addr(dev, reg)));
        self.cmd(&format!("outl 0xcfc {v:#x}"));
    }
    fn cfg_writew(&mut self, dev: u32, reg: u32, v: u16) {
        self.cmd(&format!("outl 0xcf8 {:#x}", Self::cfg_addr(dev, reg)));
        self.cmd(&format!("outw {:#x} {v:#x}", 0xcfc + (reg & 2)));
    }

    /// Plays the firmware: finds the ivshmem device on bus 0, places its BARs,
    /// enables memory decoding and bus mastering, and points MSI-X vectors
    /// 0 and 1 at RAM (`MSI_ADDR` + 16 * v, data `0x600d_0000 | v`).
    fn setup_ivshmem(&mut self) -> u32 {
        let dev = (0..32)
            .find(|&d| self.cfg_readl(d, 0) == 0x1110_1af4)
            .expect("ivshmem-doorbell (1af4:1110) on bus 0");
        assert_eq!(self.cfg_readl(dev, 8) & 0xff, 1, "revision 1 (doorbell)");
        self.cfg_writel(dev, 0x10, BAR0 as u32);
        self.cfg_writel(dev, 0x14, BAR1 as u32);
        self.cfg_writel(dev, 0x18, BAR2 as u32);
        self.cfg_writel(dev, 0x1c, 0);
        self.cfg_writew(dev, 0x04, 0x6); // memory space + bus master
                                         // MSI-X capability (ID 0x11).
        let mut cap = self.cfg_readl(dev, 0x34) & 0xfc;
        while cap != 0 && self.cfg_readl(dev, cap) & 0xff != 0x11 {
            cap = (self.cfg_readl(dev, cap) >> 8) & 0xfc;
        }
        assert_ne!(cap, 0, "no MSI-X capability");
        let table = self.cfg_readl(dev, cap + 4);
        assert_eq!(table & 7, 1, "MSI-X table in BAR1");
        let table = BAR1 + u64::from(table & !7);
        for v in 0..2u64 {
            let e = table + 16 * v;
            self.writel(e, (MSI_ADDR + 16 * v) as u32);
            self.writel(e + 4, 0);
            self.writel(e + 8, 0x600d_0000 | v as u32);
            self.writel(e + 12, 0); // unmasked
        }
        // Message control (upper half of the capability's first dword): enable.
        let ctl = (self.cfg_readl(dev, cap) >> 16) as u16;
        self.cfg_writew(dev, cap + 2, ctl | 0x8000);
        dev
    }

    /// One driver request through the real doorbell.
    fn request(&mut self, host_peer: u32) {
        let seq = self.readl(BAR2 + off::REQ_SEQ as u64).wrapping_add(1);
        self.writel(BAR2 + off::REQ_SEQ as u64, seq);
        self.writel(DOORBELL, host_peer << 16);
        let t0 = Instant::now();
        while self.readl(BAR2 + off::ACK_SEQ as u64) != seq {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "request {seq} not acked"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn set_status(&mut self, host_peer: u32, s: u32) -> u32 {
        self.writel(BAR2 + off::STATUS as u64, s);
        self.request(host_peer);
        self.readl(BAR2 + off::STATUS as u64)
    }
}

fn qemu_available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn qemu_ivshmem_doorbell_reaches_the_transport_and_msix_comes_back() {
    let _ = env_logger::builder().is_test(true).try_init();
    assert!(
        qemu_available(),
        "{QEMU} missing: apt-get install -y qemu-system-x86"
    );
    let dir = tempfile::tempdir().unwrap();
    let info = DeviceInfo {
        device_id: 0xfffe,
        vendor_id: 0x1af4,
        features: VERSION_1,
        config: vec![0xab; 8],
        num_queues: 2,
        queue_max: 64,
    };
    let cfg = TransportConfig::in_dir(dir.path(), 64, info);
    let (backend, log) = EchoBackend::new();
    let t = IvshmemTransport::new(cfg, backend).unwrap();
    let args = t.qemu_args().to_vec();
    let ram = t.guest_ram().clone();
    let regs = t.regs().clone();
    // For diagnostics only: reading it would steal kicks from the backend.
    let kick1 = t.server().host_eventfd(1).unwrap().try_clone().unwrap();
    let handle = t.spawn().unwrap();

    let t0 = Instant::now();
    let mut q = Qtest::start(&args);
    q.setup_ivshmem();
    println!("qemu up and device programmed in {:?}", t0.elapsed());

    // BAR2 is our shared memory.
    assert_eq!(q.readl(BAR2), MAGIC);
    assert_eq!(q.readl(BAR2 + off::DEVICE_ID as u64), 0xfffe);
    let host_peer = q.readl(BAR2 + off::HOST_PEER as u64);
    assert_eq!(host_peer, regs.host_peer());
    // IVPosition (BAR0 + 8) is the client ID our server gave QEMU.
    let ivpos = q.readl(BAR0 + 8);
    assert_ne!(ivpos, host_peer);

    // Guest RAM: GPA == file offset, both ways.
    q.writeq(0x12_3458, 0x1122_3344_5566_7788);
    assert_eq!(
        ram.memory()
            .read_obj::<u64>(GuestAddress(0x12_3458))
            .unwrap(),
        0x1122_3344_5566_7788
    );
    ram.memory()
        .write_obj(0xfeed_f00d_u64, GuestAddress(0x3ff_fff8))
        .unwrap();
    assert_eq!(q.readq(0x3ff_fff8), 0xfeed_f00d);

    // Driver bring-up through real doorbells.
    let s = q.set_status(host_peer, st::ACKNOWLEDGE | st::DRIVER);
    assert_eq!(s, 3);
    q.writel(BAR2 + off::DRIVER_FEATURES as u64 + 4, 1 << 1); // bit 33: not offered
    assert_eq!(q.set_status(host_peer, 3 | st::FEATURES_OK), 3, "refused");
    q.writel(BAR2 + off::DRIVER_FEATURES as u64 + 4, 1); // VERSION_1 only
    assert_eq!(
        q.set_status(host_peer, 3 | st::FEATURES_OK),
        3 | st::FEATURES_OK
    );
    let q0 = BAR2 + off::QUEUES as u64;
    q.writew(q0 + qoff::NUM as u64, 64);
    q.writeq(q0 + qoff::DESC as u64, 0x10_0000);
    q.writeq(q0 + qoff::DRIVER as u64, 0x10_0400);
    q.writeq(q0 + qoff::DEVICE as u64, 0x10_0800);
    q.writew(q0 + qoff::READY as u64, 1);
    let ok = 3 | st::FEATURES_OK | st::DRIVER_OK;
    assert_eq!(q.set_status(host_peer, ok), ok);
    let act = log
        .wait_for(Duration::from_secs(5), |e| {
            matches!(e, EchoEvent::Activated { .. })
        })
        .expect("activated");
    assert_eq!(
        act,
        EchoEvent::Activated {
            features: VERSION_1,
            queues: vec![(
                0,
                QueueConfig {
                    size: 64,
                    desc: 0x10_0000,
                    driver: 0x10_0400,
                    device: 0x10_0800
                }
            )]
        }
    );

    // Kick queue 0: doorbell vector 1 -> host eventfd 1 -> echo -> guest
    // eventfd 1 -> MSI-X vector 1 -> a write of 0x600d0001 at MSI_ADDR + 16.
    let t_kick = Instant::now();
    q.writel(DOORBELL, (host_peer << 16) | 1);
    assert!(log
        .wait_for(Duration::from_secs(5), |e| *e == EchoEvent::Kick(0))
        .is_some());
    let mut msi = 0u32;
    while t_kick.elapsed() < Duration::from_secs(5) {
        msi = ram
            .memory()
            .read_obj::<u32>(GuestAddress(MSI_ADDR + 16))
            .unwrap();
        if msi != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!(
        "doorbell -> kick -> MSI-X round trip: {:?}",
        t_kick.elapsed()
    );
    assert_eq!(msi, 0x600d_0001, "MSI-X vector 1 message");
    assert_eq!(
        ram.memory()
            .read_obj::<u32>(GuestAddress(MSI_ADDR))
            .unwrap(),
        0,
        "vector 0 must not fire for a queue interrupt"
    );

    // Round trips doorbell -> QEMU -> host kick eventfd -> echo backend ->
    // guest eventfd -> QEMU -> MSI-X write, timed from the qtest command
    // (which includes one qtest exchange). Reported, not asserted.
    // Every doorbell is one kick: none lost, none merged (each waits for the last).
    let kicks = || {
        log.events()
            .iter()
            .filter(|e| **e == EchoEvent::Kick(0))
            .count()
    };
    for i in 0..300 {
        let before = kicks();
        q.writel(DOORBELL, (host_peer << 16) | 1);
        let t = Instant::now();
        while kicks() == before {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "kick {i} lost (kick eventfd: {:?})",
                kick1.read()
            );
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    let mut lat = Vec::new();
    for _ in 0..100 {
        ram.memory()
            .write_obj(0u32, GuestAddress(MSI_ADDR + 16))
            .unwrap();
        let t = Instant::now();
        q.writel(DOORBELL, (host_peer << 16) | 1);
        while ram
            .memory()
            .read_obj::<u32>(GuestAddress(MSI_ADDR + 16))
            .unwrap()
            == 0
        {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "MSI-X lost after {} round trips",
                lat.len()
            );
            std::hint::spin_loop();
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "qtest doorbell -> echo -> MSI-X round trip over 100: p50 {:?} p90 {:?} max {:?}",
        lat[50], lat[90], lat[99]
    );

    // An invalid request (queue 1 of size 3) sets DEVICE_NEEDS_RESET and
    // raises the config vector 0.
    let q1 = q0 + 32;
    q.writew(q1 + qoff::NUM as u64, 3);
    q.writew(q1 + qoff::READY as u64, 1);
    q.request(host_peer);
    assert_eq!(
        q.readl(BAR2 + off::STATUS as u64),
        ok | st::DEVICE_NEEDS_RESET
    );
    let t_cfg = Instant::now();
    while ram
        .memory()
        .read_obj::<u32>(GuestAddress(MSI_ADDR))
        .unwrap()
        == 0
    {
        assert!(
            t_cfg.elapsed() < Duration::from_secs(5),
            "no config interrupt"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        ram.memory()
            .read_obj::<u32>(GuestAddress(MSI_ADDR))
            .unwrap(),
        0x600d_0000
    );
    assert!(log
        .wait_for(Duration::from_secs(5), |e| *e == EchoEvent::Reset)
        .is_some());

    // QEMU going away is a disconnect: the register file is republished.
    q.set_status(host_peer, 0);
    assert_eq!(q.set_status(host_peer, st::ACKNOWLEDGE), st::ACKNOWLEDGE);
    drop(q);
    let t_gone = Instant::now();
    while regs.status() != 0 {
        assert!(
            t_gone.elapsed() < Duration::from_secs(5),
            "disconnect not seen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = handle.stop().unwrap();
    let s = t.device().stats();
    assert_eq!(
        (s.activations, s.features_refused, s.needs_reset, s.resets),
        (1, 1, 1, 1)
    );
}
