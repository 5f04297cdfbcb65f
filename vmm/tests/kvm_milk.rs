//! KVM, here: virtio-milk on milk-vmm's virtio-mmio bus, driven by the
//! freestanding test guest (`vmm/test-guest/`, which picks its milk test when
//! the announced device is virtio-milk): feature negotiation with
//! VERSION_1, config read, one CPU's event and decision queues, the host's
//! HELLO, the guest's HELLO, TASK_NEW + TASK_WAKEUP of a fake task, the host
//! policy's RUN for it with the task's seq, an OK ACK, InterruptStatus set and
//! acknowledged, device reset.
//!
//! - `cli_kvm_policy_fifo_round_trip`: `milk-vmm --engine kvm --policy fifo`,
//!   the summary printed at exit;
//! - `cli_policy_device_unused_by_the_guest_says_so`: a device the guest never
//!   starts is reported as such at exit;
//! - `vm_with_milk_device_round_trip_64bit_entry`: the same through the
//!   library (64-bit entry), with transport and device counters.

mod common;

use common::{number_after, BIN};

use std::process::Command;
use std::time::Duration;

use milk_vmm::devices::virtio::milk::MilkMmioDevice;
use milk_vmm::{ExitReason, Vm, VmConfig};
use virtio_milk::protocol::AckStatus;
use virtio_milk::runtime::RuntimeConfig;

#[test]
fn cli_kvm_policy_fifo_round_trip() {
    assert!(common::kvm_usable(), "/dev/kvm is needed for this test");
    let k = common::test_guest("pvh");
    let out = Command::new(BIN)
        .args(["--kernel", k.to_str().unwrap()])
        .args(["--engine", "kvm", "--policy", "fifo", "--timeout", "120"])
        .env("RUST_LOG", "info")
        .output()
        .expect("run milk-vmm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    // The device is announced like any virtio-mmio device.
    assert!(
        stdout.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{stdout}"
    );
    // Guest side.
    assert!(stdout.contains("virtio-milk device"), "{stdout}");
    assert!(
        stdout.contains("milk: config num_cpus=1 version=2 record_size=64"),
        "{stdout}"
    );
    assert!(stdout.contains("milk: host HELLO, policy fifo"), "{stdout}");
    assert!(
        stdout.contains("milk: RUN pid=4242 gen=1 cpu=0 seq=2 "),
        "the guest saw the RUN with the task's seq:\n{stdout}"
    );
    assert!(stdout.contains("milk: round trip ok"), "{stdout}");
    // Host side: the summary printed at exit.
    let summary = &stdout[stdout
        .find("virtio-milk summary: policy fifo")
        .unwrap_or_else(|| panic!("no summary at exit:\n{stdout}"))..];
    for (key, want) in [
        ("messages: ", 4),
        ("(HELLO ", 1),
        ("TASK_NEW ", 1),
        ("TASK_WAKEUP ", 1),
        ("ACK ", 1),
        ("decisions: ", 1),
        ("(RUN ", 1),
        ("acks: OK ", 1),
        ("STALE ", 0),
        ("NO_TASK ", 0),
        ("rejections: ", 0),
        ("protocol errors: ", 0),
    ] {
        assert_eq!(
            number_after(summary, key),
            Some(want),
            "{key}in the summary:\n{summary}"
        );
    }
}

#[test]
fn vm_with_milk_device_round_trip_64bit_entry() {
    assert!(common::kvm_usable(), "/dev/kvm is needed for this test");
    let mut cfg = VmConfig::new(common::test_guest("64"));
    cfg.memory_mib = 64;
    cfg.echo_console = false;
    cfg.timeout = Some(Duration::from_secs(120));
    let mut vm = Vm::new(cfg);
    let (dev, summaries) = MilkMmioDevice::new(
        1,
        "fifo",
        milk_policies::resolve("fifo").unwrap().factory,
        RuntimeConfig::default(),
    )
    .unwrap();
    assert_eq!(vm.add_virtio_device(Box::new(dev)).unwrap(), 0);
    let mut transports = Vec::new();
    let out = vm.run_with_transports(&mut transports).expect("VM runs");
    let console = out.console.join("\n");
    assert_eq!(out.exit, ExitReason::Reset, "{console}");
    assert_eq!(out.result, Some(0), "guest checks failed:\n{console}");
    {
        let t = transports[0].lock().unwrap();
        assert_eq!(t.bad_accesses(), 0, "the guest followed the init order");
        assert_eq!(t.status(), 0, "the guest reset the device");
        assert!(!t.is_activated());
    }
    // The guest's reset stopped the runtime: exactly one summary.
    let s = summaries.summaries();
    assert_eq!(s.len(), 1, "one runtime run");
    let m = &s[0].metrics;
    assert_eq!(m.decisions_run, 1);
    assert_eq!(m.acks[AckStatus::Ok as usize], 1);
    assert_eq!(m.acks_total(), 1);
    assert_eq!(m.messages(), 4, "{}", s[0]);
    assert_eq!(s[0].engine.malformed_total(), 0);
    assert_eq!(m.latency.count(), 1, "one event -> decision sample");
}

#[test]
fn cli_policy_device_unused_by_the_guest_says_so() {
    assert!(common::kvm_usable(), "/dev/kvm is needed for this test");
    // Echo in slot 0, virtio-milk in slot 1: the test guest drives only the
    // first device, so no runtime ever runs.
    let k = common::test_guest("pvh");
    let out = Command::new(BIN)
        .args(["--kernel", k.to_str().unwrap(), "--echo-device"])
        .args(["--engine", "kvm", "--policy", "fifo", "--timeout", "120"])
        .output()
        .expect("run milk-vmm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("virtio_mmio.device=4K@0xd0001000:6"),
        "second slot announced: {stdout}"
    );
    assert!(stdout.contains("echo: HELLO FROM THE MILK TEST GUEST"));
    assert!(
        stdout.contains("virtio-milk summary: the guest driver never started the device"),
        "{stdout}"
    );
}
