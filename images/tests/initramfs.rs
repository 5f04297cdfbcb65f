//! The initramfs is reproducible and is a cpio archive the standard tool reads.

use std::io::Read;
use std::process::{Command, Stdio};

#[test]
fn two_builds_are_byte_identical_and_cpio_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.cpio.gz"), dir.path().join("b.cpio.gz"));
    milk_images::build_to(&a).unwrap();
    milk_images::build_to(&b).unwrap();
    let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(
        ba.len() > 500_000,
        "suspiciously small image: {} bytes",
        ba.len()
    );
    assert_eq!(ba, bb, "two initramfs builds differ");

    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&ba[..])
        .read_to_end(&mut raw)
        .unwrap();
    let mut child = Command::new("cpio")
        .args(["-t", "-v", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&raw).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    let has = |suffix: &str| listing.lines().any(|l| l.ends_with(suffix));
    for want in [
        " init",
        " bin/busybox",
        " bin/milk-work",
        " bin/sh -> busybox",
        " dev/console",
    ] {
        assert!(has(want), "{want} missing from:\n{listing}");
    }
    // Fixed owner and mtime on every member.
    for l in listing.lines() {
        assert!(
            l.contains(" root ") || l.contains(" 0 "),
            "owner not root: {l}"
        );
        assert!(l.contains("1970"), "mtime not fixed: {l}");
    }
}

#[test]
fn the_workload_checks_itself_and_rejects_bad_arguments() {
    let w = milk_images::workloads().unwrap();
    let bin = milk_images::compile(w.iter().find(|w| w.name == "milk-work").unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milk-work");
    std::fs::write(&path, bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = Command::new(&path)
        .args(["-t", "8", "-r", "3", "-s", "100"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.contains("threads=8 rounds=3 ok=8 bad=0 wakeups=24"),
        "{line}"
    );

    let bad = Command::new(&path).args(["-t", "zero"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let none = Command::new(&path).args(["-t", "0"]).output().unwrap();
    assert_eq!(none.status.code(), Some(2));
}
