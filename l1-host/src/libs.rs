//! The shared libraries a dynamically linked binary needs, from `ldd`.
//!
//! milk-vmm is built for the host's glibc (a musl target cannot be
//! installed offline), so the L1 image carries the loader and every library
//! `ldd` resolves, at the paths `ldd` reports.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// Parses `ldd` output into the absolute paths of the loader and the
/// libraries. The vDSO (no path) is skipped; an unresolved library is an
/// error naming it.
pub fn parse_ldd(binary: &Path, text: &str) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(Error::Libs(
                        binary.into(),
                        format!("{} not found", name.trim()),
                    ));
                }
                rest.split(" (").next().unwrap_or_default().trim()
            }
            None => line.split(" (").next().unwrap_or_default().trim(),
        };
        if path.starts_with('/') {
            let p = PathBuf::from(path);
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The loader and libraries `binary` needs (empty for a static binary).
pub fn needed(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| Error::Libs(binary.into(), format!("ldd: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd exits 1 with "not a dynamic executable" for static binaries.
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(Error::Libs(binary.into(), format!("ldd: {}", err.trim())));
    }
    parse_ldd(binary, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_loader_and_libraries() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc5a3f2000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f2)\n";
        let libs = parse_ldd(Path::new("b"), text).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_missing_library_is_named() {
        let e = parse_ldd(Path::new("b"), "\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.to_string().contains("libfoo.so.1 not found"), "{e}");
    }

    #[test]
    fn this_test_binary_resolves() {
        // Test binaries link glibc dynamically: at least libc and the loader.
        let me = std::env::current_exe().unwrap();
        let libs = needed(&me).unwrap();
        assert!(libs.iter().any(|p| p.ends_with("libc.so.6")), "{libs:?}");
        assert!(
            libs.iter()
                .any(|p| p.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
    }
}
