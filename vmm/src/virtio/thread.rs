//! The device thread: one event-manager loop serving every virtio device's queue
//! notifications (ioeventfds) and backends (taps), off the vCPU threads. Started with the VM,
//! stopped (and joined) when the device set is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A subscriber the device thread serves.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// The running device thread.
#[derive(Debug)]
pub struct DeviceThread {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl DeviceThread {
    /// Starts a thread serving `subscribers` until [`DeviceThread`] is dropped.
    pub fn start(subscribers: Vec<Subscriber>) -> std::io::Result<Self> {
        let mut manager = EventManager::<Subscriber>::new().map_err(std::io::Error::other)?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stopped = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Box::new(Stopper {
            evt: stop.try_clone()?,
            stopped: stopped.clone(),
        }));
        for subscriber in subscribers {
            manager.add_subscriber(subscriber);
        }
        let thread = std::thread::Builder::new()
            .name("virtio".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Device);
                while !stopped.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        log::error!("virtio device thread: {e}");
                        break;
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot stop the virtio device thread: {e}");
            return;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Ends the loop when its eventfd is written.
struct Stopper {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("virtio device thread: cannot watch its stop eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_and_stops() {
        let thread = DeviceThread::start(Vec::new()).unwrap();
        drop(thread);
    }
}
