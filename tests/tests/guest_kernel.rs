//! The guest kernel's inputs: config fragment honoured, patches apply to
//! the pinned source, cache hits are fast and builds reproduce the lock.

use std::process::Command;
use std::time::Instant;

use milk_guest_kernel::config::KConfig;
use milk_guest_kernel::lockfile::KernelLock;
use milk_guest_kernel::patches::{self, Series};
use milk_guest_kernel::source;

#[test]
fn built_config_keeps_every_option_of_the_fragment() {
    let k = milk_guest_kernel::ensure_built().unwrap();
    let fragment = KConfig::load(&milk_guest_kernel::fragment_path()).unwrap();
    let full = KConfig::load(&k.config).unwrap();
    let bad = full.violations(&fragment);
    assert!(
        bad.is_empty(),
        "olddefconfig dropped options:\n{}",
        bad.join("\n")
    );
    assert!(fragment.options.len() > 40, "fragment looks truncated");
}

#[test]
fn patches_apply_to_the_pinned_tarball() {
    let tarball = std::path::Path::new(source::DEFAULT_TARBALL);
    let series = Series::load(&milk_guest_kernel::patches_dir()).unwrap();
    assert!(!series.patches.is_empty());
    for p in &series.patches {
        assert!(
            p.text.starts_with("From "),
            "{}: not a git-format patch",
            p.name
        );
        assert!(
            p.text.contains("\nSubject: [PATCH"),
            "{}: no subject",
            p.name
        );
        assert!(
            p.text.contains("\nSigned-off-by: "),
            "{}: no Signed-off-by",
            p.name
        );
    }
    // Extract only the files the series touches (GNU tar exits 2 for the
    // ones the series creates, which are not in the archive).
    let dir = tempfile::tempdir().unwrap();
    let members: Vec<String> = series
        .touched_paths()
        .iter()
        .map(|p| format!("linux-source-6.12/{p}"))
        .collect();
    let status = Command::new("tar")
        .arg("-xJf")
        .arg(tarball)
        .arg("--strip-components=1")
        .arg("-C")
        .arg(dir.path())
        .args(&members)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        matches!(status.code(), Some(0) | Some(2)),
        "tar failed: {status}"
    );
    for p in &series.patches {
        patches::apply_one(dir.path(), p, false).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn cache_hit_is_fast_and_matches_the_lock() {
    let first = milk_guest_kernel::ensure_built().unwrap();
    let t = Instant::now();
    let again = milk_guest_kernel::ensure_built().unwrap();
    let took = t.elapsed();
    assert!(again.cache_hit);
    assert_eq!(first.key, again.key);
    assert!(took.as_secs_f64() < 5.0, "cache hit took {took:?}");
    println!("cache hit in {took:?}");

    let lock = KernelLock::load(&milk_guest_kernel::lock_path()).unwrap();
    let tar_sha = source::tarball_sha256(
        std::path::Path::new(source::DEFAULT_TARBALL),
        &milk_guest_kernel::cache_dir(),
    )
    .unwrap();
    assert_eq!(
        again.version, lock.version,
        "kernel version differs from kernel.lock"
    );
    if tar_sha == lock.source_sha256 {
        assert_eq!(
            again.key, lock.bzimage_key,
            "kernel.lock records the bzImage of other inputs (config, patches or build \
             recipe changed): run `cargo xtask reproducible --record`"
        );
        assert_eq!(
            again.bzimage_sha256, lock.bzimage_sha256,
            "bzImage does not reproduce the hash recorded in kernel.lock"
        );
    } else {
        println!(
            "skipped: installed source is not the one kernel.lock pins, no bzImage hash to compare"
        );
    }
}

#[test]
fn uapi_headers_in_the_patches_are_the_canonical_ones() {
    let series = Series::load(&milk_guest_kernel::patches_dir()).unwrap();
    let root = milk_guest_kernel::crate_dir().join("..");
    for (path, canonical) in [
        (
            "include/uapi/linux/virtio_milk.h",
            root.join("virtio-milk/include/virtio_milk.h"),
        ),
        (
            "include/uapi/linux/virtio_ivshmem.h",
            root.join("guest-kernel/include/uapi/linux/virtio_ivshmem.h"),
        ),
    ] {
        let created: Vec<String> = series
            .patches
            .iter()
            .filter_map(|p| p.created_file(path))
            .collect();
        assert_eq!(
            created.len(),
            1,
            "{path} should be created by exactly one patch"
        );
        let want = std::fs::read_to_string(&canonical).unwrap();
        assert!(
            created[0] == want,
            "{path} in the patch series differs from {}; regenerate the patches",
            canonical.display()
        );
    }
}
