//! The MADT (signature `APIC`): one enabled local APIC per vCPU (ACPI processor UID = APIC id =
//! vCPU index, as CPUID reports), the IOAPIC with id = cpus and GSIs from 0, and LINT1 as NMI on
//! every processor (as fabvm programs the LAPICs). No interrupt source overrides: under KVM's
//! default routing ISA IRQ n is GSI n (see the module above).

use super::sdt;
use crate::layout;

/// ACPI 6.3+ MADT revision.
const REVISION: u8 = 5;
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel ones).
const PCAT_COMPAT: u32 = 1;

const TYPE_LOCAL_APIC: u8 = 0;
const TYPE_IO_APIC: u8 = 1;
const TYPE_LOCAL_APIC_NMI: u8 = 4;
const LOCAL_APIC_ENABLED: u32 = 1;
/// Local APIC NMI processor UID meaning "all processors".
const ALL_PROCESSORS: u8 = 0xff;
/// MPS INTI flags: active high (bits 1:0 = 01), edge triggered (bits 3:2 = 01).
const ACTIVE_HIGH_EDGE: u16 = 0b0101;
const NMI_LINT: u8 = 1;

/// Builds the MADT for `cpus` vCPUs (1 to `super::MAX_CPUS`, checked by the caller).
pub fn build(cpus: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(8 + 8 * cpus as usize + 12 + 6);
    body.extend_from_slice(&(layout::LAPIC as u32).to_le_bytes());
    body.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cpus as u8 {
        body.extend_from_slice(&[TYPE_LOCAL_APIC, 8, cpu, cpu]);
        body.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[TYPE_IO_APIC, 12, cpus as u8, 0]);
    body.extend_from_slice(&(layout::IOAPIC as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    body.extend_from_slice(&[TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    body.extend_from_slice(&ACTIVE_HIGH_EDGE.to_le_bytes());
    body.push(NMI_LINT);
    sdt(*b"APIC", REVISION, &body)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{check_header, u32_at};
    use super::*;

    /// (type, bytes) of each interrupt controller structure.
    fn entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let len = madt[at + 1] as usize;
            assert!(len >= 2 && at + len <= madt.len());
            out.push((madt[at], &madt[at..at + len]));
            at += len;
        }
        out
    }

    #[test]
    fn one_local_apic_per_cpu_then_the_ioapic() {
        for cpus in [1u32, 2, 4, 254] {
            let madt = build(cpus);
            check_header(&madt, b"APIC", REVISION);
            assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
            assert_eq!(u32_at(&madt, 40), PCAT_COMPAT);
            let entries = entries(&madt);
            let lapics: Vec<_> = entries
                .iter()
                .filter(|(t, _)| *t == TYPE_LOCAL_APIC)
                .map(|(_, e)| (e[2], e[3], u32_at(e, 4)))
                .collect();
            let expected: Vec<_> = (0..cpus as u8).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, expected, "uid, APIC id, enabled per vCPU");
            let ioapics: Vec<_> = entries.iter().filter(|(t, _)| *t == TYPE_IO_APIC).collect();
            assert_eq!(ioapics.len(), 1);
            let io = ioapics[0].1;
            assert_eq!((io[1], io[2]), (12, cpus as u8));
            assert_eq!(u32_at(io, 4), 0xfec0_0000);
            assert_eq!(u32_at(io, 8), 0);
            assert_eq!(entries.len(), cpus as usize + 2);
        }
    }

    #[test]
    fn nmi_on_lint1_and_no_source_overrides() {
        let madt = build(2);
        let entries = entries(&madt);
        let nmi: Vec<_> = entries
            .iter()
            .filter(|(t, _)| *t == TYPE_LOCAL_APIC_NMI)
            .collect();
        assert_eq!(nmi.len(), 1);
        assert_eq!(nmi[0].1, &[4, 6, 0xff, 0b0101, 0, 1]);
        assert!(
            !entries.iter().any(|(t, _)| *t == 2),
            "interrupt source override"
        );
    }
}
