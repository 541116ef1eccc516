//! seccomp filters: one allow-list per kind of thread ([`ThreadKind`]), installed by each
//! thread on itself before it touches guest-controlled data, so a compromised thread can make
//! only the system calls its job needs. Everything else ends the process (see docs/seccomp.md).
//!
//! The binary picks the [`Mode`] once ([`init`]: `--seccomp on|off|log`, default on); library
//! users and unit tests that never call [`init`] install nothing. A forbidden call is trapped
//! (SIGSYS): a handler prints one line naming the call and the thread's kind and exits with
//! [`VIOLATION_EXIT`]. In `log` mode forbidden calls are allowed and the kernel logs each one
//! (`dmesg`: `audit: type=1326 ... comm="vcpu0" ... syscall=N`), to find what a new code path
//! needs.
//!
//! Where each filter goes on: the main thread ([`ThreadKind::Vmm`]) just before the vCPUs
//! start (a migration destination first stacks [`ThreadKind::MigrationDestination`] before it
//! reads the source); vCPU, device, API, sharing, identity, lazy-restore and migration
//! threads when they start; rayon's workers when the pool starts ([`start_workers`]). Threads
//! inherit their creator's filter, so the API's per-request threads and tiny_http's own
//! threads run under the API filter, and a migration's helper under the migration filter.

mod api;
mod device;
mod identities;
mod kvm;
mod lazy;
mod migration;
pub mod names;
mod rules;
mod sharing;
mod vcpu;
mod vmm;
mod workers;

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use rules::Rules;

/// Exit status after a forbidden system call: 128 + SIGSYS, as if SIGSYS had killed us.
pub const VIOLATION_EXIT: i32 = 128 + libc::SIGSYS;

/// Errors from setting up or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not make a filter (a bug in a rules file).
    #[error("seccomp: cannot build the {kind} filter: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("seccomp: cannot install the {kind} filter: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be set.
    #[error("seccomp: cannot set the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// Whether filters are installed, and what a forbidden call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Filters on; a forbidden call ends the process with one line on stderr.
    On,
    /// No filters (debugging only).
    Off,
    /// Filters on, but forbidden calls are allowed and logged by the kernel (`dmesg`).
    Log,
}

/// The kinds of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: event loop, API requests, snapshots, stats.
    Vmm,
    /// A vCPU: `KVM_RUN` and the port and MMIO devices on its buses.
    Vcpu,
    /// The virtio device thread: queues, disks, taps, entropy.
    Device,
    /// The API server, its per-request threads and tiny_http's threads.
    Api,
    /// A live migration's source (and its throttle helper).
    MigrationSource,
    /// `fabvm receive`'s main thread while it takes a VM from the network and builds it.
    MigrationDestination,
    /// The sharing agent and, on one VM per host, the sharing leader (`--share`).
    Sharing,
    /// The background identity thread (`fabvm-ids`).
    Identities,
    /// rayon's workers (parallel hashing, store and migration work).
    Worker,
    /// The lazy-restore loader (userfaultfd).
    LazyRestore,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Api,
        ThreadKind::MigrationSource,
        ThreadKind::MigrationDestination,
        ThreadKind::Sharing,
        ThreadKind::Identities,
        ThreadKind::Worker,
        ThreadKind::LazyRestore,
    ];

    /// The kind's name in messages and in `FABVM_TEST_SECCOMP_VIOLATION`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Api => "api",
            ThreadKind::MigrationSource => "migration-source",
            ThreadKind::MigrationDestination => "migration-destination",
            ThreadKind::Sharing => "sharing",
            ThreadKind::Identities => "identities",
            ThreadKind::Worker => "worker",
            ThreadKind::LazyRestore => "lazy-restore",
        }
    }

    /// The kind's allow-list.
    pub fn rules(self) -> Rules {
        let mut r = Rules::default();
        rules::runtime(&mut r);
        match self {
            ThreadKind::Vmm => vmm::rules(&mut r),
            ThreadKind::Vcpu => vcpu::rules(&mut r),
            ThreadKind::Device => device::rules(&mut r),
            ThreadKind::Api => api::rules(&mut r),
            ThreadKind::MigrationSource => migration::source(&mut r),
            ThreadKind::MigrationDestination => migration::destination(&mut r),
            ThreadKind::Sharing => sharing::rules(&mut r),
            ThreadKind::Identities => identities::rules(&mut r),
            ThreadKind::Worker => workers::rules(&mut r),
            ThreadKind::LazyRestore => lazy::rules(&mut r),
        }
        r
    }

    /// The kind's BPF program; forbidden calls get `mismatch`.
    pub fn program(self, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
        let build = |source| SeccompError::Build {
            kind: self.name(),
            source,
        };
        let rules = self.rules().into_map().map_err(build)?;
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(build)?;
        BpfProgram::try_from(filter).map_err(build)
    }
}

const MODE_UNSET: u8 = 0;
const MODE_ON: u8 = 1;
const MODE_OFF: u8 = 2;
const MODE_LOG: u8 = 3;

/// The process's mode; unset (no filters) until [`init`].
static MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);

thread_local! {
    /// The kind of the last filter this thread installed (index into [`ThreadKind::ALL`]),
    /// for the SIGSYS report; `u8::MAX` when none.
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Sets the process's mode (the binary calls this once, before starting any thread) and, with
/// filters on, the SIGSYS handler that reports a forbidden call.
pub fn init(mode: Mode) -> Result<(), SeccompError> {
    let value = match mode {
        Mode::On => MODE_ON,
        Mode::Off => MODE_OFF,
        Mode::Log => MODE_LOG,
    };
    if mode == Mode::On {
        report::install_handler().map_err(SeccompError::Handler)?;
    }
    if mode != Mode::Off {
        fix_malloc_arenas();
    }
    #[cfg(debug_assertions)]
    hook::read_env();
    MODE.store(value, Ordering::Release);
    Ok(())
}

/// glibc's malloc opens files from whichever thread happens to need them, which a filtered
/// thread may not: `/sys/devices/system/cpu/online` the first time a thread needs a new arena
/// (unless the arena cap is set: set it here, to glibc's own default, 8 per core), and
/// `/proc/sys/vm/overcommit_memory` the first time a thread's arena heap shrinks (seen: the
/// identity thread freeing a sync's page lists, killed for `openat`). Large blocks are
/// mmapped at a fixed threshold (so they go back to the kernel when freed) and arena heaps
/// are never trimmed, so the second never happens.
fn fix_malloc_arenas() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = i32::try_from(cores.saturating_mul(8)).unwrap_or(i32::MAX);
    for (param, value) in [
        (libc::M_ARENA_MAX, cap),
        (libc::M_MMAP_THRESHOLD, 128 << 10),
        (libc::M_TRIM_THRESHOLD, i32::MAX),
    ] {
        // SAFETY: mallopt only changes malloc's tunables; each of these takes any positive
        // value.
        unsafe { libc::mallopt(param, value) };
    }
}

/// The mode set by [`init`] (`Off` if it was never called).
pub fn mode() -> Mode {
    match MODE.load(Ordering::Acquire) {
        MODE_ON => Mode::On,
        MODE_LOG => Mode::Log,
        _ => Mode::Off,
    }
}

/// Installs `kind`'s filter on the calling thread (nothing when filters are off). Filters
/// stack: a thread that installs a second one is held to both.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let mismatch = match mode() {
        Mode::Off => return Ok(()),
        Mode::On => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let program = kind.program(mismatch)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })?;
    let index = ThreadKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    KIND.with(|k| k.set(index as u8));
    #[cfg(debug_assertions)]
    hook::violate_if_asked(kind);
    Ok(())
}

/// [`install`] at the start of a thread that has nowhere to return an error: on failure it
/// prints one line and ends the process (a thread must not run unfiltered by accident).
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("fabvm: {e}");
        std::process::exit(1);
    }
}

/// Starts rayon's global pool (every worker installs [`ThreadKind::Worker`]'s filter as it
/// starts); call after [`init`] and before anything uses rayon. Without this, workers would
/// be started on first use by whatever thread came first and inherit its filter.
pub fn start_workers() {
    let built = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("fabvm-worker{i}"))
        .start_handler(|_| install_or_exit(ThreadKind::Worker))
        .build_global();
    if let Err(e) = built {
        log::warn!("rayon pool already started, its workers inherit filters: {e}");
    }
}

/// The one-line report of a forbidden call (async-signal-safe: no allocation, no locks).
mod report {
    use super::{names, ThreadKind, KIND, VIOLATION_EXIT};

    /// The start of `siginfo_t` for SIGSYS (`_sigsys` in the kernel's union, x86_64 layout).
    #[repr(C)]
    struct SigsysInfo {
        signo: i32,
        errno: i32,
        code: i32,
        _pad: i32,
        call_addr: *mut libc::c_void,
        syscall: i32,
        arch: u32,
    }

    /// Sets the process-wide SIGSYS handler.
    pub fn install_handler() -> std::io::Result<()> {
        // SAFETY: an all-zero sigaction is a valid value to fill in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action` is initialised and the handler has the SA_SIGINFO signature.
        let ret = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo; for SIGSYS from
        // seccomp its union holds `_sigsys`, laid out as `SigsysInfo`.
        let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
        let kind = KIND.with(|k| k.get());
        let kind = ThreadKind::ALL
            .get(usize::from(kind))
            .map_or("unfiltered", |k| k.name());
        let mut buf = [0u8; 192];
        let len = line(&mut buf, i64::from(nr), kind);
        // SAFETY: write(2) is async-signal-safe; `buf[..len]` is initialised.
        unsafe { libc::write(2, buf.as_ptr().cast(), len) };
        // SAFETY: _exit(2) is async-signal-safe and ends the process at once.
        unsafe { libc::_exit(VIOLATION_EXIT) };
    }

    /// Writes the report line into `buf`; returns its length (cut short if `buf` is).
    pub fn line(buf: &mut [u8], nr: i64, kind: &str) -> usize {
        use std::fmt::Write;
        struct Cursor<'a>(&'a mut [u8], usize);
        impl Write for Cursor<'_> {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                let n = s.len().min(self.0.len() - self.1);
                self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
                self.1 += n;
                Ok(())
            }
        }
        let mut cursor = Cursor(buf, 0);
        let _ = writeln!(
            cursor,
            "fabvm: seccomp: forbidden system call {nr} ({}) on a {kind} thread; exiting",
            names::name(nr)
        );
        cursor.1
    }
}

/// Test hook (debug builds only; release builds have no trace of it):
/// `FABVM_TEST_SECCOMP_VIOLATION=KIND` makes the first thread of that kind call a system call
/// no filter allows (`personality`, a harmless query) just after installing its filter, so a
/// test can see the process end instead of the call passing.
#[cfg(debug_assertions)]
mod hook {
    use std::sync::OnceLock;

    use super::ThreadKind;

    static ASKED: OnceLock<Option<String>> = OnceLock::new();

    pub fn read_env() {
        let _ = ASKED.set(std::env::var("FABVM_TEST_SECCOMP_VIOLATION").ok());
    }

    pub fn violate_if_asked(kind: ThreadKind) {
        if ASKED.get().and_then(|a| a.as_deref()) == Some(kind.name()) {
            // SAFETY: personality(0xffffffff) only reads the persona; it changes nothing.
            unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
        }
    }
}

#[cfg(test)]
mod tests;
