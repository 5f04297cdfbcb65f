//! virtio-milk
