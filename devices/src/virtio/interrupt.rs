//! How a virtio transport interrupts the guest: a small trait, implemented with an eventfd that
//! the VMM registers with KVM as an irqfd (both kinds of interrupt share one line on MMIO).

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// Raises the device's interrupt line. The transport sets the interrupt status bits first.
pub trait Interrupt: Send + Sync + std::fmt::Debug {
    /// A used ring has new entries.
    fn signal_used_queue(&self) -> io::Result<()>;
    /// The configuration space (or the device status, as with `DEVICE_NEEDS_RESET`) changed.
    fn signal_config(&self) -> io::Result<()>;
}

/// An interrupt raised by writing to an eventfd (an irqfd in the VMM).
#[derive(Debug)]
pub struct EventFdInterrupt {
    evt: EventFd,
}

impl EventFdInterrupt {
    /// Raises the interrupt through `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self { evt }
    }

    /// The eventfd, to register with KVM as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Interrupt for EventFdInterrupt {
    fn signal_used_queue(&self) -> io::Result<()> {
        self.evt.write(1)
    }

    fn signal_config(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn both_kinds_signal_the_eventfd() {
        let irq = EventFdInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        irq.signal_used_queue().unwrap();
        irq.signal_config().unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 2);
    }
}
