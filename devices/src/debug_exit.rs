//! A test-exit port compatible with QEMU's `isa-debug-exit` (port 0xf4): a guest writes a
//! status byte and the VM ends, 0 as a clean power-off, anything else as a reported failure.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The port QEMU's `isa-debug-exit` uses by default in test setups.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;

/// Signals `status + 1` on an eventfd (an eventfd cannot carry 0). Only the first status
/// counts: eventfd writes add up, and a guest may write more than once on its way out.
#[derive(Debug)]
pub struct DebugExit {
    evt: EventFd,
    reported: bool,
}

impl DebugExit {
    /// A device that reports the guest's status on `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            evt,
            reported: false,
        }
    }

    /// Decodes what the event loop read from the eventfd back into the guest's status byte.
    pub fn status_from_event(value: u64) -> u8 {
        value.saturating_sub(1).min(u64::from(u8::MAX)) as u8
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&status) = data.first().filter(|_| !self.reported) {
            self.reported = true;
            if let Err(e) = self.evt.write(u64::from(status) + 1) {
                log::error!("debug-exit: cannot signal: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_the_eventfd() {
        for status in [0u8, 1, 3, 255] {
            let evt = EventFd::new(0o4000).unwrap();
            let mut dev = DebugExit::new(evt.try_clone().unwrap());
            dev.write(0, &[status, 9, 9, 9]);
            assert_eq!(DebugExit::status_from_event(evt.read().unwrap()), status);
        }
    }

    #[test]
    fn only_the_first_status_counts() {
        let evt = EventFd::new(0o4000).unwrap();
        let mut dev = DebugExit::new(evt.try_clone().unwrap());
        dev.write(0, &[1]);
        dev.write(0, &[1]);
        dev.write(0, &[0]);
        assert_eq!(DebugExit::status_from_event(evt.read().unwrap()), 1);
    }

    #[test]
    fn empty_writes_signal_nothing() {
        let evt = EventFd::new(0o4000).unwrap();
        let mut dev = DebugExit::new(evt.try_clone().unwrap());
        dev.write(0, &[]);
        assert!(evt.read().is_err());
    }
}
