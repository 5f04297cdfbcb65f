//! The test initramfs: reproducible, and rt-tests' binaries in it find every
//! shared library they need inside the image.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// Unpacks a gzip'd cpio into `dir` with the standard tool.
fn unpack(image: &[u8], dir: &Path) {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(image)
        .read_to_end(&mut raw)
        .unwrap();
    let mut child = Command::new("cpio")
        .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&raw).unwrap());
    assert!(child.wait().unwrap().success());
    writer.join().unwrap();
}

/// `readelf -d -l` of `file`: (NEEDED names, the interpreter if any).
fn needs(file: &Path) -> (Vec<String>, Option<String>) {
    let out = Command::new("readelf")
        .args(["-d", "-l", "-W"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "readelf {}", file.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let needed = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_string()))
        .collect();
    let interp = text.lines().find_map(|l| {
        let at = l.find("[Requesting program interpreter: ")?;
        let rest = &l[at + "[Requesting program interpreter: ".len()..];
        Some(rest.trim_end_matches(']').to_string())
    });
    (needed, interp)
}

#[test]
fn test_image_is_reproducible_and_rt_tests_find_their_libraries_in_it() {
    milk_images::rt_tests::ensure_installed().expect("rt-tests installs");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.cpio.gz"), dir.path().join("b.cpio.gz"));
    milk_images::build_test_to(&a).unwrap();
    milk_images::build_test_to(&b).unwrap();
    let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(ba, bb, "two test initramfs builds differ");
    // The key names the contents: same inputs, same key.
    assert_eq!(
        milk_images::test_input_key().unwrap(),
        milk_images::test_input_key().unwrap()
    );
    assert_ne!(
        milk_images::test_input_key().unwrap(),
        milk_images::input_key().unwrap()
    );

    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    unpack(&ba, &root);
    for f in ["init", "bin/busybox", "bin/milk-work", "bin/milk-mix"] {
        assert!(root.join(f).is_file(), "{f} missing");
    }
    // Every ELF in the image that needs shared objects finds them (by
    // soname in the image's library directories) and its interpreter.
    let lib_dirs = ["lib/x86_64-linux-gnu", "lib64", "usr/lib/x86_64-linux-gnu"];
    let mut checked = BTreeSet::new();
    let mut todo: Vec<std::path::PathBuf> = ["bin/hackbench", "bin/cyclictest"]
        .iter()
        .map(|b| root.join(b))
        .collect();
    while let Some(f) = todo.pop() {
        if !checked.insert(f.clone()) {
            continue;
        }
        assert!(f.is_file(), "{} missing from the image", f.display());
        let (needed, interp) = needs(&f);
        if let Some(i) = interp {
            let p = root.join(i.trim_start_matches('/'));
            assert!(
                p.is_file(),
                "{}: interpreter {i} not in the image",
                f.display()
            );
        }
        for so in needed {
            let found = lib_dirs
                .iter()
                .map(|d| root.join(d).join(&so))
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("{}: {so} not in the image", f.display()));
            todo.push(found);
        }
    }
    assert!(checked.len() >= 4, "binaries and libraries: {checked:?}");

    // The image's hackbench runs with the image's loader and libraries only.
    let loader = root.join("lib64/ld-linux-x86-64.so.2");
    let out = Command::new(&loader)
        .arg("--inhibit-cache")
        .arg("--library-path")
        .arg(root.join("lib/x86_64-linux-gnu"))
        .arg(root.join("bin/hackbench"))
        .args(["-p", "-g", "1", "-l", "10"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.lines().any(|l| l.starts_with("Time: ")), "{text}");
}

#[test]
fn the_mix_counts_every_kind_and_rejects_bad_arguments() {
    let w = milk_images::workloads().unwrap();
    let bin = milk_images::compile(w.iter().find(|w| w.name == "milk-mix").unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("milk-mix");
    std::fs::write(&path, bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = Command::new(&path).args(["-s", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("milk-mix: ms="))
        .unwrap_or_else(|| panic!("no result line: {text}"));
    let num = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    assert_eq!(num("seconds"), 1);
    assert!(num("elapsed_ms") >= 1000, "{line}");
    assert_eq!(num("errors"), 0);
    assert_eq!(num("ms"), 1000);
    assert_eq!(num("roundtrips"), num("pipe_rtts"));
    for (kind, total, min) in [
        ("yielders", "yields", "min_yield"),
        ("forkers", "forks", "min_fork"),
        ("pairs", "pipe_rtts", "min_pipe"),
    ] {
        assert_eq!(num(kind), 2, "{line}");
        // Every worker of every kind ran (on an idle host none starves).
        assert!(num(min) > 0, "a {kind} worker never ran: {line}");
        assert!(num(total) >= 2 * num(min), "{line}");
    }

    // Only forkers.
    let out = Command::new(&path)
        .args(["-d", "300", "-y", "0", "-f", "1", "-P", "0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("yields=0 forks="), "{text}");
    assert!(text.contains("yielders=0 forkers=1 pairs=0"), "{text}");

    for bad in [
        &["-s", "0"][..],
        &["-s", "x"],
        &["-q"],
        &["-y", "17"],
        &["-d", "0"],
    ] {
        let out = Command::new(&path).args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}
