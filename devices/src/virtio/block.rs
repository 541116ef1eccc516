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
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::virtio::testutil::*;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const DISK_SECTORS: u64 = 64;

    fn disk() -> File {
        let mut f = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        f.write_all(&content).unwrap();
        f
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        put(m, HDR, &h);
        put(m, STATUS, &[0xee]);
    }

    fn status(m: &GuestMemoryMmap) -> u32 {
        u32::from(get(m, STATUS, 1)[0])
    }

    fn device(read_only: bool) -> (Block, File) {
        let f = disk();
        let clone = f.try_clone().unwrap();
        (Block::new(f, read_only).unwrap(), clone)
    }

    #[test]
    fn reads_and_writes_sectors() {
        let m = mem();
        let (block, mut file) = device(false);
        let (mut t, irq) = transport(block, &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);

        // Write two sectors at sector 3, the data split over two descriptors.
        header(&m, VIRTIO_BLK_T_OUT, 3);
        put(&m, DATA, &[0xab; 1024]);
        d.add(&[
            Desc::r(HDR, 16),
            Desc::r(DATA, 700),
            Desc::r(DATA + 700, 324),
            Desc::w(STATUS, 1),
        ]);
        notify(&mut t, 0);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used(0).1, 1);
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);
        assert_eq!(irq.used(), 1);
        assert_eq!(t.interrupt_status() & 1, 1);
        let mut back = vec![0u8; 1024];
        file.seek(SeekFrom::Start(3 * 512)).unwrap();
        file.read_exact(&mut back).unwrap();
        assert_eq!(back, vec![0xab; 1024]);

        // Read sectors 2..5 back, header and status in one chain with the data in between.
        header(&m, VIRTIO_BLK_T_IN, 2);
        d.add(&[Desc::r(HDR, 16), Desc::w(DATA, 1536), Desc::w(STATUS, 1)]);
        notify(&mut t, 0);
        assert_eq!(d.used(1).1, 1537);
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);
        let data = get(&m, DATA, 1536);
        assert_eq!(&data[..512], &[2u8; 512][..]);
        assert_eq!(&data[512..], &[0xab; 1024][..]);

        // Status sharing the last data descriptor.
        header(&m, VIRTIO_BLK_T_IN, 0);
        d.add(&[Desc::r(HDR, 16), Desc::w(DATA, 513)]);
        notify(&mut t, 0);
        assert_eq!(d.used(2).1, 513);
        assert_eq!(get(&m, DATA + 512, 1)[0] as u32, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn device_writes_are_in_the_dirty_bitmap() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryBackend;

        let m = mem();
        let (block, _file) = device(false);
        let (mut t, _irq) = transport(block, &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        header(&m, VIRTIO_BLK_T_IN, 1);
        d.add(&[
            Desc::r(HDR, 16),
            Desc::w(DATA + 0x3000, 512),
            Desc::w(STATUS, 1),
        ]);
        // Forget the test's own writes, so only the device's are left.
        let region = m.iter().next().unwrap();
        region.bitmap().reset();
        notify(&mut t, 0);
        let dirty = |addr: u64| region.bitmap().dirty_at(addr as usize);
        assert!(dirty(DATA + 0x3000), "data");
        assert!(dirty(STATUS), "status");
        assert!(dirty(d.used_ring()), "used ring");
        assert!(!dirty(HDR), "the header is only read");
        assert!(!dirty(DATA), "untouched page");
    }

    #[test]
    fn flush_and_get_id() {
        let m = mem();
        let (block, _file) = device(false);
        let id = block.id();
        let (mut t, _irq) = transport(block, &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        d.add(&[Desc::r(HDR, 16), Desc::w(STATUS, 1)]);
        notify(&mut t, 0);
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        d.add(&[Desc::r(HDR, 16), Desc::w(DATA, 20), Desc::w(STATUS, 1)]);
        notify(&mut t, 0);
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);
        assert_eq!(d.used(1).1, 21);
        assert_eq!(get(&m, DATA, 20), id.to_vec());
        assert!(id.iter().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn config_space_and_features() {
        let m = mem();
        let (block, _file) = device(true);
        let (mut t, _irq) = transport(block, &m);
        let mut cap = [0u8; 8];
        crate::BusDevice::read(&mut t, 0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
        assert_eq!(r32(&mut t, 0x10c), SEG_MAX);
        assert_eq!(r32(&mut t, 0x1f0), 0);
        assert_eq!(r32(&mut t, 0x008), VIRTIO_ID_BLOCK);
        assert_ne!(r32(&mut t, 0x010) & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let m = mem();
        let (block, mut file) = device(true);
        let (mut t, _irq) = transport(block, &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        header(&m, VIRTIO_BLK_T_OUT, 0);
        put(&m, DATA, &[0xcd; 512]);
        d.add(&[Desc::r(HDR, 16), Desc::r(DATA, 512), Desc::w(STATUS, 1)]);
        notify(&mut t, 0);
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
        assert_eq!(d.used(0).1, 1);
        let mut first = [0u8; 512];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut first).unwrap();
        assert_eq!(first, [0u8; 512]);
        // Reads still work.
        header(&m, VIRTIO_BLK_T_IN, 5);
        d.add(&[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)]);
        notify(&mut t, 0);
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);
        assert_eq!(get(&m, DATA, 512), vec![5u8; 512]);
    }

    /// One request on a fresh device; returns (used length, status byte).
    fn one(descs: &[Desc], kind: u32, sector: u64) -> (u32, u32) {
        let m = mem();
        let (block, _file) = device(false);
        let (mut t, _irq) = transport(block, &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        header(&m, kind, sector);
        d.add(descs);
        notify(&mut t, 0);
        assert_eq!(d.used_idx(), 1, "every chain is returned");
        assert!(t.is_activated(), "a bad request does not break the device");
        (d.used(0).1, status(&m))
    }

    #[test]
    fn bad_requests_get_error_status() {
        let io = VIRTIO_BLK_S_IOERR;
        let rw = |len| [Desc::r(HDR, 16), Desc::w(DATA, len), Desc::w(STATUS, 1)];
        // Past the end, straddling the end, overflowing sector numbers.
        assert_eq!(one(&rw(512), VIRTIO_BLK_T_IN, DISK_SECTORS), (1, io));
        assert_eq!(one(&rw(1024), VIRTIO_BLK_T_IN, DISK_SECTORS - 1), (1, io));
        assert_eq!(one(&rw(512), VIRTIO_BLK_T_IN, u64::MAX / 256), (1, io));
        assert_eq!(one(&rw(512), VIRTIO_BLK_T_IN, u64::MAX), (1, io));
        // Oversize buffer: 8 MiB for a 32 KiB disk.
        assert_eq!(one(&rw(8 << 20), VIRTIO_BLK_T_IN, 0), (1, io));
        // Not whole sectors.
        assert_eq!(one(&rw(100), VIRTIO_BLK_T_IN, 0), (1, io));
        let w = [Desc::r(HDR, 16), Desc::r(DATA, 100), Desc::w(STATUS, 1)];
        assert_eq!(one(&w, VIRTIO_BLK_T_OUT, 0), (1, io));
        // Unknown and unsupported types.
        assert_eq!(one(&rw(512), 0x7777, 0), (1, VIRTIO_BLK_S_UNSUPP));
        assert_eq!(one(&rw(512), 11, 0), (1, VIRTIO_BLK_S_UNSUPP));
        // Header in a device-writable descriptor.
        let hw = [Desc::w(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)];
        assert_eq!(one(&hw, VIRTIO_BLK_T_IN, 0).1, io);
        // Header cut short.
        let short = [Desc::r(HDR, 8), Desc::w(DATA, 512), Desc::w(STATUS, 1)];
        assert_eq!(one(&short, VIRTIO_BLK_T_IN, 0), (1, io));
        // Zero-length data: nothing moved, fine.
        let zero = [Desc::r(HDR, 16), Desc::w(DATA, 0), Desc::w(STATUS, 1)];
        assert_eq!(one(&zero, VIRTIO_BLK_T_IN, 0), (1, VIRTIO_BLK_S_OK));
    }

    #[test]
    fn malformed_chains_are_dropped() {
        const UNTOUCHED: u32 = 0xee;
        // Data outside guest memory.
        let out = [
            Desc::r(HDR, 16),
            Desc::w(MEM_SIZE + 0x1000, 512),
            Desc::w(STATUS, 1),
        ];
        assert_eq!(one(&out, VIRTIO_BLK_T_IN, 0), (0, UNTOUCHED));
        // Straddling the end of memory.
        let straddle = [
            Desc::r(HDR, 16),
            Desc::w(MEM_SIZE - 256, 512),
            Desc::w(STATUS, 1),
        ];
        assert_eq!(one(&straddle, VIRTIO_BLK_T_IN, 0), (0, UNTOUCHED));
        // No writable byte for the status.
        assert_eq!(
            one(&[Desc::r(HDR, 16)], VIRTIO_BLK_T_FLUSH, 0),
            (0, UNTOUCHED)
        );
        assert_eq!(
            one(
                &[Desc::r(HDR, 16), Desc::w(STATUS, 0)],
                VIRTIO_BLK_T_FLUSH,
                0
            ),
            (0, UNTOUCHED)
        );
        // Readable after writable.
        let order = [Desc::r(HDR, 16), Desc::w(STATUS, 1), Desc::r(DATA, 512)];
        assert_eq!(one(&order, VIRTIO_BLK_T_OUT, 0), (0, UNTOUCHED));
    }

    #[test]
    fn descriptor_loop_is_dropped_and_device_goes_on() {
        let m = mem();
        let (block, _file) = device(false);
        let (mut t, _irq) = transport(block, &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        header(&m, VIRTIO_BLK_T_IN, 0);
        d.add_raw(&[(HDR, 16, false, Some(1)), (DATA, 512, true, Some(0))]);
        notify(&mut t, 0);
        assert_eq!(d.used(0).1, 0);
        header(&m, VIRTIO_BLK_T_IN, 1);
        d.add(&[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)]);
        notify(&mut t, 0);
        assert_eq!(d.used_idx(), 2);
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn bogus_avail_index_needs_reset() {
        let m = mem();
        let (block, _file) = device(false);
        let (mut t, irq) = transport(block, &m);
        let d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        // The driver claims 1000 new entries in a 16-entry queue.
        put(&m, d.avail_ring() + 2, &1000u16.to_le_bytes());
        notify(&mut t, 0);
        assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);
        assert!(!t.is_activated());
        assert_eq!(irq.config(), 1);
        assert_eq!(d.used_idx(), 0);
    }

    #[test]
    fn state_round_trip() {
        let m = mem();
        let (block, file) = device(true);
        let (mut t, _irq) = transport(block, &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        header(&m, VIRTIO_BLK_T_IN, 7);
        d.add(&[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)]);
        notify(&mut t, 0);
        let state = t.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: BlockState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.transport.queues[0].next_avail, 1);

        let irq = Arc::new(CountingInterrupt::default());
        let mut restored =
            MmioTransport::<Block>::from_state(&back, file.try_clone().unwrap(), m.clone(), irq)
                .unwrap();
        assert_eq!(restored.state(), state);
        assert!(restored.is_activated());
        // The restored device carries on where the old one stopped.
        header(&m, VIRTIO_BLK_T_IN, 9);
        d.add(&[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)]);
        notify(&mut restored, 0);
        assert_eq!(d.used_idx(), 2);
        assert_eq!(get(&m, DATA, 512), vec![9u8; 512]);

        // A different image size is refused.
        let mut other = back.clone();
        other.capacity += 1;
        let irq = Arc::new(CountingInterrupt::default());
        assert!(matches!(
            MmioTransport::<Block>::from_state(&other, file, m, irq),
            Err(BlockError::Capacity { .. })
        ));
    }
}
