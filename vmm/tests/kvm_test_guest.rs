//! KVM, here: the freestanding test guest writes to the serial port and drives
//! the echo device through full virtio-mmio initialisation and one queue round
//! trip; the host checks what the device saw. Both entry paths are covered:
//! PVH (32-bit entry) and the 64-bit boot protocol.

mod common;

use std::time::Duration;

use milk_vmm::boot::EntryMode;
use milk_vmm::devices::virtio::echo::{EchoDevice, ECHO_F_UPPER};
use milk_vmm::devices::virtio::VIRTIO_F_VERSION_1;
use milk_vmm::{ExitReason, Vm, VmConfig};

fn run_test_guest(flavour: &str, cpus: u32) {
    assert!(common::kvm_usable(), "/dev/kvm is needed for this test");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut cfg = VmConfig::new(common::test_guest(flavour));
    cfg.cpus = cpus;
    cfg.memory_mib = 64;
    cfg.echo_console = false;
    cfg.serial_log = Some(log.clone());
    cfg.timeout = Some(Duration::from_secs(120));
    cfg.cmdline = "milk.test=1".into();
    let mut vm = Vm::new(cfg);
    let (dev, stats) = EchoDevice::new();
    assert_eq!(vm.add_virtio_device(Box::new(dev)).unwrap(), 0);
    let mut transports = Vec::new();
    let out = vm.run_with_transports(&mut transports).expect("VM runs");
    let console = out.console.join("\n");
    eprintln!("--- console ---\n{console}\n--- end ---");

    // The guest ran to its end and reset the machine through the i8042.
    assert_eq!(out.exit, ExitReason::Reset, "{console}");
    assert_eq!(out.result, Some(0), "guest checks failed:\n{console}");
    let expected_mode = if flavour == "pvh" {
        EntryMode::Pvh
    } else {
        EntryMode::Linux64
    };
    assert_eq!(out.entry_mode, expected_mode);

    // The guest saw the command line the VMM built, with the device on it.
    assert!(out.cmdline.contains("milk.test=1"));
    assert!(out.cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"));
    assert!(
        console.contains(&format!("cmdline: {}", out.cmdline)),
        "{console}"
    );
    assert!(console.contains("echo: HELLO FROM THE MILK TEST GUEST"));

    // Host side: what the device and the transport saw.
    let s = stats.lock().unwrap().clone();
    assert_eq!(s.activations, 1);
    assert_eq!(s.acked_features, VIRTIO_F_VERSION_1 | ECHO_F_UPPER);
    assert_eq!(s.requests, vec![b"hello from the milk test guest".to_vec()]);
    assert_eq!(s.bytes_out, 30);
    assert_eq!(s.interrupts, 1);
    assert_eq!(
        s.scratch, 0xc0ffee,
        "the guest's config-space write reached the device"
    );
    assert_eq!(s.resets, 1, "the guest reset the device at the end");
    let t = transports[0].lock().unwrap();
    assert_eq!(t.bad_accesses(), 0);
    assert_eq!(t.status(), 0);

    // The serial log holds the same output.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("MILK-RESULT status=0"));
    assert!(
        logged.starts_with('@'),
        "first guest instructions write '@'"
    );
    assert!(out.timings.to_first_entry.is_some());
    assert!(out.timings.to_first_io.unwrap() >= out.timings.to_first_entry.unwrap());
}

#[test]
fn test_guest_pvh_entry_virtio_round_trip() {
    run_test_guest("pvh", 1);
}

#[test]
fn test_guest_64bit_entry_virtio_round_trip() {
    run_test_guest("64", 1);
}

#[test]
fn test_guest_with_two_vcpus_shuts_down_all_threads() {
    // The second vCPU waits for a SIPI that never comes; the VM must still stop.
    run_test_guest("pvh", 2);
}
