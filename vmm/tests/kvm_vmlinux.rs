//! The real MiLK kernel under milk-vmm's KVM engine.
//!
//! Kernel and initramfs come from `milk_guest_kernel::ensure_built()` and
//! `milk_images::ensure_initramfs()` (cached builds), or from the paths in
//! `MILK_VMLINUX`, `MILK_BZIMAGE` and `MILK_INITRAMFS` when set.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use milk_vmm::{detect_kvm, ExitReason, KvmSupport, Vm, VmConfig};

const BIN: &str = env!("CARGO_BIN_EXE_milk-vmm");

fn kernels() -> (PathBuf, PathBuf) {
    if let (Ok(v), Ok(b)) = (std::env::var("MILK_VMLINUX"), std::env::var("MILK_BZIMAGE")) {
        return (v.into(), b.into());
    }
    if let Ok(v) = std::env::var("MILK_VMLINUX") {
        return (v.clone().into(), v.into());
    }
    let k = milk_guest_kernel::ensure_built().expect("guest kernel builds");
    (k.vmlinux, k.bzimage)
}

fn initramfs() -> PathBuf {
    match std::env::var("MILK_INITRAMFS") {
        Ok(p) => p.into(),
        Err(_) => milk_images::ensure_initramfs().expect("initramfs builds"),
    }
}

/// The tests in this file run one at a time: a standard kernel emulated by
/// kvm_pvm keeps a host CPU busy in the kernel for seconds, and a QEMU TCG
/// guest booting next to it on a 2-core host was seen to stall in early boot.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serialize() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints past the test harness's output capture, so CI logs show it.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

#[test]
fn vmlinux_pvh_boot_shows_banner_e820_cpus_and_cmdline() {
    boot_vmlinux_to_first_exception(&[], "Pvh entry");
}

#[test]
fn vmlinux_64bit_boot_protocol_shows_banner_e820_cpus_and_cmdline() {
    // The same kernel through the zero page instead of the PVH start info.
    boot_vmlinux_to_first_exception(&["--linux64"], "Linux64 entry");
}

fn boot_vmlinux_to_first_exception(extra: &[&str], entry: &str) {
    let _one = serialize();
    assert!(common::kvm_usable(), "/dev/kvm is needed for this test");
    let (vmlinux, _) = kernels();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let out = Command::new(BIN)
        .args(["--kernel", vmlinux.to_str().unwrap(), "--engine", "kvm"])
        .args([
            "--cpus",
            "2",
            "--memory",
            "256",
            "--quiet",
            "--timeout",
            "240",
        ])
        .args(["--cmdline", "milk.vmmtest=42"])
        .args(["--serial-log", log.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    let ctx = format!(
        "exit {:?}\nstderr:\n{stderr}\nserial:\n{serial}",
        out.status.code()
    );
    assert!(!stderr.contains("panicked"), "{ctx}");

    assert!(
        stderr.contains(entry),
        "vmlinux is entered with {entry}: {ctx}"
    );
    assert!(
        serial.contains("Linux version 6.12"),
        "kernel banner: {ctx}"
    );
    let cmdline = format!("{} milk.vmmtest=42", milk_harness::BASE_CMDLINE);
    assert!(
        serial.contains(&format!("Command line: {cmdline}")),
        "the command line milk-vmm passed: {ctx}"
    );
    for e820 in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
    ] {
        assert!(serial.contains(e820), "e820 map line {e820:?}: {ctx}");
    }
    // The MP table (no ACPI) announces both vCPUs and the IOAPIC.
    for line in [
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]",
        "MPTABLE: OEM ID: MILK",
        "Processor #1",
        "IOAPIC[0]: apic_id 2",
        "Processors: 2",
        "nr_cpu_ids:2",
    ] {
        assert!(
            serial.contains(line),
            "CPU count / MP table line {line:?}: {ctx}"
        );
    }

    match detect_kvm() {
        KvmSupport::Pvm => {
            // kvm_pvm emulates a standard kernel's ring-0 code and gives up at
            // its first exception: a guest fault, reported cleanly.
            assert_eq!(out.status.code(), Some(71), "{ctx}");
            assert!(stderr.contains("KVM internal error"), "{ctx}");
            say("note: kvm_pvm: the kernel stopped at its first exception, as expected here");
        }
        _ => {
            // No initramfs: the kernel panics, panic=-1 reboots, reboot=t
            // triple-faults: a clean end without a result line.
            assert_eq!(out.status.code(), Some(80), "{ctx}");
        }
    }
}

#[test]
fn kvm_standard_guest_boots_to_result_line_with_two_vcpus() {
    let _one = serialize();
    let reason = match detect_kvm() {
        KvmSupport::Standard => None,
        KvmSupport::Pvm => Some(
            "/dev/kvm is kvm_pvm, which cannot run a standard kernel (needs KVM with VMX/SVM)"
                .to_string(),
        ),
        KvmSupport::Missing(why) => Some(format!("no usable KVM: {why}")),
    };
    if let Some(r) = reason {
        say(&format!(
            "skipped: kvm_standard_guest_boots_to_result_line_with_two_vcpus: {r}"
        ));
        return;
    }
    let (vmlinux, bzimage) = kernels();
    let initrd = initramfs();
    for kernel in [vmlinux, bzimage] {
        let mut cfg = VmConfig::new(&kernel);
        cfg.initrd = Some(initrd.clone());
        cfg.cpus = 2;
        cfg.memory_mib = 512;
        cfg.echo_console = false;
        cfg.timeout = Some(Duration::from_secs(300));
        cfg.cmdline = "milk.run=\"exit 7\"".into();
        let out = Vm::new(cfg).run().expect("VM runs");
        let console = out.console.join("\n");
        assert_eq!(out.result, Some(7), "{}: {console}", kernel.display());
        assert_eq!(
            out.exit,
            ExitReason::Shutdown,
            "reboot=t ends in a triple fault"
        );
        assert!(
            console.contains("MILK-BOOT") && console.contains("cpus=2"),
            "{console}"
        );
    }
}

#[test]
fn same_command_runs_the_real_guest_to_its_result_line() {
    let _one = serialize();
    // `auto` picks KVM where it can run a standard guest and QEMU TCG
    // elsewhere (this machine): either way the same command ends with the
    // guest's status. (`--engine qemu` itself is covered with the test guest
    // in tests/cli.rs.)
    let (vmlinux, _) = kernels();
    let initrd = initramfs();
    {
        let engine = "auto";
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let out = Command::new(BIN)
            .args(["--kernel", vmlinux.to_str().unwrap()])
            .args(["--initrd", initrd.to_str().unwrap()])
            .args(["--engine", engine, "--cpus", "2", "--memory", "256"])
            .args([
                "--cmdline",
                "milk.run=\"exit 3\"",
                "--timeout",
                "300",
                "--quiet",
            ])
            .args(["--serial-log", log.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let serial = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(
            out.status.code(),
            Some(3),
            "{engine}: stderr:\n{stderr}\nserial:\n{serial}"
        );
        assert!(
            serial.contains("MILK-BOOT") && serial.contains("cpus=2"),
            "{serial}"
        );
        assert!(serial.contains("MILK-RESULT status=3"), "{serial}");
        if detect_kvm() == KvmSupport::Pvm {
            assert_eq!(
                stderr.lines().filter(|l| l.contains("engine:")).count(),
                1,
                "one line says why QEMU runs the guest: {stderr}"
            );
        }
    }
}
