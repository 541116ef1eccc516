//! The virtio-mmio register file as the guest reads and writes it: 32-bit registers below
//! 0x100, the device's config space from there (the bus's view of the transport).

use virtio_queue::{Queue, QueueT};

use super::*;
use crate::bus::BusDevice;

impl<D: VirtioDevice> MmioTransport<D> {
    /// Queue registers are writable only between FEATURES_OK and DRIVER_OK.
    pub(super) fn selected_queue_for_setup(&mut self) -> Option<&mut Queue> {
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

    pub(super) fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    pub(super) fn read_reg(&self, offset: u64) -> u32 {
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

    pub(super) fn write_reg(&mut self, offset: u64, value: u32) {
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

    pub(super) fn write_driver_features(&mut self, value: u32) {
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

    pub(super) fn write_queue_address(&mut self, offset: u64, value: u32) {
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
