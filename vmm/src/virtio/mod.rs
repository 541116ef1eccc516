//! The VM's virtio-mmio devices (block, net, rng from `devices::virtio`), wired into KVM: each
//! device gets a slot from `layout` (register window and GSI), an irqfd on its GSI, one
//! ioeventfd per queue at QueueNotify (datamatch = queue index), and a place on the MMIO bus;
//! one device thread serves every queue and tap (see [`thread`]).
//!
//! ```text
//!  guest write QueueNotify ──► KVM ioeventfd ──► device thread ──► MmioTransport<D> (Mutex)
//!  guest read/write regs   ──► MMIO exit ──► Bus ─────────────────────┘      │
//!  guest interrupt         ◄── KVM irqfd (GSI = slot's IRQ) ◄─────────────────┘
//! ```
//!
//! Devices take slots in the order of [`DeviceSpec`]s (the config puts disks first, then
//! nets, then the rng), so the first `--disk` is always at `layout::VIRTIO_MMIO_BASE`. Guests
//! find them through the ACPI DSDT ([`VirtioDevices::acpi_devices`]) or, for kernels built
//! with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, through `virtio_mmio.device=` entries appended to
//! the kernel command line ([`cmdline_with_devices`]).

pub mod spec;
pub mod thread;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::virtio::{
    cmdline_entry, net_subscriber, Block, BlockError, BlockState, DeviceMetrics, EventFdInterrupt,
    Interrupt, MacAddr, MmioError, MmioTransport, Net, NetError, NetState, Rng, RngState, Tap,
    VirtioDevice, VirtioSubscriber, MMIO_LEN, NOTIFY_OFFSET,
};
use devices::{Bus, BusError};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::VirtioMmioDevice;
use crate::layout;
use crate::memory::GuestMemory;
use thread::{DeviceThread, Subscriber};

/// Errors from building or restoring the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// More devices than there are slots.
    #[error("{0} virtio devices: at most {max} fit", max = layout::VIRTIO_MMIO_MAX_DEVICES)]
    TooMany(usize),
    /// An eventfd could not be created.
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused the device's irqfd.
    #[error("KVM refused irqfd for GSI {irq}: {source}")]
    Irqfd { irq: u32, source: kvm_ioctls::Error },
    /// KVM refused a queue's ioeventfd.
    #[error("KVM refused ioeventfd at {addr:#x} for queue {queue}: {source}")]
    Ioeventfd {
        addr: u64,
        queue: usize,
        source: kvm_ioctls::Error,
    },
    /// A disk could not be opened or restored.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A tap could not be opened, or a net device restored.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A device's saved transport state was refused.
    #[error("virtio device state: {0}")]
    Transport(#[from] MmioError),
    /// The device thread could not be started.
    #[error("cannot start the virtio device thread: {0}")]
    Thread(std::io::Error),
}

/// One virtio device to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// virtio-blk on a raw image.
    Block {
        /// The image.
        path: PathBuf,
        /// Refuse writes.
        read_only: bool,
    },
    /// virtio-net on a tap.
    Net {
        /// Tap interface name.
        tap: String,
        /// The guest's MAC address.
        mac: MacAddr,
    },
    /// virtio-rng.
    Rng,
}

/// A device's saved state, with what is needed to reopen its backend on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VirtioDeviceState {
    /// virtio-blk: the image is reopened at `path` (read-only if the state says so).
    Block {
        /// The image file.
        path: PathBuf,
        /// The device.
        state: BlockState,
    },
    /// virtio-net: the tap `tap` is opened again (created if it no longer exists).
    Net {
        /// Tap interface name.
        tap: String,
        /// The device.
        state: NetState,
    },
    /// virtio-rng.
    Rng {
        /// The device.
        state: RngState,
    },
}

/// The command line the guest gets: `cmdline` plus one `virtio_mmio.device=` entry for each of
/// the first `count` slots. The test guest ignores keys with a dot, as Linux does for modules
/// it does not have.
pub fn cmdline_with_devices(cmdline: &str, count: usize) -> String {
    let mut out = cmdline.to_owned();
    for index in 0..count {
        if let Some((base, irq)) = layout::virtio_mmio_slot(index) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&cmdline_entry(base, irq));
        }
    }
    out
}

/// The VM's virtio devices and the thread serving them.
#[derive(Debug, Default)]
pub struct VirtioDevices {
    devices: Vec<Device>,
    /// Serves the devices; stopped and joined when dropped.
    _thread: Option<DeviceThread>,
}

#[derive(Debug)]
struct Device {
    base: u64,
    irq: u32,
    kind: Kind,
    metrics: Arc<DeviceMetrics>,
}

#[derive(Debug)]
enum Kind {
    Block {
        transport: Arc<Mutex<MmioTransport<Block>>>,
        path: PathBuf,
    },
    Net {
        transport: Arc<Mutex<MmioTransport<Net>>>,
        tap: String,
    },
    Rng {
        transport: Arc<Mutex<MmioTransport<Rng>>>,
    },
}

impl VirtioDevices {
    /// No devices, no thread.
    pub fn none() -> Self {
        Self::default()
    }

    /// Opens every backend, wires each device into `vm` and starts the device thread.
    pub fn build(vm: &VmFd, mem: &GuestMemory, specs: &[DeviceSpec]) -> Result<Self, VirtioError> {
        check_count(specs.len())?;
        let mut wiring = Wiring::new(vm, mem);
        for spec in specs {
            match spec {
                DeviceSpec::Block { path, read_only } => {
                    let block = Block::open(path, *read_only)?;
                    wiring.add_block(path, |mem, irq| Ok(MmioTransport::new(block, mem, irq)?))?;
                }
                DeviceSpec::Net { tap, mac } => {
                    let net = Net::new(Tap::open(tap).map_err(NetError::from)?, *mac);
                    wiring.add_net(tap, |mem, irq| Ok(MmioTransport::new(net, mem, irq)?))?;
                }
                DeviceSpec::Rng => {
                    wiring.add_rng(|mem, irq| Ok(MmioTransport::new(Rng::new(), mem, irq)?))?;
                }
            }
        }
        wiring.finish()
    }

    /// Rebuilds the devices of a snapshot (reopening disks and taps), validating each state,
    /// and starts the device thread. Call [`process_all_queues`](Self::process_all_queues)
    /// before the vCPUs run.
    pub fn restore(
        vm: &VmFd,
        mem: &GuestMemory,
        states: &[VirtioDeviceState],
    ) -> Result<Self, VirtioError> {
        check_count(states.len())?;
        let mut wiring = Wiring::new(vm, mem);
        for saved in states {
            match saved {
                VirtioDeviceState::Block { path, state } => {
                    let disk = OpenOptions::new()
                        .read(true)
                        .write(!state.read_only)
                        .open(path)
                        .map_err(|source| BlockError::Open {
                            path: path.clone(),
                            source,
                        })?;
                    wiring.add_block(path, |mem, irq| {
                        Ok(MmioTransport::<Block>::from_state(state, disk, mem, irq)?)
                    })?;
                }
                VirtioDeviceState::Net { tap, state } => {
                    let opened = Tap::open(tap).map_err(NetError::from)?;
                    wiring.add_net(tap, |mem, irq| {
                        Ok(MmioTransport::<Net>::from_state(state, opened, mem, irq)?)
                    })?;
                }
                VirtioDeviceState::Rng { state } => {
                    wiring.add_rng(|mem, irq| {
                        Ok(MmioTransport::<Rng>::from_state(state, mem, irq)?)
                    })?;
                }
            }
        }
        wiring.finish()
    }

    /// How many devices there are.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// No devices.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Each device's request counters, in slot order: `device` names it by type and index
    /// among its type (`block0`, `net0`, `rng0`), `backend` is its disk path or tap.
    pub fn metrics(&self) -> Vec<serde_json::Value> {
        let mut seen = std::collections::HashMap::<&str, usize>::new();
        self.devices
            .iter()
            .map(|d| {
                let (kind, backend) = match &d.kind {
                    Kind::Block { path, .. } => ("block", path.display().to_string()),
                    Kind::Net { tap, .. } => ("net", tap.clone()),
                    Kind::Rng { .. } => ("rng", String::new()),
                };
                let index = seen.entry(kind).or_default();
                let name = format!("{kind}{index}");
                *index += 1;
                let mut value = serde_json::to_value(d.metrics.counts()).unwrap_or_default();
                value["device"] = name.into();
                value["backend"] = backend.into();
                value
            })
            .collect()
    }

    /// Puts every device on the MMIO bus at its slot.
    pub fn attach(&self, mmio: &mut Bus) -> Result<(), BusError> {
        for device in &self.devices {
            let shared: devices::bus::SharedDevice = match &device.kind {
                Kind::Block { transport, .. } => transport.clone(),
                Kind::Net { transport, .. } => transport.clone(),
                Kind::Rng { transport } => transport.clone(),
            };
            mmio.insert(shared, device.base, MMIO_LEN)?;
        }
        Ok(())
    }

    /// The devices as the ACPI DSDT lists them.
    pub fn acpi_devices(&self) -> Vec<VirtioMmioDevice> {
        self.devices
            .iter()
            .map(|d| VirtioMmioDevice {
                base: d.base,
                len: MMIO_LEN,
                irq: d.irq,
            })
            .collect()
    }

    /// Locks every device (in slot order) so that none moves a byte of guest memory or changes
    /// state until the guard is dropped: for snapshots and migration, with the vCPUs paused.
    pub fn lock(&self) -> VirtioGuard<'_> {
        let guards = self
            .devices
            .iter()
            .map(|d| match &d.kind {
                Kind::Block { transport, path } => Locked::Block(lock(transport), path),
                Kind::Net { transport, tap } => Locked::Net(lock(transport), tap),
                Kind::Rng { transport } => Locked::Rng(lock(transport)),
            })
            .collect();
        VirtioGuard { guards }
    }

    /// Processes every ready queue of every device once (after a restore: catches
    /// notifications the snapshot's guest made that no device had served yet).
    pub fn process_all_queues(&self) {
        for device in &self.devices {
            match &device.kind {
                Kind::Block { transport, .. } => lock(transport).process_all_queues(),
                Kind::Net { transport, .. } => lock(transport).process_all_queues(),
                Kind::Rng { transport } => lock(transport).process_all_queues(),
            }
        }
    }
}

/// Every device locked; see [`VirtioDevices::lock`].
#[derive(Debug)]
pub struct VirtioGuard<'a> {
    guards: Vec<Locked<'a>>,
}

#[derive(Debug)]
enum Locked<'a> {
    Block(MutexGuard<'a, MmioTransport<Block>>, &'a Path),
    Net(MutexGuard<'a, MmioTransport<Net>>, &'a str),
    Rng(MutexGuard<'a, MmioTransport<Rng>>),
}

impl VirtioGuard<'_> {
    /// Every device's state, in slot order.
    pub fn state(&self) -> Vec<VirtioDeviceState> {
        self.guards
            .iter()
            .map(|g| match g {
                Locked::Block(t, path) => VirtioDeviceState::Block {
                    path: path.to_path_buf(),
                    state: t.state(),
                },
                Locked::Net(t, tap) => VirtioDeviceState::Net {
                    tap: (*tap).to_owned(),
                    state: t.state(),
                },
                Locked::Rng(t) => VirtioDeviceState::Rng { state: t.state() },
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_count(count: usize) -> Result<(), VirtioError> {
    if count > layout::VIRTIO_MMIO_MAX_DEVICES {
        return Err(VirtioError::TooMany(count));
    }
    Ok(())
}

/// Devices being wired, slot after slot.
struct Wiring<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemory,
    devices: Vec<Device>,
    subscribers: Vec<Subscriber>,
}

impl<'a> Wiring<'a> {
    fn new(vm: &'a VmFd, mem: &'a GuestMemory) -> Self {
        Self {
            vm,
            mem,
            devices: Vec::new(),
            subscribers: Vec::new(),
        }
    }

    fn add_block(
        &mut self,
        path: &Path,
        make: impl FnOnce(GuestMemory, Arc<dyn Interrupt>) -> Result<MmioTransport<Block>, VirtioError>,
    ) -> Result<(), VirtioError> {
        let (base, irq, transport, notify) = self.wire(make)?;
        let metrics = lock(&transport).metrics();
        self.subscribers
            .push(Box::new(VirtioSubscriber::new(transport.clone(), notify)));
        self.devices.push(Device {
            base,
            irq,
            metrics,
            kind: Kind::Block {
                transport,
                path: path.to_path_buf(),
            },
        });
        Ok(())
    }

    fn add_net(
        &mut self,
        tap: &str,
        make: impl FnOnce(GuestMemory, Arc<dyn Interrupt>) -> Result<MmioTransport<Net>, VirtioError>,
    ) -> Result<(), VirtioError> {
        let (base, irq, transport, notify) = self.wire(make)?;
        let metrics = lock(&transport).metrics();
        self.subscribers
            .push(Box::new(net_subscriber(transport.clone(), notify)));
        self.devices.push(Device {
            base,
            irq,
            metrics,
            kind: Kind::Net {
                transport,
                tap: tap.to_owned(),
            },
        });
        Ok(())
    }

    fn add_rng(
        &mut self,
        make: impl FnOnce(GuestMemory, Arc<dyn Interrupt>) -> Result<MmioTransport<Rng>, VirtioError>,
    ) -> Result<(), VirtioError> {
        let (base, irq, transport, notify) = self.wire(make)?;
        let metrics = lock(&transport).metrics();
        self.subscribers
            .push(Box::new(VirtioSubscriber::new(transport.clone(), notify)));
        self.devices.push(Device {
            base,
            irq,
            metrics,
            kind: Kind::Rng { transport },
        });
        Ok(())
    }

    /// The next slot: an irqfd on its GSI, the transport, an ioeventfd per queue.
    #[allow(clippy::type_complexity)]
    fn wire<D: VirtioDevice>(
        &mut self,
        make: impl FnOnce(GuestMemory, Arc<dyn Interrupt>) -> Result<MmioTransport<D>, VirtioError>,
    ) -> Result<(u64, u32, Arc<Mutex<MmioTransport<D>>>, Vec<EventFd>), VirtioError> {
        let index = self.devices.len();
        let (base, irq) = layout::virtio_mmio_slot(index).ok_or(VirtioError::TooMany(index + 1))?;
        let evt = EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
        self.vm
            .register_irqfd(&evt, irq)
            .map_err(|source| VirtioError::Irqfd { irq, source })?;
        let transport = make(self.mem.clone(), Arc::new(EventFdInterrupt::new(evt)))?;
        let addr = base + NOTIFY_OFFSET;
        let mut notify = Vec::with_capacity(transport.num_queues());
        for queue in 0..transport.num_queues() {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
            self.vm
                .register_ioevent(&evt, &IoEventAddress::Mmio(addr), queue as u32)
                .map_err(|source| VirtioError::Ioeventfd {
                    addr,
                    queue,
                    source,
                })?;
            notify.push(evt);
        }
        Ok((base, irq, Arc::new(Mutex::new(transport)), notify))
    }

    fn finish(self) -> Result<VirtioDevices, VirtioError> {
        let thread = if self.subscribers.is_empty() {
            None
        } else {
            Some(DeviceThread::start(self.subscribers).map_err(VirtioError::Thread)?)
        };
        Ok(VirtioDevices {
            devices: self.devices,
            _thread: thread,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_entries_follow_the_slots() {
        assert_eq!(cmdline_with_devices("console=ttyS0", 0), "console=ttyS0");
        assert_eq!(
            cmdline_with_devices("console=ttyS0", 2),
            "console=ttyS0 virtio_mmio.device=512@0xd0000000:5 virtio_mmio.device=512@0xd0001000:6"
        );
        assert_eq!(
            cmdline_with_devices("", 1),
            "virtio_mmio.device=512@0xd0000000:5"
        );
    }

    #[test]
    fn state_round_trips_through_json() {
        let state = VirtioDeviceState::Rng {
            state: RngState {
                transport: Default::default(),
            },
        };
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains("\"kind\":\"rng\""), "{json}");
        let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
    }
}
