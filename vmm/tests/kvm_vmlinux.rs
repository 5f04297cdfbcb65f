//! The real MiLK kernel under milk-vmm's KVM engine.
//!
//! Kernel and initramfs come from `milk_guest_kernel::ensure_built()` and
//! `milk_images::ensure_initramfs()` (cached builds), or from the paths in
//! `MILK_VMLINUX`, `MILK_BZIMAGE` and `MILK_INITRAMFS` when set.

mod common;
mod real_kvm;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use milk_launcher::{detect_kvm, KvmSupport};

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

/// The real guest on real KVM (nested here, see `real_kvm`): vmlinux (PVH)
/// and bzImage (64-bit boot protocol), 1 and 2 vCPUs, each to `/init` and
/// its result line; milk-vmm's exit status is the guest command's.
#[test]
fn real_kvm_boots_bzimage_and_vmlinux_with_1_and_2_vcpus_to_the_result_line() {
    let _one = serialize();
    let g = real_kvm::guest();
    let mut r = real_kvm::runner();
    let (vmlinux, bzimage, initrd) = (r.file(&g.vmlinux), r.file(&g.bzimage), r.file(&g.initrd));
    // (kernel, entry log line, vCPUs, guest exit status)
    let cases = [
        (&vmlinux, "Pvh entry", 1, 5),
        (&vmlinux, "Pvh entry", 2, 7),
        (&bzimage, "Linux64 entry", 1, 0),
        (&bzimage, "Linux64 entry", 2, 9),
    ];
    for (kernel, _, cpus, status) in &cases {
        r.vmm_step(&real_kvm::args(&[
            "--kernel",
            kernel,
            "--initrd",
            &initrd,
            "--engine",
            "kvm",
            "--cpus",
            &cpus.to_string(),
            "--timeout",
            "240",
            "--cmdline",
            &format!("milk.run=\"exit {status}\""),
        ]))
        .unwrap();
    }
    let out = real_kvm::run(&r, Duration::from_secs(900));
    for (s, (_, entry, cpus, status)) in out.steps.iter().zip(cases) {
        let c = real_kvm::ctx(s);
        assert_eq!(s.status, Some(status), "exit status is the guest's: {c}");
        let stdout = s.stdout_text();
        let stderr = s.stderr_text();
        assert!(stderr.contains(entry), "{entry}: {c}");
        assert!(!stderr.contains("kvm_pvm"), "real KVM, not kvm_pvm: {c}");
        assert!(stdout.contains("Linux version 6.12"), "banner: {c}");
        assert!(
            stdout.contains("MILK-BOOT kernel=") && stdout.contains(&format!(" cpus={cpus} ")),
            "/init reports {cpus} CPUs: {c}"
        );
        assert!(
            stdout.contains(&format!("MILK-RESULT status={status}")),
            "{c}"
        );
        say(&format!(
            "real KVM {:?}: {} {cpus} vCPU(s): /init {:.2} s after milk-vmm started, exit {status} after {:.2} s",
            r.mode,
            entry,
            s.to_guest_init.unwrap_or_default().as_secs_f64(),
            s.elapsed.as_secs_f64()
        ));
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

/// The initramfs goes above the bzImage's decompression buffer (its
/// runtime start + `init_size`), not just above the image: the loader
/// decides before the guest runs, so this holds on any `/dev/kvm`.
#[test]
fn bzimage_initramfs_is_placed_above_init_size() {
    let _one = serialize();
    let (_, bzimage) = kernels();
    let head = std::fs::read(&bzimage).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
    let pref = u64::from_le_bytes(head[0x258..0x260].try_into().unwrap());
    let init_end = pref + u64::from(u32_at(0x260));
    let image_end = (1 << 20) + head.len() as u64;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("initrd");
    // Fits between the image and the top of RAM, not above init_end.
    let mem_mib = init_end.div_ceil(1 << 20) + 8;
    let size = (mem_mib << 20) - init_end + (1 << 20);
    assert!(
        size < (mem_mib << 20) - image_end,
        "the old rule would accept it"
    );
    std::fs::File::create(&big).unwrap().set_len(size).unwrap();
    let run = |mem: u64, timeout: &str| {
        Command::new(BIN)
            .args(["--kernel", bzimage.to_str().unwrap(), "--engine", "kvm"])
            .args(["--initrd", big.to_str().unwrap(), "--quiet"])
            .args(["--memory", &mem.to_string(), "--timeout", timeout])
            .output()
            .unwrap()
    };
    let out = run(mem_mib, "30");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("does not fit in guest memory"), "{stderr}");
    // With room above init_end the same initramfs is accepted and the guest
    // starts (then ends at the timeout, or without a result line).
    let out = run(mem_mib + (size >> 20) + 2, "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("does not fit"), "{stderr}");
    assert!(
        matches!(out.status.code(), Some(124 | 80 | 71)),
        "{:?}: {stderr}",
        out.status
    );
}
