//! The PVH `hvm_start_info` block: command line, modules (the initrd), the ACPI RSDP and the
//! memory map.
//! Laid out at `layout::PVH_START_INFO`: the struct, then the module list, then the memmap.

use crate::layout;

const MAGIC: u32 = 0x336e_c578;
const START_INFO_SIZE: usize = 56;
const MODLIST_OFFSET: usize = 0x40;
const MODLIST_ENTRY_SIZE: usize = 32;
const MEMMAP_OFFSET: usize = 0x80;
const MEMMAP_ENTRY_SIZE: usize = 24;
const _: () = assert!(
    START_INFO_SIZE <= MODLIST_OFFSET && MODLIST_OFFSET + MODLIST_ENTRY_SIZE <= MEMMAP_OFFSET
);

/// Builds the start_info block (to be written at `layout::PVH_START_INFO`), pointing the kernel
/// at the RSDP at `rsdp`.
pub fn build(mem_size: u64, initrd: Option<(u64, u64)>, rsdp: u64) -> Vec<u8> {
    let base = layout::PVH_START_INFO;
    let map = layout::memory_map(mem_size);
    let mut out = vec![0u8; MEMMAP_OFFSET + map.len() * MEMMAP_ENTRY_SIZE];
    let put32 =
        |out: &mut Vec<u8>, at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |out: &mut Vec<u8>, at: usize, v: u64| out[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put32(&mut out, 0, MAGIC);
    put32(&mut out, 4, 1); // version
    if let Some((addr, size)) = initrd {
        put32(&mut out, 12, 1); // nr_modules
        put64(&mut out, 16, base + MODLIST_OFFSET as u64);
        put64(&mut out, MODLIST_OFFSET, addr);
        put64(&mut out, MODLIST_OFFSET + 8, size);
    }
    put64(&mut out, 24, layout::CMDLINE);
    put64(&mut out, 32, rsdp);
    put64(&mut out, 40, base + MEMMAP_OFFSET as u64);
    put32(&mut out, 48, map.len() as u32);
    for (i, entry) in map.iter().enumerate() {
        let at = MEMMAP_OFFSET + i * MEMMAP_ENTRY_SIZE;
        put64(&mut out, at, entry.addr);
        put64(&mut out, at + 8, entry.size);
        put32(&mut out, at + 16, entry.kind as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn start_info_fields() {
        let info = build(256 << 20, Some((0x0f00_0000, 0x1234)), 0xe0000);
        assert_eq!(u32_at(&info, 0), MAGIC);
        assert_eq!(u32_at(&info, 4), 1);
        assert_eq!(u32_at(&info, 12), 1);
        assert_eq!(u64_at(&info, 24), layout::CMDLINE);
        assert_eq!(u64_at(&info, 32), 0xe0000, "rsdp_paddr");
        let modlist = u64_at(&info, 16) - layout::PVH_START_INFO;
        assert_eq!(u64_at(&info, modlist as usize), 0x0f00_0000);
        assert_eq!(u64_at(&info, modlist as usize + 8), 0x1234);
        let entries = u32_at(&info, 48) as usize;
        let memmap = (u64_at(&info, 40) - layout::PVH_START_INFO) as usize;
        let ram: u64 = (0..entries)
            .map(|i| memmap + i * MEMMAP_ENTRY_SIZE)
            .filter(|&at| u32_at(&info, at + 16) == 1)
            .map(|at| u64_at(&info, at + 8))
            .sum();
        assert_eq!(
            ram,
            (256 << 20) - (layout::HIGH_MEMORY - layout::EBDA_START)
        );
    }

    #[test]
    fn no_initrd_means_no_modules() {
        let info = build(64 << 20, None, 0xe0000);
        assert_eq!(u32_at(&info, 12), 0);
        assert_eq!(u64_at(&info, 16), 0);
    }
}
