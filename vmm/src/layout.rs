//! The guest physical memory map: the one place that owns guest addresses.
//! Boot structures sit below 1 MiB; RAM is split around a 1 GiB device hole below 4 GiB.

/// 4 KiB: the guest page size the memory manager tracks.
pub const PAGE_SIZE: u64 = 0x1000;

/// Boot GDT (used for both the PVH and the 64-bit entry).
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT (empty: the guest loads its own).
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its module list and memory map.
pub const PVH_START_INFO: u64 = 0x6000;
/// Linux zero page (`boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry (grows down, below the page tables).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry: PML4, PDPT, one PD (first 1 GiB, 2 MiB pages).
pub const PML4: u64 = 0x9000;
/// Page-directory-pointer table, see [`PML4`].
pub const PDPT: u64 = 0xa000;
/// Page directory, see [`PML4`].
pub const PD: u64 = 0xb000;
/// Page reserved for guests' AP start-up trampolines (SIPI vector 0x10); fabvm never writes it.
pub const AP_TRAMPOLINE: u64 = 0x10000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line we pass (Linux x86 accepts 2048 bytes; PVH kernels the same).
pub const CMDLINE_MAX: usize = 2048;
/// End of conventional RAM (640 KiB); the EBDA and legacy hole follow.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, in the reserved BIOS area: the RSDP first (16-byte aligned, so a legacy scan of
/// 0xe0000–0xfffff finds it too), then XSDT, FADT, MADT and DSDT, up to the MP table.
pub const ACPI_TABLES: u64 = 0xe0000;
/// Room for the ACPI tables.
pub const ACPI_TABLES_SIZE: u64 = MPTABLE - ACPI_TABLES;
/// The MP table lives in the BIOS area, where Linux scans for its floating pointer.
pub const MPTABLE: u64 = 0xf0000;
/// End of the BIOS area and start of high memory (1 MiB).
pub const HIGH_MEMORY: u64 = 0x10_0000;

/// Start of the 32-bit device hole (3 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit device hole (4 GiB): RAM beyond the hole continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC: u64 = 0xfee0_0000;
/// Pins of KVM's in-kernel IOAPIC (GSIs 0–23; KVM routes GSI n to pin n).
pub const IOAPIC_PINS: u32 = 24;

/// virtio-mmio devices: slot `i` has its registers at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`
/// and interrupt `VIRTIO_MMIO_IRQS.start() + i` (see [`virtio_mmio_slot`]).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device's register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Interrupts (GSIs = IOAPIC pins) for virtio-mmio devices, one each: ISA IRQs 5–15, which the
/// MP table also lists, so kernels that find devices on the command line can route them too.
/// IRQ 4 is COM1's.
pub const VIRTIO_MMIO_IRQS: std::ops::RangeInclusive<u32> = 5..=15;
/// How many virtio-mmio devices fit: one per interrupt.
pub const VIRTIO_MMIO_MAX_DEVICES: usize =
    (*VIRTIO_MMIO_IRQS.end() - *VIRTIO_MMIO_IRQS.start() + 1) as usize;

/// ACPI power management ports (sleep control, sleep status, reset; see `devices::acpi_pm`).
pub const ACPI_PM_PORT: u64 = 0x600;

/// Smallest guest we boot: room for boot structures, a kernel at 1 MiB and its working memory.
pub const MIN_MEM: u64 = 16 << 20;
/// Largest guest memory we accept (the mmap is reserved lazily, but e820 and slots have limits).
pub const MAX_MEM: u64 = 1 << 40;

/// Type of an e820 / PVH memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemType {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (firmware tables, legacy areas).
    Reserved = 2,
}

/// One entry of the memory map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: MemType,
}

/// The RAM regions backing `mem` bytes of guest memory: below the hole, then above 4 GiB.
pub fn ram_regions(mem: u64) -> Vec<(u64, u64)> {
    let low = mem.min(MMIO_HOLE_START);
    let mut regions = vec![(0, low)];
    if mem > low {
        regions.push((MMIO_HOLE_END, mem - low));
    }
    regions
}

/// The memory map the guest sees (e820 for Linux, the PVH memmap for PVH kernels).
pub fn memory_map(mem: u64) -> Vec<MapEntry> {
    let regions = ram_regions(mem);
    let low_end = regions[0].1;
    let mut map = vec![
        MapEntry {
            addr: 0,
            size: EBDA_START,
            kind: MemType::Ram,
        },
        MapEntry {
            addr: EBDA_START,
            size: HIGH_MEMORY - EBDA_START,
            kind: MemType::Reserved,
        },
        MapEntry {
            addr: HIGH_MEMORY,
            size: low_end - HIGH_MEMORY,
            kind: MemType::Ram,
        },
    ];
    if let Some(&(addr, size)) = regions.get(1) {
        map.push(MapEntry {
            addr,
            size,
            kind: MemType::Ram,
        });
    }
    map
}

/// Highest address (exclusive) of RAM below the device hole.
pub fn low_ram_end(mem: u64) -> u64 {
    mem.min(MMIO_HOLE_START)
}

/// Register window base and interrupt of virtio-mmio slot `index`, if there is such a slot.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    (index < VIRTIO_MMIO_MAX_DEVICES).then(|| {
        (
            VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
            VIRTIO_MMIO_IRQS.start() + index as u32,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let mem = 4 << 30;
        let regions = ram_regions(mem);
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), mem);
    }

    #[test]
    fn memory_map_covers_ram_and_reserves_bios_area() {
        let mem = 5 << 30;
        let map = memory_map(mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == MemType::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the 384 KiB legacy area below 1 MiB is usable.
        assert_eq!(ram, mem - (HIGH_MEMORY - EBDA_START));
        assert!(map.iter().any(|e| e.kind == MemType::Reserved
            && e.addr <= MPTABLE
            && e.addr + e.size > MPTABLE));
        // Sorted, non-overlapping, nothing in the device hole.
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr);
        }
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT, 0x20),
            (BOOT_IDT, 0x10),
            (PVH_START_INFO, 0x1000),
            (ZERO_PAGE, 0x1000),
            (BOOT_STACK - 0x800, 0x800),
            (PML4, 0x1000),
            (PDPT, 0x1000),
            (PD, 0x1000),
            (AP_TRAMPOLINE, 0x1000),
            (CMDLINE, CMDLINE_MAX as u64),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        assert!(CMDLINE + CMDLINE_MAX as u64 <= EBDA_START);
    }

    #[test]
    fn acpi_tables_sit_in_reserved_memory_below_the_mp_table() {
        // The legacy RSDP scan covers 0xe0000-0xfffff at 16-byte boundaries.
        const {
            assert!(ACPI_TABLES >= 0xe0000 && ACPI_TABLES.is_multiple_of(16));
            assert!(ACPI_TABLES + ACPI_TABLES_SIZE <= MPTABLE);
            assert!(ACPI_TABLES >= AP_TRAMPOLINE + PAGE_SIZE);
        }
        for mem in [MIN_MEM, 5 << 30] {
            assert!(memory_map(mem).iter().any(|e| e.kind == MemType::Reserved
                && e.addr <= ACPI_TABLES
                && e.addr + e.size >= MPTABLE));
        }
    }

    #[test]
    fn virtio_mmio_slots_are_in_the_hole_and_distinct() {
        let slots: Vec<_> = (0..VIRTIO_MMIO_MAX_DEVICES)
            .map(|i| virtio_mmio_slot(i).unwrap())
            .collect();
        assert_eq!(slots.len(), 11);
        assert_eq!(slots[0], (0xd000_0000, 5));
        assert_eq!(virtio_mmio_slot(VIRTIO_MMIO_MAX_DEVICES), None);
        let end = slots.last().unwrap().0 + VIRTIO_MMIO_SIZE;
        assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE_START && end <= IOAPIC);
        for (base, irq) in slots {
            assert!(base + VIRTIO_MMIO_SIZE <= u64::from(u32::MAX));
            assert!(irq != 4 && irq < IOAPIC_PINS);
        }
    }
}
