//! rt-tests (`hackbench`, `cyclictest`) for the test initramfs.
//!
//! The binaries come from the Debian package `rt-tests`, installed on the
//! host by [`ensure_installed`] when missing (as the kernel's build tools
//! are, see `milk_guest_kernel::host_deps`). They are dynamically linked, so
//! the image also gets every shared library `ldd` names for them, each at
//! the path the dynamic loader asks for, with the contents of the file that
//! path resolves to on the host. Entries come out sorted, so the same host
//! files always give the same archive members.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use milk_guest_kernel::host_deps::{self, Package};
use sha2::{Digest, Sha256};

use crate::cpio::{Entry, Kind};
use crate::Error;

/// The Debian package, probed by one of its binaries.
pub const PACKAGE: Package = Package {
    name: "rt-tests",
    probe: "/usr/bin/cyclictest",
};

/// The binaries the image gets, as installed by [`PACKAGE`]; each lands in
/// the guest's `/bin` under its file name.
pub const BINARIES: &[&str] = &["/usr/bin/hackbench", "/usr/bin/cyclictest"];

/// Installs [`PACKAGE`] if it is missing (root), or fails with the command to run.
pub fn ensure_installed() -> Result<(), Error> {
    Ok(host_deps::ensure_packages(&[PACKAGE])?)
}

/// The absolute library paths in `ldd` output: `name => /path (addr)` and
/// the loader's own `/path (addr)` line. The vDSO and libraries `ldd` could
/// not find are left out; a missing library is an error the caller reports.
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("{} not found", name.trim()));
                }
                rest
            }
            None => line,
        };
        let path = target.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            out.push(PathBuf::from(path));
        }
    }
    Ok(out)
}

/// The shared libraries `bin` needs, from `ldd`.
pub fn libraries(bin: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| Error::RtTests(format!("ldd {}: {e}", bin.display())))?;
    if !out.status.success() {
        return Err(Error::RtTests(format!(
            "ldd {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| Error::RtTests(format!("{}: {e}", bin.display())))
}

/// Every host file that goes into the image, with its path in the image
/// (binaries in `bin/`, libraries at their own paths), sorted by image path.
pub fn files() -> Result<Vec<(String, PathBuf)>, Error> {
    let mut set = BTreeSet::new();
    for bin in BINARIES {
        let p = Path::new(bin);
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        set.insert((format!("bin/{name}"), p.to_path_buf()));
        for lib in libraries(p)? {
            let in_image = lib.to_string_lossy().trim_start_matches('/').to_string();
            set.insert((in_image, lib));
        }
    }
    Ok(set.into_iter().collect())
}

/// The archive members: the directories the libraries need (parents first),
/// then the files. `have` are the directories the base image already has.
pub fn entries(have: &[&str]) -> Result<Vec<Entry>, Error> {
    let files = files()?;
    let mut dirs = BTreeSet::new();
    for (path, _) in &files {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    // BTreeSet order puts "lib" before "lib/x86_64-linux-gnu".
    let mut e: Vec<Entry> = dirs
        .into_iter()
        .filter(|d| !have.contains(&d.as_str()))
        .map(|d| Entry {
            path: d,
            perm: 0o755,
            kind: Kind::Dir,
        })
        .collect();
    for (path, host) in files {
        // fs::read follows symlinks: the member holds the library itself.
        let data = fs::read(&host).map_err(|source| Error::Io {
            path: host.clone(),
            source,
        })?;
        e.push(Entry {
            path,
            perm: 0o755,
            kind: Kind::File(data),
        });
    }
    Ok(e)
}

/// Feeds every input of [`entries`] (image paths and file contents) to `h`.
pub fn hash_inputs(h: &mut Sha256) -> Result<(), Error> {
    for (path, host) in files()? {
        h.update(path.as_bytes());
        h.update([0]);
        h.update(fs::read(&host).map_err(|source| Error::Io {
            path: host.clone(),
            source,
        })?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_library_and_loader_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibnuma.so.1 => /lib/x86_64-linux-gnu/libnuma.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libnuma.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_library_ldd_cannot_find_is_an_error() {
        let text = "\tlibnuma.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n";
        assert_eq!(parse_ldd(text).unwrap_err(), "libnuma.so.1 not found");
    }
}
