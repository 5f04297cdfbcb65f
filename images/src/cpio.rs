//! A writer for the `newc` cpio format the kernel unpacks as initramfs.
//!
//! Entries are written exactly as given, with fixed inode numbers, owner,
//! and modification time, so the same entries always give the same bytes.

use std::io::{self, Write};

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A symbolic link to the target.
    Symlink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a leading `/`.
    pub path: String,
    /// Permission bits (the file type bits are added from `kind`).
    pub perm: u32,
    /// What it is.
    pub kind: Kind,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

fn pad4(w: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])
}

#[allow(clippy::too_many_arguments)]
fn header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    write!(
        w,
        "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
         {dmaj:08X}{dmin:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
        uid = 0,
        gid = 0,
        mtime = 0,
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    // The 110-byte header plus the name is padded to a multiple of four.
    pad4(w, 110 + namesize)
}

/// Writes `entries` in the given order, then the trailer.
pub fn write_archive(w: &mut impl Write, entries: &[Entry]) -> io::Result<()> {
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let path = e.path.trim_start_matches('/');
        let (mode, data, nlink, rdev): (u32, &[u8], u32, (u32, u32)) = match &e.kind {
            Kind::Dir => (S_IFDIR | e.perm, &[], 2, (0, 0)),
            Kind::File(d) => (S_IFREG | e.perm, d, 1, (0, 0)),
            Kind::Symlink(t) => (S_IFLNK | e.perm, t.as_bytes(), 1, (0, 0)),
            Kind::CharDev(maj, min) => (S_IFCHR | e.perm, &[], 1, (*maj, *min)),
        };
        header(w, ino, mode, nlink, data.len(), rdev, path)?;
        w.write_all(data)?;
        pad4(w, data.len())?;
    }
    header(w, 0, 0, 1, 0, (0, 0), "TRAILER!!!")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_newc() {
        let mut out = Vec::new();
        write_archive(
            &mut out,
            &[Entry {
                path: "/a".into(),
                perm: 0o644,
                kind: Kind::File(b"hello".to_vec()),
            }],
        )
        .unwrap();
        // Header + "a\0" = 112 bytes (already aligned), data 5 + 3 pad.
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[6..14], b"00000001"); // inode
        assert_eq!(&out[14..22], b"000081A4"); // S_IFREG | 0644
        assert_eq!(&out[54..62], b"00000005"); // file size
        assert_eq!(&out[94..102], b"00000002"); // name size
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..117], b"hello");
        assert_eq!(&out[117..120], &[0, 0, 0]);
        let trailer = &out[120..];
        assert!(trailer.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn devices_and_links_carry_their_metadata() {
        let mut out = Vec::new();
        write_archive(
            &mut out,
            &[
                Entry {
                    path: "dev/console".into(),
                    perm: 0o600,
                    kind: Kind::CharDev(5, 1),
                },
                Entry {
                    path: "bin/sh".into(),
                    perm: 0o777,
                    kind: Kind::Symlink("busybox".into()),
                },
            ],
        )
        .unwrap();
        assert_eq!(&out[14..22], b"00002180"); // S_IFCHR | 0600
        assert_eq!(&out[78..86], b"00000005"); // rdevmajor
        assert_eq!(&out[86..94], b"00000001"); // rdevminor
        let second = out.windows(6).skip(1).position(|w| w == b"070701").unwrap() + 1;
        assert_eq!(&out[second + 14..second + 22], b"0000A1FF"); // S_IFLNK | 0777
        assert_eq!(&out[second + 54..second + 62], b"00000007"); // "busybox"
    }

    #[test]
    fn same_entries_same_bytes() {
        let e = vec![Entry {
            path: "x".into(),
            perm: 0o755,
            kind: Kind::Dir,
        }];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_archive(&mut a, &e).unwrap();
        write_archive(&mut b, &e).unwrap();
        assert_eq!(a, b);
    }
}
