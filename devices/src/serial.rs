//! COM1: a 16550A UART from vm-superio on the PIO bus, its interrupt raised through an irqfd.
//! Guest output goes to any writer (the console); host input is queued into the receive FIFO.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
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

/// The UART's registers and receive FIFO, for snapshots and migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest (at most the FIFO size, 64).
    pub in_buffer: Vec<u8>,
}

/// Errors from restoring the UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO is larger than the UART's.
    #[error("serial state holds {0} bytes of input, more than the FIFO")]
    FifoOverflow(usize),
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

    /// A UART restored from `state`.
    pub fn from_state(
        state: &SerialDeviceState,
        irq: EventFdTrigger,
        drained: InputDrained,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, SerialError> {
        let raw = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&raw, irq, drained, out)
            .map_err(|_| SerialError::FifoOverflow(state.in_buffer.len()))?;
        Ok(Self { uart })
    }

    /// The UART's state.
    pub fn state(&self) -> SerialDeviceState {
        let raw = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: raw.baud_divisor_low,
            baud_divisor_high: raw.baud_divisor_high,
            interrupt_enable: raw.interrupt_enable,
            interrupt_identification: raw.interrupt_identification,
            line_control: raw.line_control,
            line_status: raw.line_status,
            modem_control: raw.modem_control,
            modem_status: raw.modem_status,
            scratch: raw.scratch,
            in_buffer: raw.in_buffer,
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
    fn state_round_trips() {
        let (mut dev, _, _) = device();
        dev.write(3, &[0x80]); // DLAB on
        dev.write(0, &[0x0c]); // divisor low
        dev.write(3, &[0x03]); // 8N1, DLAB off
        dev.write(7, &[0x5a]); // scratch
        dev.enqueue_input(b"xyz");
        let state = dev.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let sink = Sink::default();
        let mut restored = SerialDevice::from_state(
            &back,
            EventFdTrigger(EventFd::new(libc_nonblock()).unwrap()),
            InputDrained(EventFd::new(libc_nonblock()).unwrap()),
            Box::new(sink),
        )
        .unwrap();
        assert_eq!(restored.state(), state);
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        let mut byte = [0u8];
        restored.read(0, &mut byte);
        assert_eq!(byte, *b"x");
    }

    #[test]
    fn oversized_fifo_state_is_rejected() {
        let state = SerialDeviceState {
            baud_divisor_low: 12,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 0,
            in_buffer: vec![0; 65],
        };
        let result = SerialDevice::from_state(
            &state,
            EventFdTrigger(EventFd::new(libc_nonblock()).unwrap()),
            InputDrained(EventFd::new(libc_nonblock()).unwrap()),
            Box::new(Sink::default()),
        );
        assert!(matches!(result, Err(SerialError::FifoOverflow(65))));
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
