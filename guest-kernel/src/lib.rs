//! MiLK's guest kernel: Debian's Linux 6.12 source, the config fragment in
//! `config/milk.config` and the patch series in `patches/`, built
//! reproducibly into a cache keyed by a hash of all three.
//!
//! ```text
//! cache/                        ($MILK_CACHE_DIR or ~/.cache/milk)
//!   src/linux-<sha12>/          extracted tarball + the current series
//!   build/linux-<sha12>/        make O= directory (kept for incremental builds)
//!   kernels/<key>/              bzImage, vmlinux, config, info, build.log
//! ```
//!
//! [`ensure_built`] returns the cached artifacts when the key matches (a
//! cache hit takes well under a second) and builds them otherwise.

pub mod config;
pub mod host_deps;
pub mod lockfile;
pub mod make;
pub mod patches;
pub mod source;

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::config::KConfig;
use crate::lockfile::KernelLock;
use crate::patches::{hex, Series};

/// Errors from preparing or building the kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Host packages are missing; the string is the command to install them.
    #[error("missing host packages; run as root: {0}")]
    MissingPackages(String),
    /// An external tool could not run or failed.
    #[error("{0}: {1}")]
    Tool(String, String),
    /// A patch did not apply.
    #[error("patch {0} does not apply:\n{1}")]
    PatchFailed(String, String),
    /// The kernel.lock file is malformed.
    #[error("kernel.lock: {0}")]
    Lock(String),
    /// The config fragment is malformed or was not honoured.
    #[error("kernel config: {0}")]
    Config(String),
    /// The source tree is not usable.
    #[error("kernel source: {0}")]
    SourceTree(String),
    /// make failed.
    #[error("kernel build: {0}")]
    Build(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// This crate's directory (holds `config/`, `patches/`, `kernel.lock`).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The config fragment applied on top of `tinyconfig`.
pub fn fragment_path() -> PathBuf {
    crate_dir().join("config/milk.config")
}

/// The patch series directory.
pub fn patches_dir() -> PathBuf {
    crate_dir().join("patches")
}

/// The lock file.
pub fn lock_path() -> PathBuf {
    crate_dir().join("kernel.lock")
}

/// The project's cache directory: `$MILK_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/milk`, else `~/.cache/milk`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MILK_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("milk");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/milk")
}

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Cache root (default [`cache_dir`]).
    pub cache: PathBuf,
    /// Kernel source tarball (default [`source::DEFAULT_TARBALL`]).
    pub tarball: PathBuf,
    /// Parallel make jobs (default: number of CPUs).
    pub jobs: usize,
    /// Build into a fresh output directory, ignoring cached artifacts and
    /// object files (used to check reproducibility).
    pub clean: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            cache: cache_dir(),
            tarball: PathBuf::from(source::DEFAULT_TARBALL),
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            clean: false,
        }
    }
}

/// A built kernel.
#[derive(Debug, Clone)]
pub struct KernelArtifacts {
    /// Compressed kernel for the 64-bit boot protocol.
    pub bzimage: PathBuf,
    /// ELF kernel with the PVH entry note, debug info stripped (BTF kept).
    pub vmlinux: PathBuf,
    /// The final `.config`.
    pub config: PathBuf,
    /// Kernel release, e.g. `6.12.117`.
    pub version: String,
    /// Cache key (hash of source, config fragment and patches).
    pub key: String,
    /// sha256 of `bzimage`.
    pub bzimage_sha256: String,
    /// True if this call found the artifacts in the cache.
    pub cache_hit: bool,
}

/// The cache key for a (tarball, fragment, series) triple.
pub fn cache_key(tarball_sha: &str, fragment: &str, series: &Series) -> String {
    let mut h = Sha256::new();
    // Bump when the build recipe (environment, flags) changes the output.
    h.update(b"milk-kernel-v2\0");
    h.update(tarball_sha.as_bytes());
    h.update([0]);
    h.update(fragment.as_bytes());
    h.update([0]);
    h.update(series.digest().as_bytes());
    hex(&h.finalize())[..24].to_string()
}

/// An exclusive lock on a file, released on drop (the cache's kernel build lock,
/// shared with the L1 host kernel build).
pub struct FileLock(fs::File);

impl FileLock {
    /// Blocks until the lock on `path` (created if missing) is granted.
    pub fn acquire(path: &Path) -> Result<Self, Error> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let f = fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // SAFETY: flock on a file descriptor we own; it blocks until granted.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if r != 0 {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking a descriptor we own; errors are harmless here.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn read_info(dir: &Path) -> Option<(String, String)> {
    let text = fs::read_to_string(dir.join("info")).ok()?;
    let mut version = None;
    let mut sha = None;
    for l in text.lines() {
        if let Some(v) = l.strip_prefix("version=") {
            version = Some(v.to_string());
        } else if let Some(v) = l.strip_prefix("bzimage_sha256=") {
            sha = Some(v.to_string());
        }
    }
    Some((version?, sha?))
}

fn artifacts_in(dir: &Path, key: &str, cache_hit: bool) -> Option<KernelArtifacts> {
    let (version, bzimage_sha256) = read_info(dir)?;
    let a = KernelArtifacts {
        bzimage: dir.join("bzImage"),
        vmlinux: dir.join("vmlinux"),
        config: dir.join("config"),
        version,
        key: key.to_string(),
        bzimage_sha256,
        cache_hit,
    };
    (a.bzimage.is_file() && a.vmlinux.is_file() && a.config.is_file()).then_some(a)
}

/// Builds the guest kernel (or finds it in the cache) with default options.
pub fn ensure_built() -> Result<KernelArtifacts, Error> {
    build(&BuildOptions::default())
}

/// Builds the guest kernel as `opts` says.
pub fn build(opts: &BuildOptions) -> Result<KernelArtifacts, Error> {
    let fragment_text =
        fs::read_to_string(fragment_path()).map_err(|e| Error::io(&fragment_path(), e))?;
    let fragment = KConfig::parse(&fragment_text)?;
    let series = Series::load(&patches_dir())?;
    let lock = KernelLock::load(&lock_path())?;

    if !opts.tarball.exists() {
        host_deps::ensure()?;
    }
    let tarball_sha = source::tarball_sha256(&opts.tarball, &opts.cache)?;
    let key = cache_key(&tarball_sha, &fragment_text, &series);
    let out_dir = opts.cache.join("kernels").join(&key);
    if !opts.clean {
        if let Some(a) = artifacts_in(&out_dir, &key, true) {
            log::info!("kernel {} cache hit ({key})", a.version);
            return Ok(a);
        }
    }

    host_deps::ensure()?;
    let _lock = FileLock::acquire(&opts.cache.join("kernel-build.lock"))?;
    // Someone else may have built it while we waited for the lock.
    if !opts.clean {
        if let Some(a) = artifacts_in(&out_dir, &key, true) {
            return Ok(a);
        }
    }
    if tarball_sha != lock.source_sha256 {
        log::warn!(
            "{} (sha256 {}) is not the source kernel.lock pins ({}, sha256 {}); building anyway",
            opts.tarball.display(),
            &tarball_sha[..12],
            lock.version,
            &lock.source_sha256[..12]
        );
    }

    let short = &tarball_sha[..12];
    let src = opts.cache.join("src").join(format!("linux-{short}"));
    if !src.join("Makefile").exists() {
        source::extract(&opts.tarball, &src)?;
    }
    let version = source::tree_version(&src)?;
    if patches::sync(&src, &series)? {
        log::info!("kernel source now carries {} patches", series.patches.len());
    }

    let build_dir = if opts.clean {
        let d = opts.cache.join("build").join(format!("clean-{key}"));
        if d.exists() {
            fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        d
    } else {
        opts.cache.join("build").join(format!("linux-{short}"))
    };
    fs::create_dir_all(&build_dir).map_err(|e| Error::io(&build_dir, e))?;
    fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let log_path = out_dir.join("build.log");
    let _ = fs::remove_file(&log_path);

    configure(&src, &build_dir, &fragment, &fragment_text, &log_path)?;
    eprintln!(
        "[kernel] building Linux {version} with {} patches (about 5 min on 2 cores from scratch; log: {})",
        series.patches.len(),
        log_path.display()
    );
    make::run(
        &src,
        &build_dir,
        &[format!("-j{}", opts.jobs.max(1)), "bzImage".to_string()],
        &log_path,
        "kernel",
    )?;

    let bz = build_dir.join("arch/x86/boot/bzImage");
    let tmp_vmlinux = out_dir.join("vmlinux.partial");
    run_tool(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(build_dir.join("vmlinux"))
            .arg(&tmp_vmlinux),
        "objcopy",
    )?;
    fs::rename(&tmp_vmlinux, out_dir.join("vmlinux")).map_err(|e| Error::io(&out_dir, e))?;
    fs::copy(&bz, out_dir.join("bzImage")).map_err(|e| Error::io(&bz, e))?;
    fs::copy(build_dir.join(".config"), out_dir.join("config"))
        .map_err(|e| Error::io(&out_dir, e))?;
    let bz_sha = source::sha256_file(&out_dir.join("bzImage"))?;
    // `info` is written last: its presence marks a complete entry.
    let info = format!(
        "version={version}\nbzimage_sha256={bz_sha}\nkey={key}\nsource_sha256={tarball_sha}\n"
    );
    fs::write(out_dir.join("info"), info).map_err(|e| Error::io(&out_dir, e))?;
    if opts.clean {
        fs::remove_dir_all(&build_dir).map_err(|e| Error::io(&build_dir, e))?;
    }
    eprintln!(
        "[kernel] Linux {version} ready: {} (sha256 {})",
        out_dir.display(),
        &bz_sha[..16]
    );
    artifacts_in(&out_dir, &key, false).ok_or_else(|| {
        Error::Build(format!(
            "{}: artifacts missing after build",
            out_dir.display()
        ))
    })
}

/// Generates `.config` (tinyconfig + fragment + olddefconfig) when the
/// fragment changed, and checks that every requested option survived.
fn configure(
    src: &Path,
    build_dir: &Path,
    fragment: &KConfig,
    fragment_text: &str,
    log: &Path,
) -> Result<(), Error> {
    let stamp = build_dir.join(".milk-fragment");
    let dot_config = build_dir.join(".config");
    let current = fs::read_to_string(&stamp).ok();
    if current.as_deref() != Some(fragment_text) || !dot_config.exists() {
        eprintln!(
            "[kernel] configuring: tinyconfig + {}",
            fragment_path().display()
        );
        make::run(src, build_dir, &["tinyconfig".to_string()], log, "config")?;
        let frag_copy = build_dir.join("milk.config");
        fs::write(&frag_copy, fragment_text).map_err(|e| Error::io(&frag_copy, e))?;
        run_tool(
            Command::new(src.join("scripts/kconfig/merge_config.sh"))
                .arg("-m")
                .arg("-O")
                .arg(build_dir)
                .arg(&dot_config)
                .arg(&frag_copy)
                .current_dir(src),
            "merge_config.sh",
        )?;
        make::run(src, build_dir, &["olddefconfig".to_string()], log, "config")?;
        fs::write(&stamp, fragment_text).map_err(|e| Error::io(&stamp, e))?;
    }
    let full = KConfig::load(&dot_config)?;
    let bad = full.violations(fragment);
    if !bad.is_empty() {
        // Force a fresh configure next time.
        let _ = fs::remove_file(&stamp);
        return Err(Error::Config(format!(
            "olddefconfig dropped options the fragment asks for:\n  {}",
            bad.join("\n  ")
        )));
    }
    Ok(())
}

fn run_tool(cmd: &mut Command, name: &str) -> Result<(), Error> {
    let out = cmd
        .output()
        .map_err(|e| Error::Tool(name.into(), e.to_string()))?;
    if !out.status.success() {
        return Err(Error::Tool(
            name.into(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_depends_on_every_input() {
        let s1 = Series::default();
        let s2 = Series {
            patches: vec![patches::Patch {
                name: "1.patch".into(),
                text: "x".into(),
            }],
        };
        let base = cache_key("aa", "CONFIG_A=y\n", &s1);
        assert_eq!(base, cache_key("aa", "CONFIG_A=y\n", &s1));
        assert_ne!(base, cache_key("ab", "CONFIG_A=y\n", &s1));
        assert_ne!(base, cache_key("aa", "CONFIG_A=n\n", &s1));
        assert_ne!(base, cache_key("aa", "CONFIG_A=y\n", &s2));
    }

    #[test]
    fn incomplete_cache_entries_are_not_hits() {
        let d = tempfile::tempdir().unwrap();
        assert!(artifacts_in(d.path(), "k", true).is_none());
        fs::write(d.path().join("info"), "version=6.12.1\nbzimage_sha256=00\n").unwrap();
        assert!(artifacts_in(d.path(), "k", true).is_none());
        for f in ["bzImage", "vmlinux", "config"] {
            fs::write(d.path().join(f), "x").unwrap();
        }
        let a = artifacts_in(d.path(), "k", true).unwrap();
        assert_eq!(a.version, "6.12.1");
        assert!(a.cache_hit);
    }
}
