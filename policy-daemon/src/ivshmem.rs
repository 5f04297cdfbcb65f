//! The QEMU engine's side (cargo feature `ivshmem`): virtio-milk over the ivshmem
//! transport with the rings served by a `milk-policy` daemon.
//!
//! [`VhostUserIvshmem`] is a `milk_ivshmem` [`Backend`]: at DRIVER_OK it hands the daemon
//! the guest-RAM file QEMU runs on (`memory-backend-file,share=on`), the ring addresses,
//! each queue's doorbell eventfd (host vector `1 + q`) as kick and the guest's MSI-X
//! eventfd of the same vector as call, so the daemon interrupts the guest through QEMU
//! directly, with no relay in between. Supervision, reconnection and planned swaps are the
//! [`MilkFrontend`]'s, reachable through [`VhostUserIvshmem::handle`].

use std::path::{Path, PathBuf};

use milk_ivshmem::backend::{Activation, Backend, BackendError};
use milk_ivshmem::device::DeviceInfo;
use milk_ivshmem::milk::MILK_VENDOR_ID;
use virtio_milk::protocol::VIRTIO_ID_MILK;
use virtio_milk::queue::QueueConfig;

use crate::frontend::{DeviceSetup, FrontendError, FrontendSlot, Link, MilkFrontend, RingSetup};

/// virtio-milk on the ivshmem transport, served by a daemon. See the module docs.
pub struct VhostUserIvshmem {
    path: PathBuf,
    num_cpus: u32,
    features: u64,
    config: Vec<u8>,
    idle: Option<Link>,
    slot: FrontendSlot,
}

impl VhostUserIvshmem {
    /// Connect to the daemon at `path` for a guest of `num_cpus` CPUs.
    pub fn new(path: &Path, num_cpus: u32) -> Result<Self, FrontendError> {
        let link = Link::connect(path, num_cpus as usize * 2)?;
        let daemon = link.num_cpus().unwrap_or(0);
        if daemon != num_cpus {
            return Err(FrontendError::Incompatible(format!(
                "daemon serves {daemon} cpus, the guest has {num_cpus}"
            )));
        }
        Ok(VhostUserIvshmem {
            path: path.to_owned(),
            num_cpus,
            features: link.device_features(),
            config: link.config().to_vec(),
            idle: Some(link),
            slot: FrontendSlot::default(),
        })
    }

    /// What the transport publishes: the daemon's features and config space.
    pub fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            device_id: VIRTIO_ID_MILK,
            vendor_id: MILK_VENDOR_ID,
            features: self.features,
            config: self.config.clone(),
            num_queues: (self.num_cpus * 2) as u16,
            queue_max: 256,
        }
    }

    /// Swap and status handle.
    pub fn handle(&self) -> FrontendSlot {
        self.slot.clone()
    }
}

impl Backend for VhostUserIvshmem {
    fn activate(&mut self, a: Activation) -> Result<(), BackendError> {
        let n = self.num_cpus as usize * 2;
        let complete = a.queues.len() == n
            && a.queues
                .iter()
                .enumerate()
                .all(|(i, q)| usize::from(q.index) == i);
        if !complete {
            return Err(format!("virtio-milk needs all {n} queues ready").into());
        }
        let mut rings = Vec::with_capacity(n);
        for q in a.queues {
            let call = a
                .interrupts
                .vector_fd(q.index + 1)
                .ok_or("no interrupt vector for a queue")?
                .try_clone()?;
            rings.push(RingSetup {
                cfg: QueueConfig {
                    size: q.config.size,
                    desc_table: q.config.desc,
                    avail_ring: q.config.driver,
                    used_ring: q.config.device,
                },
                kick: q.kick,
                call,
            });
        }
        let dev = DeviceSetup {
            mem: a.memory,
            acked_features: a.features,
            rings,
        };
        let fe = match self.idle.take() {
            Some(link) => MilkFrontend::start_on(link, dev, true)?,
            None => MilkFrontend::start(&self.path, dev)?,
        };
        self.slot.set(fe);
        log::info!(
            "virtio-milk: rings handed to the policy daemon at {}",
            self.path.display()
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(fe) = self.slot.take() {
            self.idle = fe.detach();
        }
    }
}
