//! virtio-blk over a raw image file: read, write, flush and get-id, every request's sectors
//! checked against the capacity, and read-only enforced by the device (writes answered with
//! `VIRTIO_BLK_S_IOERR`). Requests are served synchronously, one chain at a time.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::chain::{self, Chain};
use super::device::{read_config_bytes, DeviceError, Queues, VirtioDevice};
use super::{GuestMemoryMmap, Interrupt, MmioError, MmioTransport, TransportState};

/// Descriptors per request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per sector, as virtio-blk counts them.
pub const SECTOR_SIZE: u64 = 512;
/// Request header: type (u32), reserved (u32), sector (u64).
const HEADER_LEN: usize = 16;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Data segments per request the driver may use (the header and status take two descriptors).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Errors from opening a disk or restoring a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image file could not be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// The image's size or identity could not be read.
    #[error("cannot read disk image size: {0}")]
    Size(io::Error),
    /// The image is not the one the state was saved with.
    #[error("disk image has {image} sectors, the saved device had {saved}")]
    Capacity { image: u64, saved: u64 },
    /// The transport part of the state was refused.
    #[error(transparent)]
    Transport(#[from] MmioError),
}

/// A virtio block device on a raw image.
#[derive(Debug)]
pub struct Block {
    disk: File,
    /// Capacity in sectors.
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
}

impl Block {
    /// Opens the image at `path`, read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let disk = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::new(disk, read_only)
    }

    /// A device on an already opened image. The capacity is the image size in whole sectors
    /// (a partial last sector is not exposed); the serial number (GET_ID) is derived from the
    /// file's device and inode numbers.
    pub fn new(mut disk: File, read_only: bool) -> Result<Self, BlockError> {
        let size = disk.seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!("virtio-blk: image size {size} is not a multiple of {SECTOR_SIZE}; the tail is not exposed");
        }
        let meta = disk.metadata().map_err(BlockError::Size)?;
        let serial = format!("{:08x}{:012x}", meta.dev() as u32, meta.ino());
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Self {
            disk,
            capacity: size / SECTOR_SIZE,
            read_only,
            id,
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The serial number GET_ID returns.
    pub fn id(&self) -> [u8; ID_LEN] {
        self.id
    }

    fn config(&self) -> [u8; 16] {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8..12) is not offered; seg_max follows.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config
    }

    /// Serves one chain; returns the bytes written into it (used length).
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> u32 {
        let writable = chain.writable_len();
        let Some(status_at) = writable.checked_sub(1) else {
            log::debug!("virtio-blk: request without a status byte, dropped");
            return 0;
        };
        let (status, written) = self.execute(mem, chain, status_at);
        match chain::write_bytes(mem, &chain.writable, status_at, &[status as u8]) {
            // `written` never exceeds the data part of the writable buffers, below 4 GiB.
            Ok(()) => written as u32 + 1,
            Err(e) => {
                log::debug!("virtio-blk: cannot write status: {e}");
                0
            }
        }
    }

    /// Runs the request; returns its status and the data bytes written to the guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, chain: &Chain, data_in_len: u64) -> (u32, u64) {
        let mut header = [0u8; HEADER_LEN];
        if chain::read_bytes(mem, &chain.readable, 0, &mut header).is_err() {
            log::debug!("virtio-blk: request header missing from the device-readable buffers");
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let data_out_len = chain.readable_len() - HEADER_LEN as u64;
        match kind {
            VIRTIO_BLK_T_IN => match self.seek_checked(sector, data_in_len) {
                Ok(()) => {
                    match chain::fill_from(mem, &chain.writable, 0, data_in_len, &mut self.disk) {
                        Ok(()) => (VIRTIO_BLK_S_OK, data_in_len),
                        Err(e) => {
                            log::warn!("virtio-blk: read at sector {sector}: {e}");
                            (VIRTIO_BLK_S_IOERR, 0)
                        }
                    }
                }
                Err(status) => (status, 0),
            },
            VIRTIO_BLK_T_OUT if self.read_only => {
                log::debug!("virtio-blk: write to a read-only disk refused");
                (VIRTIO_BLK_S_IOERR, 0)
            }
            VIRTIO_BLK_T_OUT => match self.seek_checked(sector, data_out_len) {
                Ok(()) => {
                    let r = chain::drain_to(
                        mem,
                        &chain.readable,
                        HEADER_LEN as u64,
                        data_out_len,
                        &mut self.disk,
                    );
                    match r {
                        Ok(()) => (VIRTIO_BLK_S_OK, 0),
                        Err(e) => {
                            log::warn!("virtio-blk: write at sector {sector}: {e}");
                            (VIRTIO_BLK_S_IOERR, 0)
                        }
                    }
                }
                Err(status) => (status, 0),
            },
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                match self.disk.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        log::warn!("virtio-blk: flush: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_in_len.min(ID_LEN as u64) as usize;
                match chain::write_bytes(mem, &chain.writable, 0, &self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u64),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    /// Checks `len` bytes at `sector` are whole sectors inside the disk and seeks there.
    fn seek_checked(&mut self, sector: u64, len: u64) -> Result<(), u32> {
        let disk_bytes = self.capacity * SECTOR_SIZE;
        let start = sector.checked_mul(SECTOR_SIZE);
        let in_bounds = start
            .and_then(|s| s.checked_add(len))
            .is_some_and(|end| end <= disk_bytes);
        if !len.is_multiple_of(SECTOR_SIZE) || !in_bounds {
            log::debug!("virtio-blk: {len} bytes at sector {sector} outside the {} sectors or not whole sectors", self.capacity);
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let start = start.unwrap_or(0);
        self.disk.seek(SeekFrom::Start(start)).map_err(|e| {
            log::warn!("virtio-blk: seek to sector {sector}: {e}");
            VIRTIO_BLK_S_IOERR
        })?;
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH) | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-blk: write to read-only config at {offset:#x} ignored");
    }

    fn activate(&mut self, _features: u64, _queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        while let Some(desc_chain) = queues.pop(index)? {
            let head = desc_chain.head_index();
            let used = match queues.parse(desc_chain) {
                Ok(chain) => self.serve(queues.mem, &chain),
                Err(e) => {
                    log::debug!("virtio-blk: malformed chain {head}: {e}");
                    0
                }
            };
            queues.add_used(index, head, used)?;
        }
        Ok(())
    }

    fn reset(&mut self) {}
}

/// A block device's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Registers, queues and features.
    pub transport: TransportState,
    /// Capacity in sectors (checked against the image on restore).
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Serial number returned by GET_ID.
    pub id: [u8; ID_LEN],
}

impl MmioTransport<Block> {
    /// The device's saved state.
    pub fn state(&self) -> BlockState {
        let block = self.device();
        BlockState {
            transport: self.transport_state(),
            capacity: block.capacity,
            read_only: block.read_only,
            id: block.id,
        }
    }

    /// Rebuilds a block device on `disk` from `state`; the image must have the saved capacity.
    pub fn from_state(
        state: &BlockState,
        disk: File,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<Self, BlockError> {
        let mut block = Block::new(disk, state.read_only)?;
        if block.capacity != state.capacity {
            return Err(BlockError::Capacity {
                image: block.capacity,
                saved: state.capacity,
            });
        }
        block.id = state.id;
        Ok(MmioTransport::restore(
            block,
            mem,
            interrupt,
            &state.transport,
        )?)
    }
}

#[cfg(test)]
mod tests;
