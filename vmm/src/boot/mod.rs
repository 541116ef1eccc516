//! x86_64 boot: load a kernel (bzImage or ELF vmlinux), its initrd and command line, and
//! write the structures the kernel's entry expects (PVH start_info or the Linux zero page), the
//! MP table and the ACPI tables.

pub mod cpuid;
pub mod mptable;
pub mod pvh;
pub mod regs;
pub mod zero_page;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, elf::PvhBootCapability, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::acpi::{self, AcpiError, VirtioMmioDevice};
use crate::layout;
use crate::memory::GuestMemory;

/// Errors from loading a kernel and its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("kernel {0} is neither a bzImage nor an ELF vmlinux")]
    UnknownFormat(String),
    /// The file ends inside its own headers.
    #[error("kernel {0} is truncated")]
    Truncated(String),
    /// An ELF that is not a 64-bit x86 executable.
    #[error("kernel {0} is not a 64-bit x86 ELF")]
    WrongElf(String),
    /// The loader rejected the image (truncated, bad headers, does not fit in memory).
    #[error("kernel {path} is malformed or truncated ({source})")]
    Load {
        path: String,
        source: linux_loader::loader::Error,
    },
    /// The kernel ends beyond RAM below the device hole.
    #[error("kernel {0} does not fit in guest memory")]
    KernelTooBig(String),
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: String,
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("initrd {0} does not fit in guest memory (try a larger --mem)")]
    InitrdTooBig(String),
    /// The ACPI tables cannot describe this machine.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Writing boot data into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = start_info.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `%rsi` = zero page.
    Linux64,
}

/// Where and how to start the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// Entry point (guest physical).
    pub addr: u64,
    /// Entry mode.
    pub mode: EntryMode,
}

/// The kernel formats we load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux.
    Elf,
    /// bzImage.
    BzImage,
}

/// What the boot needs to know about a loaded kernel.
#[derive(Debug)]
pub struct LoadedKernel {
    entry: BootEntry,
    kernel_end: u64,
    setup_header: Option<setup_header>,
}

/// Tells an ELF from a bzImage by their magic numbers.
pub fn detect_format(header: &[u8]) -> Option<KernelFormat> {
    if header.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    (header.get(0x202..0x206) == Some(b"HdrS")).then_some(KernelFormat::BzImage)
}

/// Loads the kernel, initrd, command line, and boot tables for `cpus` vCPUs and the `virtio`
/// devices (listed in the ACPI DSDT); returns the entry.
pub fn load(
    memory: &GuestMemory,
    mem_size: u64,
    cpus: u32,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    virtio: &[VirtioMmioDevice],
) -> Result<BootEntry, BootError> {
    let loaded = load_kernel(memory, mem_size, kernel)?;
    let initrd = match initrd {
        Some(path) => Some(load_initrd(memory, mem_size, &loaded, path)?),
        None => None,
    };
    write(
        memory,
        layout::CMDLINE,
        &cmdline_bytes(cmdline),
        "command line",
    )?;
    write(memory, layout::MPTABLE, &mptable::build(cpus), "MP table")?;
    for (addr, table) in acpi::build(cpus, virtio)? {
        write(memory, addr, &table, "ACPI tables")?;
    }
    let rsdp = acpi::RSDP_ADDR;
    match loaded.entry.mode {
        EntryMode::Pvh => {
            let info = pvh::build(mem_size, initrd, rsdp);
            write(memory, layout::PVH_START_INFO, &info, "PVH start_info")?;
        }
        EntryMode::Linux64 => {
            let params =
                zero_page::build(loaded.setup_header, mem_size, cmdline.len(), initrd, rsdp);
            write(
                memory,
                layout::ZERO_PAGE,
                zero_page::as_bytes(&params),
                "zero page",
            )?;
            regs::write_page_tables(memory).map_err(|source| BootError::GuestWrite {
                what: "page tables",
                source,
            })?;
        }
    }
    regs::write_gdt(memory, loaded.entry.mode).map_err(|source| BootError::GuestWrite {
        what: "GDT",
        source,
    })?;
    Ok(loaded.entry)
}

fn load_kernel(
    memory: &GuestMemory,
    mem_size: u64,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let read_err = |source| BootError::Read {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut header = vec![0u8; 0x210];
    let n = read_up_to(&mut file, &mut header).map_err(read_err)?;
    header.truncate(n);
    let format = detect_format(&header).ok_or_else(|| BootError::UnknownFormat(name.clone()))?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let load_err = |source| BootError::Load {
        path: name.clone(),
        source,
    };
    let high = Some(GuestAddress(layout::HIGH_MEMORY));
    let loaded = match format {
        KernelFormat::Elf => {
            const ELF64_HEADER: usize = 64;
            if header.len() < ELF64_HEADER {
                return Err(BootError::Truncated(name));
            }
            // EI_CLASS 2 = 64-bit, e_machine 62 = x86_64.
            if header.get(4) != Some(&2) || header.get(18..20) != Some(&[62, 0]) {
                return Err(BootError::WrongElf(name));
            }
            let result = Elf::load(memory, None, &mut file, high).map_err(load_err)?;
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry {
                    addr: addr.0,
                    mode: EntryMode::Pvh,
                },
                _ => BootEntry {
                    addr: result.kernel_load.0,
                    mode: EntryMode::Linux64,
                },
            };
            LoadedKernel {
                entry,
                kernel_end: result.kernel_end,
                setup_header: None,
            }
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(memory, None, &mut file, high).map_err(load_err)?;
            // The 64-bit entry (startup_64) is 0x200 past the protected-mode kernel's start.
            let entry = BootEntry {
                addr: result.kernel_load.0 + 0x200,
                mode: EntryMode::Linux64,
            };
            LoadedKernel {
                entry,
                kernel_end: result.kernel_end,
                setup_header: result.setup_header,
            }
        }
    };
    if loaded.kernel_end > layout::low_ram_end(mem_size) {
        return Err(BootError::KernelTooBig(path.display().to_string()));
    }
    Ok(loaded)
}

/// Loads the initrd as high in low memory as the kernel allows; returns (address, size).
fn load_initrd(
    memory: &GuestMemory,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| BootError::InitrdRead {
        path: name.clone(),
        source,
    })?;
    let max_addr = kernel
        .setup_header
        .filter(|h| h.version >= 0x203)
        .map(|h| u64::from(h.initrd_addr_max))
        .unwrap_or(0x7fff_ffff);
    let addr = initrd_address(
        layout::low_ram_end(mem_size),
        max_addr,
        kernel.kernel_end,
        data.len() as u64,
    )
    .ok_or(BootError::InitrdTooBig(name))?;
    write(memory, addr, &data, "initrd")?;
    Ok((addr, data.len() as u64))
}

/// Picks a page-aligned address for an initrd of `size` bytes: as high as possible below both
/// `low_end` and `max_addr`, and above the kernel.
pub fn initrd_address(low_end: u64, max_addr: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let top = low_end.min(max_addr.saturating_add(1));
    let addr = top.checked_sub(size)? & !(layout::PAGE_SIZE - 1);
    (addr >= kernel_end.max(layout::HIGH_MEMORY)).then_some(addr)
}

fn cmdline_bytes(cmdline: &str) -> Vec<u8> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

fn write(
    memory: &GuestMemory,
    addr: u64,
    data: &[u8],
    what: &'static str,
) -> Result<(), BootError> {
    memory
        .write_slice(data, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, source })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_magic() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let addr = initrd_address(256 << 20, 0x7fff_ffff, 0x200_0000, 5000).unwrap();
        assert_eq!(addr, (256 << 20) - 0x2000);
        assert_eq!(addr % 4096, 0);
        // Capped by the kernel's initrd_addr_max.
        let addr = initrd_address(3 << 30, 0x3fff_ffff, 0x200_0000, 4096).unwrap();
        assert_eq!(addr, 0x4000_0000 - 4096);
        // Would overlap the kernel.
        assert_eq!(
            initrd_address(64 << 20, 0x7fff_ffff, 60 << 20, 8 << 20),
            None
        );
        assert_eq!(initrd_address(16 << 20, 0x7fff_ffff, 0, 32 << 20), None);
    }
}
