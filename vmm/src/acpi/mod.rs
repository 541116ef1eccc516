//! ACPI tables for a hardware-reduced x86 microVM, generated at boot: how kernels without MP-table
//! parsing or device-tree support find the vCPUs, the IOAPIC, the serial port and virtio-mmio
//! devices, and how they power off.
//!
//! ```text
//! layout::ACPI_TABLES   RSDP (v2) ──► XSDT ──┬─► FACP (FADT 6.5, HW_REDUCED_ACPI)
//!   (16-byte aligned;                        │     X_DSDT ──► DSDT (AML: COM1, virtio-mmio, _S5)
//!    a legacy scan of                        │     sleep control/status, reset ──► ACPI_PM_PORT
//!    0xe0000-0xfffff                         └─► APIC (MADT: LAPIC per vCPU, IOAPIC, LAPIC NMI)
//!    finds it too)
//! ```
//!
//! The RSDP address also goes to the kernel directly (PVH `rsdp_paddr`, zero-page
//! `acpi_rsdp_addr`). Table headers, the FADT layout and the AML encoding come from the
//! `acpi_tables` crate (rust-vmm); what goes in them is decided here.
//!
//! Interrupt routing: fabvm keeps KVM's default GSI routing, where GSI n drives IOAPIC pin n (and
//! PIC pin n for n < 16), and KVM's in-kernel PIT raises GSI 0. So ISA IRQ n is GSI n for every n,
//! which is the MADT default: there is no interrupt source override (QEMU's IRQ0→GSI2 override
//! exists because QEMU reroutes GSI 0 to pin 2; we do not).

mod dsdt;
mod fadt;
mod madt;

use acpi_tables::{rsdp::Rsdp, xsdt::XSDT, Aml};

use crate::layout;

/// OEM id in every table header (Linux prints it in its `ACPI:` lines).
pub const OEM_ID: [u8; 6] = *b"FABVM ";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"FABVM   ";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// Where the RSDP is written (and where the kernel is told it is).
pub const RSDP_ADDR: u64 = layout::ACPI_TABLES;
/// Most vCPUs the MADT describes: APIC ids are 8 bits, 0xff is broadcast and the IOAPIC takes the
/// id after the last vCPU.
pub const MAX_CPUS: u32 = 254;

/// Table alignment inside the ACPI area.
const TABLE_ALIGN: u64 = 16;

/// A virtio-mmio device as the guest must find it: its register window and its interrupt (a GSI,
/// which is the IOAPIC pin under KVM's default routing; edge-triggered, active high, as irqfd
/// delivers it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest physical base of the register window.
    pub base: u64,
    /// Window length in bytes.
    pub len: u64,
    /// GSI.
    pub irq: u32,
}

/// Errors from building the tables: a configuration they cannot describe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// No vCPUs, or more than 8-bit APIC ids allow.
    #[error("ACPI tables describe 1 to {MAX_CPUS} vCPUs, not {0}")]
    Cpus(u32),
    /// A virtio-mmio window that is empty or not below 4 GiB (the DSDT uses Memory32Fixed).
    #[error("virtio-mmio window {base:#x}+{len:#x} is empty or not below 4 GiB")]
    MmioWindow { base: u64, len: u64 },
    /// An interrupt the IOAPIC does not have.
    #[error("virtio-mmio interrupt {0} is beyond the IOAPIC's {pins} pins", pins = layout::IOAPIC_PINS)]
    Irq(u32),
    /// More devices than the DSDT names (VR00..VRFF).
    #[error("{0} virtio-mmio devices: at most 256 can be named in the DSDT")]
    TooManyDevices(usize),
    /// The tables do not fit in their area.
    #[error("ACPI tables need {0} bytes, more than the {size} reserved for them", size = layout::ACPI_TABLES_SIZE)]
    TooBig(u64),
}

/// Builds every table for `cpus` vCPUs and `virtio` devices; returns (guest address, bytes) for
/// each, the RSDP (at [`RSDP_ADDR`]) first.
pub fn build(cpus: u32, virtio: &[VirtioMmioDevice]) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(AcpiError::Cpus(cpus));
    }
    if virtio.len() > 256 {
        return Err(AcpiError::TooManyDevices(virtio.len()));
    }
    for dev in virtio {
        let end = dev.base.checked_add(dev.len);
        if dev.len == 0 || end.is_none_or(|end| end > 1 << 32) {
            return Err(AcpiError::MmioWindow {
                base: dev.base,
                len: dev.len,
            });
        }
        if dev.irq >= layout::IOAPIC_PINS {
            return Err(AcpiError::Irq(dev.irq));
        }
    }

    let dsdt = dsdt::build(virtio);
    let madt = madt::build(cpus);
    // Two XSDT entries: FADT and MADT (the DSDT hangs off the FADT).
    let xsdt_len = 36 + 2 * 8;
    let rsdp_addr = RSDP_ADDR;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let madt_addr = align(fadt_addr + fadt::LEN as u64);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > layout::ACPI_TABLES + layout::ACPI_TABLES_SIZE {
        return Err(AcpiError::TooBig(end - layout::ACPI_TABLES));
    }

    let fadt = fadt::build(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(vec![
        (rsdp_addr, rsdp),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (dsdt_addr, dsdt),
    ])
}

fn align(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// A standard table header (signature, length, revision, checksum, our OEM ids, the creator)
/// followed by `body`, with length and checksum filled in.
fn sdt(signature: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut table =
        acpi_tables::sdt::Sdt::new(signature, 36, revision, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(body);
    table.as_slice().to_vec()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Byte sum of a table; 0 for a valid checksum.
    pub fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }
    pub fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    pub fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    pub fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Checks a standard table header and returns the table's bytes.
    pub fn check_header(table: &[u8], signature: &[u8; 4], revision: u8) {
        assert_eq!(&table[..4], signature);
        assert_eq!(
            u32_at(table, 4) as usize,
            table.len(),
            "length of {signature:?}"
        );
        assert_eq!(table[8], revision, "revision of {signature:?}");
        assert_eq!(sum(table), 0, "checksum of {signature:?}");
        assert_eq!(&table[10..16], &OEM_ID);
        assert_eq!(&table[16..24], &OEM_TABLE_ID);
        assert_eq!(u32_at(table, 24), OEM_REVISION);
    }

    pub fn devices(n: usize) -> Vec<VirtioMmioDevice> {
        (0..n)
            .map(|i| {
                let (base, irq) = layout::virtio_mmio_slot(i).unwrap();
                VirtioMmioDevice {
                    base,
                    len: layout::VIRTIO_MMIO_SIZE,
                    irq,
                }
            })
            .collect()
    }

    fn table(tables: &[(u64, Vec<u8>)], addr: u64) -> &[u8] {
        &tables
            .iter()
            .find(|(a, _)| *a == addr)
            .expect("table at addr")
            .1
    }

    #[test]
    fn rsdp_v2_points_at_the_xsdt() {
        let tables = build(2, &[]).unwrap();
        let (addr, rsdp) = &tables[0];
        assert_eq!(*addr, RSDP_ADDR);
        assert_eq!(addr % 16, 0);
        assert!((0xe0000..0x100000).contains(addr));
        assert_eq!(rsdp.len(), 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "extended checksum");
        assert_eq!(&rsdp[9..15], &OEM_ID);
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");
        assert_eq!(u32_at(rsdp, 20), 36, "length");
        assert_eq!(u64_at(rsdp, 24), tables[1].0);
    }

    #[test]
    fn xsdt_lists_fadt_and_madt() {
        let tables = build(1, &[]).unwrap();
        let xsdt = table(&tables, u64_at(&tables[0].1, 24));
        check_header(xsdt, b"XSDT", 1);
        assert_eq!(xsdt.len(), 36 + 16);
        let entries: Vec<_> = (0..2).map(|i| u64_at(xsdt, 36 + 8 * i)).collect();
        assert_eq!(&table(&tables, entries[0])[..4], b"FACP");
        assert_eq!(&table(&tables, entries[1])[..4], b"APIC");
    }

    #[test]
    fn tables_are_aligned_disjoint_and_inside_the_area() {
        for (cpus, n) in [(1, 0), (2, 3), (MAX_CPUS, layout::VIRTIO_MMIO_MAX_DEVICES)] {
            let tables = build(cpus, &devices(n)).unwrap();
            assert_eq!(tables.len(), 5);
            for pair in tables.windows(2) {
                assert!(pair[0].0 + pair[0].1.len() as u64 <= pair[1].0);
            }
            for (addr, bytes) in &tables {
                assert_eq!(addr % TABLE_ALIGN, 0);
                assert!(*addr >= layout::ACPI_TABLES);
                assert!(
                    addr + bytes.len() as u64 <= layout::ACPI_TABLES + layout::ACPI_TABLES_SIZE
                );
            }
        }
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert_eq!(build(0, &[]), Err(AcpiError::Cpus(0)));
        assert_eq!(build(255, &[]), Err(AcpiError::Cpus(255)));
        let mut dev = devices(1)[0];
        dev.irq = 24;
        assert_eq!(build(1, &[dev]), Err(AcpiError::Irq(24)));
        let high = VirtioMmioDevice {
            base: 0xffff_f000,
            len: 0x2000,
            irq: 5,
        };
        assert!(matches!(
            build(1, &[high]),
            Err(AcpiError::MmioWindow { .. })
        ));
        let empty = VirtioMmioDevice { len: 0, ..high };
        assert!(matches!(
            build(1, &[empty]),
            Err(AcpiError::MmioWindow { .. })
        ));
        assert_eq!(
            build(1, &vec![devices(1)[0]; 257]),
            Err(AcpiError::TooManyDevices(257))
        );
        // 256 devices still fit.
        assert!(build(MAX_CPUS, &vec![devices(1)[0]; 256]).is_ok());
    }

    /// Disassembles every table with ACPICA's `iasl` when it is installed (Debian package
    /// `acpica-tools`): it must parse them and see what we put in.
    #[test]
    fn iasl_disassembles_the_tables() {
        let Some(iasl) = find_iasl() else {
            eprintln!(
                "!!! iasl_disassembles_the_tables: SKIPPED, `iasl` not found (apt-get install acpica-tools) !!!"
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let tables = build(2, &devices(2)).unwrap();
        let mut outputs = String::new();
        for (_, bytes) in &tables[1..] {
            let name = String::from_utf8_lossy(&bytes[..4]).to_lowercase();
            let dat = dir.path().join(format!("{name}.dat"));
            std::fs::write(&dat, bytes).unwrap();
            let out = std::process::Command::new(&iasl)
                .arg("-d")
                .arg(&dat)
                .current_dir(dir.path())
                .output()
                .unwrap();
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl -d {name}: {log}");
            let dsl = std::fs::read_to_string(dir.path().join(format!("{name}.dsl")))
                .unwrap_or_else(|e| panic!("iasl wrote no {name}.dsl ({e}): {log}"));
            assert!(
                !dsl.contains("Incorrect checksum") && !log.contains("Error"),
                "{name}: {log}\n{dsl}"
            );
            outputs.push_str(&dsl);
        }
        let outputs = outputs.split_whitespace().collect::<Vec<_>>().join(" ");
        for wanted in [
            "Hardware Reduced (V5) : 1",
            "Reset Register Supported (V2) : 1",
            "Sleep Control Register : [Generic Address Structure]",
            "Address : 0000000000000600",
            "Address : 0000000000000601",
            "Address : 0000000000000602",
            "Local Apic Address : FEE00000",
            "PC-AT Compatibility : 1",
            "Processor ID : 01 [037h 0055 1] Local Apic ID : 01",
            "I/O Apic ID : 02",
            "Address : FEC00000",
            "Subtable Type : 04 [Local APIC NMI]",
            "Device (COM1) { Name (_HID, EisaId (\"PNP0501\")",
            "Device (VR01) { Name (_HID, \"LNRO0005\")",
            "Memory32Fixed (ReadWrite, 0xD0001000, // Address Base 0x00001000,",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000006, }",
            "Name (_S5, Package (0x04) // _S5_: S5 System State { 0x05, 0x05, Zero, Zero })",
        ] {
            assert!(outputs.contains(wanted), "{wanted:?} not in:\n{outputs}");
        }
    }

    fn find_iasl() -> Option<std::path::PathBuf> {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|dir| std::path::Path::new(dir).join("iasl"))
            .find(|p| p.is_file())
    }
}
