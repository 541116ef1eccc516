//! Builds a VM, by booting a kernel or restoring a snapshot, and hands it to the event loop.
//! Returns why the VM stopped.

use std::sync::mpsc::channel;
use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, cpuid, regs, BootEntry, BootError};
use crate::cluster::pull::PullConfig;
use crate::config::{Launch, Source, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager, DeviceStates};
use crate::event_loop::{self, Machine};
use crate::memory::identities::Initial;
use crate::memory::MemoryManager;
use crate::snapshot::confirm::Confirmed;
use crate::snapshot::format::SnapshotState;
use crate::snapshot::restore::{self, RestoreError};
use crate::snapshot::save::VmMeta;
use crate::vcpu::exit::StopReason;
use crate::vcpu::{SaveContext, StopSink, Vcpu, VcpuError, Vcpus};
use crate::virtio::{VirtioDevices, VirtioError};
use crate::vm::{Vm, VmError, VmShell};
use crate::vm_state::VmStateError;
use fabric::Manifest;

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Creating the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the kernel and boot data.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Reading a snapshot.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// A snapshot's disks or taps not confirmed on the command line.
    #[error(transparent)]
    Unconfirmed(#[from] crate::snapshot::confirm::ConfirmError),
    /// Fetching the pages a snapshot's store lacks.
    #[error(transparent)]
    Pull(#[from] crate::cluster::pull::PullError),
    /// Restoring VM state.
    #[error("restoring VM state: {0}")]
    VmState(#[from] VmStateError),
    /// Building devices.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// Building or restoring the virtio devices.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// vCPU threads.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Setting up a vCPU's registers.
    #[error("vCPU {index}: {source}")]
    Regs { index: u32, source: regs::RegsError },
    /// Restoring a vCPU's state.
    #[error("restoring vCPU {index}: {source}")]
    VcpuState {
        index: u32,
        source: crate::vcpu::state::StateError,
    },
    /// The saved state has another number of vCPUs than the VM built for it.
    #[error("the saved state has {saved} vCPUs, the VM was built with {built}")]
    VcpuCount { built: usize, saved: usize },
    /// A KVM vCPU call outside register setup.
    #[error("vCPU {index}: KVM {what} failed: {source}")]
    Kvm {
        index: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// The event loop or the API socket.
    #[error(transparent)]
    EventLoop(#[from] event_loop::LoopError),
    /// The memory manager.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

/// Builds the VM `launch` asks for and runs it to the end.
pub fn run(launch: &Launch) -> Result<StopReason, RunError> {
    let ctx = RunContext::new()?;
    let built = match &launch.source {
        Source::Boot(config) => boot(config, &ctx.sink)?,
        Source::Restore {
            dir,
            lazy,
            confirmed,
            pull,
        } => restore_snapshot(dir, *lazy, (confirmed, pull), launch, &ctx.sink)?,
    };
    let services = event_loop::Services {
        api_sock: launch.api_sock.clone(),
        store: launch.store_dir(),
        share: launch.share,
        identities: launch.identities,
    };
    ctx.run(built, &services, || Ok(()))
}

/// What every VM's vCPUs report to, set up before the VM is built.
#[derive(Debug)]
pub struct RunContext {
    started: std::time::Instant,
    stop_evt: Arc<EventFd>,
    stop_rx: std::sync::mpsc::Receiver<StopReason>,
    /// Where vCPUs report that the VM stops.
    pub sink: StopSink,
}

impl RunContext {
    /// A fresh context; its clock starts now.
    pub fn new() -> Result<Self, RunError> {
        let stop_evt = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(event_loop::LoopError::Io)?);
        let (stop_tx, stop_rx) = channel();
        let sink = StopSink::new(stop_tx, stop_evt.clone());
        Ok(Self {
            started: std::time::Instant::now(),
            stop_evt,
            stop_rx,
            sink,
        })
    }

    /// Starts the vCPUs of a built VM, calls `started` (a migration destination confirms
    /// here), then serves the VM until it stops.
    pub fn run(
        self,
        built: Built,
        services: &event_loop::Services,
        started: impl FnOnce() -> Result<(), String>,
    ) -> Result<StopReason, RunError> {
        let Built {
            vm,
            devices,
            vcpus: prepared,
            meta,
            contents,
        } = built;
        // The vCPUs start first: KVM logs every write since the slots went in, and the
        // memory manager's dirty log, opened just after, sees all of them.
        let vcpus = start_vcpus(prepared)?;
        log::debug!(target: "fabvm::timing", "vcpus started after {:?}", self.started.elapsed());
        let initial = match &contents {
            Some(manifest) => Initial::Manifest(manifest),
            None => Initial::Zero,
        };
        let publish = crate::host_index::table_path(std::process::id());
        let memory = MemoryManager::new(
            vm.fd.clone(),
            &vm.memory,
            initial,
            services.identities,
            Some(&publish),
        );
        let memory = match memory {
            Ok(memory) => memory,
            Err(e) => {
                vcpus.stop();
                return Err(e.into());
            }
        };
        drop(contents);
        log::debug!(target: "fabvm::timing", "memory manager up after {:?}", self.started.elapsed());
        if let Err(message) = started() {
            vcpus.stop();
            return Ok(StopReason::Failed(message));
        }
        let machine = Machine {
            vm,
            memory,
            devices,
            vcpus,
            meta,
            started: self.started,
        };
        Ok(event_loop::run(
            machine,
            services,
            &self.stop_evt,
            &self.stop_rx,
        )?)
    }
}

/// A VM ready to start: its devices and vCPUs created, the vCPUs not yet running.
#[derive(Debug)]
pub struct Built {
    /// The VM.
    pub vm: Vm,
    /// Its devices.
    pub devices: DeviceManager,
    /// Its vCPUs, not yet running.
    pub vcpus: Vec<Vcpu>,
    /// How it was started.
    pub meta: VmMeta,
    /// What guest memory holds, when known (restored or received): its identities start
    /// from this instead of from zero memory.
    pub contents: Option<Manifest>,
}

fn boot(config: &VmConfig, sink: &StopSink) -> Result<Built, RunError> {
    let vm = Vm::new(config.mem, config.cpus, config.hugepages)?;
    // Memory slots go in on a second thread while the kernel loads and the vCPUs are made:
    // the first slot costs milliseconds on some KVM flavours.
    let (devices, prepared) = std::thread::scope(|scope| {
        let slots = scope.spawn(|| vm.register_memory());
        let setup = setup_guest(&vm, config, sink);
        let slots = slots
            .join()
            .unwrap_or_else(|_| panic!("memory slot thread panicked"));
        slots?;
        setup
    })?;
    let meta = VmMeta {
        mem: config.mem,
        cpus: config.cpus,
        cmdline: config.cmdline.clone(),
        kernel: config.kernel.display().to_string(),
    };
    Ok(Built {
        vm,
        devices,
        vcpus: prepared,
        meta,
        contents: None,
    })
}

/// Builds the devices, loads the kernel (the ACPI tables and command line list the virtio
/// devices) and creates the vCPUs (not yet running).
fn setup_guest(
    vm: &Vm,
    config: &VmConfig,
    sink: &StopSink,
) -> Result<(DeviceManager, Vec<Vcpu>), RunError> {
    let virtio = VirtioDevices::build(&vm.fd, &vm.memory, &config.devices)?;
    let devices = DeviceManager::with_virtio(&vm.fd, Box::new(std::io::stdout()), None, virtio)?;
    let entry = boot::load(
        &vm.memory,
        config.mem,
        config.cpus,
        &config.kernel,
        config.initrd.as_deref(),
        &config.guest_cmdline(),
        &devices.virtio.acpi_devices(),
    )?;
    let vcpus = create_vcpus(vm, config.cpus, entry, &devices, sink)?;
    Ok((devices, vcpus))
}

fn save_context(vm: &Vm) -> Result<SaveContext, RunError> {
    let msr_list = vm
        .kvm
        .get_msr_index_list()
        .map_err(|source| RunError::Kvm {
            index: 0,
            what: "GET_MSR_INDEX_LIST",
            source,
        })?;
    Ok(SaveContext {
        msr_candidates: Arc::new(msr_list.as_slice().to_vec()),
        xsave2_size: usize::try_from(vm.fd.check_extension_int(kvm_ioctls::Cap::Xsave2))
            .unwrap_or(0),
    })
}

fn create_vcpus(
    vm: &Vm,
    cpus: u32,
    entry: BootEntry,
    devices: &DeviceManager,
    sink: &StopSink,
) -> Result<Vec<Vcpu>, RunError> {
    let supported = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| RunError::Kvm {
            index: 0,
            what: "GET_SUPPORTED_CPUID",
            source,
        })?;
    let save = save_context(vm)?;
    let mut prepared = Vec::with_capacity(cpus as usize);
    for index in 0..cpus {
        let kvm_err = |what| {
            move |source| RunError::Kvm {
                index,
                what,
                source,
            }
        };
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("CREATE_VCPU"))?;
        let tsc_khz = fd.get_tsc_khz().ok().filter(|&khz| khz > 0);
        let mut entries = supported.as_slice().to_vec();
        cpuid::normalize(&mut entries, index, cpus, tsc_khz);
        let cpuid = kvm_bindings::CpuId::from_entries(&entries).expect("CPUID fits KVM's limit");
        fd.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2"))?;
        regs::setup_common(&fd).map_err(|source| RunError::Regs { index, source })?;
        if index == 0 {
            regs::setup_boot_cpu(&fd, entry.addr, entry.mode)
                .map_err(|source| RunError::Regs { index, source })?;
        }
        prepared.push(Vcpu::new(
            index,
            fd,
            devices.buses.clone(),
            sink.clone(),
            save.clone(),
        ));
    }
    Ok(prepared)
}

/// Restores a snapshot: its disks and taps checked against the user's confirmations, memory
/// mapped copy-on-write from its image, then VM state, devices
/// and vCPUs in the order KVM needs (irqchip and PIT exist before their state is set; vCPU
/// state last, see [`crate::vcpu::state::VcpuState::restore`]). With the image on this host
/// already, the manifest is read and checked on a second thread meanwhile (the identities
/// start from it).
fn restore_snapshot(
    dir: &std::path::Path,
    lazy: bool,
    (confirmed, pull): (&Confirmed, &PullConfig),
    launch: &Launch,
    sink: &StopSink,
) -> Result<Built, RunError> {
    let clock = std::time::Instant::now();
    // The VM, and its costly first memory slot, are made while the snapshot is read.
    let shell = std::thread::spawn(|| {
        let shell = VmShell::new()?;
        shell.warm();
        Ok::<_, RunError>(shell)
    });
    let state = restore::load_state(dir)?;
    confirmed.check(dir, &state.virtio)?;
    let store = launch.store.clone().unwrap_or_else(|| state.store.clone());
    let mut manifest = Some({
        let (dir, hash) = (dir.to_path_buf(), state.manifest_blake3.clone());
        std::thread::spawn(move || restore::load_manifest(&dir, &hash))
    });
    let mut join = || {
        manifest
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_else(|| panic!("manifest thread panicked"))
    };
    let existing = match lazy {
        true => None,
        false => crate::snapshot::image::existing(&store, &state.manifest_blake3)?,
    };
    let (memory, loaded) = match existing {
        Some(image) => (restore::map_image(&image, &state)?, None),
        None => {
            let (ids, hash) = join()?;
            let loaded = restore::Loaded::new(dir, state.clone(), ids, hash)?;
            crate::cluster::pull::ensure_pages(dir, &loaded, &store, pull)?;
            let memory = if lazy {
                // The loader thread (if this process builds the image) runs on its own
                // until the image is complete, then ends.
                crate::snapshot::lazy::start(&loaded, &store)?.0
            } else {
                let (image, file) = crate::snapshot::image::ensure(&loaded, &store)?;
                restore::map_file(&file, &image, &state)?
            };
            (memory, Some(loaded))
        }
    };
    log::debug!(target: "fabvm::timing", "restore: memory mapped after {:?}", clock.elapsed());
    let shell = shell
        .join()
        .unwrap_or_else(|_| panic!("VM creation thread panicked"))?;
    log::debug!(target: "fabvm::timing", "restore: VM made after {:?}", clock.elapsed());
    let mut built = restore_machine_in(shell, &state, memory, sink)?;
    log::debug!(target: "fabvm::timing", "restore: machine restored after {:?}", clock.elapsed());
    let loaded = match loaded {
        Some(loaded) => loaded,
        None => {
            let (ids, hash) = join()?;
            restore::Loaded::new(dir, state, ids, hash)?
        }
    };
    built.contents = Some(loaded.manifest);
    Ok(built)
}

/// Builds a VM from saved state and guest memory already holding its contents (a snapshot's
/// image or lazy loader, or pages received from a migration source). The memory slots (the
/// first costs milliseconds on kvm_pvm) go in on a second thread while the vCPUs are made
/// and the VM and device state set; vCPU state follows once they are in.
pub fn restore_machine(
    state: &SnapshotState,
    memory: crate::memory::GuestMemory,
    sink: &StopSink,
) -> Result<Built, RunError> {
    restore_machine_in(VmShell::new()?, state, memory, sink)
}

/// [`restore_machine`] in a VM made beforehand.
fn restore_machine_in(
    shell: VmShell,
    state: &SnapshotState,
    memory: crate::memory::GuestMemory,
    sink: &StopSink,
) -> Result<Built, RunError> {
    let clock = std::time::Instant::now();
    let vm = shell.with_memory(memory, state.cpus)?;
    let (vcpus, devices) = std::thread::scope(|scope| {
        let slots = scope.spawn(|| vm.register_memory());
        let early = create_vcpu_fds(&vm, state.cpus)
            .and_then(|vcpus| Ok((vcpus, restore_devices(&vm, state)?)));
        let slots = slots
            .join()
            .unwrap_or_else(|_| panic!("memory slot thread panicked"));
        log::debug!(target: "fabvm::timing", "restore: slots in after {:?}", clock.elapsed());
        slots?;
        early
    })?;
    finish_restore(vm, vcpus, devices, state, sink)
}

/// A VM whose machine state has not arrived yet: KVM VM, irqchip, memory slots and vCPUs
/// made, so that a migration destination builds it while pages arrive and only sets state
/// while the guest is paused.
#[derive(Debug)]
pub struct Shell {
    vm: Vm,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
}

impl Shell {
    /// Creates the VM around `memory` with `cpus` vCPUs.
    pub fn build(memory: crate::memory::GuestMemory, cpus: u32) -> Result<Shell, RunError> {
        let vm = Vm::with_memory(memory, cpus)?;
        vm.register_memory()?;
        let vcpus = create_vcpu_fds(&vm, cpus)?;
        Ok(Shell { vm, vcpus })
    }

    /// The guest memory, to fill before [`restore_into`].
    pub fn memory(&self) -> &crate::memory::GuestMemory {
        &self.vm.memory
    }
}

/// Sets `state` into `shell`, in the order KVM needs (irqchip and PIT exist before their
/// state is set; vCPU state last, see [`crate::vcpu::state::VcpuState::restore`]).
pub fn restore_into(
    shell: Shell,
    state: &SnapshotState,
    sink: &StopSink,
) -> Result<Built, RunError> {
    let Shell { vm, vcpus } = shell;
    let devices = restore_devices(&vm, state)?;
    finish_restore(vm, vcpus, devices, state, sink)
}

fn create_vcpu_fds(vm: &Vm, cpus: u32) -> Result<Vec<kvm_ioctls::VcpuFd>, RunError> {
    (0..cpus)
        .map(|index| {
            vm.fd
                .create_vcpu(u64::from(index))
                .map_err(|source| RunError::Kvm {
                    index,
                    what: "CREATE_VCPU",
                    source,
                })
        })
        .collect()
}

/// VM state (irqchip, PIT, clock) and devices: nothing here needs the memory slots.
fn restore_devices(vm: &Vm, state: &SnapshotState) -> Result<DeviceManager, RunError> {
    state.vm.restore(&vm.fd)?;
    let saved = DeviceStates {
        serial: &state.serial,
        i8042: &state.i8042,
    };
    let virtio = VirtioDevices::restore(&vm.fd, &vm.memory, &state.virtio)?;
    Ok(DeviceManager::with_virtio(
        &vm.fd,
        Box::new(std::io::stdout()),
        Some(saved),
        virtio,
    )?)
}

/// vCPU state, once the memory slots are in (KVM reads guest memory for some of it, e.g.
/// the kvmclock page).
fn finish_restore(
    vm: Vm,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    devices: DeviceManager,
    state: &SnapshotState,
    sink: &StopSink,
) -> Result<Built, RunError> {
    if vcpus.len() != state.vcpus.len() {
        return Err(RunError::VcpuCount {
            built: vcpus.len(),
            saved: state.vcpus.len(),
        });
    }
    let save = save_context(&vm)?;
    let mut prepared = Vec::with_capacity(state.vcpus.len());
    for (index, (fd, vcpu_state)) in vcpus.into_iter().zip(&state.vcpus).enumerate() {
        let index = index as u32;
        vcpu_state
            .restore(&fd, save.xsave2_size)
            .map_err(|source| RunError::VcpuState { index, source })?;
        prepared.push(Vcpu::new(
            index,
            fd,
            devices.buses.clone(),
            sink.clone(),
            save.clone(),
        ));
    }
    // Requests the guest made just before the snapshot that no device had picked up yet.
    devices.virtio.process_all_queues();
    let meta = VmMeta {
        mem: state.mem,
        cpus: state.cpus,
        cmdline: state.cmdline.clone(),
        kernel: state.kernel.clone(),
    };
    Ok(Built {
        vm,
        devices,
        vcpus: prepared,
        meta,
        contents: None,
    })
}

/// Starts every vCPU thread. APs wait for INIT/SIPI; the guest wakes them through its LAPIC.
fn start_vcpus(prepared: Vec<Vcpu>) -> Result<Vcpus, RunError> {
    let mut handles = Vec::with_capacity(prepared.len());
    for vcpu in prepared {
        match vcpu.start() {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                Vcpus::new(handles).stop();
                return Err(e.into());
            }
        }
    }
    Ok(Vcpus::new(handles))
}
