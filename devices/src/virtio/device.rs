//! The one trait every virtio device implements, and the view of guest memory and queues the
//! transport lends a device while it handles requests.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::chain::{self, Chain, ChainError};
use super::metrics::DeviceMetrics;
use super::GuestMemoryMmap;

/// Errors that leave a device unable to go on; the transport answers them with
/// `DEVICE_NEEDS_RESET`. Bad requests are not errors: devices answer them with a virtio status.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device asked for a queue it does not have.
    #[error("no queue {0}")]
    NoQueue(usize),
    /// A ring could not be read or written (its addresses left guest memory, or the available
    /// index ran ahead of the queue size).
    #[error("queue {index}: {source}")]
    Ring {
        index: usize,
        source: virtio_queue::Error,
    },
}

/// Guest memory and the device's queues, lent by the transport while the device is active.
#[derive(Debug)]
pub struct Queues<'a> {
    /// All of guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The device's queues, in virtio order, configured and validated by the transport.
    pub queues: &'a mut [Queue],
    /// The device's request counters.
    pub metrics: &'a DeviceMetrics,
}

impl<'a> Queues<'a> {
    /// The next descriptor chain the driver made available on queue `index`, if any.
    pub fn pop(
        &mut self,
        index: usize,
    ) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, DeviceError> {
        let queue = self
            .queues
            .get_mut(index)
            .ok_or(DeviceError::NoQueue(index))?;
        if !queue.ready() {
            return Ok(None);
        }
        let mem: &'a GuestMemoryMmap = self.mem;
        match queue.iter(mem) {
            Ok(mut iter) => Ok(iter.next()),
            Err(source) => Err(DeviceError::Ring { index, source }),
        }
    }

    /// Validates a popped chain ([`chain::parse`]) and counts the bytes it offers the device.
    pub fn parse(
        &self,
        desc_chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Chain, ChainError> {
        let chain = chain::parse(desc_chain)?;
        self.metrics.offered(chain.readable_len());
        Ok(chain)
    }

    /// Gives back the last chain [`pop`](Self::pop) returned, to be popped again later.
    pub fn undo_pop(&mut self, index: usize) -> Result<(), DeviceError> {
        let queue = self
            .queues
            .get_mut(index)
            .ok_or(DeviceError::NoQueue(index))?;
        queue.go_to_previous_position();
        Ok(())
    }

    /// Returns the chain headed by `head` to the driver with `len` bytes written into it.
    /// A head outside the queue (a driver's mistake) is dropped with a log line.
    pub fn add_used(&mut self, index: usize, head: u16, len: u32) -> Result<(), DeviceError> {
        let queue = self
            .queues
            .get_mut(index)
            .ok_or(DeviceError::NoQueue(index))?;
        if head >= queue.size() {
            log::warn!("virtio: queue {index}: dropping chain with head {head} outside the queue");
            return Ok(());
        }
        queue
            .add_used(self.mem, head, len)
            .map_err(|source| DeviceError::Ring { index, source })?;
        self.metrics.used(len);
        Ok(())
    }
}

/// A virtio device behind a transport: what it is, what it offers, and how it handles the
/// requests on its queues.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_BLOCK`, ...).
    fn device_type(&self) -> u32;

    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Device-specific feature bits offered (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;

    /// Reads the device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space at `offset` (ignored where it is read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set `DRIVER_OK` with `features` negotiated and the ready queues valid.
    fn activate(&mut self, features: u64, queues: &mut Queues<'_>) -> Result<(), DeviceError>;

    /// Handles what the driver made available on queue `index`.
    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>) -> Result<(), DeviceError>;

    /// Drops any state tied to the driver (the transport resets the queues itself).
    fn reset(&mut self);
}

/// Copies the part of `config` at `offset` into `data`; bytes past its end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
