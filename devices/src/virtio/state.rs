//! The transport's part of every device's saved state: plain, serializable data. It is
//! untrusted on restore (it may come over the network), so the transport validates it.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// One queue as the driver configured it and as far as the device has used it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver wrote 1 to QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available ring entry the device will read.
    pub next_avail: u16,
    /// Next used ring entry the device will write.
    pub next_used: u16,
}

impl QueueSnapshot {
    /// Captures `queue`.
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }

    /// Rebuilds a queue, checking sizes and ring alignment.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: false,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Everything the guest programmed through the virtio-mmio registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// virtio device id, checked against the device on restore.
    pub device_type: u32,
    /// Features the device offered (with `VIRTIO_F_VERSION_1`), checked on restore.
    pub device_features: u64,
    /// Features the driver wrote (negotiated once `FEATURES_OK` is set).
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue, in order.
    pub queues: Vec<QueueSnapshot>,
}
