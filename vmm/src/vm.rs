//! A KVM VM: /dev/kvm, the VM fd with in-kernel irqchip and PIT, and guest memory in slots.
//! Everything a vCPU or device needs from the VM is reachable from [`Vm`].

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
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
        let max = kvm.get_max_vcpus();
        if cpus as usize > max {
            return Err(VmError::TooManyCpus { asked: cpus, max });
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
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            memory,
        })
    }

    /// Registers guest RAM as KVM memory slots. The first slot costs milliseconds on some KVM
    /// flavours (kvm_pvm sets up its MMU then), so the runner does this on a second thread
    /// while it loads the kernel and creates vCPUs.
    pub fn register_memory(&self) -> Result<(), VmError> {
        Ok(memory::register(&self.fd, &self.memory)?)
    }
}
