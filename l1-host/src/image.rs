//! The L1 initramfs: a base archive (busybox, the L1 `/init`, milk-vmm,
//! milkctl and milk-policy with their shared libraries) followed by a job archive (the
//! job's files and `/job/steps.sh`). Both are uncompressed newc cpio
//! written by `milk_images::cpio` (fixed order, owners, mtimes): the kernel
//! unpacks concatenated archives in order, an uncompressed one costs no
//! decompression under TCG, and the same inputs give the same bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use milk_images::cpio::{self, Entry, Kind};
use sha2::{Digest, Sha256};

use crate::job::{Job, STEPS_SCRIPT};
use crate::Error;

/// The host binaries the L1 runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// milk-vmm (the binary a test or `cargo build` produced).
    pub milk_vmm: PathBuf,
    /// milkctl, the control-socket client, when it exists.
    pub milkctl: Option<PathBuf>,
    /// milk-policy, the vhost-user policy daemon, when it exists.
    pub milk_policy: Option<PathBuf>,
}

impl Binaries {
    /// milk-vmm at `path`, and milkctl and milk-policy from the same directory if built.
    pub fn beside(milk_vmm: impl Into<PathBuf>) -> Self {
        let milk_vmm = milk_vmm.into();
        let near = |name: &str| {
            let p = milk_vmm.with_file_name(name);
            p.is_file().then_some(p)
        };
        Binaries {
            milkctl: near("milkctl"),
            milk_policy: near("milk-policy"),
            milk_vmm,
        }
    }
}

fn read(p: &Path) -> Result<Vec<u8>, Error> {
    fs::read(p).map_err(|e| Error::io(p, e))
}

/// `binary` without its debug sections (`objcopy --strip-debug`, which is
/// deterministic): a debug build of milk-vmm shrinks from ~100 MB to a few.
fn stripped(binary: &Path) -> Result<Vec<u8>, Error> {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("milk-l1-strip-{}-{seq}", std::process::id()));
    let out = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&tmp)
        .output()
        .map_err(|e| Error::Libs(binary.into(), format!("objcopy: {e}")))?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Libs(
            binary.into(),
            format!("objcopy: {}", String::from_utf8_lossy(&out.stderr).trim()),
        ));
    }
    let bytes = read(&tmp);
    let _ = fs::remove_file(&tmp);
    bytes
}

fn dir(p: &str) -> Entry {
    Entry {
        path: p.into(),
        perm: 0o755,
        kind: Kind::Dir,
    }
}

fn file(p: &str, perm: u32, data: Vec<u8>) -> Entry {
    Entry {
        path: p.trim_start_matches('/').into(),
        perm,
        kind: Kind::File(data),
    }
}

/// Every parent directory of `files`' paths, parents first, each once.
fn parent_dirs(files: &[Entry]) -> Vec<Entry> {
    let mut dirs: Vec<String> = Vec::new();
    for f in files {
        let mut acc = String::new();
        let parts: Vec<&str> = f.path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if !dirs.contains(&acc) {
                dirs.push(acc.clone());
            }
        }
    }
    dirs.sort();
    dirs.iter().map(|d| dir(d)).collect()
}

/// The base archive's entries, in archive order.
pub fn base_entries(bins: &Binaries) -> Result<Vec<Entry>, Error> {
    let mut e: Vec<Entry> = ["bin", "dev", "job", "proc", "run", "sbin", "sys", "tmp"]
        .iter()
        .map(|d| dir(d))
        .collect();
    e.push(Entry {
        path: "dev/console".into(),
        perm: 0o600,
        kind: Kind::CharDev(5, 1),
    });
    e.push(Entry {
        path: "dev/null".into(),
        perm: 0o666,
        kind: Kind::CharDev(1, 3),
    });
    let bb = Path::new(milk_images::BUSYBOX);
    e.push(file("bin/busybox", 0o755, read(bb)?));
    let list = Command::new(bb)
        .arg("--list")
        .output()
        .map_err(|e| Error::io(bb, e))?;
    let mut applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "busybox" && !l.contains('/'))
        .map(str::to_string)
        .collect();
    applets.sort();
    applets.dedup();
    for a in applets {
        e.push(Entry {
            path: format!("bin/{a}"),
            perm: 0o777,
            kind: Kind::Symlink("busybox".into()),
        });
    }
    let mut programs = vec![("milk-vmm", &bins.milk_vmm)];
    if let Some(c) = &bins.milkctl {
        programs.push(("milkctl", c));
    }
    if let Some(p) = &bins.milk_policy {
        programs.push(("milk-policy", p));
    }
    let mut libs: Vec<PathBuf> = Vec::new();
    for (name, path) in &programs {
        e.push(file(&format!("bin/{name}"), 0o755, stripped(path)?));
        for l in crate::libs::needed(path)? {
            if !libs.contains(&l) {
                libs.push(l);
            }
        }
    }
    libs.sort();
    let lib_entries: Vec<Entry> = libs
        .iter()
        .map(|l| Ok(file(&l.to_string_lossy(), 0o755, read(l)?)))
        .collect::<Result<_, Error>>()?;
    e.extend(parent_dirs(&lib_entries));
    e.extend(lib_entries);
    let init = crate::crate_dir().join("init");
    e.push(file("init", 0o755, read(&init)?));
    Ok(e)
}

/// The job archive's entries: `/job/files/*` and `/job/steps.sh`.
pub fn job_entries(job: &Job) -> Result<Vec<Entry>, Error> {
    let mut e = vec![dir("job"), dir("job/files")];
    for f in &job.files {
        e.push(file(&f.l1, 0o644, read(&f.host)?));
    }
    e.push(file(STEPS_SCRIPT, 0o644, job.steps_script().into_bytes()));
    Ok(e)
}

fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    cpio::write_archive(&mut out, entries).expect("writing to memory cannot fail");
    out
}

/// The whole L1 initramfs for `job`: base archive then job archive.
pub fn build(bins: &Binaries, job: &Job) -> Result<Vec<u8>, Error> {
    let mut bytes = archive(&base_entries(bins)?);
    bytes.extend(archive(&job_entries(job)?));
    Ok(bytes)
}

/// Builds the image for `job` into `out`; returns its sha256.
pub fn write(bins: &Binaries, job: &Job, out: &Path) -> Result<String, Error> {
    let bytes = build(bins, job)?;
    let sha = crate::hex(&Sha256::digest(&bytes));
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    fs::write(out, &bytes).map_err(|e| Error::io(out, e))?;
    Ok(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_before_their_files_once() {
        let f = |p: &str| file(p, 0o644, vec![]);
        let d = parent_dirs(&[
            f("lib/x86_64-linux-gnu/libc.so.6"),
            f("lib64/ld.so"),
            f("lib/a"),
        ]);
        let names: Vec<&str> = d.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["lib", "lib/x86_64-linux-gnu", "lib64"]);
    }

    #[test]
    fn init_keeps_the_marker_protocol() {
        use milk_harness::nested::{L1_BOOT, L1_DONE, L1_NOKVM, STEP_BEGIN, STEP_END};
        let init = fs::read_to_string(crate::crate_dir().join("init")).unwrap();
        assert!(init.starts_with("#!/bin/busybox sh\n"));
        for m in [L1_BOOT, L1_DONE, L1_NOKVM, STEP_BEGIN, STEP_END] {
            assert!(init.contains(m), "{m}");
        }
        assert!(init.contains(&format!("echo \"{STEP_BEGIN}id=$id\"")));
        assert!(init.contains(&format!("echo \"{STEP_END}id=$id status=$st\"")));
        assert!(init.contains(&format!("echo \"{STEP_END}id=$id\" >&3")));
        assert!(init.contains(&format!(". /{STEPS_SCRIPT}")));
        assert!(init.contains("reboot -f"));
    }
}
