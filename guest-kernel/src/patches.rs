//! The patch series in `guest-kernel/patches/` and applying it to a kernel
//! source tree incrementally.
//!
//! A source tree remembers which series it carries (`.milk-series`) and keeps
//! the original of every file that series touched (`.milk-pristine/`). To
//! move to another series, those originals are put back (files the old series
//! created are removed) and the new series is applied. Only touched files get
//! new modification times, so the kernel's make rebuilds just what changed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::Error;

const STATE_FILE: &str = ".milk-series";
const PRISTINE_DIR: &str = ".milk-pristine";
/// Marker stored in the pristine area for a file the series creates.
const ABSENT_SUFFIX: &str = ".milk-absent";

/// One patch of the series.
#[derive(Debug, Clone)]
pub struct Patch {
    /// File name, e.g. `0001-sched_ext-....patch`.
    pub name: String,
    /// The patch text.
    pub text: String,
}

impl Patch {
    /// Paths (relative to the tree root) the patch modifies, creates or deletes.
    pub fn touched_paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        for line in self.text.lines() {
            let rest = line
                .strip_prefix("--- a/")
                .or_else(|| line.strip_prefix("+++ b/"));
            if let Some(rest) = rest {
                // Unified diffs may carry a tab and a timestamp after the name.
                let path = rest.split('\t').next().unwrap_or(rest).trim_end();
                if !out.iter().any(|p| p == path) {
                    out.push(path.to_string());
                }
            }
        }
        out
    }
}

impl Patch {
    /// The full text of a file this patch creates, or `None` if it does not
    /// create `path`.
    pub fn created_file(&self, path: &str) -> Option<String> {
        let mut lines = self.text.lines();
        let target = format!("+++ b/{path}");
        let mut prev = "";
        for line in lines.by_ref() {
            if line == target && prev == "--- /dev/null" {
                break;
            }
            prev = line;
        }
        if prev != "--- /dev/null" {
            return None;
        }
        let mut out = String::new();
        let mut in_hunk = false;
        for line in lines {
            if line.starts_with("diff --git ") {
                break;
            }
            if line.starts_with("@@ ") {
                in_hunk = true;
            } else if let (true, Some(added)) = (in_hunk, line.strip_prefix('+')) {
                out.push_str(added);
                out.push('\n');
            } else if line == "\\ No newline at end of file" {
                out.pop();
            }
        }
        Some(out)
    }
}

/// The ordered patch series.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Patches in application order (sorted by file name).
    pub patches: Vec<Patch>,
}

impl Series {
    /// Loads every `*.patch` in `dir`, in file-name order.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".patch"))
            .collect();
        names.sort();
        let mut patches = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            patches.push(Patch { name, text });
        }
        Ok(Series { patches })
    }

    /// A hash over the names and contents of all patches.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for p in &self.patches {
            h.update(p.name.as_bytes());
            h.update([0]);
            h.update(p.text.as_bytes());
            h.update([0]);
        }
        hex(&h.finalize())
    }

    /// Every path any patch touches, without duplicates, in first-seen order.
    pub fn touched_paths(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.patches {
            for path in p.touched_paths() {
                if !out.contains(&path) {
                    out.push(path);
                }
            }
        }
        out
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Applies one patch with `patch -p1` in `tree`. With `dry_run`, only checks.
pub fn apply_one(tree: &Path, patch: &Patch, dry_run: bool) -> Result<(), Error> {
    use std::io::Write;
    let mut cmd = Command::new("patch");
    cmd.args([
        "-p1",
        "--forward",
        "--batch",
        "--no-backup-if-mismatch",
        "-s",
    ]);
    if dry_run {
        cmd.arg("--dry-run");
    }
    let mut child = cmd
        .current_dir(tree)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Tool("patch".into(), e.to_string()))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(patch.text.as_bytes())
        .map_err(|e| Error::Tool("patch".into(), e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Tool("patch".into(), e.to_string()))?;
    if !out.status.success() {
        let mut msg = String::from_utf8_lossy(&out.stdout).into_owned();
        msg.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(Error::PatchFailed(
            patch.name.clone(),
            msg.trim().to_string(),
        ));
    }
    Ok(())
}

/// What a source tree says it carries.
fn recorded_state(tree: &Path) -> Option<(String, Vec<String>)> {
    let text = fs::read_to_string(tree.join(STATE_FILE)).ok()?;
    let mut lines = text.lines();
    let digest = lines.next()?.to_string();
    Some((digest, lines.map(str::to_string).collect()))
}

/// Puts back the originals of every file the tree's current series touched.
fn revert(tree: &Path, touched: &[String]) -> Result<(), Error> {
    let pristine = tree.join(PRISTINE_DIR);
    for rel in touched {
        let target = tree.join(rel);
        let saved = pristine.join(rel);
        let absent = PathBuf::from(format!("{}{ABSENT_SUFFIX}", saved.display()));
        if absent.exists() {
            if target.exists() {
                fs::remove_file(&target).map_err(|e| Error::io(&target, e))?;
            }
        } else if saved.exists() {
            // Copy (not rename) so the file gets a fresh mtime and is rebuilt.
            fs::copy(&saved, &target).map_err(|e| Error::io(&target, e))?;
        }
        // Neither: an interrupted run never saved (so never patched) it.
    }
    if pristine.exists() {
        fs::remove_dir_all(&pristine).map_err(|e| Error::io(&pristine, e))?;
    }
    Ok(())
}

/// Saves the original of every file `series` touches, then applies it.
fn apply(tree: &Path, series: &Series) -> Result<(), Error> {
    let pristine = tree.join(PRISTINE_DIR);
    for rel in series.touched_paths() {
        let src = tree.join(&rel);
        let saved = pristine.join(&rel);
        if let Some(parent) = saved.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        if src.exists() {
            fs::copy(&src, &saved).map_err(|e| Error::io(&saved, e))?;
        } else {
            let marker = PathBuf::from(format!("{}{ABSENT_SUFFIX}", saved.display()));
            fs::write(&marker, b"").map_err(|e| Error::io(&marker, e))?;
        }
    }
    for p in &series.patches {
        log::info!("applying {}", p.name);
        apply_one(tree, p, false)?;
    }
    Ok(())
}

/// Brings `tree` to carry exactly `series`. Returns true if anything changed.
pub fn sync(tree: &Path, series: &Series) -> Result<bool, Error> {
    let digest = series.digest();
    let state = recorded_state(tree);
    if let Some((d, _)) = &state {
        if *d == digest {
            return Ok(false);
        }
    }
    // Record an "in progress" state first: if we are interrupted, the next
    // run reverts the union of both series, which is always safe.
    let old_touched = state.map(|(_, t)| t).unwrap_or_default();
    let mut union = old_touched.clone();
    for p in series.touched_paths() {
        if !union.contains(&p) {
            union.push(p);
        }
    }
    let before = snapshot(tree, &union);
    if !old_touched.is_empty() {
        write_state(tree, "reverting", &old_touched)?;
        revert(tree, &old_touched)?;
    }
    write_state(tree, "applying", &union)?;
    apply(tree, series)?;
    restore_unchanged_mtimes(tree, &before)?;
    write_state(tree, &digest, &series.touched_paths())?;
    Ok(true)
}

/// Content and modification time of each existing file among `paths`.
fn snapshot(tree: &Path, paths: &[String]) -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
    paths
        .iter()
        .filter_map(|rel| {
            let p = tree.join(rel);
            let mtime = fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            Some((rel.clone(), fs::read(&p).ok()?, mtime))
        })
        .collect()
}

/// Files that end up with the content they had before keep their old mtime,
/// so switching series rebuilds only what really changed.
fn restore_unchanged_mtimes(
    tree: &Path,
    before: &[(String, Vec<u8>, std::time::SystemTime)],
) -> Result<(), Error> {
    for (rel, content, mtime) in before {
        let p = tree.join(rel);
        if fs::read(&p).is_ok_and(|now| now == *content) {
            let f = fs::File::options()
                .write(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))?;
            f.set_modified(*mtime).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

fn write_state(tree: &Path, digest: &str, touched: &[String]) -> Result<(), Error> {
    let mut text = format!("{digest}\n");
    for t in touched {
        text.push_str(t);
        text.push('\n');
    }
    let path = tree.join(STATE_FILE);
    fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(name: &str, text: &str) -> Patch {
        Patch {
            name: name.into(),
            text: text.into(),
        }
    }

    const MODIFY_A: &str = "--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-one\n+uno\n";
    const CREATE_B: &str = "--- /dev/null\n+++ b/dir/b.txt\n@@ -0,0 +1 @@\n+new\n";

    #[test]
    fn touched_paths_cover_modified_and_created_files() {
        let s = Series {
            patches: vec![patch("1.patch", MODIFY_A), patch("2.patch", CREATE_B)],
        };
        assert_eq!(
            s.touched_paths(),
            vec!["a.txt".to_string(), "dir/b.txt".to_string()]
        );
    }

    #[test]
    fn created_file_is_rebuilt_from_the_hunk() {
        let text = format!(
            "{MODIFY_A}diff --git a/dir/b.txt b/dir/b.txt\nnew file mode 100644\n{CREATE_B}"
        );
        let p = patch("x.patch", &text);
        assert_eq!(p.created_file("dir/b.txt").as_deref(), Some("new\n"));
        assert_eq!(p.created_file("a.txt"), None);
        assert_eq!(p.created_file("missing"), None);
    }

    #[test]
    fn digest_changes_with_content_and_name() {
        let a = Series {
            patches: vec![patch("1.patch", MODIFY_A)],
        };
        let b = Series {
            patches: vec![patch("1.patch", CREATE_B)],
        };
        let c = Series {
            patches: vec![patch("2.patch", MODIFY_A)],
        };
        assert_ne!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        assert_eq!(a.digest(), a.clone().digest());
    }

    #[test]
    fn sync_applies_switches_and_reverts_series() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        fs::write(t.join("a.txt"), "one\n").unwrap();

        let both = Series {
            patches: vec![patch("1.patch", MODIFY_A), patch("2.patch", CREATE_B)],
        };
        assert!(sync(t, &both).unwrap());
        assert_eq!(fs::read_to_string(t.join("a.txt")).unwrap(), "uno\n");
        assert_eq!(fs::read_to_string(t.join("dir/b.txt")).unwrap(), "new\n");
        // Same series again: nothing to do.
        assert!(!sync(t, &both).unwrap());

        // Dropping the first patch restores a.txt; b.txt is recreated.
        let only_b = Series {
            patches: vec![patch("2.patch", CREATE_B)],
        };
        assert!(sync(t, &only_b).unwrap());
        assert_eq!(fs::read_to_string(t.join("a.txt")).unwrap(), "one\n");
        assert!(t.join("dir/b.txt").exists());

        // The empty series gives back the pristine tree.
        assert!(sync(t, &Series::default()).unwrap());
        assert_eq!(fs::read_to_string(t.join("a.txt")).unwrap(), "one\n");
        assert!(!t.join("dir/b.txt").exists());
    }

    #[test]
    fn switching_series_keeps_mtimes_of_files_whose_content_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        fs::write(t.join("a.txt"), "one\n").unwrap();
        let both = Series {
            patches: vec![patch("1.patch", MODIFY_A), patch("2.patch", CREATE_B)],
        };
        sync(t, &both).unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        for f in ["a.txt", "dir/b.txt"] {
            fs::File::options()
                .write(true)
                .open(t.join(f))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        // Same first patch, different second one: a.txt keeps its time.
        const CREATE_C: &str = "--- /dev/null\n+++ b/dir/c.txt\n@@ -0,0 +1 @@\n+c\n";
        let other = Series {
            patches: vec![patch("1.patch", MODIFY_A), patch("2.patch", CREATE_C)],
        };
        sync(t, &other).unwrap();
        let mtime = |f: &str| fs::metadata(t.join(f)).unwrap().modified().unwrap();
        assert_eq!(fs::read_to_string(t.join("a.txt")).unwrap(), "uno\n");
        assert_eq!(mtime("a.txt"), old);
        assert!(!t.join("dir/b.txt").exists());
        assert!(mtime("dir/c.txt") > old);
    }

    #[test]
    fn a_patch_that_does_not_apply_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.txt"), "something else\n").unwrap();
        let s = Series {
            patches: vec![patch("1.patch", MODIFY_A)],
        };
        match sync(dir.path(), &s) {
            Err(Error::PatchFailed(name, _)) => assert_eq!(name, "1.patch"),
            other => panic!("expected PatchFailed, got {other:?}"),
        }
    }
}
