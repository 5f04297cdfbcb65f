//! The L1 initramfs: reproducible byte for byte, and carrying what the L1
//! `/init` needs. Any dynamically linked binary stands in for milk-vmm
//! (this test binary itself); the image builder does not care which.

use std::path::{Path, PathBuf};

use milk_l1_host::image::{self, Binaries};
use milk_l1_host::job::Job;

/// Names in a newc archive stream (several archives back to back).
fn names(mut b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while b.len() >= 110 && &b[..6] == b"070701" {
        let field = |i: usize| {
            usize::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        let (size, namesize) = (field(6), field(11));
        let name = String::from_utf8_lossy(&b[110..110 + namesize - 1]).into_owned();
        let data = (110 + namesize).div_ceil(4) * 4;
        let next = (data + size).div_ceil(4) * 4;
        out.push(name);
        b = &b[next.min(b.len())..];
    }
    out
}

fn stand_in() -> PathBuf {
    std::env::current_exe().unwrap()
}

fn job(dir: &Path) -> Job {
    let k = dir.join("bzImage");
    std::fs::write(&k, b"kernel bytes").unwrap();
    let mut j = Job::new();
    j.add_vmm_step(&[
        "--kernel".into(),
        k.display().to_string(),
        "--cmdline".into(),
        "milk.run=\"exit 3\"".into(),
    ])
    .unwrap();
    j
}

#[test]
fn same_inputs_give_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    let bins = Binaries {
        milk_vmm: stand_in(),
        milkctl: None,
        milk_policy: None,
    };
    let j = job(d.path());
    let a = image::build(&bins, &j).unwrap();
    let b = image::build(&bins, &j).unwrap();
    assert!(a == b, "two builds of the same inputs differ");
    // Written to disk: the same bytes and hash.
    let (p1, p2) = (d.path().join("1.cpio"), d.path().join("2.cpio"));
    assert_eq!(
        image::write(&bins, &j, &p1).unwrap(),
        image::write(&bins, &j, &p2).unwrap()
    );
    assert_eq!(std::fs::read(&p1).unwrap(), a);

    // Another job changes only the job archive: the base is a common prefix.
    let mut other = Job::new();
    other.add_step(vec!["true".into()]);
    let c = image::build(&bins, &other).unwrap();
    let base = image::base_entries(&bins).unwrap();
    let mut base_bytes = Vec::new();
    milk_images::cpio::write_archive(&mut base_bytes, &base).unwrap();
    assert_eq!(&a[..base_bytes.len()], &base_bytes[..]);
    assert_eq!(&c[..base_bytes.len()], &base_bytes[..]);
    assert_ne!(a, c);
}

#[test]
fn image_carries_init_busybox_the_vmm_its_libraries_and_the_job() {
    let d = tempfile::tempdir().unwrap();
    let ctl = d.path().join("milkctl");
    std::fs::copy(stand_in(), &ctl).unwrap();
    let pol = d.path().join("milk-policy");
    std::fs::copy(stand_in(), &pol).unwrap();
    let bins = Binaries {
        milk_vmm: stand_in(),
        milkctl: Some(ctl),
        milk_policy: Some(pol),
    };
    let bytes = image::build(&bins, &job(d.path())).unwrap();
    let n = names(&bytes);
    for want in [
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/milk-vmm",
        "bin/milkctl",
        "bin/milk-policy",
        "dev/console",
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libc.so.6",
        "job/steps.sh",
        "job/files/0-bzImage",
    ] {
        assert!(n.iter().any(|x| x == want), "{want} missing from {n:?}");
    }
    // Two archives, each with its trailer; parents before children.
    assert_eq!(n.iter().filter(|x| *x == "TRAILER!!!").count(), 2);
    let pos = |x: &str| n.iter().position(|y| y == x).unwrap();
    assert!(pos("lib/x86_64-linux-gnu") < pos("lib/x86_64-linux-gnu/libc.so.6"));
    // The steps script runs what was asked, quoted.
    let steps = String::from_utf8_lossy(&bytes);
    assert!(steps.contains(
        "milk_step 1 milk-vmm --kernel /job/files/0-bzImage --cmdline 'milk.run=\"exit 3\"'"
    ));
}

#[test]
fn milkctl_is_picked_up_beside_milk_vmm_when_built() {
    let d = tempfile::tempdir().unwrap();
    let vmm = d.path().join("milk-vmm");
    std::fs::write(&vmm, b"x").unwrap();
    assert!(Binaries::beside(&vmm).milkctl.is_none());
    std::fs::write(d.path().join("milkctl"), b"x").unwrap();
    assert_eq!(
        Binaries::beside(&vmm).milkctl,
        Some(d.path().join("milkctl"))
    );
    assert!(Binaries::beside(&vmm).milk_policy.is_none());
    std::fs::write(d.path().join("milk-policy"), b"x").unwrap();
    assert_eq!(
        Binaries::beside(&vmm).milk_policy,
        Some(d.path().join("milk-policy"))
    );
}
