//! MiLK's guest initramfs: busybox-static, the `/init` in this directory and
//! the static workloads in `workloads/`, packed as a gzip'd newc cpio with
//! fixed ordering, owners and mtimes so two builds give the same bytes.
//!
//! `/init` prints `MILK-BOOT ...` once the system is up, runs the command
//! given as `milk.run="..."` on the kernel command line, prints
//! `MILK-RESULT status=<exit status>` and reboots, which ends the VM.
//!
//! The test image ([`ensure_test_initramfs`]) is the same plus rt-tests
//! (`hackbench`, `cyclictest`) and their shared libraries ([`rt_tests`]).

pub mod cpio;
pub mod rt_tests;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cpio::{Entry, Kind};

/// Where busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Errors from building the image.
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
    /// Compiling a workload failed.
    #[error("building workload {0}: {1}")]
    Workload(String, String),
    /// Host prerequisites are missing.
    #[error(transparent)]
    Host(#[from] milk_guest_kernel::Error),
    /// Collecting rt-tests and its libraries failed.
    #[error("rt-tests: {0}")]
    RtTests(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// This crate's directory (holds `init` and `workloads/`).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A C workload compiled statically into `/bin/<name>`.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Binary name (the source's file stem).
    pub name: String,
    /// Source file.
    pub source: PathBuf,
}

/// Every `workloads/*.c`, sorted by name.
pub fn workloads() -> Result<Vec<Workload>, Error> {
    let dir = crate_dir().join("workloads");
    let mut out: Vec<Workload> = fs::read_dir(&dir)
        .map_err(io(&dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .map(|p| Workload {
            name: p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            source: p,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Compiles one workload with `gcc -static`, returning the binary.
pub fn compile(w: &Workload) -> Result<Vec<u8>, Error> {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("milk-{}-{}-{seq}", w.name, std::process::id()));
    let dir = w.source.parent().unwrap_or(Path::new("."));
    let file = w.source.file_name().unwrap_or_default();
    // Relative source name and -s: no host paths end up in the binary.
    let out = Command::new("gcc")
        .args([
            "-static", "-O2", "-pthread", "-s", "-Wall", "-Wextra", "-Werror", "-o",
        ])
        .arg(&tmp)
        .arg(file)
        .current_dir(dir)
        .output()
        .map_err(|e| Error::Workload(w.name.clone(), format!("gcc: {e}")))?;
    if !out.status.success() {
        return Err(Error::Workload(
            w.name.clone(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let bytes = fs::read(&tmp).map_err(io(&tmp))?;
    let _ = fs::remove_file(&tmp);
    Ok(bytes)
}

fn busybox_applets() -> Result<Vec<String>, Error> {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(io(Path::new(BUSYBOX)))?;
    let mut list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "busybox" && !l.contains('/'))
        .map(str::to_string)
        .collect();
    list.sort();
    list.dedup();
    Ok(list)
}

/// Everything that goes into the image, in archive order.
pub fn entries() -> Result<Vec<Entry>, Error> {
    let dir = |p: &str| Entry {
        path: p.into(),
        perm: 0o755,
        kind: Kind::Dir,
    };
    let mut e = vec![
        dir("bin"),
        dir("dev"),
        Entry {
            path: "dev/console".into(),
            perm: 0o600,
            kind: Kind::CharDev(5, 1),
        },
        Entry {
            path: "dev/null".into(),
            perm: 0o666,
            kind: Kind::CharDev(1, 3),
        },
        dir("proc"),
        dir("sbin"),
        dir("sys"),
        dir("tmp"),
    ];
    let bb = fs::read(BUSYBOX).map_err(io(Path::new(BUSYBOX)))?;
    e.push(Entry {
        path: "bin/busybox".into(),
        perm: 0o755,
        kind: Kind::File(bb),
    });
    for applet in busybox_applets()? {
        e.push(Entry {
            path: format!("bin/{applet}"),
            perm: 0o777,
            kind: Kind::Symlink("busybox".into()),
        });
    }
    for w in workloads()? {
        let bin = compile(&w)?;
        // A workload replaces a busybox applet of the same name.
        e.retain(|x| x.path != format!("bin/{}", w.name));
        e.push(Entry {
            path: format!("bin/{}", w.name),
            perm: 0o755,
            kind: Kind::File(bin),
        });
    }
    let init_path = crate_dir().join("init");
    let init = fs::read(&init_path).map_err(io(&init_path))?;
    e.push(Entry {
        path: "init".into(),
        perm: 0o755,
        kind: Kind::File(init),
    });
    Ok(e)
}

/// Packs `entries` as gzip'd cpio with a fixed gzip header.
pub fn pack(entries: &[Entry]) -> Result<Vec<u8>, Error> {
    let mut raw = Vec::new();
    cpio::write_archive(&mut raw, entries).map_err(io(Path::new("<memory>")))?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(3)
        .write(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&raw).map_err(io(Path::new("<memory>")))?;
    gz.finish().map_err(io(Path::new("<memory>")))
}

/// Builds the initramfs into `out` unconditionally.
pub fn build_to(out: &Path) -> Result<(), Error> {
    write_image(out, &pack(&entries()?)?)
}

fn write_image(out: &Path, bytes: &[u8]) -> Result<(), Error> {
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = out.with_extension("partial");
    fs::write(&tmp, bytes).map_err(io(&tmp))?;
    fs::rename(&tmp, out).map_err(io(out))
}

/// A hash over everything that decides the image's bytes.
pub fn input_key() -> Result<String, Error> {
    let mut h = Sha256::new();
    h.update(b"milk-initramfs-v2\0");
    let init = crate_dir().join("init");
    h.update(fs::read(&init).map_err(io(&init))?);
    h.update(fs::read(BUSYBOX).map_err(io(Path::new(BUSYBOX)))?);
    for w in workloads()? {
        h.update(w.name.as_bytes());
        h.update(fs::read(&w.source).map_err(io(&w.source))?);
    }
    // Headers the workloads share.
    let dir = crate_dir().join("workloads");
    let mut headers: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(io(&dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "h"))
        .collect();
    headers.sort();
    for hdr in headers {
        h.update(hdr.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(fs::read(&hdr).map_err(io(&hdr))?);
    }
    let gcc = Command::new("gcc")
        .arg("--version")
        .output()
        .map_err(io(Path::new("gcc")))?;
    h.update(&gcc.stdout);
    Ok(short_hex(&h.finalize()))
}

fn short_hex(digest: &[u8]) -> String {
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Returns the cached initramfs, building it if its inputs changed.
pub fn ensure_initramfs() -> Result<PathBuf, Error> {
    if !Path::new(BUSYBOX).exists() {
        milk_guest_kernel::host_deps::ensure()?;
    }
    let out = milk_guest_kernel::cache_dir()
        .join("initramfs")
        .join(format!("initramfs-{}.cpio.gz", input_key()?));
    if !out.exists() {
        log::info!("building {}", out.display());
        build_to(&out)?;
    }
    Ok(out)
}

/// The test image's members: [`entries`] plus [`rt_tests::entries`].
pub fn test_entries() -> Result<Vec<Entry>, Error> {
    let mut e = entries()?;
    let have: Vec<String> = e
        .iter()
        .filter(|x| x.kind == Kind::Dir)
        .map(|x| x.path.clone())
        .collect();
    let have: Vec<&str> = have.iter().map(String::as_str).collect();
    let extra = rt_tests::entries(&have)?;
    // rt-tests' binaries replace busybox applets of the same name.
    e.retain(|x| !extra.iter().any(|n| n.path == x.path));
    e.extend(extra);
    Ok(e)
}

/// Builds the test initramfs into `out` unconditionally.
pub fn build_test_to(out: &Path) -> Result<(), Error> {
    write_image(out, &pack(&test_entries()?)?)
}

/// [`input_key`] extended with rt-tests' files.
pub fn test_input_key() -> Result<String, Error> {
    let mut h = Sha256::new();
    h.update(b"milk-test-initramfs-v1\0");
    h.update(input_key()?.as_bytes());
    rt_tests::hash_inputs(&mut h)?;
    Ok(short_hex(&h.finalize()))
}

/// Returns the cached test initramfs (rt-tests included), installing
/// rt-tests and building the image if its inputs changed.
pub fn ensure_test_initramfs() -> Result<PathBuf, Error> {
    if !Path::new(BUSYBOX).exists() {
        milk_guest_kernel::host_deps::ensure()?;
    }
    rt_tests::ensure_installed()?;
    let out = milk_guest_kernel::cache_dir()
        .join("initramfs")
        .join(format!("initramfs-test-{}.cpio.gz", test_input_key()?));
    if !out.exists() {
        log::info!("building {}", out.display());
        build_test_to(&out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_script_keeps_its_protocol() {
        let init = fs::read_to_string(crate_dir().join("init")).unwrap();
        assert!(init.starts_with("#!/bin/busybox sh\n"));
        assert!(init.contains("MILK-RESULT status=$status"));
        assert!(init.contains("milk\\.run="));
        assert!(init.contains("reboot -f"));
    }

    #[test]
    fn workloads_are_found() {
        let w = workloads().unwrap();
        assert!(w.iter().any(|w| w.name == "milk-work"), "{w:?}");
    }
}
