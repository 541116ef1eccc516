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
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot}: {source}")]
    Slot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Maps `mem` bytes of guest RAM, split around the device hole.
pub fn create(mem: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<_> = layout::ram_regions(mem)
        .into_iter()
        .map(|(base, size)| (GuestAddress(base), size as usize))
        .collect();
    let memory = GuestMemory::from_ranges(&ranges)?;
    for region in memory.iter() {
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
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let entry = kvm_userspace_memory_region {
            slot,
            flags: 0,
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
