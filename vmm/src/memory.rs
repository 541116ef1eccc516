//! Guest memory: anonymous mappings per RAM region (vm-memory, with a dirty bitmap for the
//! VMM's own writes) registered as KVM memory slots, one slot per region.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;

/// Guest memory with a bitmap recording the pages the VMM itself writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Errors from creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the guest's memory failed.
    #[error("cannot allocate guest memory: {0}")]
    Allocate(#[from] vm_memory::mmap::FromRangesError),
    /// KVM could not report a slot's dirty pages.
    #[error("KVM dirty log of slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot}: {source}")]
    Slot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Maps `mem` bytes of guest RAM, split around the device hole, with transparent huge pages
/// when `hugepages` (first touch is several times faster; on nested KVM the dirty log then
/// reports writes at a coarser grain).
pub fn create(mem: u64, hugepages: bool) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<_> = layout::ram_regions(mem)
        .into_iter()
        .map(|(base, size)| (GuestAddress(base), size as usize))
        .collect();
    let memory = GuestMemory::from_ranges(&ranges)?;
    for region in memory.iter().filter(|_| hugepages) {
        let (ptr, len) = (region.as_ptr(), region.len() as usize);
        // SAFETY: advising the kernel about a mapping we own changes no memory contents; on
        // failure (THP disabled) the mapping keeps working with small pages.
        let ret = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
        if ret != 0 {
            log::debug!("MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
        }
    }
    Ok(memory)
}

/// Registers every region as a KVM slot (slot number = region index).
pub fn register(vm: &VmFd, memory: &GuestMemory) -> Result<(), MemoryError> {
    set_slots(vm, memory, 0)
}

/// Turns KVM dirty-page logging on for every slot (re-registering them with the flag).
pub fn enable_dirty_log(vm: &VmFd, memory: &GuestMemory) -> Result<(), MemoryError> {
    set_slots(vm, memory, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)
}

/// Pages written since the last call, per region: KVM's dirty log (guest writes) ORed with
/// vm-memory's bitmap (the VMM's own writes, e.g. device emulation). Both are reset.
pub fn take_dirty(vm: &VmFd, memory: &GuestMemory) -> Result<Vec<Vec<u64>>, MemoryError> {
    memory
        .iter()
        .enumerate()
        .map(|(slot, region)| {
            let slot = slot as u32;
            let mut words = vm
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| MemoryError::DirtyLog { slot, source })?;
            let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
            let vmm_words = mapping.bitmap().get_and_reset();
            for (word, vmm) in words.iter_mut().zip(vmm_words) {
                *word |= vmm;
            }
            Ok(words)
        })
        .collect()
}

fn set_slots(vm: &VmFd, memory: &GuestMemory, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let entry = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region's mapping lives as long as `memory`, which the VM holds until
        // after the VM fd (and so every slot) is closed.
        unsafe { vm.set_user_memory_region(entry) }
            .map_err(|source| MemoryError::Slot { slot, source })?;
    }
    Ok(())
}
