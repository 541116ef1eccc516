//! The Intel MultiProcessor table (spec 1.4), so every vCPU and the IOAPIC are found without
//! ACPI: a floating pointer, then the config table with processor, bus, IOAPIC and IRQ entries.

use crate::layout;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU | APIC
const ISA_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const IRQ_INT: u8 = 0;
const IRQ_NMI: u8 = 1;
const IRQ_EXTINT: u8 = 3;

const FLOATING_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

/// Size of the table for `cpus` vCPUs.
pub fn size(cpus: u32) -> usize {
    FLOATING_SIZE + HEADER_SIZE + 20 * cpus as usize + 8 + 8 + 8 * ISA_IRQS as usize + 2 * 8
}

/// Builds the table to be written at `layout::MPTABLE`. APIC ids are the vCPU indices; the
/// IOAPIC takes the id after the last vCPU.
pub fn build(cpus: u32) -> Vec<u8> {
    let ioapic_id = cpus as u8;
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let flags = if cpu == 0 { 0b11 } else { 0b01 }; // enabled, BSP
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC as u32).to_le_bytes());
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    for (kind, lint) in [(IRQ_EXTINT, 0), (IRQ_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
    }
    let entry_count = cpus as u16 + 2 + u16::from(ISA_IRQS) + 2;

    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_SIZE + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[4, 0]); // spec revision, checksum (below)
    header.extend_from_slice(b"FABVM   ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&(layout::LAPIC as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut config = header;
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let config_addr = layout::MPTABLE + FLOATING_SIZE as u64;
    let mut floating = Vec::with_capacity(FLOATING_SIZE);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(config_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length/16, spec rev, checksum, features
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&config);
    floating
}

/// The byte that makes the sum of `bytes` (with that byte zero) come to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_lengths() {
        for cpus in [1, 2, 8, 254] {
            let table = build(cpus);
            assert_eq!(table.len(), size(cpus));
            assert_eq!(&table[..4], b"_MP_");
            assert_eq!(sum(&table[..16]), 0);
            let config = &table[16..];
            assert_eq!(&config[..4], b"PCMP");
            let len = u16::from_le_bytes([config[4], config[5]]) as usize;
            assert_eq!(len, config.len());
            assert_eq!(sum(config), 0);
            assert!(layout::MPTABLE + table.len() as u64 <= layout::HIGH_MEMORY);
        }
    }

    #[test]
    fn one_processor_entry_per_cpu_bsp_first() {
        let table = build(4);
        let entries = &table[16 + HEADER_SIZE..];
        let cpus: Vec<_> = entries
            .chunks(20)
            .take(4)
            .map(|e| (e[0], e[1], e[3]))
            .collect();
        assert_eq!(cpus, vec![(0, 0, 3), (0, 1, 1), (0, 2, 1), (0, 3, 1)]);
        let count = u16::from_le_bytes([table[16 + 34], table[16 + 35]]);
        assert_eq!(count, 4 + 2 + 16 + 2);
        // The IOAPIC id follows the last CPU.
        let ioapic = &entries[4 * 20 + 8..4 * 20 + 16];
        assert_eq!((ioapic[0], ioapic[1]), (ENTRY_IOAPIC, 4));
    }
}
