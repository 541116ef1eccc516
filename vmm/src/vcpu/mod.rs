//! vCPUs as threads, each a small state machine (running, paused, finished) driven by
//! requests in a mailbox; a real-time signal kicks a vCPU out of KVM_RUN via immediate_exit.

pub mod exit;
pub mod state;

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use exit::{Buses, ExitAction, StopReason};
use state::VcpuState;

/// Errors from managing vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread could not be started.
    #[error("cannot start vCPU {index} thread: {source}")]
    Spawn { index: u32, source: std::io::Error },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The thread is gone (it ended or panicked).
    #[error("vCPU {0} is not running")]
    Gone(u32),
    /// Saving a vCPU's state failed.
    #[error("{0}")]
    Save(String),
}

/// What the VMM asks of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Leave the guest and wait; acknowledged with [`Ack::Paused`].
    Pause,
    /// Re-enter the guest; acknowledged with [`Ack::Resumed`].
    Resume,
    /// Save the vCPU's state (only while paused); answered with [`Ack::State`].
    SaveState,
    /// End the thread.
    Stop,
}

/// A vCPU's answer to a request.
#[derive(Debug)]
pub enum Ack {
    /// Out of the guest; its state may be read.
    Paused,
    /// Back in the guest.
    Resumed,
    /// The saved state, or why it could not be saved.
    State(Box<Result<VcpuState, String>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Finished,
}

/// Where a vCPU reports that the VM should stop.
#[derive(Debug, Clone)]
pub struct StopSink {
    reasons: Sender<StopReason>,
    wake: Arc<EventFd>,
}

impl StopSink {
    /// Reasons go to `reasons`; `wake` is signalled so an event loop notices.
    pub fn new(reasons: Sender<StopReason>, wake: Arc<EventFd>) -> Self {
        Self { reasons, wake }
    }

    /// Reports a stop.
    pub fn stop(&self, reason: StopReason) {
        let _ = self.reasons.send(reason);
        let _ = self.wake.write(1);
    }
}

/// What every vCPU needs to know to save its state on this host.
#[derive(Debug, Clone, Default)]
pub struct SaveContext {
    /// KVM's MSR index list; each vCPU keeps those it can read, found at its first save.
    pub msr_candidates: Arc<Vec<u32>>,
    /// KVM_CAP_XSAVE2: the XSAVE area size in bytes (0 without the capability).
    pub xsave2_size: usize,
}

/// A vCPU, before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    buses: Arc<Buses>,
    stops: StopSink,
    save: SaveContext,
    saveable_msrs: Option<Vec<u32>>,
}

/// The VMM's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    requests: Sender<Request>,
    acks: Receiver<Ack>,
    thread: JoinHandle<()>,
}

/// Share (percent) of each [`THROTTLE_PERIOD`] the vCPUs of this process spend out of the
/// guest: set by a migration whose guest dirties memory faster than the link drains it.
/// One VM runs per fabvm process, so one value serves all its vCPUs.
static THROTTLE_PERCENT: AtomicU32 = AtomicU32::new(0);
/// The throttling period: vCPUs are kicked this often while throttled.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

thread_local! {
    /// The kvm_run page of the vCPU on this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        let flag = run
            .cast::<u8>()
            .wrapping_add(std::mem::offset_of!(kvm_run, immediate_exit));
        // SAFETY: `run` is this thread's own kvm_run mapping, set before the thread first enters
        // KVM_RUN and cleared before it ends, so `flag` points at its immediate_exit byte; a
        // byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
    });
    result
}

impl Vcpu {
    /// A vCPU that dispatches I/O to `buses` and reports stops to `stops`.
    pub fn new(
        index: u32,
        fd: VcpuFd,
        buses: Arc<Buses>,
        stops: StopSink,
        save: SaveContext,
    ) -> Self {
        Self {
            index,
            fd,
            buses,
            stops,
            save,
            saveable_msrs: None,
        }
    }

    /// The vCPU's KVM fd, for setup before the thread starts.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Starts the vCPU's thread; it enters the guest at once.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let (requests, mailbox) = channel();
        let (ack_tx, acks) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(mailbox, ack_tx))
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            requests,
            acks,
            thread,
        })
    }

    fn run(mut self, mailbox: Receiver<Request>, acks: Sender<Ack>) {
        crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Vcpu);
        KVM_RUN.with(|cell| cell.set(self.fd.get_kvm_run()));
        let mut state = State::Running;
        let mut first_exit = true;
        loop {
            let request = match state {
                State::Running => mailbox.try_recv().ok(),
                // The VMM dropped its handle: nothing more will come, end the thread.
                State::Paused | State::Finished => Some(mailbox.recv().unwrap_or(Request::Stop)),
            };
            if let Some(request) = request {
                match request {
                    Request::Pause => {
                        if state == State::Running {
                            self.complete_pending_io();
                            state = State::Paused;
                        }
                        let _ = acks.send(Ack::Paused);
                    }
                    Request::SaveState => {
                        let result = if state == State::Running {
                            Err(format!("vCPU {} is running; pause it first", self.index))
                        } else {
                            let msrs = self.saveable_msrs.get_or_insert_with(|| {
                                state::saveable_msrs(&self.fd, &self.save.msr_candidates)
                            });
                            VcpuState::save(&self.fd, msrs, self.save.xsave2_size)
                                .map_err(|e| format!("vCPU {}: {e}", self.index))
                        };
                        let _ = acks.send(Ack::State(Box::new(result)));
                    }
                    Request::Resume => {
                        if state == State::Paused {
                            state = State::Running;
                        }
                        let _ = acks.send(Ack::Resumed);
                    }
                    Request::Stop => break,
                }
                continue;
            }
            let result = self.run_once();
            if first_exit {
                first_exit = false;
                log_first_exit(self.index);
            }
            if let Some(reason) = result {
                self.stops.stop(reason);
                state = State::Finished;
            }
        }
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }

    /// Lets KVM finish an exit we already handled (the data of a port or MMIO read lands in
    /// the registers only on the next KVM_RUN) without running guest code, so that saved
    /// registers are complete.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Enters the guest once; returns a reason if the VM must stop.
    fn run_once(&mut self) -> Option<StopReason> {
        match self.fd.run() {
            Ok(exit) => {
                crate::metrics::count_exit(exit::kind(&exit));
                match exit::handle(exit, &self.buses) {
                    ExitAction::Continue => None,
                    ExitAction::Stop(reason) => Some(reason),
                    ExitAction::InternalError => Some(StopReason::Failed(self.internal_error())),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                crate::metrics::count_exit(crate::metrics::ExitKind::Interrupted);
                self.fd.set_kvm_immediate_exit(0);
                let percent = THROTTLE_PERCENT.load(Ordering::Relaxed);
                if percent > 0 {
                    std::thread::sleep(THROTTLE_PERIOD * percent.min(99) / 100);
                }
                None
            }
            Err(e) => Some(StopReason::Failed(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                self.index
            ))),
        }
    }

    fn internal_error(&mut self) -> String {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit union is the
        // one KVM filled in; it is plain data.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let what = match suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception during exception delivery",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            _ => "internal error",
        };
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|_| "?".into());
        format!(
            "vCPU {}: KVM {what} (suberror {suberror}) at rip {rip}",
            self.index
        )
    }
}

/// Logs (target `fabvm::timing`) the wall-clock time of a vCPU's first exit from the guest,
/// which the boot benchmark compares with QEMU's `kvm_run_exit` trace.
fn log_first_exit(index: u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    log::info!(target: "fabvm::timing", "vcpu {index} first exit at {:.6}", now.as_secs_f64());
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Posts a request and kicks the vCPU out of the guest so it sees it.
    pub fn request(&self, request: Request) -> Result<(), VcpuError> {
        self.requests
            .send(request)
            .map_err(|_| VcpuError::Gone(self.index))?;
        // The thread may already have ended; then there is nothing to kick.
        let _ = self.thread.kill(kick_signal());
        Ok(())
    }

    /// Waits for the acknowledgement of a pause or resume.
    pub fn wait_ack(&self) -> Result<Ack, VcpuError> {
        self.acks.recv().map_err(|_| VcpuError::Gone(self.index))
    }

    /// Stops the thread and waits for it to end.
    pub fn stop(self) {
        let _ = self.request(Request::Stop);
        if self.thread.join().is_err() {
            log::error!("vCPU {} thread panicked", self.index);
        }
    }
}

/// Kicks throttled vCPUs out of the guest every period so they take their pause.
#[derive(Debug, Clone)]
pub struct Throttle {
    threads: Vec<libc::pthread_t>,
}

impl Throttle {
    /// Kicks every vCPU once (call every [`THROTTLE_PERIOD`] while throttled).
    pub fn kick(&self) {
        for &thread in &self.threads {
            // SAFETY: the threads are the VM's vCPU threads, which outlive every migration
            // (they are joined only when the VM stops); a signal to one that has ended is
            // an error we ignore.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Whether the guest is throttled now.
    pub fn active(&self) -> bool {
        THROTTLE_PERCENT.load(Ordering::Relaxed) > 0
    }
}

/// All of a VM's vCPUs.
#[derive(Debug, Default)]
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
}

impl Vcpus {
    /// Wraps started vCPUs.
    pub fn new(handles: Vec<VcpuHandle>) -> Self {
        Self { handles }
    }

    /// Takes every vCPU out of the guest and waits until all have.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.all(Request::Pause, Ack::Paused)
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.all(Request::Resume, Ack::Resumed)
    }

    /// Saves every (paused) vCPU's state, in vCPU order.
    pub fn save_state(&self) -> Result<Vec<VcpuState>, VcpuError> {
        for handle in &self.handles {
            handle.request(Request::SaveState)?;
        }
        let mut states = Vec::with_capacity(self.handles.len());
        for handle in &self.handles {
            match handle.wait_ack()? {
                Ack::State(result) => states.push((*result).map_err(VcpuError::Save)?),
                _ => return Err(VcpuError::Gone(handle.index)),
            }
        }
        Ok(states)
    }

    fn all(&self, request: Request, expect: Ack) -> Result<(), VcpuError> {
        for handle in &self.handles {
            handle.request(request)?;
        }
        for handle in &self.handles {
            let ack = handle.wait_ack()?;
            if std::mem::discriminant(&ack) != std::mem::discriminant(&expect) {
                return Err(VcpuError::Gone(handle.index));
            }
        }
        Ok(())
    }

    /// Slows the guest down: from now on each vCPU spends `percent` of every
    /// [`THROTTLE_PERIOD`] out of the guest (0 = full speed). Returns a kicker that must run
    /// (see [`Throttle::kick`]) for the setting to bite on vCPUs that rarely exit.
    pub fn throttle(&self, percent: u32) -> Throttle {
        THROTTLE_PERCENT.store(percent.min(99), Ordering::Relaxed);
        Throttle {
            threads: self
                .handles
                .iter()
                .map(|h| h.thread.as_pthread_t())
                .collect(),
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(self) {
        for handle in &self.handles {
            let _ = handle.request(Request::Stop);
        }
        for handle in self.handles {
            handle.stop();
        }
    }
}
