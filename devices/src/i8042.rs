//! A minimal i8042 keyboard controller: enough for Linux's probe, and the reset line (0xFE on
//! port 0x64) that guests use to reboot, which ends the VM.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Offset of the data port (0x60) within the device's range.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port (0x64) within the device's range (base 0x60, length 5).
pub const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD_PORT: u8 = 0xab;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller. A CPU reset request is signalled on `reset_evt`.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
    status: u8,
    control: u8,
    output: Option<u8>,
    pending_command: Option<u8>,
}

/// The controller's registers, for snapshots and migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub control: u8,
    /// Byte waiting in the output buffer.
    pub output: Option<u8>,
    /// A command waiting for its data byte.
    pub pending_command: Option<u8>,
}

impl I8042 {
    /// The controller's state.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output: self.output,
            pending_command: self.pending_command,
        }
    }

    /// A controller restored from `state`, signalling resets on `reset_evt`.
    pub fn from_state(state: &I8042State, reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            status: state.status,
            control: state.control,
            output: state.output,
            pending_command: state.pending_command,
        }
    }

    /// A controller that writes to `reset_evt` when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            status: STATUS_SYSTEM_FLAG,
            control: 0x45,
            output: None,
            pending_command: None,
        }
    }

    fn respond(&mut self, byte: u8) {
        self.output = Some(byte);
        self.status |= STATUS_OUTPUT_FULL;
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.respond(self.control),
            CMD_WRITE_CTR | CMD_WRITE_AUX => self.pending_command = Some(cmd),
            CMD_SELF_TEST => self.respond(0x55),
            CMD_TEST_KBD_PORT => self.respond(0x00),
            CMD_RESET_CPU => {
                if let Err(e) = self.reset_evt.write(1) {
                    log::error!("i8042: cannot signal reset: {e}");
                }
            }
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        // No keyboard or mouse behind the controller: other device commands go unanswered.
        if let Some(CMD_WRITE_CTR) = self.pending_command.take() {
            self.control = byte;
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => {
                self.status &= !STATUS_OUTPUT_FULL;
                self.output.take().unwrap_or(0)
            }
            COMMAND_OFFSET => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA_OFFSET => self.data(byte),
            COMMAND_OFFSET => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (I8042, EventFd) {
        let evt = EventFd::new(0o4000).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn reset_command_signals_reset() {
        let (mut dev, evt) = controller();
        assert!(evt.read().is_err(), "no reset before the command");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn control_register_round_trips() {
        let (mut dev, _) = controller();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        let mut status = [0u8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        let mut data = [0u8];
        dev.read(DATA_OFFSET, &mut data);
        assert_eq!(data[0], 0x47);
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn state_round_trips() {
        let (mut dev, _) = controller();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        let state = dev.state();
        assert_eq!(state.pending_command, Some(CMD_WRITE_CTR));
        let json = serde_json::to_string(&state).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();
        let mut restored = I8042::from_state(&back, EventFd::new(0o4000).unwrap());
        assert_eq!(restored.state(), state);
        restored.write(DATA_OFFSET, &[0x11]);
        assert_eq!(restored.state().control, 0x11);
    }

    #[test]
    fn self_test_passes_and_odd_accesses_are_harmless() {
        let (mut dev, evt) = controller();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        let mut data = [0u8; 4];
        dev.read(DATA_OFFSET, &mut data);
        assert_eq!(data, [0x55, 0, 0, 0]);
        dev.write(COMMAND_OFFSET, &[]);
        dev.write(7, &[CMD_RESET_CPU]);
        assert!(evt.read().is_err());
    }
}
