//! Boot-time vCPU state: GDT and segments, identity page tables, registers, FPU, MSRs and the
//! local APIC's LINT pins. Pure builders up top, the KVM calls in `setup_*` at the bottom.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::EntryMode;
use crate::layout;
use crate::memory::GuestMemory;

/// Errors from setting up a vCPU's boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than we gave it.
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selector of the boot code segment (GDT index 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the boot data segment (GDT index 2).
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the boot TSS (GDT index 3).
pub const TSS_SELECTOR: u16 = 0x18;

/// The four boot GDT entries (null, code, data, TSS) as (flags, base, limit).
fn gdt_table(mode: EntryMode) -> [(u16, u32, u32); 4] {
    match mode {
        // 32-bit flat code and data, a busy 32-bit TSS: what PVH entry requires.
        EntryMode::Pvh => [
            (0, 0, 0),
            (0xc09b, 0, 0xfffff),
            (0xc093, 0, 0xfffff),
            (0x008b, 0, 0x67),
        ],
        // 64-bit code, flat data, a busy TSS.
        EntryMode::Linux64 => [
            (0, 0, 0),
            (0xa09b, 0, 0xfffff),
            (0xc093, 0, 0xfffff),
            (0x808b, 0, 0xfffff),
        ],
    }
}

/// Encodes one GDT descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM segment register matching GDT entry `index` built from (flags, base, limit).
pub fn segment(index: u16, (flags, base, limit): (u16, u32, u32)) -> kvm_segment {
    let bit = |n: u16| ((flags >> n) & 1) as u8;
    let granular = bit(15) == 1;
    kvm_segment {
        base: u64::from(base),
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: bit(7),
        dpl: ((flags >> 5) & 3) as u8,
        db: bit(14),
        s: bit(4),
        l: bit(13),
        g: bit(15),
        avl: bit(12),
        unusable: u8::from(bit(7) == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT.
pub fn write_gdt(memory: &GuestMemory, mode: EntryMode) -> Result<(), GuestMemoryError> {
    for (i, (flags, base, limit)) in gdt_table(mode).into_iter().enumerate() {
        let at = layout::BOOT_GDT + 8 * i as u64;
        memory.write_obj(gdt_entry(flags, base, limit), GuestAddress(at))?;
    }
    memory.write_obj(0u64, GuestAddress(layout::BOOT_IDT))
}

/// Writes identity page tables mapping the first 1 GiB with 2 MiB pages.
pub fn write_page_tables(memory: &GuestMemory) -> Result<(), GuestMemoryError> {
    memory.write_obj(layout::PDPT | 0x3, GuestAddress(layout::PML4))?;
    memory.write_obj(layout::PD | 0x3, GuestAddress(layout::PDPT))?;
    let entries: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    memory.write_slice(&entries, GuestAddress(layout::PD))
}

/// Special registers for the entry mode, starting from KVM's reset values.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let table = gdt_table(mode);
    let code = segment(1, table[1]);
    let data = segment(2, table[2]);
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(3, table[3]);
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = layout::PML4;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers for the entry.
pub fn boot_regs(entry: u64, mode: EntryMode) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = layout::PVH_START_INFO,
        EntryMode::Linux64 => {
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
            regs.rsi = layout::ZERO_PAGE;
        }
    }
    regs
}

/// MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a LAPIC register page.
pub fn set_lint(regs: &mut [u8]) {
    const LINT0: usize = 0x350;
    const LINT1: usize = 0x360;
    const EXTINT: u32 = 7;
    const NMI: u32 = 4;
    for (offset, mode) in [(LINT0, EXTINT), (LINT1, NMI)] {
        let raw = u32::from_le_bytes(regs[offset..offset + 4].try_into().expect("4 bytes"));
        let value = (raw & !0x700) | (mode << 8);
        regs[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }
}

/// AMD's HWCR (MSR 0xc0010015) bit 24, TscFreqSel: the TSC counts at the P0 frequency, as on
/// every AMD CPU with an invariant TSC. Linux on AMD warns "[Firmware Bug]: TSC doesn't count
/// with P0 frequency!" when it is clear. KVM takes it from userspace on recent kernels (QEMU
/// sets it too); an older KVM refuses it, and then the guest only warns.
fn set_tsc_freq_sel(vcpu: &VcpuFd) {
    const MSR_K7_HWCR: u32 = 0xc001_0015;
    const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;
    let entry = kvm_msr_entry {
        index: MSR_K7_HWCR,
        data: HWCR_TSC_FREQ_SEL,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[entry]).expect("one MSR fits a FAM struct");
    if !matches!(vcpu.set_msrs(&msrs), Ok(1)) {
        log::debug!("KVM refused HWCR.TscFreqSel; an AMD guest will warn about its TSC");
    }
}

/// State every vCPU needs: MSRs, FPU, LAPIC LINT pins.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("boot MSR list fits a FAM struct");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    set_tsc_freq_sel(vcpu);
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm("GET_LAPIC"))?;
    // SAFETY: `regs` is a plain [c_char; 1024] array; viewing it as bytes of the same length
    // and alignment 1 is sound, and the borrow ends before `lapic` is used again.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(lapic.regs.as_mut_ptr().cast::<u8>(), lapic.regs.len())
    };
    set_lint(bytes);
    vcpu.set_lapic(&lapic).map_err(kvm("SET_LAPIC"))?;
    Ok(())
}

/// Puts the boot vCPU at the kernel's entry.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: u64, mode: EntryMode) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(kvm("GET_SREGS"))?;
    vcpu.set_sregs(&boot_sregs(sregs, mode))
        .map_err(kvm("SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry, mode))
        .map_err(kvm("SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_like_the_manual() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x008b, 0, 0x67), 0x0000_8b00_0000_0067);
    }

    #[test]
    fn pvh_segments_are_flat_32_bit() {
        let sregs = boot_sregs(kvm_sregs::default(), EntryMode::Pvh);
        assert_eq!(sregs.cs.selector, CODE_SELECTOR);
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
        assert_eq!(sregs.ds.selector, DATA_SELECTOR);
        assert_eq!(sregs.tr.selector, TSS_SELECTOR);
        assert_eq!((sregs.tr.type_, sregs.tr.s, sregs.tr.limit), (0xb, 0, 0x67));
        assert_eq!(sregs.cr0 & CR0_PG, 0);
        assert_eq!(sregs.cr0 & CR0_PE, 1);
        assert_eq!(sregs.efer, 0);
    }

    #[test]
    fn linux64_is_long_mode_with_our_tables() {
        let sregs = boot_sregs(kvm_sregs::default(), EntryMode::Linux64);
        assert_eq!((sregs.cs.l, sregs.cs.db), (1, 0));
        assert_eq!(sregs.cr3, layout::PML4);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        let regs = boot_regs(0x100_0200, EntryMode::Linux64);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0200, layout::ZERO_PAGE, 2)
        );
        let regs = boot_regs(0x100_0000, EntryMode::Pvh);
        assert_eq!(regs.rbx, layout::PVH_START_INFO);
    }

    #[test]
    fn lint_pins_programmed() {
        let mut page = vec![0xffu8; 1024];
        set_lint(&mut page);
        let lint0 = u32::from_le_bytes(page[0x350..0x354].try_into().unwrap());
        let lint1 = u32::from_le_bytes(page[0x360..0x364].try_into().unwrap());
        assert_eq!((lint0 >> 8) & 7, 7);
        assert_eq!((lint1 >> 8) & 7, 4);
        assert_eq!(lint0 | 0x700, 0xffff_ffff, "other bits kept");
    }

    #[test]
    fn boot_msrs_are_distinct() {
        let msrs = boot_msrs();
        let mut idx: Vec<_> = msrs.iter().map(|m| m.index).collect();
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), msrs.len());
    }
}
