//! Page sharing between VMs on one host (`--share`): guest memory handed to the kernel's
//! same-page merging (KSM), guided by the fabric's page identities, and the figures that
//! say how much is shared.
//!
//! - `--share=plain` marks all guest memory `MADV_MERGEABLE` and leaves the rest to ksmd.
//! - `--share` (`guided`) marks only pages that have a twin in another guided VM, in two
//!   stages that spare ksmd most of its slow first passes, and runs ksmd fast only while
//!   known potential is unmerged ([`plan`], [`leader`]).
//! - Reports: [`Sharing::report`] for `fabvm ctl stats`, [`host_report`] for
//!   `fabvm host stats`: pages identical to another running VM's (potential, from hashing
//!   the VMs' memory now), pages KSM has merged, zero pages.
//!
//! Every VM with `--share` registers its mode next to its [`host_index`] registration
//! (`PID.share`); guided VMs read their plan from `PID.plan`, which the leader writes.

pub mod index;
pub mod ksm;
pub mod leader;
pub mod plan;
pub mod tuning;

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::host_index::{self, RegisteredVm};
use crate::memory::GuestMemory;
use index::{Index, VmCounts};
use ksm::ProcessStat;
use leader::{Leader, PlanFile};

/// How often the agent thread looks at its plan (and, as leader, at the host).
const TICK: Duration = Duration::from_millis(250);

/// The leader's nice value when it may choose (ksmd's).
const LEADER_NICE: i32 = 5;

/// How long a stopping VM waits for its agent thread.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// Errors of page sharing.
#[derive(Debug, thiserror::Error)]
pub enum SharingError {
    /// `--share` on a kernel without KSM.
    #[error("--share: {0}")]
    Ksm(#[from] ksm::KsmError),
    /// The agent thread could not be started.
    #[error("cannot start the sharing thread: {0}")]
    Thread(std::io::Error),
}

/// How a VM shares its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ShareMode {
    /// Mark only pages with twins in other VMs, in stages; tune ksmd while merging.
    Guided,
    /// Mark all guest memory mergeable; ksmd as the host has it.
    Plain,
}

/// A VM's sharing registration (`PID.share` in the registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// Its mode.
    pub mode: ShareMode,
    /// When it started (ms since the Unix epoch): the oldest VMs anchor the plan.
    pub started_ms: u64,
}

/// Checks, before a VM is built, that `--share` can work here.
pub fn check_available() -> Result<(), SharingError> {
    if ksm::available() {
        Ok(())
    } else {
        Err(ksm::KsmError::Unavailable.into())
    }
}

/// A VM's sharing: its registration, and for guided VMs the agent thread.
#[derive(Debug)]
pub struct Sharing {
    mode: Option<ShareMode>,
    memory: GuestMemory,
    ksm_run: Option<ksm::RunState>,
    marked: Arc<AtomicU64>,
    agent: Option<Agent>,
    registration: Option<PathBuf>,
}

impl Sharing {
    /// Starts sharing `memory` as `mode` asks (nothing for `None`). Problems leave the VM
    /// running unshared, with a warning: KSM stopped and we may not start it, or no thread
    /// for the agent. (`fabvm` checks for KSM with [`check_available`] before the VM is
    /// built, so a kernel without it is a one-line error instead.)
    pub fn start(memory: &GuestMemory, mode: Option<ShareMode>) -> Self {
        let mut sharing = Self {
            mode,
            memory: memory.clone(),
            ksm_run: None,
            marked: Arc::new(AtomicU64::new(0)),
            agent: None,
            registration: None,
        };
        if let Some(mode) = mode {
            if let Err(e) = sharing.enable(mode) {
                log::warn!("{e}; the VM runs without sharing");
            }
        }
        sharing
    }

    fn enable(&mut self, mode: ShareMode) -> Result<(), SharingError> {
        let run = ksm::ensure_running()?;
        match run {
            ksm::RunState::Started => log::warn!(
                "--share: KSM was not running; set {}/run to 1 (left set when fabvm exits)",
                ksm::SYSFS
            ),
            ksm::RunState::Stopped => log::warn!(
                "--share: KSM is not running and only root can start it ({}/run): \
                 nothing will be merged until it is 1",
                ksm::SYSFS
            ),
            ksm::RunState::AlreadyRunning => {}
        }
        self.ksm_run = Some(run);
        let dir = host_index::registry_dir();
        let path = dir.join(format!("{}.share", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        leader::write_json(
            &path,
            &Registered {
                mode,
                started_ms: unix_ms(),
            },
        );
        self.registration = Some(path);
        match mode {
            ShareMode::Plain => {
                let all: Vec<(u64, u64)> = self
                    .memory
                    .iter()
                    .map(|r| {
                        (
                            r.start_addr().0 / PAGE_SIZE as u64,
                            r.len() / PAGE_SIZE as u64,
                        )
                    })
                    .collect();
                let pages = mark_mergeable(&self.memory, &all);
                self.marked.store(pages, Ordering::Relaxed);
            }
            ShareMode::Guided => {
                self.agent = Some(Agent::start(&self.memory, dir, self.marked.clone())?);
            }
        }
        Ok(())
    }

    /// The `sharing` part of `fabvm ctl stats`: this VM's memory and every other registered
    /// VM's are hashed now (on all cores) to find the potential.
    pub fn report(&self) -> serde_json::Value {
        let started = Instant::now();
        let pid = std::process::id();
        let own = RegisteredVm {
            pid,
            regions: self
                .memory
                .iter()
                .map(|r| host_index::RegisteredRegion {
                    guest_addr: r.start_addr().0,
                    host_addr: r.as_ptr() as u64,
                    len: r.len(),
                })
                .collect(),
            api_sock: None,
        };
        let others = host_index::running_vms(Some(pid));
        let other_pages: Vec<_> = index::published(&others).into_iter().flatten().collect();
        let counts = index::vm_pages(&own)
            .map(|pages| index::potential_against(&pages, &other_pages))
            .unwrap_or_default();
        let hashed: u64 = index::vm_bytes(&own) + others.iter().map(index::vm_bytes).sum::<u64>();
        let stat = ProcessStat::read(pid);
        serde_json::json!({
            "mode": self.mode,
            "pages": counts.pages,
            "zero_pages": counts.zero_pages,
            "potential_pages": counts.potential_pages,
            "potential_bytes": counts.potential_pages * PAGE_SIZE as u64,
            "duplicate_pages": counts.duplicate_pages,
            "marked_pages": self.marked.load(Ordering::Relaxed),
            "merged_pages": stat.merged(),
            "merged_bytes": stat.merged() * PAGE_SIZE as u64,
            "ksm": stat,
            "ksm_run": self.ksm_run,
            "leader": self.agent.as_ref().is_some_and(|a| a.leader.load(Ordering::Relaxed)),
            "other_vms": others.len(),
            "hashed_bytes": hashed,
            "hash_ms": started.elapsed().as_millis() as u64,
        })
    }
}

impl Drop for Sharing {
    fn drop(&mut self) {
        self.agent.take();
        if let Some(path) = &self.registration {
            let _ = fs::remove_file(path);
            let _ = fs::remove_file(leader::plan_path(
                path.parent().unwrap_or(Path::new(".")),
                std::process::id(),
            ));
        }
    }
}

/// The per-VM thread of a guided VM: applies its plan and, when it holds the registry's
/// lock, is the host's sharing leader.
#[derive(Debug)]
struct Agent {
    stop: Arc<AtomicBool>,
    leader: Arc<AtomicBool>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Agent {
    fn start(
        memory: &GuestMemory,
        dir: PathBuf,
        marked: Arc<AtomicU64>,
    ) -> Result<Self, SharingError> {
        let stop = Arc::new(AtomicBool::new(false));
        let leader = Arc::new(AtomicBool::new(false));
        let memory = memory.clone();
        let (stop_flag, leader_flag) = (stop.clone(), leader.clone());
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("fabvm-share".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Sharing);
                agent_loop(&memory, &dir, &marked, &stop_flag, &leader_flag);
                let _ = done_tx.send(());
            })
            .map_err(SharingError::Thread)?;
        Ok(Self { stop, leader, done })
    }
}

impl Drop for Agent {
    /// Stops the thread, waiting a moment for a leader to give ksmd's settings back; a
    /// leader busy hashing is not waited for (the next leader restores them).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.done.recv_timeout(STOP_WAIT);
    }
}

fn agent_loop(
    memory: &GuestMemory,
    dir: &Path,
    marked: &AtomicU64,
    stop: &AtomicBool,
    is_leader: &AtomicBool,
) {
    let plan_path = leader::plan_path(dir, std::process::id());
    let mut applied = None;
    let mut lock: Option<fs::File> = None;
    let mut leader: Option<Leader> = None;
    while !stop.load(Ordering::Relaxed) {
        if leader.is_none() {
            lock = lock.or_else(|| fs::File::create(dir.join("sharing.lock")).ok());
            if lock.as_ref().is_some_and(try_lock) {
                log::info!("sharing: this VM leads the host's sharing");
                raise_priority();
                leader = Some(Leader::new(dir.to_path_buf()));
                is_leader.store(true, Ordering::Relaxed);
            }
        }
        if let Some(leader) = &mut leader {
            leader.tick();
        }
        // The plan file is replaced (renamed over) when it changes: read it only then.
        let version = fs::metadata(&plan_path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if version.is_some() && version != applied {
            if let Some(plan) = fs::read(&plan_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<PlanFile>(&b).ok())
            {
                let pages = mark_mergeable(memory, &plan.ranges);
                log::debug!(
                    "sharing: plan {} applied, {} ranges, {pages} pages mergeable",
                    plan.epoch,
                    plan.ranges.len()
                );
                marked.store(pages, Ordering::Relaxed);
                applied = version;
            }
        }
        std::thread::sleep(TICK);
    }
    if let Some(leader) = &mut leader {
        leader.step_down();
    }
}

/// Runs the calling thread no lower than ksmd (nice 5), when it was started lower (VMs
/// run niced) and may raise itself (root): the leader's work is the host's, like ksmd's.
fn raise_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: reads the nice value of our own thread.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    if nice > LEADER_NICE {
        // SAFETY: changes only our own thread's nice value; failure (no privilege) is fine.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, LEADER_NICE) };
    }
}

/// Non-blocking exclusive flock; released when the file is closed (or the process dies).
fn try_lock(file: &fs::File) -> bool {
    // SAFETY: flock on a file descriptor we own; it only affects advisory locks.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Marks the frame ranges `(gfn, frames)` of `memory` mergeable; returns how many pages of
/// `memory` the ranges cover. Ranges outside RAM are skipped.
pub fn mark_mergeable(memory: &GuestMemory, ranges: &[(u64, u64)]) -> u64 {
    let mut pages = 0;
    for region in memory.iter() {
        let start = region.start_addr().0 / PAGE_SIZE as u64;
        let end = start + region.len() / PAGE_SIZE as u64;
        for &(gfn, count) in ranges {
            let (from, to) = (gfn.max(start), (gfn + count).min(end));
            if from >= to {
                continue;
            }
            let offset = ((from - start) * PAGE_SIZE as u64) as usize;
            let len = ((to - from) * PAGE_SIZE as u64) as usize;
            let addr = region.as_ptr().wrapping_add(offset);
            // SAFETY: the range lies inside this region's mapping, which `memory` keeps
            // alive; MADV_MERGEABLE changes no contents (KSM compares pages before merging
            // and breaks the sharing again on a write).
            let ret = unsafe { libc::madvise(addr.cast(), len, libc::MADV_MERGEABLE) };
            if ret == 0 {
                pages += to - from;
            } else {
                log::warn!("MADV_MERGEABLE: {}", std::io::Error::last_os_error());
            }
        }
    }
    pages
}

/// The VMs registered for sharing (and with the host index) in `dir`; registrations of
/// processes that are gone are removed.
pub fn registered(dir: &Path) -> Vec<(RegisteredVm, Registered)> {
    let vms = host_index::running_vms(None);
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".share"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(leader::plan_path(dir, pid));
            continue;
        }
        let Some(registered) = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Registered>(&b).ok())
        else {
            continue;
        };
        if let Some(vm) = vms.iter().find(|vm| vm.pid == pid) {
            out.push((vm.clone(), registered));
        }
    }
    out
}

/// One VM in [`host_report`].
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    /// fabvm's pid.
    pub pid: u32,
    /// Its sharing mode (`null`: not sharing).
    pub mode: Option<ShareMode>,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// Pages, zero pages, potential.
    #[serde(flatten)]
    pub counts: VmCounts,
    /// Pages KSM has merged.
    pub merged_pages: u64,
    /// Its `/proc/PID/ksm_stat`.
    pub ksm: ProcessStat,
    /// Its proportional set size (its share of every page it maps, KSM pages included).
    pub pss_bytes: u64,
}

/// `fabvm host stats`: every running VM hashed now, counted across VMs.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// The registry read.
    pub registry: PathBuf,
    /// Per VM.
    pub vms: Vec<VmReport>,
    /// Totals over the VMs.
    pub host: index::HostCounts,
    /// Sum of the VMs' merged pages.
    pub merged_pages: u64,
    /// Sum of the VMs' PSS: the host memory they use, each merged page counted once.
    pub pss_bytes: u64,
    /// The kernel's KSM counters (every KSM user on the host, not only fabvm).
    pub ksm: Option<ksm::Global>,
    /// CPU time of ksmd since boot.
    pub ksmd_cpu_ms: Option<u64>,
    /// The sharing leader's last status, if a guided VM runs.
    pub leader: Option<leader::Status>,
    /// Bytes read and hashed for this report, and how long it took.
    pub hashed_bytes: u64,
    /// Time spent hashing.
    pub hash_ms: u64,
}

/// Hashes every registered VM (all cores) and reports potential and merged pages.
pub fn host_report() -> HostReport {
    let dir = host_index::registry_dir();
    let started = Instant::now();
    let vms = host_index::running_vms(None);
    let modes = registered(&dir);
    let hashed: Vec<_> = index::published(&vms).into_iter().flatten().collect();
    let index = Index::new(hashed.iter().map(|v| v.keys.as_slice()));
    let hash_ms = started.elapsed().as_millis() as u64;
    let reports: Vec<VmReport> = hashed
        .iter()
        .map(|pages| {
            let ksm = ProcessStat::read(pages.pid);
            VmReport {
                pid: pages.pid,
                mode: modes
                    .iter()
                    .find(|(vm, _)| vm.pid == pages.pid)
                    .map(|(_, r)| r.mode),
                mem_bytes: (pages.keys.len() * PAGE_SIZE) as u64,
                counts: index.vm_counts(&pages.keys),
                merged_pages: ksm.merged(),
                ksm,
                pss_bytes: pss_bytes(pages.pid),
            }
        })
        .collect();
    let counts: Vec<VmCounts> = reports.iter().map(|r| r.counts).collect();
    HostReport {
        host: index.host_counts(&counts),
        merged_pages: reports.iter().map(|r| r.merged_pages).sum(),
        pss_bytes: reports.iter().map(|r| r.pss_bytes).sum(),
        vms: reports,
        ksm: ksm::Global::read().ok(),
        ksmd_cpu_ms: ksm::ksmd_cpu_ms(),
        leader: leader::read_status(&dir),
        hashed_bytes: hashed
            .iter()
            .map(|v| (v.keys.len() * PAGE_SIZE) as u64)
            .sum(),
        hash_ms,
        registry: dir,
    }
}

/// The cheap host figures (nothing hashed), for `fabvm store stats`.
pub fn host_summary() -> serde_json::Value {
    let dir = host_index::registry_dir();
    let vms = host_index::running_vms(None);
    let merged: u64 = vms
        .iter()
        .map(|vm| ProcessStat::read(vm.pid).merged())
        .sum();
    serde_json::json!({
        "running_vms": vms.len(),
        "sharing_vms": registered(&dir).len(),
        "merged_pages": merged,
        "ksm": ksm::Global::read().ok(),
    })
}

/// A process's PSS from `/proc/PID/smaps_rollup`, in bytes.
pub fn pss_bytes(pid: u32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix("Pss:")?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marking_counts_only_pages_inside_ram() {
        let memory = GuestMemory::from_ranges(&[
            (vm_memory::GuestAddress(0), 16 * PAGE_SIZE),
            (vm_memory::GuestAddress(0x10_0000), 8 * PAGE_SIZE),
        ])
        .unwrap();
        // 2..6 in the first region, 14..20 cut at 16, 0x100+6.. cut at 0x108, one outside.
        let ranges = [(2, 4), (14, 6), (0x106, 10), (0x200, 3)];
        assert_eq!(mark_mergeable(&memory, &ranges), 4 + 2 + 2);
    }
}
