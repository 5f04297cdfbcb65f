//! `kernel.lock`: the pinned kernel version, source tarball hash and the
//! bzImage hash a clean build of that source reproduces.

use std::path::Path;

use crate::Error;

/// The contents of `guest-kernel/kernel.lock`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelLock {
    /// Kernel release, e.g. `6.12.117`.
    pub version: String,
    /// Debian package and version the tarball came from.
    pub source_package: String,
    /// sha256 of `/usr/src/linux-source-6.12.tar.xz`.
    pub source_sha256: String,
    /// sha256 of the `bzImage` a clean build produces (empty: not recorded).
    pub bzimage_sha256: String,
    /// Cache key (source, config fragment, patches, recipe) that hash is for.
    pub bzimage_key: String,
}

impl KernelLock {
    /// Parses `key = "value"` lines; `#` starts a comment.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut lock = KernelLock::default();
        for (no, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || Error::Lock(format!("line {}: expected key = \"value\"", no + 1));
            let (key, value) = line.split_once('=').ok_or_else(bad)?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .ok_or_else(bad)?
                .to_string();
            match key.trim() {
                "version" => lock.version = value,
                "source_package" => lock.source_package = value,
                "source_sha256" => lock.source_sha256 = value,
                "bzimage_sha256" => lock.bzimage_sha256 = value,
                "bzimage_key" => lock.bzimage_key = value,
                other => return Err(Error::Lock(format!("line {}: unknown key {other}", no + 1))),
            }
        }
        if lock.version.is_empty() || lock.source_sha256.is_empty() {
            return Err(Error::Lock("version and source_sha256 are required".into()));
        }
        Ok(lock)
    }

    /// Reads and parses a lock file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_keys_and_comments() {
        let l = KernelLock::parse(
            "# c\nversion = \"6.12.1\"\nsource_package = \"p\"\n\nsource_sha256 = \"ab\"\nbzimage_sha256 = \"\"\nbzimage_key = \"k\"\n",
        )
        .unwrap();
        assert_eq!(l.version, "6.12.1");
        assert_eq!(l.source_package, "p");
        assert_eq!(l.source_sha256, "ab");
        assert_eq!(l.bzimage_sha256, "");
        assert_eq!(l.bzimage_key, "k");
    }

    #[test]
    fn rejects_unquoted_unknown_and_incomplete() {
        assert!(KernelLock::parse("version = 6\nsource_sha256 = \"a\"").is_err());
        assert!(KernelLock::parse("version = \"6\"\nsource_sha256 = \"a\"\nx = \"1\"").is_err());
        assert!(KernelLock::parse("version = \"6\"").is_err());
    }

    #[test]
    fn the_checked_in_lock_parses() {
        let l = KernelLock::load(&crate::crate_dir().join("kernel.lock")).unwrap();
        assert!(l.version.starts_with("6.12."), "{}", l.version);
        assert_eq!(l.source_sha256.len(), 64);
    }
}
