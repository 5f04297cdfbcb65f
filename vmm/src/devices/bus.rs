//! Port-I/O and MMIO buses: map address ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`].
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing one.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// Zero-length range.
    #[error("empty bus range at {0:#x}")]
    Empty(u64),
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address ranges -> devices. Cloning shares the devices.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// Empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base+len)` to `dev`.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((b, (l, _))) = self.devices.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (l, dev)) = self.devices.range(..=addr).next_back()?;
        let off = addr - base;
        if off.checked_add(len as u64)? <= *l {
            Some((off, dev))
        } else {
            None
        }
    }

    /// Routes a read; returns false (leaving `data` untouched) when nothing is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false when nothing is mapped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Rec::default()));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x104, &mut d));
        assert_eq!(d, [4, 4]);
        assert!(bus.write(0x10f, &[9]));
        assert_eq!(a.lock().unwrap().last, vec![(0xf, vec![9])]);
        // Straddling the end or outside: unmapped.
        assert!(!bus.write(0x10f, &[1, 2]));
        assert!(!bus.read(0xff, &mut d));
        assert!(!bus.read(0x110, &mut d));
    }

    #[test]
    fn rejects_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Rec::default()));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(a.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(a.clone(), 0xf0, 0x11).is_err());
        assert!(bus.insert(a.clone(), 0x110, 0x10).is_ok());
        assert!(bus.insert(a.clone(), 0xf0, 0x10).is_ok());
        assert_eq!(bus.insert(a.clone(), 0x500, 0), Err(BusError::Empty(0x500)));
        assert!(bus.insert(a, u64::MAX, 2).is_err());
    }
}
