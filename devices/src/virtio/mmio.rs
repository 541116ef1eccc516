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
use crate::bus::BusDevice;

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

    /// The transport's saved state.
    pub fn transport_state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            device_features: self.offered_features(),
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
        }
    }

    /// Rebuilds a transport around `device` from `state`, validated as untrusted input. An
    /// active device is activated again; the VMM then calls
    /// [`process_all_queues`](Self::process_all_queues) once the guest runs.
    pub fn restore(
        device: D,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        state: &TransportState,
    ) -> Result<Self, MmioError> {
        let mut t = Self::new(device, mem, interrupt)?;
        if state.device_type != t.device.device_type() {
            return Err(MmioError::DeviceType {
                expected: t.device.device_type(),
                found: state.device_type,
            });
        }
        if state.device_features != t.offered_features() {
            return Err(MmioError::Features {
                expected: t.offered_features(),
                found: state.device_features,
            });
        }
        if state.queues.len() != t.queues.len() {
            return Err(MmioError::QueueCount {
                expected: t.queues.len(),
                found: state.queues.len(),
            });
        }
        let base = state.status & !(NEEDS_RESET | FAILED);
        let features_ok = base & FEATURES_OK != 0;
        if (base != 0 && !LADDER.contains(&base))
            || state.interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0
            || (features_ok && !t.features_acceptable(state.driver_features))
        {
            return Err(MmioError::Status {
                status: state.status,
                interrupt: state.interrupt_status,
            });
        }
        for (index, (queue, saved)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.max_size != queue.max_size() {
                return Err(MmioError::Queue {
                    index,
                    reason: format!(
                        "maximum size {} is not the device's {}",
                        saved.max_size,
                        queue.max_size()
                    ),
                });
            }
            *queue = saved.to_queue().map_err(|e| MmioError::Queue {
                index,
                reason: e.to_string(),
            })?;
        }
        t.status = state.status;
        t.driver_features = state.driver_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.interrupt_status = state.interrupt_status;
        t.config_generation = state.config_generation;
        if base & DRIVER_OK != 0 && state.status & (NEEDS_RESET | FAILED) == 0 {
            if let Some(index) = t.invalid_queue() {
                return Err(MmioError::Queue {
                    index,
                    reason: "rings outside guest memory".into(),
                });
            }
            let features = t.driver_features;
            t.device.activate(
                features,
                &mut Queues {
                    mem: &t.mem,
                    queues: &mut t.queues,
                    metrics: &t.metrics,
                },
            )?;
            t.activated = true;
        }
        Ok(t)
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

    /// Queue registers are writable only between FEATURES_OK and DRIVER_OK.
    fn selected_queue_for_setup(&mut self) -> Option<&mut Queue> {
        if self.status != ACK | DRIVER | FEATURES_OK {
            log::warn!("virtio: queue setup in status {:#x}, ignored", self.status);
            return None;
        }
        let sel = self.queue_sel as usize;
        let queue = self.queues.get_mut(sel);
        if queue.is_none() {
            log::warn!("virtio: setup of queue {sel}, which does not exist");
        }
        queue
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            // No shared memory regions: their length reads as -1.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                let size = u16::try_from(value).unwrap_or(0);
                let result = match self.selected_queue_for_setup() {
                    Some(q) => q.try_set_size(size),
                    None => return,
                };
                if result.is_err() {
                    self.needs_reset(&format!(
                        "queue size {value} is not a power of two up to the maximum"
                    ));
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue_for_setup() {
                    match value {
                        0 | 1 => q.set_ready(value == 1),
                        _ => log::warn!("virtio: QueueReady {value} ignored"),
                    }
                }
            }
            reg::QUEUE_NOTIFY => self.process_queue(value as usize),
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW..=reg::QUEUE_USED_HIGH => self.write_queue_address(offset, value),
            reg::SHM_SEL => {}
            _ => log::debug!("virtio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            log::warn!(
                "virtio: driver features written in status {:#x}, ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => log::debug!("virtio: driver features word {sel} ignored"),
        }
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(q) = self.selected_queue_for_setup() else {
            return;
        };
        let (current, high) = match offset {
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                (q.desc_table(), offset == reg::QUEUE_DESC_HIGH)
            }
            reg::QUEUE_AVAIL_LOW | reg::QUEUE_AVAIL_HIGH => {
                (q.avail_ring(), offset == reg::QUEUE_AVAIL_HIGH)
            }
            reg::QUEUE_USED_LOW | reg::QUEUE_USED_HIGH => {
                (q.used_ring(), offset == reg::QUEUE_USED_HIGH)
            }
            _ => {
                log::debug!("virtio: write of unknown register {offset:#x}");
                return;
            }
        };
        let addr = vm_memory::GuestAddress(if high {
            (current & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (current & !0xffff_ffff) | u64::from(value)
        });
        let result = match offset {
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => q.try_set_desc_table_address(addr),
            reg::QUEUE_AVAIL_LOW | reg::QUEUE_AVAIL_HIGH => q.try_set_avail_ring_address(addr),
            _ => q.try_set_used_ring_address(addr),
        };
        if let Err(e) = result {
            self.needs_reset(&format!("queue {}: {e}", self.queue_sel));
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            log::debug!(
                "virtio: register read of {} bytes at {offset:#x}",
                data.len()
            );
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(bytes))
            }
            _ => log::debug!(
                "virtio: register write of {} bytes at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::virtio::testutil::*;

    /// A device that records what the transport asks of it.
    #[derive(Debug, Default)]
    struct Dummy {
        config: [u8; 8],
        fail_activate: bool,
        activations: usize,
        resets: usize,
        processed: Arc<AtomicUsize>,
    }

    const DUMMY_FEATURES: u64 = (1 << 3) | (1 << 40);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8, 16]
        }
        fn features(&self) -> u64 {
            DUMMY_FEATURES
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::device::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let start = offset as usize;
            if let Some(dst) = self.config.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, features: u64, _q: &mut Queues<'_>) -> Result<(), DeviceError> {
            assert_eq!(features & F_VERSION_1, F_VERSION_1);
            self.activations += 1;
            if self.fail_activate {
                return Err(DeviceError::NoQueue(7));
            }
            Ok(())
        }
        fn process_queue(&mut self, index: usize, q: &mut Queues<'_>) -> Result<(), DeviceError> {
            self.processed.fetch_add(1, Ordering::SeqCst);
            while let Some(chain) = q.pop(index)? {
                q.add_used(index, chain.head_index(), 0)?;
            }
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn dummy(m: &GuestMemoryMmap) -> (MmioTransport<Dummy>, Arc<CountingInterrupt>) {
        transport(Dummy::default(), m)
    }

    #[test]
    fn cmdline_entry_format() {
        assert_eq!(
            cmdline_entry(0xd000_0000, 5),
            "virtio_mmio.device=512@0xd0000000:5"
        );
    }

    #[test]
    fn identifies_itself() {
        let m = mem();
        let (mut t, _) = dummy(&m);
        assert_eq!(r32(&mut t, 0x000), 0x7472_6976);
        assert_eq!(r32(&mut t, 0x004), 2);
        assert_eq!(r32(&mut t, 0x008), 42);
        assert_eq!(r32(&mut t, 0x00c), 0);
        assert_eq!(r32(&mut t, 0x0b0), u32::MAX, "no shared memory");
        // Narrow or unaligned register reads return zero.
        let mut b = [0xffu8; 2];
        t.read(0x000, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(r32(&mut t, 0x002), 0);
    }

    #[test]
    fn negotiates_features() {
        let m = mem();
        let (mut t, _) = dummy(&m);
        w32(&mut t, 0x14, 0);
        assert_eq!(r32(&mut t, 0x10), 1 << 3);
        w32(&mut t, 0x14, 1);
        assert_eq!(
            r32(&mut t, 0x10),
            (1 << 8) | 1,
            "VIRTIO_F_VERSION_1 and bit 40"
        );
        w32(&mut t, 0x14, 2);
        assert_eq!(r32(&mut t, 0x10), 0);

        // A subset with VERSION_1 is accepted.
        assert_eq!(
            negotiate(&mut t, F_VERSION_1 | (1 << 3)),
            ACK | DRIVER | FEATURES_OK
        );
        // Feature writes after FEATURES_OK are ignored.
        w32(&mut t, 0x24, 0);
        w32(&mut t, 0x20, 0);
        assert_eq!(t.transport_state().driver_features, F_VERSION_1 | (1 << 3));
    }

    #[test]
    fn refuses_features_without_version_1_or_not_offered() {
        let m = mem();
        for features in [1u64 << 3, F_VERSION_1 | (1 << 4), F_VERSION_1 | (1 << 63)] {
            let (mut t, _) = dummy(&m);
            assert_eq!(negotiate(&mut t, features), ACK | DRIVER, "{features:#x}");
            // DRIVER_OK without FEATURES_OK goes nowhere.
            w32(&mut t, 0x70, ACK | DRIVER | DRIVER_OK);
            assert_eq!(r32(&mut t, 0x70), ACK | DRIVER);
            assert!(!t.is_activated());
        }
    }

    #[test]
    fn status_only_moves_forward() {
        let m = mem();
        let (mut t, _) = dummy(&m);
        w32(&mut t, 0x70, DRIVER); // DRIVER without ACK
        assert_eq!(r32(&mut t, 0x70), 0);
        w32(&mut t, 0x70, ACK);
        w32(&mut t, 0x70, ACK | DRIVER);
        w32(&mut t, 0x70, ACK); // clearing a bit without reset
        assert_eq!(r32(&mut t, 0x70), ACK | DRIVER);
        w32(&mut t, 0x70, ACK | DRIVER | 0x10); // unknown bit
        assert_eq!(r32(&mut t, 0x70), ACK | DRIVER);
        // Features written before DRIVER are ignored.
        let (mut t2, _) = dummy(&m);
        w32(&mut t2, 0x70, ACK);
        w32(&mut t2, 0x24, 1);
        w32(&mut t2, 0x20, 1);
        assert_eq!(t2.transport_state().driver_features, 0);
        // FAILED sticks until reset.
        w32(&mut t, 0x70, ACK | DRIVER | 0x80);
        assert_eq!(r32(&mut t, 0x70), ACK | DRIVER | 0x80);
        w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK);
        assert_eq!(r32(&mut t, 0x70), ACK | DRIVER | 0x80);
        w32(&mut t, 0x70, 0);
        assert_eq!(r32(&mut t, 0x70), 0);
    }

    #[test]
    fn activates_and_processes_notified_queues() {
        let m = mem();
        let (mut t, irq) = dummy(&m);
        let processed = t.device().processed.clone();
        let mut q0 = Driver::at(&m, 0, 8);
        let q1 = Driver::at(&m, 0x4000, 16);
        // Notifications before DRIVER_OK are ignored.
        notify(&mut t, 0);
        assert_eq!(processed.load(Ordering::SeqCst), 0);
        activate(&mut t, &[&q0, &q1]);
        assert_eq!(t.device().activations, 1);
        // Activation looks at every ready queue once.
        assert_eq!(processed.load(Ordering::SeqCst), 2);
        assert_eq!(r32(&mut t, 0x34), 16, "QueueSel still 1");
        w32(&mut t, 0x30, 0);
        assert_eq!(r32(&mut t, 0x34), 8);
        assert_eq!(r32(&mut t, 0x44), 1);

        q0.add(&[Desc::r(0x10_0000, 4)]);
        notify(&mut t, 0);
        assert_eq!(q0.used_idx(), 1);
        assert_eq!(irq.used(), 1);
        assert_eq!(r32(&mut t, 0x60), 1);
        w32(&mut t, 0x64, 1);
        assert_eq!(r32(&mut t, 0x60), 0);
        // No new used entries, no interrupt; unknown queues are ignored.
        notify(&mut t, 0);
        notify(&mut t, 2);
        notify(&mut t, u32::MAX);
        assert_eq!(irq.used(), 1);
        // Queue registers are frozen once the device is live.
        w32(&mut t, 0x38, 4);
        w32(&mut t, 0x44, 0);
        assert_eq!(r32(&mut t, 0x44), 1);
        assert_eq!(t.transport_state().queues[0].size, 8);
    }

    #[test]
    fn reset_clears_everything() {
        let m = mem();
        let (mut t, _) = dummy(&m);
        let mut q0 = Driver::at(&m, 0, 8);
        let q1 = Driver::at(&m, 0x4000, 16);
        activate(&mut t, &[&q0, &q1]);
        q0.add(&[Desc::r(0x10_0000, 4)]);
        notify(&mut t, 0);
        w32(&mut t, 0x14, 1);
        w32(&mut t, 0x70, 0);
        assert_eq!(t.device().resets, 1);
        assert!(!t.is_activated());
        let fresh = dummy(&m).0.transport_state();
        assert_eq!(t.transport_state(), fresh);
        assert_eq!(r32(&mut t, 0x70), 0);
        assert_eq!(r32(&mut t, 0x44), 0);
        assert_eq!(r32(&mut t, 0x60), 0);
        // Notifications after reset are ignored.
        let processed = t.device().processed.load(Ordering::SeqCst);
        notify(&mut t, 0);
        assert_eq!(t.device().processed.load(Ordering::SeqCst), processed);
        // And the device can be brought up again.
        let q0 = Driver::at(&m, 0x8000, 8);
        activate(&mut t, &[&q0, &q1]);
    }

    #[test]
    fn bad_queue_sizes_need_reset() {
        let m = mem();
        for size in [0u32, 3, 12, 16, 1 << 16, u32::MAX] {
            let (mut t, irq) = dummy(&m);
            negotiate(&mut t, F_VERSION_1);
            w32(&mut t, 0x30, 0);
            w32(&mut t, 0x38, size);
            assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, NEEDS_RESET, "size {size}");
            assert_eq!(irq.config(), 0, "no interrupt before DRIVER_OK");
            // DRIVER_OK does not activate a device that needs reset.
            w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
            assert!(!t.is_activated());
            // Reset recovers.
            w32(&mut t, 0x70, 0);
            assert_eq!(r32(&mut t, 0x70), 0);
        }
    }

    #[test]
    fn misaligned_rings_need_reset() {
        let m = mem();
        for (reg, value) in [(0x80, 0x1008), (0x90, 0x1001), (0xa0, 0x1002)] {
            let (mut t, _) = dummy(&m);
            negotiate(&mut t, F_VERSION_1);
            w32(&mut t, reg, value);
            assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, NEEDS_RESET, "{reg:#x}");
        }
    }

    #[test]
    fn rings_outside_memory_fail_activation() {
        let m = mem();
        let (mut t, irq) = dummy(&m);
        negotiate(&mut t, F_VERSION_1);
        let q = Driver::at(&m, 0, 8);
        setup_queue(&mut t, 0, &q);
        // Move the used ring past the end of guest memory (high half).
        w32(&mut t, 0xa4, 1);
        w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(
            r32(&mut t, 0x70),
            ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
        );
        assert_eq!(irq.config(), 1);
        assert_eq!(r32(&mut t, 0x60), 2);
        notify(&mut t, 0);
        assert_eq!(t.device().processed.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn available_ring_at_zero_fails_activation() {
        let m = mem();
        let (mut t, _) = dummy(&m);
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0, &Driver::at(&m, 0x1000, 8));
        w32(&mut t, 0x90, 0);
        w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, NEEDS_RESET);
    }

    #[test]
    fn queue_setup_outside_its_window_is_ignored() {
        let m = mem();
        let (mut t, _) = dummy(&m);
        // Before FEATURES_OK.
        w32(&mut t, 0x70, ACK | DRIVER);
        w32(&mut t, 0x30, 0);
        w32(&mut t, 0x38, 4);
        w32(&mut t, 0x44, 1);
        assert_eq!(r32(&mut t, 0x44), 0);
        assert_eq!(t.transport_state().queues[0].size, 8);
        // A queue that does not exist.
        negotiate(&mut t, F_VERSION_1);
        w32(&mut t, 0x30, 5);
        assert_eq!(r32(&mut t, 0x34), 0);
        w32(&mut t, 0x38, 4);
        w32(&mut t, 0x44, 1);
        assert_eq!(r32(&mut t, 0x44), 0);
        assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, 0);
    }

    #[test]
    fn activation_failure_needs_reset() {
        let m = mem();
        let (mut t, irq) = transport(
            Dummy {
                fail_activate: true,
                ..Dummy::default()
            },
            &m,
        );
        negotiate(&mut t, F_VERSION_1);
        w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, NEEDS_RESET);
        assert_eq!(irq.config(), 1);
    }

    #[test]
    fn config_space_and_generation() {
        let m = mem();
        let (mut t, irq) = dummy(&m);
        t.write(0x102, &[0xaa, 0xbb]);
        let mut b = [0u8; 4];
        t.read(0x100, &mut b);
        assert_eq!(b, [0, 0, 0xaa, 0xbb]);
        let mut past = [0xffu8; 8];
        t.read(0x1f8, &mut past);
        assert_eq!(past, [0; 8]);
        assert_eq!(r32(&mut t, 0xfc), 0);
        t.config_changed();
        assert_eq!(r32(&mut t, 0xfc), 1);
        assert_eq!(r32(&mut t, 0x60), 2);
        assert_eq!(irq.config(), 1);
    }

    #[test]
    fn restore_validates_state() {
        let m = mem();
        let (mut t, _) = dummy(&m);
        negotiate(&mut t, F_VERSION_1 | (1 << 40));
        let good = t.transport_state();
        let irq: Arc<dyn Interrupt> = Arc::new(CountingInterrupt::default());
        let restore = |s: &TransportState| {
            MmioTransport::restore(Dummy::default(), m.clone(), irq.clone(), s)
        };
        let back = restore(&good).unwrap();
        assert_eq!(back.transport_state(), good);
        assert!(!back.is_activated());

        let mut bad = good.clone();
        bad.device_type = 2;
        assert!(matches!(restore(&bad), Err(MmioError::DeviceType { .. })));
        let mut bad = good.clone();
        bad.device_features |= 1;
        assert!(matches!(restore(&bad), Err(MmioError::Features { .. })));
        let mut bad = good.clone();
        bad.queues.pop();
        assert!(matches!(restore(&bad), Err(MmioError::QueueCount { .. })));
        for status in [
            DRIVER,
            ACK | DRIVER_OK,
            0x10,
            ACK | DRIVER | FEATURES_OK | 0x20,
        ] {
            let mut bad = good.clone();
            bad.status = status;
            assert!(
                matches!(restore(&bad), Err(MmioError::Status { .. })),
                "{status:#x}"
            );
        }
        let mut bad = good.clone();
        bad.interrupt_status = 4;
        assert!(matches!(restore(&bad), Err(MmioError::Status { .. })));
        let mut bad = good.clone();
        bad.driver_features = 1 << 5;
        assert!(matches!(restore(&bad), Err(MmioError::Status { .. })));
        for (i, f) in [
            |q: &mut QueueSnapshot| q.size = 3,
            |q: &mut QueueSnapshot| q.size = 32,
            |q: &mut QueueSnapshot| q.max_size = 4,
            |q: &mut QueueSnapshot| q.desc_table = 8,
        ]
        .iter()
        .enumerate()
        {
            let mut bad = good.clone();
            f(&mut bad.queues[0]);
            assert!(
                matches!(restore(&bad), Err(MmioError::Queue { .. })),
                "case {i}"
            );
        }
        // An active device whose rings are outside this memory.
        let mut bad = good.clone();
        bad.status = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
        bad.queues[0].ready = true;
        bad.queues[0].used_ring = 1 << 40;
        assert!(matches!(restore(&bad), Err(MmioError::Queue { .. })));
    }
}
