//! virtio devices on the virtio-mmio transport (version 2, modern): block, net and rng.
//!
//! # Shape
//!
//! ```text
//!  vCPU thread                      device thread (event-manager)
//!  MMIO exit ──► Bus ──► MmioTransport<D> ◄── VirtioSubscriber<D> ◄── ioeventfd per queue
//!                          │    (one Mutex)            │                 (QueueNotify, 0x50)
//!                          │                           └── tap fd (net rx, edge-triggered)
//!                          ├── queues, features, status, interrupt status
//!                          ├── D: VirtioDevice (Block, Net, Rng) ── request handling
//!                          └── Interrupt (irqfd) ◄── raised when a used ring advanced
//! ```
//!
//! - [`MmioTransport`] owns everything the guest programs through the registers: feature
//!   negotiation, the status state machine, the queues (virtio-queue [`Queue`]s), the interrupt
//!   status and the config generation. It is a [`BusDevice`](crate::BusDevice) of
//!   [`MMIO_LEN`] bytes.
//! - A [`VirtioDevice`] only handles requests: the transport hands it the guest memory and its
//!   queues ([`Queues`]) when a queue is notified, and raises the used-buffer interrupt itself
//!   whenever a used ring advanced. One trait, three implementations.
//! - Descriptor chains are validated once, by [`chain::parse`], before a device reads or writes
//!   a byte: every buffer inside guest memory, device-readable buffers before device-writable
//!   ones, no loops, bounded length. Devices then only move bytes through the checked
//!   [`chain::Chain`] segments.
//! - Every device has its own plain serializable state type ([`BlockState`], [`NetState`],
//!   [`RngState`]) holding the [`TransportState`] and the device's configuration; restoring
//!   validates the state as untrusted input.
//!
//! # Wiring (the VMM's side)
//!
//! 1. Build the device (`Block::open`, `Net::new(Tap::open(..)?, mac)`, `Rng::new()`), then
//!    `MmioTransport::new(device, mem.clone(), Arc::new(EventFdInterrupt::new(irqfd)))` and put
//!    it in an `Arc<Mutex<_>>` on the MMIO bus at its base, `MMIO_LEN` bytes long.
//! 2. irqfd: register the interrupt's eventfd with KVM for the device's GSI.
//! 3. ioeventfd: for each queue `i` in `0..transport.num_queues()`, register an eventfd at
//!    `base + NOTIFY_OFFSET` (4 bytes, datamatch `i`), and hand them to a
//!    [`VirtioSubscriber`] (net: [`net_subscriber`]) added to an event-manager running on a
//!    device thread. Without ioeventfds, QueueNotify writes are served on the vCPU thread.
//!
//! A guest that programs the device wrongly never panics the VMM: the transport ignores the
//! access or sets `DEVICE_NEEDS_RESET`, and logs it.

pub mod block;
pub mod chain;
mod device;
mod interrupt;
pub mod metrics;
pub mod mmio;
pub mod net;
pub mod rng;
mod state;
mod subscriber;
pub mod tap;

#[cfg(test)]
mod testutil;

pub use block::{Block, BlockError, BlockState};
pub use device::{DeviceError, Queues, VirtioDevice};
pub use interrupt::{EventFdInterrupt, Interrupt};
pub use metrics::{DeviceCounts, DeviceMetrics};
pub use mmio::{cmdline_entry, MmioError, MmioTransport, MMIO_LEN, NOTIFY_OFFSET};
pub use net::{net_subscriber, MacAddr, Net, NetError, NetState};
pub use rng::{Rng, RngState};
pub use state::{QueueSnapshot, TransportState};
pub use subscriber::VirtioSubscriber;
pub use tap::{Tap, TapError};
pub use virtio_queue::Queue;

/// Guest memory as the VMM maps it: vm-memory's mmap backend with a dirty bitmap, so the pages
/// devices write are seen by dirty tracking.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
