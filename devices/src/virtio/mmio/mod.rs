//! The virtio-mmio transport, version 2 (virtio 1.x "modern" only): the register file a guest
//! programs (features, status, queues, interrupts, config space at 0x100) in front of a
//! [`VirtioDevice`], with hooks for ioeventfd (QueueNotify at [`NOTIFY_OFFSET`]) and irqfd.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};

use super::device::{DeviceError, Queues, VirtioDevice};
use super::interrupt::Interrupt;
use super::metrics::DeviceMetrics;
use super::state::{QueueSnapshot, TransportState};
use super::GuestMemoryMmap;

/// Length of a virtio-mmio device's register window (registers, then config space at 0x100).
pub const MMIO_LEN: u64 = 0x200;
/// Offset of QueueNotify: register an ioeventfd at `base + NOTIFY_OFFSET` per queue, 4 bytes,
/// with the queue index as datamatch.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
const CONFIG_OFFSET: u64 = 0x100;

mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

pub(crate) const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub(crate) const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
pub(crate) const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub(crate) const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
pub(crate) const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
pub(crate) const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// The statuses a driver steps through, in order (each adds one bit).
const LADDER: [u32; 4] = [
    ACK,
    ACK | DRIVER,
    ACK | DRIVER | FEATURES_OK,
    ACK | DRIVER | FEATURES_OK | DRIVER_OK,
];

/// `VIRTIO_F_VERSION_1` as a feature mask.
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

/// The kernel command-line entry announcing a device at `base` on interrupt `irq` to Linux
/// kernels built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`.
pub fn cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device={MMIO_LEN}@{base:#x}:{irq}")
}

/// Errors from building a transport or restoring one from saved state.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A device declared a queue size virtio does not allow.
    #[error("queue {index}: invalid maximum size {size}")]
    MaxSize { index: usize, size: u16 },
    /// The state belongs to another kind of device.
    #[error("state is for device type {found}, not {expected}")]
    DeviceType { expected: u32, found: u32 },
    /// The state was saved by a device offering other features.
    #[error("state offers features {found:#x}, the device offers {expected:#x}")]
    Features { expected: u64, found: u64 },
    /// The state has another number of queues.
    #[error("state has {found} queues, the device has {expected}")]
    QueueCount { expected: usize, found: usize },
    /// A saved queue is not a valid queue of this device.
    #[error("state queue {index}: {reason}")]
    Queue { index: usize, reason: String },
    /// A status the transport never reaches, or an unexpected interrupt status.
    #[error("state status {status:#x} / interrupt status {interrupt:#x} is not reachable")]
    Status { status: u32, interrupt: u32 },
    /// The restored device could not be activated.
    #[error("activating the restored device: {0}")]
    Activate(#[from] DeviceError),
}

/// A virtio device behind the virtio-mmio register file.
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
    metrics: Arc<DeviceMetrics>,
}

impl<D> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("interrupt_status", &self.interrupt_status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind a fresh transport that reaches guest memory through `mem` and
    /// raises its interrupt through `interrupt`.
    pub fn new(
        device: D,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| Queue::new(size).map_err(|_| MmioError::MaxSize { index, size }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
            metrics: Arc::default(),
        })
    }

    /// The device's request counters (shared: read them while the device runs).
    pub fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (for backend work outside queue processing).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Number of queues (one ioeventfd each).
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The interrupt status register (bit 0 used buffers, bit 1 config change).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// The driver set `DRIVER_OK` and the device has not failed since.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features the device offers, as the driver reads them.
    pub fn offered_features(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    /// Handles a notification for queue `index` (QueueNotify written, or its ioeventfd fired).
    /// Ignored, with a log line, before `DRIVER_OK` or for a queue that is not ready.
    pub fn process_queue(&mut self, index: usize) {
        if !self.activated {
            log::debug!("virtio: notify for queue {index} while the device is not active");
            return;
        }
        if !self.queues.get(index).is_some_and(|q| q.ready()) {
            log::debug!("virtio: notify for queue {index}, which is not ready");
            return;
        }
        self.with_device(|dev, queues| dev.process_queue(index, queues));
    }

    /// Processes every ready queue, as after activation or a restore (catches notifications
    /// that arrived while nobody listened).
    pub fn process_all_queues(&mut self) {
        for index in 0..self.queues.len() {
            self.process_queue(index);
        }
    }

    /// Runs `f` on the active device with its queues (the net device's tap reads go through
    /// here), then interrupts the guest if a used ring advanced. `None` when the device is not
    /// active or `f` failed, in which case the device now needs a reset.
    pub fn with_device<R>(
        &mut self,
        f: impl FnOnce(&mut D, &mut Queues<'_>) -> Result<R, DeviceError>,
    ) -> Option<R> {
        if !self.activated {
            return None;
        }
        let before: Vec<u16> = self.queues.iter().map(|q| q.next_used()).collect();
        let result = f(
            &mut self.device,
            &mut Queues {
                mem: &self.mem,
                queues: &mut self.queues,
                metrics: &self.metrics,
            },
        );
        self.signal_used(&before);
        match result {
            Ok(r) => Some(r),
            Err(e) => {
                self.needs_reset(&e.to_string());
                None
            }
        }
    }

    /// Tells the driver the configuration space changed.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn features_acceptable(&self, features: u64) -> bool {
        features & F_VERSION_1 != 0 && features & !self.offered_features() == 0
    }

    /// The first ready queue whose rings are not inside guest memory (or whose available ring
    /// sits at address 0, which virtio-queue takes for an unconfigured queue).
    fn invalid_queue(&self) -> Option<usize> {
        self.queues
            .iter()
            .position(|q| q.ready() && (q.avail_ring() == 0 || !q.is_valid(&self.mem)))
    }

    fn raise(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        let result = if bit == VIRTIO_MMIO_INT_VRING {
            self.interrupt.signal_used_queue()
        } else {
            self.interrupt.signal_config()
        };
        if let Err(e) = result {
            log::error!("virtio: cannot raise interrupt: {e}");
        }
    }

    fn signal_used(&mut self, before: &[u16]) {
        let mut notify = false;
        for (queue, &old) in self.queues.iter_mut().zip(before) {
            if queue.next_used() != old {
                // Without VIRTIO_F_EVENT_IDX this is always true; an unreadable ring still
                // deserves the interrupt.
                notify |= queue.needs_notification(&self.mem).unwrap_or(true);
            }
        }
        if notify {
            self.raise(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// The device hit an error it cannot recover from without a reset by the driver.
    fn needs_reset(&mut self, why: &str) {
        log::warn!(
            "virtio: device type {} needs reset: {why}",
            self.device.device_type()
        );
        self.activated = false;
        if self.status & NEEDS_RESET != 0 {
            return;
        }
        self.status |= NEEDS_RESET;
        if self.status & DRIVER_OK != 0 {
            self.raise(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.config_generation = 0;
        self.activated = false;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let device_bits = self.status & NEEDS_RESET;
        let old = self.status & !NEEDS_RESET;
        let new = value & !NEEDS_RESET;
        if old & FAILED != 0 {
            log::debug!("virtio: status write {value:#x} after FAILED, before reset");
            return;
        }
        if new & FAILED != 0 {
            log::info!(
                "virtio: driver gave up on device type {}",
                self.device.device_type()
            );
            self.status |= FAILED;
            self.activated = false;
            return;
        }
        if new & old != old || !LADDER.contains(&new) {
            log::warn!("virtio: invalid status transition {old:#x} -> {new:#x}, ignored");
            return;
        }
        if new == old {
            return;
        }
        if new & FEATURES_OK != 0
            && old & FEATURES_OK == 0
            && !self.features_acceptable(self.driver_features)
        {
            log::warn!(
                "virtio: refusing features {:#x} (offered {:#x}, VERSION_1 required)",
                self.driver_features,
                self.offered_features()
            );
            // FEATURES_OK stays clear; the driver reads it back and gives up.
            self.status = old | device_bits;
            return;
        }
        self.status = new | device_bits;
        if new & DRIVER_OK != 0 && old & DRIVER_OK == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & NEEDS_RESET != 0 {
            log::warn!("virtio: DRIVER_OK on a device that needs reset, not activating");
            return;
        }
        if let Some(index) = self.invalid_queue() {
            self.needs_reset(&format!(
                "queue {index} rings outside guest memory or available ring at 0"
            ));
            return;
        }
        let features = self.driver_features;
        let result = self.device.activate(
            features,
            &mut Queues {
                mem: &self.mem,
                queues: &mut self.queues,
                metrics: &self.metrics,
            },
        );
        match result {
            Ok(()) => {
                self.activated = true;
                self.process_all_queues();
            }
            Err(e) => self.needs_reset(&format!("activation failed: {e}")),
        }
    }
}

mod persist;
mod registers;

#[cfg(test)]
mod tests;
