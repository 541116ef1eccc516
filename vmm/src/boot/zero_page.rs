//! The Linux zero page (`boot_params`) for the 64-bit boot protocol: setup header, command
//! line pointer, initrd, the ACPI RSDP and the e820 map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::ByteValued;

use crate::layout;

const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_UNDEFINED: u8 = 0xff;
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// The zero page holds at most this many e820 entries.
const E820_MAX: usize = 128;

/// Builds boot_params from the kernel's setup header (bzImage) or a default one (ELF), with the
/// RSDP at `rsdp` (`acpi_rsdp_addr`, read by kernels since boot protocol 2.14).
pub fn build(
    header: Option<setup_header>,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> boot_params {
    let mut params = boot_params {
        hdr: header.unwrap_or_default(),
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = layout::memory_map(mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter().take(E820_MAX)) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = map.len().min(E820_MAX) as u8;
    params
}

/// The bytes of a zero page, to write into guest memory.
pub fn as_bytes(params: &boot_params) -> &[u8] {
    params.as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_matches_memory_size() {
        let params = build(None, 2 << 30, 20, None, 0xe0000);
        let n = params.e820_entries as usize;
        let ram: u64 = params.e820_table[..n]
            .iter()
            .filter(|e| e.r#type == 1)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (2 << 30) - (layout::HIGH_MEMORY - layout::EBDA_START));
        let last = params.e820_table[n - 1];
        assert_eq!(last.addr + last.size, 2 << 30);
    }

    #[test]
    fn e820_splits_around_hole() {
        let params = build(None, 6 << 30, 0, None, 0xe0000);
        let n = params.e820_entries as usize;
        let last = params.e820_table[n - 1];
        assert_eq!((last.addr, last.size), (4 << 30, 3 << 30));
    }

    #[test]
    fn header_fields_for_the_kernel() {
        let hdr = setup_header {
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let params = build(Some(hdr), 256 << 20, 42, Some((0x0e00_0000, 999)), 0xe0000);
        let h = params.hdr;
        let (magic, flag, loader) = (h.header, h.boot_flag, h.type_of_loader);
        assert_eq!((magic, flag, loader), (HDRS_MAGIC, BOOT_FLAG, 0xff));
        let (ptr, size) = (h.cmd_line_ptr, h.cmdline_size);
        assert_eq!((ptr, size), (layout::CMDLINE as u32, 42));
        let (image, rsize, align) = (h.ramdisk_image, h.ramdisk_size, h.kernel_alignment);
        assert_eq!((image, rsize, align), (0x0e00_0000, 999, 0x20_0000));
        let rsdp = params.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe0000);
        // boot_params.acpi_rsdp_addr sits at 0x70.
        assert_eq!(as_bytes(&params)[0x70..0x78], 0xe0000u64.to_le_bytes());
        assert_eq!(as_bytes(&params).len(), 4096);
    }
}
