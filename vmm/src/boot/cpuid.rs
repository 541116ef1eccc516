//! Per-vCPU CPUID, derived from KVM's supported set: APIC ids, topology (one socket, one thread
//! per core), the hypervisor bit, no PMU, and a timing leaf carrying the TSC frequency.

use kvm_bindings::kvm_cpuid_entry2;

/// KVM's flag for leaves whose output depends on the subleaf index.
const SIGNIFICANT_INDEX: u32 = 1;
/// CPUID leaf where hypervisors put the TSC and APIC-bus frequencies (kHz).
pub const TIMING_LEAF: u32 = 0x4000_0010;
const HYPERVISOR_BASE: u32 = 0x4000_0000;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// Rewrites KVM's supported CPUID for vCPU `index` of `count`.
pub fn normalize(
    entries: &mut Vec<kvm_cpuid_entry2>,
    index: u32,
    count: u32,
    tsc_khz: Option<u32>,
) {
    let apic_id = index;
    let core_bits = 32 - (count.max(1) - 1).leading_zeros();
    for entry in entries.iter_mut() {
        match entry.function {
            1 => {
                // EBX: initial APIC id, logical processor count, CLFLUSH line size (8 x 8 bytes).
                entry.ebx = (apic_id << 24) | ((count & 0xff) << 16) | (8 << 8);
                entry.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: the count in EBX is valid
                } else {
                    entry.edx &= !(1 << 28);
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; caches shared by one thread each.
                entry.eax = (entry.eax & 0x3ff) | ((count.saturating_sub(1) & 0x3f) << 26);
            }
            6 => entry.ecx &= !(1 << 3), // no energy-performance bias MSR
            0xa => {
                // No architectural PMU: guests must not program performance counters.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xb | 0x1f => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = count;
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n;
                    }
                }
            }
            HYPERVISOR_BASE if tsc_khz.is_some() => entry.eax = entry.eax.max(TIMING_LEAF),
            _ => {}
        }
    }
    if let Some(khz) = tsc_khz {
        entries.retain(|e| e.function != TIMING_LEAF);
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        });
    }
    for entry in entries
        .iter_mut()
        .filter(|e| matches!(e.function, 0xb | 0x1f))
    {
        entry.flags |= SIGNIFICANT_INDEX;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0),
            leaf(1, 0),
            leaf(4, 0),
            leaf(0xa, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            kvm_cpuid_entry2 {
                function: HYPERVISOR_BASE,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn apic_ids_and_counts_per_vcpu() {
        for (index, count) in [(0, 1), (1, 2), (5, 8)] {
            let mut entries = supported();
            normalize(&mut entries, index, count, None);
            let l1 = find(&entries, 1, 0);
            assert_eq!(l1.ebx >> 24, index);
            assert_eq!((l1.ebx >> 16) & 0xff, count);
            assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
            assert_eq!(l1.edx & (1 << 28) != 0, count > 1);
            assert_eq!(find(&entries, 0xb, 0).edx, index);
            assert_eq!(find(&entries, 0xb, 1).ebx, count);
            assert_eq!((find(&entries, 4, 0).eax >> 26) + 1, count);
        }
    }

    #[test]
    fn topology_shift_covers_all_cores() {
        let mut entries = supported();
        normalize(&mut entries, 0, 5, None);
        assert_eq!(find(&entries, 0xb, 1).eax, 3); // 5 cores need 3 bits
        assert_eq!(find(&entries, 0xb, 2).ebx, 0, "no level past core");
        assert!(entries
            .iter()
            .filter(|e| e.function == 0xb)
            .all(|e| e.flags & SIGNIFICANT_INDEX != 0));
    }

    #[test]
    fn pmu_hidden_and_timing_leaf_added() {
        let mut entries = supported();
        normalize(&mut entries, 0, 1, Some(2_100_000));
        assert_eq!(find(&entries, 0xa, 0).eax, 0);
        assert_eq!(find(&entries, HYPERVISOR_BASE, 0).eax, TIMING_LEAF);
        let timing = find(&entries, TIMING_LEAF, 0);
        assert_eq!((timing.eax, timing.ebx), (2_100_000, APIC_BUS_KHZ));
        // Normalising again does not duplicate the leaf.
        normalize(&mut entries, 0, 1, Some(2_100_000));
        assert_eq!(
            entries.iter().filter(|e| e.function == TIMING_LEAF).count(),
            1
        );
    }
}
