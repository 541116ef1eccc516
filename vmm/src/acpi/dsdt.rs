//! The DSDT: the devices a kernel cannot probe for, in AML.
//!
//! ```text
//! Scope (\_SB) {
//!     Device (COM1) { _HID PNP0501, _UID 0, _CRS { IO 0x3f8/8, Interrupt (Edge, ActiveHigh) {4} } }
//!     Device (VRnn) { _HID "LNRO0005", _UID nn, _CCA 1,           one per virtio-mmio device
//!                     _CRS { Memory32Fixed (base, len), Interrupt (Edge, ActiveHigh) {irq} } }
//! }
//! Name (_S5, Package { 5, 5, 0, 0 })                                 sleep type for power-off
//! ```
//!
//! `LNRO0005` is the id Linux's virtio_mmio driver matches in ACPI. Interrupts are edge
//! triggered, active high: KVM's irqfd pulses the GSI, which is how both COM1 and virtio devices
//! raise theirs. `_CCA` says DMA is cache-coherent (always so on x86; arm64 requires the object).

use acpi_tables::aml::{self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path};
use acpi_tables::aml::{ResourceTemplate, Scope, IO};
use acpi_tables::Aml;
use devices::acpi_pm::S5_SLP_TYP;

use super::{aml_bytes, sdt, VirtioMmioDevice};
use crate::device_manager::{COM1_BASE, COM1_IRQ};

/// DSDT revision 2: 64-bit AML integers.
const REVISION: u8 = 2;
/// COM1's port count.
const COM1_PORTS: u8 = 8;

/// Builds the DSDT for `virtio` devices (at most 256, checked by the caller).
pub fn build(virtio: &[VirtioMmioDevice]) -> Vec<u8> {
    // Each object is encoded in one statement: its parts are temporaries borrowed until then.
    let mut devices = aml_bytes(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![
                    &IO::new(COM1_BASE as u16, COM1_BASE as u16, 1, COM1_PORTS),
                    &edge_high(COM1_IRQ),
                ]),
            ),
        ],
    ));
    for (index, dev) in virtio.iter().enumerate() {
        devices.extend_from_slice(&virtio_device(index, dev));
    }
    let mut body = Scope::raw(Path::new("\\_SB_"), devices);
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);
    sdt(*b"DSDT", REVISION, &body)
}

/// `Device (VRnn)` for virtio-mmio device `index` (nn in hex).
fn virtio_device(index: usize, dev: &VirtioMmioDevice) -> Vec<u8> {
    // The caller checked that the window lies below 4 GiB.
    let (base, len) = (dev.base as u32, dev.len as u32);
    aml_bytes(&Device::new(
        Path::new(&format!("VR{index:02X}")),
        vec![
            &Name::new(Path::new("_HID"), &"LNRO0005"),
            &Name::new(Path::new("_UID"), &(index as u32)),
            &Name::new(Path::new("_CCA"), &aml::ONE),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![
                    &Memory32Fixed::new(true, base, len),
                    &edge_high(dev.irq),
                ]),
            ),
        ],
    ))
}

/// An exclusive, edge-triggered, active-high interrupt consumed by the device.
fn edge_high(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{check_header, devices};
    use super::*;

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    /// AML for `Name (_CRS, ...)`'s Memory32Fixed descriptor: tag, length 9, read-write, base,
    /// length.
    fn memory32(base: u32, len: u32) -> Vec<u8> {
        let mut d = vec![0x86, 9, 0, 1];
        d.extend_from_slice(&base.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d
    }

    /// Extended interrupt descriptor: tag, length 6, flags (consumer | edge), count 1, GSI.
    fn interrupt(gsi: u32) -> Vec<u8> {
        let mut d = vec![0x89, 6, 0, 0b0011, 1];
        d.extend_from_slice(&gsi.to_le_bytes());
        d
    }

    #[test]
    fn header_and_fixed_content() {
        let dsdt = build(&[]);
        check_header(&dsdt, b"DSDT", REVISION);
        assert_eq!(count(&dsdt, b"_SB_"), 1);
        assert_eq!(count(&dsdt, b"COM1"), 1);
        // EISAID("PNP0501") encodes as the dword 0x0105d041.
        assert_eq!(count(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        // IO (Decode16, 0x3f8, 0x3f8, 1, 8) and IRQ 4.
        assert_eq!(count(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
        assert_eq!(count(&dsdt, &interrupt(4)), 1);
        assert_eq!(count(&dsdt, b"LNRO0005"), 0);
        // Name (_S5_, Package (4) { 5, 5, 0, 0 }).
        let s5 = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 8, 4, 0x0a, 5, 0x0a, 5, 0, 0,
        ];
        assert!(dsdt.ends_with(&s5));
    }

    #[test]
    fn one_lnro0005_device_per_virtio_device() {
        for n in [1, 3, 11] {
            let devs = devices(n);
            let dsdt = build(&devs);
            check_header(&dsdt, b"DSDT", REVISION);
            assert_eq!(count(&dsdt, b"\x0dLNRO0005\0"), n, "_HID string");
            for (i, dev) in devs.iter().enumerate() {
                let name = format!("VR{i:02X}");
                assert_eq!(count(&dsdt, name.as_bytes()), 1, "{name}");
                assert_eq!(count(&dsdt, &memory32(dev.base as u32, dev.len as u32)), 1);
                assert_eq!(count(&dsdt, &interrupt(dev.irq)), 1);
            }
            assert_eq!(count(&dsdt, b"_CCA"), n);
        }
    }

    #[test]
    fn many_devices_still_encode() {
        // Past 63 bytes and 4 KiB the AML package lengths take more bytes: the header's length
        // must still be right.
        let devs = vec![devices(1)[0]; 256];
        let dsdt = build(&devs);
        check_header(&dsdt, b"DSDT", REVISION);
        assert!(dsdt.len() > 4096);
        assert_eq!(count(&dsdt, b"VRFF"), 1);
    }
}
