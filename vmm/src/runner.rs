//! Builds a VM from a [`VmConfig`], boots it and runs the event loop until it stops: console
//! input, guest reset, vCPU stop reports. Returns why the VM stopped.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::DebugExit;

use crate::boot::{self, cpuid, regs, BootEntry, BootError};
use crate::config::VmConfig;
use crate::console::{self, RawStdin};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::vcpu::exit::StopReason;
use crate::vcpu::{state, SaveContext, StopSink, Vcpu, VcpuError, Vcpus};
use crate::vm::{Vm, VmError};

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Creating the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the kernel and boot data.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Building devices.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// vCPU threads.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Setting up a vCPU's registers.
    #[error("vCPU {index}: {source}")]
    Regs { index: u32, source: regs::RegsError },
    /// A KVM vCPU call outside register setup.
    #[error("vCPU {index}: KVM {what} failed: {source}")]
    Kvm {
        index: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// epoll or eventfd failure in the event loop.
    #[error("event loop: {0}")]
    EventLoop(std::io::Error),
}

const EV_STOP: u64 = 1;
const EV_RESET: u64 = 2;
const EV_STDIN: u64 = 3;
const EV_DRAINED: u64 = 4;
const EV_DEBUG_EXIT: u64 = 5;

/// Boots the configured guest and runs it to the end.
pub fn run(config: &VmConfig) -> Result<StopReason, RunError> {
    let started = std::time::Instant::now();
    let stage =
        |name: &str| log::debug!(target: "fabvm::timing", "{name} after {:?}", started.elapsed());
    let vm = Vm::new(config.mem, config.cpus)?;
    stage("vm created");
    let stop_evt = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(RunError::EventLoop)?);
    let (stop_tx, stop_rx) = channel();
    let sink = StopSink::new(stop_tx, stop_evt.clone());
    // Memory slots go in on a second thread while the kernel loads and the vCPUs are made.
    let (devices, prepared) = std::thread::scope(|scope| {
        let slots = scope.spawn(|| vm.register_memory());
        let setup = setup_guest(&vm, config, &sink);
        let slots = slots
            .join()
            .unwrap_or_else(|_| panic!("memory slot thread panicked"));
        slots?;
        setup
    })?;
    stage("guest set up");
    let vcpus = start_vcpus(prepared)?;
    stage("vcpus started");
    let _raw = RawStdin::new();
    let result = event_loop(&devices, &stop_evt, &stop_rx);
    vcpus.stop();
    result
}

/// Loads the kernel, builds the devices and creates the vCPUs (not yet running).
fn setup_guest(
    vm: &Vm,
    config: &VmConfig,
    sink: &StopSink,
) -> Result<(DeviceManager, Vec<Vcpu>), RunError> {
    let entry = boot::load(
        &vm.memory,
        config.mem,
        config.cpus,
        &config.kernel,
        config.initrd.as_deref(),
        &config.cmdline,
        &[], // virtio-mmio devices: none yet
    )?;
    let devices = DeviceManager::new(&vm.fd, Box::new(std::io::stdout()))?;
    let vcpus = create_vcpus(vm, config.cpus, entry, &devices, sink)?;
    Ok((devices, vcpus))
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
    let mut prepared = Vec::with_capacity(cpus as usize);
    let mut save = SaveContext {
        msrs: Arc::default(),
        xsave2_size: usize::try_from(vm.fd.check_extension_int(kvm_ioctls::Cap::Xsave2))
            .unwrap_or(0),
    };
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
        if index == 0 {
            // Which MSRs can be saved depends on the CPUID just set; ask once.
            let list = vm
                .kvm
                .get_msr_index_list()
                .map_err(kvm_err("GET_MSR_INDEX_LIST"))?;
            save.msrs = Arc::new(state::saveable_msrs(&fd, list.as_slice()));
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

/// Waits for the VM to stop, moving console input into the UART meanwhile.
fn event_loop(
    devices: &DeviceManager,
    stop_evt: &EventFd,
    stops: &Receiver<StopReason>,
) -> Result<StopReason, RunError> {
    let io = RunError::EventLoop;
    let epoll = Epoll::new().map_err(io)?;
    let add = |fd: i32, data: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, data),
        )
    };
    add(stop_evt.as_raw_fd(), EV_STOP).map_err(io)?;
    add(devices.reset.as_raw_fd(), EV_RESET).map_err(io)?;
    add(devices.serial_drained.as_raw_fd(), EV_DRAINED).map_err(io)?;
    add(devices.debug_exit.as_raw_fd(), EV_DEBUG_EXIT).map_err(io)?;
    // A regular file or /dev/null cannot be polled; then the guest simply gets no input.
    let mut stdin_open = add(console::stdin_fd(), EV_STDIN).is_ok();
    let mut pending: Vec<u8> = Vec::new();
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        for event in &events[..n] {
            match event.data() {
                EV_STOP => {
                    let _ = stop_evt.read();
                    if let Ok(reason) = stops.try_recv() {
                        return Ok(reason);
                    }
                }
                EV_RESET => {
                    let _ = devices.reset.read();
                    return Ok(StopReason::Reset);
                }
                EV_DEBUG_EXIT => {
                    let value = devices.debug_exit.read().map_err(io)?;
                    return Ok(match DebugExit::status_from_event(value) {
                        0 => StopReason::PowerOff,
                        status => StopReason::Failed(format!(
                            "guest reported failure (status {status} on the debug-exit port)"
                        )),
                    });
                }
                EV_STDIN => {
                    let mut buf = [0u8; 256];
                    match console::read_stdin(&mut buf) {
                        Ok(Some(len)) => pending.extend_from_slice(&buf[..len]),
                        Ok(None) | Err(_) => {
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                console::stdin_fd(),
                                EpollEvent::default(),
                            );
                            stdin_open = false;
                        }
                    }
                    feed_serial(devices, &mut pending);
                    if !pending.is_empty() && stdin_open {
                        // Hold stdin until the guest drains the FIFO.
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            console::stdin_fd(),
                            EpollEvent::default(),
                        );
                    }
                }
                EV_DRAINED => {
                    let _ = devices.serial_drained.read();
                    let was_pending = !pending.is_empty();
                    feed_serial(devices, &mut pending);
                    if was_pending && pending.is_empty() && stdin_open {
                        add(console::stdin_fd(), EV_STDIN).map_err(io)?;
                    }
                }
                _ => {}
            }
        }
    }
}

fn feed_serial(devices: &DeviceManager, pending: &mut Vec<u8>) {
    if pending.is_empty() {
        return;
    }
    let taken = devices
        .serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .enqueue_input(pending);
    pending.drain(..taken);
}
