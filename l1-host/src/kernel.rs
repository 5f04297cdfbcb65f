//! The L1 host kernel: the guest's pinned Linux source tarball, unpatched
//! (the L1 only runs milk-vmm on KVM; none of the guest series concerns it),
//! configured with `tinyconfig` + `config/l1.config` (KVM and KVM_AMD built
//! in, serial consoles, no modules), built reproducibly into the project
//! cache next to the guest kernel:
//!
//! ```text
//! cache/
//!   src/linux-<sha12>-l1/     pristine tree (the guest's tree carries the series)
//!   build/l1-<sha12>/         make O= directory of the L1 kernel
//!   kernels/l1-<key>/         bzImage, config, info, build.log
//! ```
//!
//! The key hashes the tarball and the L1 fragment, so changing the guest
//! series does not rebuild the L1. Builds take the guest kernel's lock file,
//! so two kernel builds never share the CPUs.

use std::fs;
use std::path::{Path, PathBuf};

use milk_guest_kernel::config::KConfig;
use milk_guest_kernel::patches::Series;
use milk_guest_kernel::{host_deps, make, patches, source};
use sha2::{Digest, Sha256};

use crate::Error;

/// The config fragment applied on top of `tinyconfig`.
pub fn fragment_path() -> PathBuf {
    crate::crate_dir().join("config/l1.config")
}

/// A built L1 kernel.
#[derive(Debug, Clone)]
pub struct L1Kernel {
    /// The compressed kernel QEMU boots (`-kernel`).
    pub bzimage: PathBuf,
    /// The final `.config`.
    pub config: PathBuf,
    /// Kernel release, e.g. `6.12.117`.
    pub version: String,
    /// Cache key (hash of the source tarball and the L1 fragment).
    pub key: String,
    /// sha256 of `bzimage`.
    pub bzimage_sha256: String,
    /// True if this call found the kernel in the cache.
    pub cache_hit: bool,
}

/// The cache key for a (tarball, fragment) pair.
pub fn cache_key(tarball_sha: &str, fragment: &str) -> String {
    let mut h = Sha256::new();
    // Bump when the build recipe changes the output (v2: unpatched source).
    h.update(b"milk-l1-kernel-v2\0");
    h.update(tarball_sha.as_bytes());
    h.update([0]);
    h.update(fragment.as_bytes());
    crate::hex(&h.finalize())[..24].to_string()
}

fn read_info(dir: &Path, key: &str, cache_hit: bool) -> Option<L1Kernel> {
    let text = fs::read_to_string(dir.join("info")).ok()?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    let k = L1Kernel {
        bzimage: dir.join("bzImage"),
        config: dir.join("config"),
        version: get("version")?,
        key: key.to_string(),
        bzimage_sha256: get("bzimage_sha256")?,
        cache_hit,
    };
    (k.bzimage.is_file() && k.config.is_file()).then_some(k)
}

/// Builds the L1 kernel, or finds it in the cache.
pub fn ensure_kernel() -> Result<L1Kernel, Error> {
    build(&milk_guest_kernel::BuildOptions::default())
}

/// Builds the L1 kernel with the guest kernel's options (cache root,
/// tarball, jobs; `clean` builds in a fresh directory).
pub fn build(opts: &milk_guest_kernel::BuildOptions) -> Result<L1Kernel, Error> {
    let fpath = fragment_path();
    let fragment_text = fs::read_to_string(&fpath).map_err(|e| Error::io(&fpath, e))?;
    let fragment = KConfig::parse(&fragment_text)?;
    if !opts.tarball.exists() {
        host_deps::ensure()?;
    }
    let tarball_sha = source::tarball_sha256(&opts.tarball, &opts.cache)?;
    let key = cache_key(&tarball_sha, &fragment_text);
    let out_dir = opts.cache.join("kernels").join(format!("l1-{key}"));
    if !opts.clean {
        if let Some(k) = read_info(&out_dir, &key, true) {
            log::info!("L1 kernel {} cache hit ({key})", k.version);
            return Ok(k);
        }
    }
    host_deps::ensure()?;
    let _lock = milk_guest_kernel::FileLock::acquire(&opts.cache.join("kernel-build.lock"))?;
    if !opts.clean {
        if let Some(k) = read_info(&out_dir, &key, true) {
            return Ok(k);
        }
    }
    let short = &tarball_sha[..12];
    let src = opts.cache.join("src").join(format!("linux-{short}-l1"));
    if !src.join("Makefile").exists() {
        eprintln!("[l1-kernel] unpacking the pristine source for the L1 kernel");
        source::extract(&opts.tarball, &src)?;
    }
    let version = source::tree_version(&src)?;
    // A tree that once carried patches (or an interrupted sync) goes back
    // to pristine; a fresh extraction is a no-op.
    patches::sync(&src, &Series::default())?;
    let build_dir = if opts.clean {
        let d = opts.cache.join("build").join(format!("l1-clean-{key}"));
        if d.exists() {
            fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        d
    } else {
        opts.cache.join("build").join(format!("l1-{short}"))
    };
    fs::create_dir_all(&build_dir).map_err(|e| Error::io(&build_dir, e))?;
    fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let log_path = out_dir.join("build.log");
    let _ = fs::remove_file(&log_path);
    configure(&src, &build_dir, &fragment, &fragment_text, &log_path)?;
    eprintln!(
        "[l1-kernel] building the L1 host kernel (Linux {version} + KVM/kvm_amd; about 4 min on 2 cores; log: {})",
        log_path.display()
    );
    make::run(
        &src,
        &build_dir,
        &[format!("-j{}", opts.jobs.max(1)), "bzImage".to_string()],
        &log_path,
        "l1-kernel",
    )?;
    let bz = build_dir.join("arch/x86/boot/bzImage");
    fs::copy(&bz, out_dir.join("bzImage")).map_err(|e| Error::io(&bz, e))?;
    fs::copy(build_dir.join(".config"), out_dir.join("config"))
        .map_err(|e| Error::io(&out_dir, e))?;
    let bz_sha = source::sha256_file(&out_dir.join("bzImage"))?;
    // `info` last: its presence marks a complete entry.
    let info = format!(
        "version={version}\nbzimage_sha256={bz_sha}\nkey={key}\nsource_sha256={tarball_sha}\n"
    );
    fs::write(out_dir.join("info"), info).map_err(|e| Error::io(&out_dir, e))?;
    if opts.clean {
        fs::remove_dir_all(&build_dir).map_err(|e| Error::io(&build_dir, e))?;
    }
    eprintln!(
        "[l1-kernel] ready: {} (sha256 {})",
        out_dir.display(),
        &bz_sha[..16]
    );
    read_info(&out_dir, &key, false)
        .ok_or_else(|| Error::Build(format!("{}: artifacts missing", out_dir.display())))
}

/// `.config` = tinyconfig + fragment + olddefconfig (when the fragment
/// changed); every option the fragment asks for must survive.
fn configure(
    src: &Path,
    build_dir: &Path,
    fragment: &KConfig,
    fragment_text: &str,
    log: &Path,
) -> Result<(), Error> {
    let stamp = build_dir.join(".milk-l1-fragment");
    let dot_config = build_dir.join(".config");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(fragment_text) || !dot_config.exists() {
        make::run(
            src,
            build_dir,
            &["tinyconfig".to_string()],
            log,
            "l1-config",
        )?;
        let frag_copy = build_dir.join("l1.config");
        fs::write(&frag_copy, fragment_text).map_err(|e| Error::io(&frag_copy, e))?;
        let out = std::process::Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .arg("-m")
            .arg("-O")
            .arg(build_dir)
            .arg(&dot_config)
            .arg(&frag_copy)
            .current_dir(src)
            .output()
            .map_err(|e| Error::Build(format!("merge_config.sh: {e}")))?;
        if !out.status.success() {
            return Err(Error::Build(format!(
                "merge_config.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        make::run(
            src,
            build_dir,
            &["olddefconfig".to_string()],
            log,
            "l1-config",
        )?;
        fs::write(&stamp, fragment_text).map_err(|e| Error::io(&stamp, e))?;
    }
    let bad = KConfig::load(&dot_config)?.violations(fragment);
    if !bad.is_empty() {
        let _ = fs::remove_file(&stamp);
        return Err(Error::Build(format!(
            "olddefconfig dropped options the L1 fragment asks for:\n  {}",
            bad.join("\n  ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_depends_on_every_input() {
        let base = cache_key("aa", "CONFIG_KVM=y\n");
        assert_eq!(base, cache_key("aa", "CONFIG_KVM=y\n"));
        assert_ne!(base, cache_key("ab", "CONFIG_KVM=y\n"));
        assert_ne!(base, cache_key("aa", "CONFIG_KVM=n\n"));
        // Never the guest kernel's key for the same inputs.
        assert_ne!(
            base,
            milk_guest_kernel::cache_key("aa", "CONFIG_KVM=y\n", &Series::default())
        );
    }

    #[test]
    fn fragment_builds_kvm_amd_and_the_consoles_in() {
        let f = KConfig::load(&fragment_path()).unwrap();
        for opt in [
            "CONFIG_KVM",
            "CONFIG_KVM_AMD",
            "CONFIG_VIRTUALIZATION",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_DEVTMPFS_MOUNT",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_UNIX",
            "CONFIG_EVENTFD",
        ] {
            assert_eq!(
                f.options.get(opt),
                Some(&milk_guest_kernel::config::Setting::Value("y".into())),
                "{opt}"
            );
        }
        assert_eq!(
            f.options.get("CONFIG_MODULES"),
            Some(&milk_guest_kernel::config::Setting::Unset),
            "everything is built in"
        );
    }

    #[test]
    fn incomplete_cache_entries_are_not_hits() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_info(d.path(), "k", true).is_none());
        fs::write(d.path().join("info"), "version=6.12.1\nbzimage_sha256=00\n").unwrap();
        assert!(read_info(d.path(), "k", true).is_none());
        fs::write(d.path().join("bzImage"), "x").unwrap();
        fs::write(d.path().join("config"), "x").unwrap();
        let k = read_info(d.path(), "k", true).unwrap();
        assert_eq!((k.version.as_str(), k.cache_hit), ("6.12.1", true));
    }
}
