//! Tests of the virtio block device: requests, bad chains, state.

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
