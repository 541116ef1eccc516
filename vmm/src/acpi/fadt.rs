//! The FADT (signature `FACP`), ACPI 6.5: a hardware-reduced platform (no SCI, PM1 blocks, PM
//! timer, GPEs or FACS) whose only fixed hardware is the sleep control / status and reset
//! registers of `devices::acpi_pm` on port `layout::ACPI_PM_PORT`.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use devices::acpi_pm;

use super::{aml_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout;

/// Length of an ACPI 6.x FADT.
pub const LEN: usize = 276;

/// IA-PC boot architecture flags: no VGA, no CMOS RTC. Not set: legacy (LPC/ISA) devices beyond
/// those in the DSDT, and the 8042 (ours is only a reset port; Linux should not probe it).
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// Builds the FADT pointing at the DSDT at `dsdt_addr`.
pub fn build(dsdt_addr: u64) -> Vec<u8> {
    let port = |offset: u64| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            layout::ACPI_PM_PORT + offset,
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    fadt.reset_reg = port(acpi_pm::RESET);
    fadt.reset_value = acpi_pm::RESET_VALUE;
    fadt.sleep_control_reg = port(acpi_pm::SLEEP_CONTROL);
    fadt.sleep_status_reg = port(acpi_pm::SLEEP_STATUS);
    let bytes = aml_bytes(&fadt.finalize());
    debug_assert_eq!(bytes.len(), FADT::len());
    bytes
}

#[cfg(test)]
mod tests {
    use super::super::tests::{check_header, u16_at, u32_at, u64_at};
    use super::*;

    /// (address space, width, offset, access size, address) of the GAS at `at`.
    fn gas(b: &[u8], at: usize) -> (u8, u8, u8, u8, u64) {
        (b[at], b[at + 1], b[at + 2], b[at + 3], u64_at(b, at + 4))
    }

    #[test]
    fn hardware_reduced_with_sleep_and_reset_registers() {
        let fadt = build(0xe0200);
        assert_eq!(fadt.len(), LEN);
        check_header(&fadt, b"FACP", 6);
        assert_eq!(fadt[131], 5, "minor version");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(u16_at(&fadt, 109), IAPC_NO_VGA | IAPC_NO_CMOS_RTC);
        // DSDT through X_DSDT only; no FACS, SCI or PM1 blocks.
        assert_eq!(u64_at(&fadt, 140), 0xe0200);
        assert_eq!(u32_at(&fadt, 40), 0);
        assert_eq!(u32_at(&fadt, 36), 0);
        assert_eq!(u64_at(&fadt, 132), 0);
        assert_eq!(u16_at(&fadt, 46), 0);
        assert_eq!(u32_at(&fadt, 64), 0);
        let port = layout::ACPI_PM_PORT;
        assert_eq!(gas(&fadt, 116), (1, 8, 0, 1, port + acpi_pm::RESET));
        assert_eq!(fadt[128], acpi_pm::RESET_VALUE);
        assert_eq!(gas(&fadt, 244), (1, 8, 0, 1, port + acpi_pm::SLEEP_CONTROL));
        assert_eq!(gas(&fadt, 256), (1, 8, 0, 1, port + acpi_pm::SLEEP_STATUS));
    }
}
