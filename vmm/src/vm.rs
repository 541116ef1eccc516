//! A KVM VM: /dev/kvm, the VM fd with in-kernel irqchip and PIT, and guest memory in slots.
//! Everything a vCPU or device needs from the VM is reachable from [`Vm`].

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::memory::{self, GuestMemory, MemoryError};

/// Errors from creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is absent.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd, or run where virtualization is enabled)")]
    NoKvm,
    /// /dev/kvm exists but we may not open it.
    #[error("no permission to open /dev/kvm (run as root or join the kvm group)")]
    KvmPermission,
    /// Opening /dev/kvm failed otherwise.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// The host's KVM lacks something we need.
    #[error("host KVM lacks {0}")]
    MissingCapability(&'static str),
    /// A VM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than KVM allows.
    #[error("--cpus {asked}: this host's KVM allows at most {max}")]
    TooManyCpus { asked: u32, max: usize },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// TSS area KVM needs on Intel hosts (three pages just below the BIOS reset vector).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The VM: KVM handles and guest memory.
#[derive(Debug)]
pub struct Vm {
    /// /dev/kvm.
    pub kvm: Kvm,
    /// The VM fd, shared with vCPU setup and devices.
    pub fd: Arc<VmFd>,
    /// Guest memory.
    pub memory: GuestMemory,
}

impl Vm {
    /// Opens KVM, creates the VM with irqchip and PIT, and maps `mem` bytes of RAM. The RAM is
    /// not yet a KVM memory slot: call [`Vm::register_memory`] before any vCPU runs.
    pub fn new(mem: u64, cpus: u32, hugepages: bool) -> Result<Self, VmError> {
        Self::with_memory(memory::create(mem, hugepages)?, cpus)
    }

    /// [`Vm::new`] with guest memory mapped by the caller (a restored snapshot's image).
    pub fn with_memory(memory: GuestMemory, cpus: u32) -> Result<Self, VmError> {
        VmShell::new()?.with_memory(memory, cpus)
    }

    /// Registers guest RAM as KVM memory slots. The first slot costs milliseconds on some KVM
    /// flavours (kvm_pvm sets up its MMU then), so the runner does this on a second thread
    /// while it loads the kernel and creates vCPUs.
    pub fn register_memory(&self) -> Result<(), VmError> {
        Ok(memory::register(&self.fd, &self.memory)?)
    }
}

/// A KVM VM (irqchip and PIT made) without guest memory yet: a restore creates it, and pays
/// for its first memory slot ([`VmShell::warm`]), while it reads the snapshot.
#[derive(Debug)]
pub struct VmShell {
    kvm: Kvm,
    fd: VmFd,
}

impl VmShell {
    /// Opens KVM and creates the VM with irqchip and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => VmError::NoKvm,
            libc::EACCES | libc::EPERM => VmError::KvmPermission,
            _ => VmError::OpenKvm(e),
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip"),
            (Cap::UserMemory, "user memory slots"),
            (Cap::Pit2, "an in-kernel PIT"),
            (Cap::Irqfd, "irqfd"),
            (Cap::ImmediateExit, "immediate_exit"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(|source| VmError::Kvm {
            what: "CREATE_VM",
            source,
        })?;
        if let Err(e) = fd.set_tss_address(KVM_TSS_ADDRESS) {
            // Only Intel VMX needs it; other KVM flavours may not implement it.
            log::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        fd.create_irq_chip().map_err(|source| VmError::Kvm {
            what: "CREATE_IRQCHIP",
            source,
        })?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(|source| VmError::Kvm {
            what: "CREATE_PIT2",
            source,
        })?;
        Ok(VmShell { kvm, fd })
    }

    /// Adds and removes a one-page memory slot: the first slot of a VM costs milliseconds
    /// on kvm_pvm (its MMU is set up then, whatever the slot's size), later ones about
    /// 0.2 ms. Best effort: on failure the real slots pay as before.
    pub fn warm(&self) {
        const LEN: usize = 4096;
        // SAFETY: a fresh private anonymous mapping of one page, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return;
        }
        let mut region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: LEN as u64,
            userspace_addr: addr as u64,
        };
        // SAFETY: the page stays mapped until after the slot is deleted again below, and no
        // vCPU exists yet that could touch it.
        if unsafe { self.fd.set_user_memory_region(region) }.is_ok() {
            region.memory_size = 0;
            // SAFETY: deleting the slot just made; KVM drops its references to the page.
            if let Err(e) = unsafe { self.fd.set_user_memory_region(region) } {
                log::warn!("KVM: cannot delete the warm-up slot: {e}");
            }
        }
        // SAFETY: unmapping the page mapped above; KVM no longer refers to it.
        unsafe { libc::munmap(addr, LEN) };
    }

    /// The VM with `memory` as its RAM (not yet registered, see [`Vm::register_memory`]) and
    /// room for `cpus` vCPUs.
    pub fn with_memory(self, memory: GuestMemory, cpus: u32) -> Result<Vm, VmError> {
        let max = self.kvm.get_max_vcpus();
        if cpus as usize > max {
            return Err(VmError::TooManyCpus { asked: cpus, max });
        }
        Ok(Vm {
            kvm: self.kvm,
            fd: Arc::new(self.fd),
            memory,
        })
    }
}
