//! Shared harness: the fuzz input becomes a guest's descriptor table, available ring and
//! buffer contents; a device behind a real `MmioTransport` is brought to DRIVER_OK through
//! its registers and serves the queue. Checks: no panic, every used entry is a head the
//! driver offered, and used lengths stay within guest memory.

use std::sync::Arc;

use devices::virtio::{GuestMemoryMmap, MmioTransport, VirtioDevice};
use devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};

mod interrupt;
use interrupt::NoInterrupt;

/// Guest RAM that buffers point into: 1 MiB at 0.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Entries in the fuzzed queue.
pub const QUEUE_SIZE: u16 = 16;
/// The rings live in a second region at 4 GiB that fuzzed buffer addresses never reach
/// (they are either below `MEM_SIZE + 4 KiB` or above 2^63), so a device writing into a
/// buffer cannot rewrite the rings under the checks below.
const RINGS: u64 = 0x1_0000_0000;
const RINGS_LEN: u64 = 0x8000;
const DESC: u64 = RINGS;
const AVAIL: u64 = RINGS + 0x1000;
const USED: u64 = RINGS + 0x2000;
/// Rings of the queues not being fuzzed (valid, empty).
const IDLE_RINGS: u64 = RINGS + 0x3000;
/// Where the rest of the input lands, for headers and frames to point at.
pub const DATA: u64 = 0x4000;

/// Reads fixed-size pieces off the input, zero-padded once it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    pub fn byte(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    pub fn rest(&mut self) -> &[u8] {
        std::mem::take(&mut self.0)
    }
}

fn w32(t: &mut impl BusDevice, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn r32(t: &mut impl BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Writes descriptor `index` from 16 fuzz bytes, biased towards addresses inside memory
/// (top bit clear) but keeping raw values (top bit set) reachable.
fn put_descriptor(mem: &GuestMemoryMmap, index: u64, raw: [u8; 16]) {
    let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
    let addr = if addr >> 63 == 0 {
        addr % (MEM_SIZE + 0x1000)
    } else {
        addr
    };
    let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
    let len = if len >> 31 == 0 { len % 0x2_0000 } else { len };
    let flags = u16::from_le_bytes([raw[12], raw[13]]) & 0x7; // NEXT, WRITE, INDIRECT
    let next = u16::from_le_bytes([raw[14], raw[15]]) % (QUEUE_SIZE + 8);
    let mut desc = [0u8; 16];
    desc[0..8].copy_from_slice(&addr.to_le_bytes());
    desc[8..12].copy_from_slice(&len.to_le_bytes());
    desc[12..14].copy_from_slice(&flags.to_le_bytes());
    desc[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&desc, GuestAddress(DESC + index * 16))
        .unwrap();
}

/// Runs `device` on the fuzz input with queue `fuzzed` of `num_queues` as the target.
pub fn run<D: VirtioDevice>(device: D, input: &mut Input<'_>, fuzzed: usize, num_queues: usize) {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_SIZE as usize),
        (GuestAddress(RINGS), RINGS_LEN as usize),
    ])
    .unwrap();

    for i in 0..u64::from(QUEUE_SIZE) {
        put_descriptor(&mem, i, input.take::<16>());
    }
    // Up to a few more entries than the queue holds, to reach the bad-index path.
    let offered = u16::from(input.byte()) % (QUEUE_SIZE + 4);
    let mut heads = Vec::new();
    for i in 0..offered.min(QUEUE_SIZE) {
        let head = u16::from_le_bytes(input.take::<2>()) % (QUEUE_SIZE + 8);
        heads.push(u32::from(head));
        let at = GuestAddress(AVAIL + 4 + 2 * u64::from(i));
        mem.write_obj(head.to_le(), at).unwrap();
    }
    mem.write_obj(offered.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    let rest = input.rest();
    let n = rest.len().min((MEM_SIZE - DATA) as usize);
    mem.write_slice(&rest[..n], GuestAddress(DATA)).unwrap();

    let mut t = MmioTransport::new(device, mem.clone(), Arc::new(NoInterrupt)).unwrap();
    let features = t.offered_features();
    w32(&mut t, 0x70, 1);
    w32(&mut t, 0x70, 3);
    w32(&mut t, 0x24, 0);
    w32(&mut t, 0x20, features as u32);
    w32(&mut t, 0x24, 1);
    w32(&mut t, 0x20, (features >> 32) as u32);
    w32(&mut t, 0x70, 0xb);
    assert_eq!(r32(&mut t, 0x70), 0xb);
    for q in 0..num_queues {
        let (desc, avail, used) = if q == fuzzed {
            (DESC, AVAIL, USED)
        } else {
            let base = IDLE_RINGS + 0x400 * q as u64;
            (base, base + 0x100, base + 0x200)
        };
        w32(&mut t, 0x30, q as u32);
        w32(&mut t, 0x38, u32::from(QUEUE_SIZE));
        for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            w32(&mut t, reg, addr as u32);
            w32(&mut t, reg + 4, (addr >> 32) as u32);
        }
        w32(&mut t, 0x44, 1);
    }
    // DRIVER_OK processes every queue once; the notify does it again.
    w32(&mut t, 0x70, 0xf);
    w32(&mut t, 0x50, fuzzed as u32);

    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert!(
        used_idx <= offered.min(QUEUE_SIZE),
        "used {used_idx} of {offered}"
    );
    for i in 0..u64::from(used_idx) {
        let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * i)).unwrap();
        assert!(heads.contains(&id), "used head {id} never offered");
        assert!(u64::from(len) <= MEM_SIZE, "used length {len}");
    }
}
