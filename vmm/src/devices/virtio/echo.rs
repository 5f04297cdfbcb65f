//! "echo": a small test device for the virtio-mmio transport.
//!
//! One queue. For every descriptor chain, the device reads the
//! driver-readable buffers, upper-cases ASCII letters and writes the result
//! into the chain's device-writable buffers; the used length is the number of
//! bytes written. The config space is a read-only `max_len: u32` followed by a
//! driver-writable `scratch: u32`. Everything the device sees is recorded in
//! [`EchoStats`] so tests can check the guest's side from the host.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::{ActivateError, Activation, VirtioDevice, VirtioInterrupt};
use crate::memory::GuestMemory;

/// Device ID of the echo device (not a registered virtio ID; Linux leaves it
/// unbound).
pub const ECHO_DEVICE_ID: u32 = 0x7e57;
/// Queue size.
pub const ECHO_QUEUE_SIZE: u16 = 16;
/// Feature bit 0: the device upper-cases (offered; the test guest accepts it).
pub const ECHO_F_UPPER: u64 = 1 << 0;
/// Feature bit 1: offered but never needed (the test guest declines it).
pub const ECHO_F_UNUSED: u64 = 1 << 1;
/// Largest request the device handles (bytes).
pub const ECHO_MAX_LEN: u32 = 4096;

/// What the echo device observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchoStats {
    /// Successful activations.
    pub activations: u32,
    /// Resets while active.
    pub resets: u32,
    /// Features acknowledged at the last activation.
    pub acked_features: u64,
    /// Input of every request, in order.
    pub requests: Vec<Vec<u8>>,
    /// Bytes written back in total.
    pub bytes_out: u64,
    /// Interrupts raised.
    pub interrupts: u32,
    /// Last value the driver wrote to `scratch`.
    pub scratch: u32,
}

/// The echo device.
pub struct EchoDevice {
    stats: Arc<Mutex<EchoStats>>,
    active: Option<(GuestMemory, Queue, VirtioInterrupt)>,
    scratch: u32,
}

impl EchoDevice {
    /// New device and a handle on its statistics.
    pub fn new() -> (Self, Arc<Mutex<EchoStats>>) {
        let stats = Arc::new(Mutex::new(EchoStats::default()));
        (
            EchoDevice {
                stats: stats.clone(),
                active: None,
                scratch: 0,
            },
            stats,
        )
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, EchoStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn transform(input: &[u8]) -> Vec<u8> {
    input.iter().map(|b| b.to_ascii_uppercase()).collect()
}

impl VirtioDevice for EchoDevice {
    fn device_type(&self) -> u32 {
        ECHO_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![ECHO_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        ECHO_F_UPPER | ECHO_F_UNUSED
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..4].copy_from_slice(&ECHO_MAX_LEN.to_le_bytes());
        cfg[4..].copy_from_slice(&self.scratch.to_le_bytes());
        let off = offset as usize;
        match cfg.get(off..off.saturating_add(data.len())) {
            Some(src) => data.copy_from_slice(src),
            None => {
                log::warn!("echo: config read out of range at {offset}");
                data.fill(0);
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset != 4 || data.len() != 4 {
            log::warn!(
                "echo: ignoring config write at {offset} ({} bytes)",
                data.len()
            );
            return;
        }
        self.scratch = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.stats().scratch = self.scratch;
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let q = a
            .queues
            .into_iter()
            .next()
            .ok_or_else(|| ActivateError::BadQueues("no queue".into()))?;
        if !q.ready() {
            return Err(ActivateError::BadQueues("queue 0 not ready".into()));
        }
        {
            let mut s = self.stats();
            s.activations += 1;
            s.acked_features = a.acked_features;
        }
        self.active = Some((a.mem, q, a.interrupt));
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.scratch = 0;
        self.stats().resets += 1;
    }

    fn process_queue(&mut self, queue_index: usize) {
        let Some((mem, queue, irq)) = self.active.as_mut() else {
            return;
        };
        if queue_index != 0 {
            return;
        }
        let mut used_any = false;
        let mut requests = Vec::new();
        let mut bytes_out = 0u64;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let mut input = Vec::new();
            let mut outputs = Vec::new();
            let mut broken = false;
            for desc in chain.clone() {
                if desc.is_write_only() {
                    outputs.push((desc.addr(), desc.len() as usize));
                } else {
                    let len = desc.len().min(ECHO_MAX_LEN - input.len() as u32) as usize;
                    let mut buf = vec![0u8; len];
                    if mem.read_slice(&mut buf, desc.addr()).is_err() {
                        broken = true;
                        break;
                    }
                    input.extend_from_slice(&buf);
                }
            }
            let mut written = 0usize;
            if !broken {
                let out = transform(&input);
                for (addr, len) in outputs {
                    let n = len.min(out.len() - written);
                    if n == 0 {
                        break;
                    }
                    if !mem.check_range(addr, n)
                        || mem.write_slice(&out[written..written + n], addr).is_err()
                    {
                        log::warn!("echo: writable buffer outside guest memory");
                        break;
                    }
                    written += n;
                }
            } else {
                log::warn!("echo: readable buffer outside guest memory");
            }
            if let Err(e) = queue.add_used(&*mem, head, written as u32) {
                log::warn!("echo: add_used failed: {e:?}");
                continue;
            }
            bytes_out += written as u64;
            requests.push(input);
            used_any = true;
        }
        if used_any {
            let notify = queue.needs_notification(&*mem).unwrap_or(true);
            let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.requests.extend(requests);
            s.bytes_out += bytes_out;
            if notify {
                if let Err(e) = irq.signal_used_queue(0) {
                    log::warn!("echo: interrupt failed: {e}");
                } else {
                    s.interrupts += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transform_uppercases_ascii_only() {
        assert_eq!(transform(b"hello, milk 42!"), b"HELLO, MILK 42!");
        assert_eq!(transform(&[0xe9, b'a']), vec![0xe9, b'A']);
    }

    #[test]
    fn config_space() {
        let (mut d, stats) = EchoDevice::new();
        let mut b = [0u8; 4];
        d.read_config(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), ECHO_MAX_LEN);
        d.write_config(4, &7u32.to_le_bytes());
        d.read_config(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 7);
        assert_eq!(stats.lock().unwrap().scratch, 7);
        // Read-only field and out-of-range accesses are ignored.
        d.write_config(0, &1u32.to_le_bytes());
        d.read_config(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), ECHO_MAX_LEN);
        let mut big = [0xffu8; 4];
        d.read_config(6, &mut big);
        assert_eq!(big, [0; 4]);
    }
}
