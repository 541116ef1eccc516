//! Test helpers: guest memory, a driver-side queue on virtio-queue's `MockSplitQueue`, an
//! interrupt that counts, and the register dance that brings a transport to `DRIVER_OK`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress};

use super::{GuestMemoryMmap, Interrupt, MmioTransport, VirtioDevice};
use crate::bus::BusDevice;

/// Size of the test guest's memory: one region at 0.
pub const MEM_SIZE: u64 = 0x100_0000;

/// 16 MiB of guest memory with a dirty bitmap, like the VMM's.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// One descriptor of a chain the test driver builds.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Desc {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// The driver's side of one split queue.
pub struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    /// A device-side queue over the same rings, for tests of chain parsing alone.
    queue: Queue,
}

impl<'a> Driver<'a> {
    /// A queue of `size` entries with its rings at guest address 0.
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, 0, size)
    }

    /// A queue of `size` entries with its rings at `start`.
    pub fn at(mem: &'a GuestMemoryMmap, start: u64, size: u16) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(start), size);
        let queue = vq.create_queue::<Queue>().unwrap();
        Self {
            mem,
            vq,
            size,
            next_desc: 0,
            avail_idx: 0,
            queue,
        }
    }

    pub fn desc_table(&self) -> u64 {
        self.vq.desc_table_addr().0
    }

    pub fn avail_ring(&self) -> u64 {
        self.vq.avail_addr().0
    }

    pub fn used_ring(&self) -> u64 {
        self.vq.used_addr().0
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    fn store(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let desc = SplitDescriptor::new(addr, len, flags as u16, next);
        self.vq
            .desc_table()
            .store(index, RawDescriptor::from(desc))
            .unwrap();
    }

    /// Makes `head` available to the device.
    pub fn push_head(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        self.vq
            .avail()
            .ring()
            .ref_at(slot as usize)
            .unwrap()
            .store(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.vq.avail().idx().store(self.avail_idx);
    }

    /// Writes `descs` as a chain in the next free table slots and makes it available; returns
    /// its head.
    pub fn add(&mut self, descs: &[Desc]) -> u16 {
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let next = (i + 1 < descs.len()).then_some(i as u16 + 1);
                (d.addr, d.len, d.write, next)
            })
            .collect();
        self.add_raw(&raw)
    }

    /// Writes descriptors `(addr, len, writable, next)` in consecutive slots, `next` relative
    /// to the first slot, and makes the first one available; returns its index.
    pub fn add_raw(&mut self, descs: &[(u64, u32, bool, Option<u16>)]) -> u16 {
        let base = self.next_desc;
        for (i, &(addr, len, write, next)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = next.map_or(0, |n| base.wrapping_add(n));
            self.store((base + i as u16) % self.size, addr, len, flags, next);
        }
        self.next_desc = (base + descs.len() as u16) % self.size;
        self.push_head(base);
        base
    }

    /// Pops the next chain through the driver's own device-side queue (chain tests only).
    pub fn pop_chain(&mut self) -> DescriptorChain<&'a GuestMemoryMmap> {
        let mem: &'a GuestMemoryMmap = self.mem;
        self.queue.iter(mem).unwrap().next().unwrap()
    }

    /// Entries the device has put in the used ring.
    pub fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// Used ring entry `i`: (head, length written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let e = self
            .vq
            .used()
            .ring()
            .ref_at((i % self.size) as usize)
            .unwrap()
            .load();
        (e.id(), e.len())
    }
}

/// Counts the interrupts a transport raises.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    pub used: AtomicUsize,
    pub config: AtomicUsize,
}

impl CountingInterrupt {
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    pub fn config(&self) -> usize {
        self.config.load(Ordering::SeqCst)
    }
}

impl Interrupt for CountingInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.used.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn signal_config(&self) -> std::io::Result<()> {
        self.config.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A transport around `device` over `mem`, and its interrupt counter.
pub fn transport<D: VirtioDevice>(
    device: D,
    mem: &GuestMemoryMmap,
) -> (MmioTransport<D>, Arc<CountingInterrupt>) {
    let irq = Arc::new(CountingInterrupt::default());
    let t = MmioTransport::new(device, mem.clone(), irq.clone()).unwrap();
    (t, irq)
}

pub fn r32(t: &mut impl BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn w32(t: &mut impl BusDevice, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Status bits.
pub(crate) use super::mmio::{ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET};

/// Negotiates `features` and stops at `FEATURES_OK` (returns the status read back).
pub fn negotiate(t: &mut impl BusDevice, features: u64) -> u32 {
    w32(t, 0x70, ACK);
    w32(t, 0x70, ACK | DRIVER);
    w32(t, 0x24, 0);
    w32(t, 0x20, features as u32);
    w32(t, 0x24, 1);
    w32(t, 0x20, (features >> 32) as u32);
    w32(t, 0x70, ACK | DRIVER | FEATURES_OK);
    r32(t, 0x70)
}

/// Programs queue `index` from a driver's rings and marks it ready.
pub fn setup_queue(t: &mut impl BusDevice, index: u32, d: &Driver<'_>) {
    w32(t, 0x30, index);
    w32(t, 0x38, u32::from(d.size()));
    for (low, addr) in [
        (0x80, d.desc_table()),
        (0x90, d.avail_ring()),
        (0xa0, d.used_ring()),
    ] {
        w32(t, low, addr as u32);
        w32(t, low + 4, (addr >> 32) as u32);
    }
    w32(t, 0x44, 1);
}

/// Brings a transport to `DRIVER_OK` with every offered feature and the given queues.
pub fn activate<D: VirtioDevice>(t: &mut MmioTransport<D>, drivers: &[&Driver<'_>]) {
    let features = t.offered_features();
    assert_eq!(negotiate(t, features) & FEATURES_OK, FEATURES_OK);
    for (i, d) in drivers.iter().enumerate() {
        setup_queue(t, i as u32, d);
    }
    w32(t, 0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(t.is_activated(), "status {:#x}", t.status());
}

/// Notifies queue `index` through the QueueNotify register.
pub fn notify(t: &mut impl BusDevice, index: u32) {
    w32(t, 0x50, index);
}

/// Writes `bytes` at `addr` of guest memory.
pub fn put(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr)).unwrap();
}

/// Reads `len` bytes at `addr` of guest memory.
pub fn get(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}
