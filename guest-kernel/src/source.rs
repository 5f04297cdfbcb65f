//! The kernel source: Debian's tarball, its hash, and an extracted tree.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::patches::hex;
use crate::Error;

/// Where Debian's `linux-source-6.12` puts the tarball.
pub const DEFAULT_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// sha256 of the tarball, remembered in `stamp_dir` by (path, size, mtime,
/// inode) so a cache hit does not rehash 150 MB.
pub fn tarball_sha256(tarball: &Path, stamp_dir: &Path) -> Result<String, Error> {
    let md = fs::metadata(tarball).map_err(|e| Error::io(tarball, e))?;
    let id = format!(
        "{} {} {} {}",
        tarball.display(),
        md.len(),
        md.mtime(),
        md.ino()
    );
    let stamp = stamp_dir.join("tarball.sha256");
    if let Ok(text) = fs::read_to_string(&stamp) {
        if let Some((sum, rest)) = text.trim_end().split_once(' ') {
            if rest == id && sum.len() == 64 {
                return Ok(sum.to_string());
            }
        }
    }
    let sum = sha256_file(tarball)?;
    fs::create_dir_all(stamp_dir).map_err(|e| Error::io(stamp_dir, e))?;
    fs::write(&stamp, format!("{sum} {id}\n")).map_err(|e| Error::io(&stamp, e))?;
    Ok(sum)
}

/// Reads `VERSION.PATCHLEVEL.SUBLEVEL` from a kernel tree's Makefile.
pub fn tree_version(tree: &Path) -> Result<String, Error> {
    let mk = tree.join("Makefile");
    let text = fs::read_to_string(&mk).map_err(|e| Error::io(&mk, e))?;
    let get = |key: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim_start().trim_start_matches('=').trim().to_string())
    };
    match (get("VERSION"), get("PATCHLEVEL"), get("SUBLEVEL")) {
        (Some(v), Some(p), Some(s)) => Ok(format!("{v}.{p}.{s}")),
        _ => Err(Error::SourceTree(format!(
            "{}: no kernel version",
            mk.display()
        ))),
    }
}

/// Extracts the tarball into `dest` (which must not exist), dropping the
/// tarball's top-level directory. Extraction goes to a sibling temporary
/// directory first, so an interrupted run never leaves a half tree at `dest`.
pub fn extract(tarball: &Path, dest: &Path) -> Result<(), Error> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = tmp_sibling(dest);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    log::info!("extracting {} (about 15 s)", tarball.display());
    let status = Command::new("tar")
        .arg("-xJf")
        .arg(tarball)
        .arg("--strip-components=1")
        .arg("-C")
        .arg(&tmp)
        .status()
        .map_err(|e| Error::Tool("tar".into(), e.to_string()))?;
    if !status.success() {
        return Err(Error::Tool(
            "tar".into(),
            format!("extracting {} failed", tarball.display()),
        ));
    }
    fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
}

fn tmp_sibling(p: &Path) -> PathBuf {
    let mut name = p.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    p.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_comes_from_the_makefile() {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("Makefile"),
            "# SPDX\nVERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 117\nEXTRAVERSION =\n",
        )
        .unwrap();
        assert_eq!(tree_version(d.path()).unwrap(), "6.12.117");
        fs::write(d.path().join("Makefile"), "all:\n").unwrap();
        assert!(tree_version(d.path()).is_err());
    }

    #[test]
    fn tarball_hash_is_remembered_and_invalidated() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("t.tar.xz");
        fs::write(&f, b"abc").unwrap();
        let stamps = d.path().join("stamps");
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(tarball_sha256(&f, &stamps).unwrap(), want);
        assert!(stamps.join("tarball.sha256").exists());
        assert_eq!(tarball_sha256(&f, &stamps).unwrap(), want);
        // A different file (new size) is hashed again.
        fs::write(&f, b"abcd").unwrap();
        assert_ne!(tarball_sha256(&f, &stamps).unwrap(), want);
    }
}
