//! Guest memory and its manager: anonymous mappings per RAM region (vm-memory, with a dirty
//! bitmap for the VMM's own writes) registered as KVM memory slots with dirty logging on,
//! and the [`MemoryManager`] that owns the dirty log and the live page identities and hands
//! each consumer (snapshots, migration, sharing, stats) what it needs.
//!
//! - [`dirty`]: one dirty log per VM, a view per consumer.
//! - [`identities`]: every page's identity kept current in the background and published.

pub mod dirty;
pub mod identities;

use std::path::Path;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;
use dirty::{DirtyLog, DirtyView};
use identities::{IdentityConfig, Initial, LiveIdentities};

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
    /// The identity table.
    #[error(transparent)]
    Table(#[from] fabric::live::TableError),
    /// A manifest built from the identities.
    #[error("identities: {0}")]
    Manifest(fabric::ManifestError),
    /// The background thread could not be started.
    #[error("cannot start the identities thread: {0}")]
    Thread(std::io::Error),
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

/// Registers every region as a KVM slot (slot number = region index), with KVM's dirty
/// logging on from the start: the memory manager's dirty log reads it.
pub fn register(vm: &VmFd, memory: &GuestMemory) -> Result<(), MemoryError> {
    set_slots(vm, memory, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)
}

/// The owner of a running VM's memory: the mapping, its dirty log, and its live page
/// identities (published for the other fabvm processes of this host).
#[derive(Debug)]
pub struct MemoryManager {
    memory: GuestMemory,
    log: Arc<DirtyLog>,
    identities: LiveIdentities,
}

impl MemoryManager {
    /// Takes over `memory`, registered in `vm` by [`register`], whose contents are as
    /// `initial` says; publishes its identities at `publish`.
    pub fn new(
        vm: Arc<VmFd>,
        memory: &GuestMemory,
        initial: Initial<'_>,
        config: IdentityConfig,
        publish: Option<&Path>,
    ) -> Result<Self, MemoryError> {
        if let Some(dir) = publish.and_then(Path::parent) {
            let _ = std::fs::create_dir_all(dir);
        }
        let log = DirtyLog::new(vm, memory.clone());
        let identities = LiveIdentities::start(&log, memory, initial, config, publish)?;
        Ok(MemoryManager {
            memory: memory.clone(),
            log,
            identities,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// A new view of the dirty log (e.g. for a migration's rounds).
    pub fn dirty_view(&self) -> DirtyView {
        self.log.view()
    }

    /// The live identities.
    pub fn identities(&self) -> &LiveIdentities {
        &self.identities
    }
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
