//! The 64-byte benchmark message shared by every channel.
//!
//! Layout (little endian): `seq: u64 | send_ns: u64 | flags: u32 | len: u32 |
//! filler: [u8; 32] | check: u64`. The filler is derived from `seq`, and
//! `check` covers the first 56 bytes, so a receiver can tell a complete,
//! uncorrupted message from a torn or stale one.

/// Size of every message on every channel.
pub const MSG_SIZE: usize = 64;
/// Flag: last message of a throughput stream.
pub const FLAG_END: u32 = 1;

const FILLER_OFF: usize = 24;
const FILLER_LEN: usize = 32;
const CHECK_OFF: usize = 56;

/// One benchmark message, kept as raw bytes so channels can move it verbatim.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct Msg(pub [u8; MSG_SIZE]);

/// Why a received message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("bad length field {0}")]
    Len(u32),
    #[error("checksum mismatch for seq {0}")]
    Checksum(u64),
    #[error("corrupt filler for seq {0}")]
    Filler(u64),
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msg")
            .field("seq", &self.seq())
            .field("send_ns", &self.send_ns())
            .field("flags", &self.flags())
            .finish()
    }
}

impl Default for Msg {
    fn default() -> Self {
        Msg([0; MSG_SIZE])
    }
}

fn filler_byte(seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(i as u8) ^ ((seq >> 8) as u8)
}

fn checksum(bytes: &[u8; MSG_SIZE]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in bytes[..CHECK_OFF].chunks_exact(8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        h = (h ^ w).rotate_left(23).wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl Msg {
    /// Builds message `seq`, stamped with `send_ns`.
    pub fn new(seq: u64, send_ns: u64, flags: u32) -> Self {
        let mut b = [0u8; MSG_SIZE];
        b[0..8].copy_from_slice(&seq.to_le_bytes());
        b[8..16].copy_from_slice(&send_ns.to_le_bytes());
        b[16..20].copy_from_slice(&flags.to_le_bytes());
        b[20..24].copy_from_slice(&(MSG_SIZE as u32).to_le_bytes());
        for i in 0..FILLER_LEN {
            b[FILLER_OFF + i] = filler_byte(seq, i);
        }
        let c = checksum(&b);
        b[CHECK_OFF..].copy_from_slice(&c.to_le_bytes());
        Msg(b)
    }

    /// Copies a message out of a byte slice of at least 64 bytes.
    pub fn from_slice(s: &[u8]) -> Option<Self> {
        let b: [u8; MSG_SIZE] = s.get(..MSG_SIZE)?.try_into().ok()?;
        Some(Msg(b))
    }

    fn u64_at(&self, off: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.0[off..off + 8]);
        u64::from_le_bytes(w)
    }

    fn u32_at(&self, off: usize) -> u32 {
        let mut w = [0u8; 4];
        w.copy_from_slice(&self.0[off..off + 4]);
        u32::from_le_bytes(w)
    }

    pub fn seq(&self) -> u64 {
        self.u64_at(0)
    }

    pub fn send_ns(&self) -> u64 {
        self.u64_at(8)
    }

    pub fn flags(&self) -> u32 {
        self.u32_at(16)
    }

    pub fn is_end(&self) -> bool {
        self.flags() & FLAG_END != 0
    }

    /// Checks length, filler and checksum.
    pub fn verify(&self) -> Result<(), MsgError> {
        let len = self.u32_at(20);
        if len as usize != MSG_SIZE {
            return Err(MsgError::Len(len));
        }
        let seq = self.seq();
        if checksum(&self.0) != self.u64_at(CHECK_OFF) {
            return Err(MsgError::Checksum(seq));
        }
        for i in 0..FILLER_LEN {
            if self.0[FILLER_OFF + i] != filler_byte(seq, i) {
                return Err(MsgError::Filler(seq));
            }
        }
        Ok(())
    }

    pub fn as_bytes(&self) -> &[u8; MSG_SIZE] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_fields() {
        let m = Msg::new(42, 1234, FLAG_END);
        assert_eq!(m.seq(), 42);
        assert_eq!(m.send_ns(), 1234);
        assert!(m.is_end());
        assert_eq!(m.verify(), Ok(()));
    }

    #[test]
    fn detects_any_flipped_byte() {
        let m = Msg::new(7, 99, 0);
        for i in 0..MSG_SIZE {
            let mut bad = m;
            bad.0[i] ^= 0x40;
            assert!(bad.verify().is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn filler_differs_between_seqs() {
        assert_ne!(Msg::new(1, 0, 0).0[24..56], Msg::new(2, 0, 0).0[24..56]);
    }
}
