//! Serves a virtio device off the vCPU threads: an event-manager subscriber that processes a
//! queue when its ioeventfd fires, and hands a backend fd's readiness (net: the tap,
//! edge-triggered) to the device.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::{DeviceError, Queues, VirtioDevice};
use super::MmioTransport;

/// The event data that marks the backend fd (queue indices use the others).
const BACKEND: u32 = u32::MAX;

/// What the device does when its backend fd becomes readable.
pub type BackendHandler<D> = fn(&mut D, &mut Queues<'_>) -> Result<(), DeviceError>;

/// An event-manager subscriber for one virtio device.
pub struct VirtioSubscriber<D> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    notify: Vec<EventFd>,
    backend: Option<(RawFd, BackendHandler<D>)>,
}

impl<D> std::fmt::Debug for VirtioSubscriber<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSubscriber")
            .field("notify", &self.notify)
            .field("backend", &self.backend.map(|(fd, _)| fd))
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> VirtioSubscriber<D> {
    /// Serves `transport`; `notify[i]` is the ioeventfd the VMM registered for queue `i` at
    /// `base + NOTIFY_OFFSET` with datamatch `i`.
    pub fn new(transport: Arc<Mutex<MmioTransport<D>>>, notify: Vec<EventFd>) -> Self {
        Self {
            transport,
            notify,
            backend: None,
        }
    }

    /// Also watches `fd` (edge-triggered) and runs `handler` on the active device when it
    /// becomes readable. The handler must drain the fd unless the device is waiting for the
    /// guest, and resume when a queue notification unblocks it.
    pub fn with_backend(mut self, fd: RawFd, handler: BackendHandler<D>) -> Self {
        self.backend = Some((fd, handler));
        self
    }

    fn lock(&self) -> MutexGuard<'_, MmioTransport<D>> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<D: VirtioDevice> MutEventSubscriber for VirtioSubscriber<D> {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.notify.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {index} notifications: {e}");
            }
        }
        if let Some((fd, _)) = self.backend {
            let events =
                Events::with_data_raw(fd, BACKEND, EventSet::IN | EventSet::EDGE_TRIGGERED);
            if let Err(e) = ops.add(events) {
                log::error!("virtio: cannot watch the backend: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if data == BACKEND {
            if let Some((_, handler)) = self.backend {
                self.lock().with_device(handler);
            }
            return;
        }
        let index = data as usize;
        let Some(evt) = self.notify.get(index) else {
            log::warn!("virtio: event for unknown queue {index}");
            return;
        };
        // A spurious wake-up finds the counter at zero; process the queue anyway.
        let _ = evt.read();
        self.lock().process_queue(index);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use event_manager::{EventManager, SubscriberOps};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::virtio::net::{net_subscriber, Net};
    use crate::virtio::testutil::*;
    use crate::virtio::{Rng, Tap};

    #[test]
    fn ioeventfd_processes_its_queue() {
        let m = mem();
        let (mut t, irq) = transport(Rng::new(), &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        let transport = Arc::new(Mutex::new(t));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let mut manager = EventManager::<VirtioSubscriber<Rng>>::new().unwrap();
        manager.add_subscriber(VirtioSubscriber::new(transport.clone(), vec![evt]));

        d.add(&[Desc::w(0x10_0000, 32)]);
        kick.write(1).unwrap();
        assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used(0).1, 32);
        assert_eq!(irq.used(), 1);
    }

    #[test]
    fn tap_readiness_receives_frames() {
        let m = mem();
        let (ours, host) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let net = Net::new(
            Tap::from_fd(ours.into(), "t0"),
            crate::virtio::MacAddr::random_local(),
        );
        let (mut t, irq) = transport(net, &m);
        let mut rx = Driver::at(&m, 0, 16);
        let tx = Driver::at(&m, 0x8000, 16);
        activate(&mut t, &[&rx, &tx]);
        rx.add(&[Desc::w(0x10_0000, 1526)]);
        let transport = Arc::new(Mutex::new(t));
        let evts: Vec<_> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let mut manager = EventManager::<VirtioSubscriber<Net>>::new().unwrap();
        manager.add_subscriber(net_subscriber(transport, evts));

        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[6u8; 64]);
        host.send(&frame).unwrap();
        assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(rx.used_idx(), 1);
        assert_eq!(rx.used(0).1, 76);
        assert_eq!(irq.used(), 1);
    }
}
