//! The `milk-vmm` binary: exit status from the guest's result line, and bad
//! input (missing/corrupt kernel, initramfs larger than memory, --cpus 0,
//! absurd memory sizes, unreadable paths) giving a clear error, a non-zero
//! documented exit code, no panic and no leftover processes.

mod common;

use common::{assert_no_leftovers, run, BIN};

use std::path::Path;
use std::process::Command;

fn expect_error(args: &[&str], code: i32, needle: &str, marker: &Path) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "args {args:?}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains(needle),
        "args {args:?}: stderr lacks {needle:?}:\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("milk-vmm: ") || l.starts_with("error: ")),
        "one clear error line expected:\n{stderr}"
    );
    assert_no_leftovers(marker);
}

#[test]
fn help_has_examples() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--engine",
        "--policy",
        "--serial-log",
        "Examples:",
        "Exit status",
        "Known policies: fifo",
    ] {
        assert!(s.contains(needle), "--help lacks {needle}:\n{s}");
    }
}

#[test]
fn missing_and_unreadable_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("no-such-vmlinux");
    expect_error(
        &["--kernel", missing.to_str().unwrap()],
        66,
        "No such file",
        d,
    );
    expect_error(
        &["--kernel", d.to_str().unwrap()],
        66,
        "not a regular file",
        d,
    );
    // A path through a regular file cannot be opened, even as root.
    let file = d.join("plain");
    std::fs::write(&file, b"x").unwrap();
    let through = file.join("vmlinux");
    expect_error(
        &["--kernel", through.to_str().unwrap()],
        66,
        "Not a directory",
        d,
    );
    let empty = d.join("empty");
    std::fs::write(&empty, b"").unwrap();
    expect_error(
        &["--kernel", empty.to_str().unwrap()],
        65,
        "not a loadable",
        d,
    );
}

#[test]
fn corrupt_kernel_any_engine() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk-kernel");
    std::fs::write(&junk, vec![0x5au8; 64 * 1024]).unwrap();
    for engine in ["auto", "kvm", "qemu"] {
        expect_error(
            &["--kernel", junk.to_str().unwrap(), "--engine", engine],
            65,
            "not a loadable x86_64 ELF or bzImage",
            dir.path(),
        );
    }
    // ELF magic with a broken header gets past the format sniffing and is
    // rejected by the loader (KVM engine).
    let bad_elf = dir.path().join("bad.elf");
    let mut data = vec![0u8; 4096];
    data[..4].copy_from_slice(b"\x7fELF");
    std::fs::write(&bad_elf, data).unwrap();
    expect_error(
        &["--kernel", bad_elf.to_str().unwrap(), "--engine", "kvm"],
        65,
        "not a loadable",
        dir.path(),
    );
}

#[test]
fn bad_cpu_counts_and_memory_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let k = common::test_guest("pvh");
    let k = k.to_str().unwrap();
    let m = dir.path();
    expect_error(&["--kernel", k, "--cpus", "0"], 64, "--cpus must be", m);
    expect_error(
        &["--kernel", k, "--cpus", "100000"],
        64,
        "--cpus must be",
        m,
    );
    expect_error(&["--kernel", k, "--memory", "0"], 64, "--memory must be", m);
    expect_error(&["--kernel", k, "--memory", "4"], 64, "--memory must be", m);
    expect_error(
        &["--kernel", k, "--memory", "4000000000"],
        64,
        "--memory must be",
        m,
    );
    // Within the VMM's range but more than this host has.
    expect_error(
        &["--kernel", k, "--memory", "1000000"],
        64,
        "exceeds the host",
        m,
    );
    // Not a number at all: clap's usage error.
    let out = run(&["--kernel", k, "--memory", "-5"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--kernel", k, "--cpus", "two"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn initrd_problems() {
    let dir = tempfile::tempdir().unwrap();
    let k = common::test_guest("pvh");
    let k = k.to_str().unwrap();
    let m = dir.path();
    let big = m.join("huge.cpio");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let big = big.to_str().unwrap();
    for engine in ["auto", "kvm"] {
        expect_error(
            &[
                "--kernel", k, "--initrd", big, "--memory", "32", "--engine", engine,
            ],
            65,
            "does not fit in guest memory",
            m,
        );
    }
    // Smaller than RAM, but not above the kernel and the boot area: the
    // loader's exact check (KVM engine).
    let almost = m.join("almost.cpio");
    std::fs::File::create(&almost)
        .unwrap()
        .set_len((32 << 20) - 4096)
        .unwrap();
    expect_error(
        &[
            "--kernel",
            k,
            "--initrd",
            almost.to_str().unwrap(),
            "--memory",
            "32",
            "--engine",
            "kvm",
        ],
        65,
        "does not fit in guest memory",
        m,
    );
    let missing = m.join("missing.cpio");
    expect_error(
        &["--kernel", k, "--initrd", missing.to_str().unwrap()],
        66,
        "No such file",
        m,
    );
    expect_error(
        &["--kernel", k, "--initrd", m.to_str().unwrap()],
        66,
        "not a regular file",
        m,
    );
}

#[test]
fn unwritable_serial_log() {
    assert!(common::kvm_usable());
    let dir = tempfile::tempdir().unwrap();
    let k = common::test_guest("pvh");
    let log = dir.path().join("no-such-dir").join("serial.log");
    expect_error(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--engine",
            "kvm",
            "--serial-log",
            log.to_str().unwrap(),
        ],
        73,
        "serial log",
        dir.path(),
    );
}

#[test]
fn invalid_cmdline_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let k = common::test_guest("pvh");
    let k = k.to_str().unwrap();
    expect_error(
        &["--kernel", k, "--engine", "kvm", "--cmdline", "a\u{7}b"],
        64,
        "printable",
        dir.path(),
    );
    for engine in ["auto", "kvm", "qemu"] {
        expect_error(
            &["--kernel", k, "--engine", engine, "--policy", "../evil"],
            64,
            "unknown --policy \"../evil\" (known: fifo, rr)",
            dir.path(),
        );
    }
}

#[test]
fn exit_status_is_the_guests_result() {
    assert!(common::kvm_usable());
    let dir = tempfile::tempdir().unwrap();
    let k = common::test_guest("pvh");
    let log = dir.path().join("serial.log");
    // With the echo device the test guest passes all its checks: status 0.
    let out = run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--engine",
        "kvm",
        "--echo-device",
        "--serial-log",
        log.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("echo: HELLO FROM THE MILK TEST GUEST"),
        "{stdout}"
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("MILK-RESULT status=0"));
    // Without it, the guest reports step 10 (no virtio device announced).
    let out = run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--engine",
        "kvm",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(10));
    assert!(
        out.stdout.is_empty(),
        "--quiet keeps the console off stdout"
    );
    assert_no_leftovers(dir.path());
}

#[test]
fn engine_choice_is_logged_once() {
    let k = common::test_guest("pvh");
    let out = run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--engine",
        "kvm",
        "--echo-device",
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = stderr.lines().filter(|l| l.contains("engine:")).count();
    match milk_launcher::detect_kvm() {
        milk_launcher::KvmSupport::Pvm => {
            assert_eq!(lines, 1, "{stderr}");
            assert!(stderr.contains("kvm_pvm"));
        }
        milk_launcher::KvmSupport::Standard => assert_eq!(lines, 0, "{stderr}"),
        milk_launcher::KvmSupport::Missing(_) => assert_eq!(out.status.code(), Some(69)),
    }
}

#[test]
fn qemu_engine_runs_the_same_guest() {
    assert!(
        milk_harness::qemu_available(),
        "qemu-system-x86_64 is needed for the QEMU engine"
    );
    let dir = tempfile::tempdir().unwrap();
    let k = common::test_guest("pvh");
    let log = dir.path().join("serial.log");
    for engine in ["qemu", "auto"] {
        let out = run(&[
            "--kernel",
            k.to_str().unwrap(),
            "--engine",
            engine,
            "--timeout",
            "120",
            "--serial-log",
            log.to_str().unwrap(),
            "--cmdline",
            "milk.qemu=1",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if engine == "auto" && milk_launcher::detect_kvm() == milk_launcher::KvmSupport::Standard {
            // Auto picks KVM there; the guest (no echo device) reports step 10 too.
            assert_eq!(out.status.code(), Some(10), "{stderr}");
            continue;
        }
        // No virtio device under QEMU: the guest reports step 10 and that is
        // the exit status, exactly as under KVM.
        assert_eq!(out.status.code(), Some(10), "{engine}: {stdout}\n{stderr}");
        assert!(stdout.contains("cmdline: console=ttyS0"), "{stdout}");
        assert!(
            stdout.contains("milk.qemu=1"),
            "same command line: {stdout}"
        );
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("MILK-RESULT status=10"), "{logged}");
        assert_no_leftovers(dir.path());
    }
}

#[test]
fn timeout_and_signals_stop_a_hung_guest() {
    assert!(common::kvm_usable());
    let k = common::test_guest("pvh");
    let k = k.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let m = marker.to_str().unwrap();
    // --timeout: exit 124 after about a second, all threads stopped.
    let t = std::time::Instant::now();
    let out = run(&[
        "--kernel",
        k,
        "--engine",
        "kvm",
        "--cpus",
        "2",
        "--timeout",
        "1",
        "--cmdline",
        "testguest.hang",
        "--serial-log",
        m,
    ]);
    assert_eq!(
        out.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&out.stdout).contains("test-guest: hanging"));
    assert_no_leftovers(dir.path());

    // SIGTERM: a clean stop with 128 + 15.
    let marker = dir.path().join("marker2");
    let m = marker.to_str().unwrap();
    let child = Command::new(BIN)
        .args([
            "--kernel",
            k,
            "--engine",
            "kvm",
            "--cmdline",
            "testguest.hang",
        ])
        .args(["--serial-log", m])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the guest runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&marker)
        .unwrap_or_default()
        .contains("hanging")
    {
        assert!(std::time::Instant::now() < deadline, "guest did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 15), "{stderr}");
    assert!(stderr.contains("signal 15"), "{stderr}");
    assert!(!stderr.contains("panicked"));
    assert_no_leftovers(dir.path());
}

#[test]
fn launcher_and_vmm_share_one_exit_code_table() {
    use milk_launcher::exit_code as l;
    use milk_vmm::exit_code as v;
    for (a, b) in [
        (l::USAGE, v::USAGE),
        (l::NO_INPUT, v::NO_INPUT),
        (l::UNAVAILABLE, v::UNAVAILABLE),
        (l::SOFTWARE, v::SOFTWARE),
        (l::GUEST_FAULT, v::GUEST_FAULT),
        (l::CANT_CREATE, v::CANT_CREATE),
        (l::NO_RESULT, v::NO_RESULT),
        (l::TIMEOUT, v::TIMEOUT),
        (l::SIGNAL_BASE, v::SIGNAL_BASE),
    ] {
        assert_eq!(a, b);
    }
}

#[test]
fn bad_chaos_and_hostile_specs() {
    let dir = tempfile::tempdir().unwrap();
    let k = common::test_guest("pvh");
    let k = k.to_str().unwrap();
    for (flag, spec, needle) in [
        ("--chaos", "nope=1", "unknown key \"nope\""),
        (
            "--chaos",
            "ack_loss=2",
            "ack_loss=2: a probability in [0, 1]",
        ),
        ("--chaos", "stall=5ms", "a range LO..HI"),
        ("--chaos", "event_delay=5", "a duration needs a unit"),
        ("--hostile-host", "0", "must be in (0, 3600] seconds"),
        ("--hostile-host", "5,rate=0", "1..=100000"),
    ] {
        expect_error(
            &["--kernel", k, "--policy", "fifo", flag, spec],
            2,
            needle,
            dir.path(),
        );
    }
    expect_error(
        &["--kernel", k, "--chaos", "default"],
        64,
        "--chaos and --hostile-host need --policy",
        dir.path(),
    );
    let out = run(&["--help"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("--chaos <SPEC>") && s.contains("--hostile-host"),
        "{s}"
    );
}
