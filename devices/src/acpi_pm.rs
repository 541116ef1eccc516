//! ACPI power management for a hardware-reduced ACPI platform: the FADT's sleep control, sleep
//! status and reset registers, three byte-wide I/O ports. A guest powers off by writing SLP_EN
//! with the sleep type its DSDT gives for S5 (`_S5`) to the sleep control register, and resets by
//! writing [`RESET_VALUE`] to the reset register; each signals an eventfd for the event loop.
//! Power-off signals 1, once: the VMM may share that eventfd with another power-off source whose
//! value carries meaning (fabvm shares the debug-exit port's, where 1 means status 0).
//!
//! Register layout (offsets from the device's base port):
//! ```text
//! +0  sleep control   write: bit 5 SLP_EN, bits 4:2 SLP_TYP; reads as 0
//! +1  sleep status    bit 7 WAK_STS, write 1 to clear; reads as 0 (we never wake)
//! +2  reset           write RESET_VALUE to reset; reads as 0
//! ```

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u64 = 1;
/// Offset of the reset register.
pub const RESET: u64 = 2;
/// Number of ports the device occupies.
pub const PORTS: u64 = 3;

/// SLP_EN: the guest asks to enter the sleep state in SLP_TYP.
pub const SLP_EN: u8 = 1 << 5;
/// Position of SLP_TYP in the sleep control register.
pub const SLP_TYP_SHIFT: u8 = 2;
/// SLP_TYP width mask (after shifting).
pub const SLP_TYP_MASK: u8 = 0b111;
/// The sleep type our DSDT's `_S5` package names: soft off.
pub const S5_SLP_TYP: u8 = 5;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;

/// The sleep control register value that powers the machine off.
pub const fn s5_command() -> u8 {
    SLP_EN | (S5_SLP_TYP << SLP_TYP_SHIFT)
}

/// The ACPI sleep control / status and reset registers.
#[derive(Debug)]
pub struct AcpiPm {
    power_off: EventFd,
    reset: EventFd,
    powered_off: bool,
}

impl AcpiPm {
    /// A device that signals `power_off` on an S5 request and `reset` on a reset request.
    pub fn new(power_off: EventFd, reset: EventFd) -> Self {
        Self {
            power_off,
            reset,
            powered_off: false,
        }
    }

    fn signal(evt: &EventFd, what: &str) {
        if let Err(e) = evt.write(1) {
            log::error!("acpi-pm: cannot signal {what}: {e}");
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No sleep state is ever left (WAK_STS stays 0) and the other registers are write-only.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if slp_typ == S5_SLP_TYP {
                    if !self.powered_off {
                        self.powered_off = true;
                        Self::signal(&self.power_off, "power-off");
                    }
                } else {
                    log::warn!("acpi-pm: guest asked for unsupported sleep type {slp_typ}");
                }
            }
            RESET if value == RESET_VALUE => Self::signal(&self.reset, "reset"),
            // Clearing WAK_STS, or SLP_TYP without SLP_EN: nothing to do.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn device() -> (AcpiPm, EventFd, EventFd) {
        let off = EventFd::new(EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = AcpiPm::new(off.try_clone().unwrap(), reset.try_clone().unwrap());
        (dev, off, reset)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut dev, off, reset) = device();
        assert_eq!(s5_command(), 0x34);
        dev.write(SLEEP_CONTROL, &[s5_command()]);
        assert_eq!(off.read().unwrap(), 1);
        assert!(reset.read().is_err());
    }

    #[test]
    fn power_off_signals_exactly_1_once() {
        let (mut dev, off, _) = device();
        dev.write(SLEEP_CONTROL, &[s5_command()]);
        dev.write(SLEEP_CONTROL, &[s5_command()]);
        assert_eq!(off.read().unwrap(), 1);
        dev.write(SLEEP_CONTROL, &[s5_command()]);
        assert!(off.read().is_err());
    }

    #[test]
    fn what_linux_writes_before_sleeping_does_nothing() {
        let (mut dev, off, reset) = device();
        // ACPICA clears WAK_STS first, then may write SLP_TYP alone.
        dev.write(SLEEP_STATUS, &[0x80]);
        dev.write(SLEEP_CONTROL, &[S5_SLP_TYP << SLP_TYP_SHIFT]);
        assert!(off.read().is_err());
        assert!(reset.read().is_err());
    }

    #[test]
    fn other_sleep_types_are_ignored() {
        let (mut dev, off, _) = device();
        for slp_typ in [0, 1, 3, 4, 7] {
            dev.write(SLEEP_CONTROL, &[SLP_EN | (slp_typ << SLP_TYP_SHIFT)]);
        }
        dev.write(SLEEP_CONTROL, &[]);
        assert!(off.read().is_err());
    }

    #[test]
    fn reset_register() {
        let (mut dev, off, reset) = device();
        dev.write(RESET, &[RESET_VALUE + 1]);
        assert!(reset.read().is_err());
        dev.write(RESET, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
        assert!(off.read().is_err());
    }

    #[test]
    fn reads_are_zero() {
        let (mut dev, _, _) = device();
        for offset in 0..PORTS {
            let mut data = [0xaa; 1];
            dev.read(offset, &mut data);
            assert_eq!(data, [0]);
        }
    }
}
