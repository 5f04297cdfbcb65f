//! `milk-vmm --engine qemu --policy NAME`: the real guest under QEMU TCG with
//! the virtio-milk device (virtio over ivshmem) served by a host policy, and
//! the summary printed at exit.
//!
//! - `qemu_engine_with_fifo_policy_schedules_the_guest`: the project's kernel
//!   and initramfs, a workload; exit status 0, the guest's sched_ext ops are
//!   `milk`, the host summary counts RUN decisions and no protocol errors;
//! - `auto_engine_with_fifo_policy_uses_qemu_here`: the same with
//!   `--engine auto`: QEMU where KVM cannot run a standard guest (kvm_pvm
//!   here), the KVM engine where it can (the same assertions; the real-KVM
//!   path is tested nested in tests/nested_kvm.rs);
//! - `unknown_policy_is_a_usage_error`: exit 64 with the known names, for
//!   every engine, and no QEMU left behind.
//!
//! Kernel and initramfs: `milk_guest_kernel::ensure_built()` and
//! `milk_images::ensure_initramfs()`, or `MILK_VMLINUX` / `MILK_INITRAMFS`.

mod common;

use common::{assert_no_leftovers, number_after, run};

#[test]
fn qemu_engine_with_fifo_policy_schedules_the_guest() {
    fifo_policy_run("qemu");
}

/// `--engine auto`: QEMU TCG where KVM cannot run a standard guest (kvm_pvm
/// here), milk-vmm's KVM engine with virtio-mmio where it can; the same
/// assertions hold on both paths, plus the engine line on the QEMU one.
#[test]
fn auto_engine_with_fifo_policy_uses_qemu_here() {
    fifo_policy_run("auto");
}

/// The project's `vmlinux` (or `MILK_VMLINUX`).
fn vmlinux() -> std::path::PathBuf {
    match std::env::var("MILK_VMLINUX") {
        Ok(p) => p.into(),
        Err(_) => {
            milk_guest_kernel::ensure_built()
                .expect("guest kernel builds")
                .vmlinux
        }
    }
}

/// The project's initramfs (or `MILK_INITRAMFS`).
fn initramfs() -> std::path::PathBuf {
    match std::env::var("MILK_INITRAMFS") {
        Ok(p) => p.into(),
        Err(_) => milk_images::ensure_initramfs().expect("initramfs builds"),
    }
}

/// One TCG guest at a time (2 host cores).
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fifo_policy_run(engine: &str) {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        milk_harness::qemu_available(),
        "qemu-system-x86_64 is needed for the QEMU engine"
    );
    let kernel = vmlinux();
    let initrd = initramfs();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let out = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--engine",
        engine,
        "--policy",
        "fifo",
        "--cpus",
        "2",
        "--timeout",
        "300",
        "--serial-log",
        log.to_str().unwrap(),
        "--cmdline",
        "milk.run=\"cat /sys/kernel/sched_ext/root/ops; milk-work -t 16 -r 5\"",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    // `cat .../ops` prints "milk"; a kernel message may follow on the same
    // console line ("milk[    3.58] input: ...").
    assert!(
        stdout
            .lines()
            .any(|l| l.split('[').next().unwrap_or_default().trim() == "milk"),
        "the guest's sched_ext ops are milk:\n{stdout}"
    );
    assert!(
        !stdout.contains("milk.policy="),
        "the policy is host-side, not a kernel argument"
    );
    let summary = &stdout[stdout
        .find("virtio-milk summary: policy fifo")
        .unwrap_or_else(|| panic!("no summary at exit:\n{stdout}"))..];
    let messages = number_after(summary, "messages: ").expect("message count");
    let runs = number_after(summary, "(RUN ").expect("RUN count");
    let malformed = number_after(summary, "protocol errors: ").expect("malformed count");
    let acked_ok = number_after(summary, "acks: OK ").expect("OK acks");
    println!("{summary}");
    assert!(messages > 0, "{summary}");
    assert!(runs > 0, "RUN decisions: {summary}");
    assert!(acked_ok > 0, "the guest acknowledged decisions: {summary}");
    assert_eq!(malformed, 0, "{summary}");
    for key in ["rejections: ", "guest fallbacks: ", "p50", "p99"] {
        assert!(summary.contains(key), "summary lacks {key}: {summary}");
    }
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("MILK-RESULT status=0"));
    if engine == "auto" {
        let kvm_runs_it = milk_launcher::detect_kvm() == milk_launcher::KvmSupport::Standard;
        assert_eq!(
            stderr.contains("running the guest under QEMU TCG"),
            !kvm_runs_it,
            "auto uses QEMU exactly where KVM cannot run the guest: {stderr}"
        );
    }
    assert_no_leftovers(dir.path());
}

#[test]
fn unknown_policy_is_a_usage_error() {
    let kernel = vmlinux();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    for engine in ["qemu", "auto", "kvm"] {
        let out = run(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--engine",
            engine,
            "--policy",
            "no-such-policy",
            "--serial-log",
            log.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{engine}: {stderr}");
        assert!(
            stderr.contains("unknown --policy \"no-such-policy\" (known: fifo"),
            "{engine}: {stderr}"
        );
        assert!(!log.exists(), "{engine}: nothing was started");
        assert_no_leftovers(dir.path());
    }
    // Guest RAM the host cannot map under QEMU.
    let out = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--engine",
        "qemu",
        "--policy",
        "fifo",
        "--memory",
        "4096",
        "--serial-log",
        log.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("at most 3072 MiB"), "{stderr}");
    assert_no_leftovers(dir.path());
}
