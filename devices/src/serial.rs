//! COM1: a 16550A UART from vm-superio on the PIO bus, its interrupt raised through an irqfd.
//! Guest output goes to any writer (the console); host input is queued into the receive FIFO.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises an interrupt by writing to an eventfd that KVM has registered as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals an eventfd when the guest has drained the receive FIFO, so held-back input can flow.
#[derive(Debug)]
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A lost wake-up only delays input until the next read by the guest.
        let _ = self.0.write(1);
    }
}

/// The console UART.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, InputDrained, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART that raises `irq`, signals `drained` when its receive FIFO empties and writes
    /// guest output to `out`.
    pub fn new(irq: EventFdTrigger, drained: InputDrained, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::with_events(irq, drained, out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(input).unwrap_or_else(|e| {
            log::warn!("serial input: {e}");
            0
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(offset, *byte) {
                log::warn!("serial output: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, Sink, EventFd) {
        let sink = Sink::default();
        let irq = EventFd::new(libc_nonblock()).unwrap();
        let drained = EventFd::new(libc_nonblock()).unwrap();
        let dev = SerialDevice::new(
            EventFdTrigger(irq.try_clone().unwrap()),
            InputDrained(drained),
            Box::new(sink.clone()),
        );
        (dev, sink, irq)
    }

    fn libc_nonblock() -> i32 {
        0o4000 // EFD_NONBLOCK
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut dev, sink, _) = device();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_is_readable_and_raises_interrupt_when_enabled() {
        let (mut dev, _, irq) = device();
        dev.write(1, &[0x01]); // IER: received data available
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        assert_eq!(byte, *b"a");
    }

    #[test]
    fn fifo_full_holds_input_back() {
        let (mut dev, _, _) = device();
        let big = [b'x'; 200];
        let n = dev.enqueue_input(&big);
        assert!(n < big.len());
        assert_eq!(dev.enqueue_input(&big), 0);
    }

    #[test]
    fn wide_or_odd_accesses_do_not_panic() {
        let (mut dev, _, _) = device();
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(0, &[1, 2]);
        dev.write(u64::MAX, &[1]);
    }
}
