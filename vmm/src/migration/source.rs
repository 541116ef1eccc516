//! The source side: connects to the destination, sends every page in a first round (hashed
//! as it is offered), then the pages dirtied since, round after round, until the rest fits
//! the downtime budget at the bandwidth measured so far (or the round limit); then pauses
//! the vCPUs and sends the last dirty pages and the machine state. Any failure before the
//! destination acknowledges leaves the guest running here, as it was.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fabric::migration::{
    Compression, MigrationError, MigrationStats, RoundStats, Sender, SenderConfig, VmDescription,
};
use fabric::{Page, PAGE_SIZE};
use serde::Serialize;

use super::guest::GuestPages;
use super::postcopy::{self, Missing, PostcopyReport};
use super::{read_key, KeyFileError};
use crate::event_loop::Machine;
use crate::memory::dirty::DirtyView;
use crate::memory::MemoryError;
use crate::snapshot::format::{self, SnapshotState};
use crate::vcpu::VcpuError;
use crate::vm_state::{VmState, VmStateError};

/// Longest wait for the send queue to drain before the final round.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// A round that sent fewer bytes than this says nothing of the link's rate.
const MEASURABLE_BYTES: u64 = 4 << 20;
/// A dirty set this small (1 MiB) never calls for throttling, and fits the budget when the
/// link's rate is not known yet.
const FEW_PAGES: usize = 256;
/// How long to wait for the destination to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A link that moves nothing for this long is dead.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors of a migration; every one leaves the guest running on the source.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The key file.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The destination address.
    #[error("destination {0}: cannot resolve or connect: {1}")]
    Connect(String, std::io::Error),
    /// The protocol failed (peer gone, timeout, wrong key, bad data...).
    #[error("migration to {dest} failed: {source}")]
    Protocol {
        dest: String,
        source: MigrationError,
    },
    /// Dirty tracking.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Pausing or saving the vCPUs.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Saving the VM state.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// The migration's thread could not start or died.
    #[error("migration thread: {0}")]
    Thread(std::io::Error),
    /// Its seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Post-copy failed after the destination resumed the guest: the guest cannot resume
    /// here (it ran there) and the pages not yet sent exist only here.
    #[error("post-copy to {dest} failed after the switchover ({missing} pages not yet sent; the VM is lost unless the destination finds them elsewhere): {source}")]
    PostcopyLost {
        dest: String,
        missing: u64,
        source: MigrationError,
    },
}

impl MigrateError {
    /// Whether the guest can no longer run here (post-copy failed after the switchover):
    /// this process must stop with the error.
    pub fn guest_gone(&self) -> bool {
        matches!(self, MigrateError::PostcopyLost { .. })
    }
}

/// What the caller asked for.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    /// HOST:PORT.
    pub dest: String,
    /// Pre-shared key file.
    pub key: PathBuf,
    /// Downtime budget.
    pub downtime: Duration,
    /// Most pre-copy rounds (the final round not counted).
    pub max_rounds: u32,
    /// Compress pages when it pays.
    pub compress: bool,
    /// Switch to post-copy after this many pre-copy rounds (0: at once); `None`: pre-copy
    /// only.
    pub postcopy_after: Option<u32>,
}

/// The migration report (JSON through the API).
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// Where the VM went.
    pub dest: String,
    /// Bytes the source wrote to the connection (frames included) and read from it.
    pub bytes_sent: u64,
    /// Bytes read from the destination.
    pub bytes_received: u64,
    /// Pages offered (identities), found at the destination, sent, and zero (never sent).
    pub pages_offered: u64,
    /// Offered pages the destination already held.
    pub pages_found: u64,
    /// Pages whose contents crossed the wire.
    pub pages_sent: u64,
    /// Zero pages.
    pub pages_zero: u64,
    /// Bytes saved by compression.
    pub compression_saved_bytes: u64,
    /// Rounds, the final one included.
    pub rounds: u32,
    /// Total time, ms.
    pub total_ms: f64,
    /// Time the guest was paused, ms (final round, state, commit).
    pub downtime_ms: f64,
    /// Whether the rest fit the budget (false: stopped at the round limit).
    pub converged: bool,
    /// Most the guest was throttled (percent of time kept out of the guest; 0 = never).
    pub max_throttle_percent: u32,
    /// Per-round figures.
    pub round_stats: Vec<RoundStats>,
    /// Protocol counters.
    pub protocol: MigrationStats,
    /// Post-copy figures, when the migration switched to post-copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyReport>,
}

/// Migrates the VM. On `Ok` the VM runs at the destination and this process should exit;
/// on `Err` the guest runs here (resumed if this call paused it).
pub fn migrate(
    machine: &Machine,
    was_paused: bool,
    req: &MigrateRequest,
    progress: &dyn Fn(serde_json::Value),
) -> Result<MigrationReport, MigrateError> {
    let started = Instant::now();
    let key = read_key(&req.key)?;
    let stream = connect(&req.dest)?;
    let protocol = |source| MigrateError::Protocol {
        dest: req.dest.clone(),
        source,
    };
    let config = SenderConfig {
        compression: if req.compress {
            Compression::Lz4
        } else {
            Compression::None
        },
        ..SenderConfig::default()
    };
    let mut sender = Sender::connect(stream, &key, config).map_err(protocol)?;
    let guest = GuestPages::new(&machine.vm.memory);
    let description = VmDescription {
        vcpus: machine.meta.cpus,
        regions: guest.regions(),
        config: Vec::new(),
    };
    log::debug!(target: "fabvm::timing", "migration: connected after {:?}", started.elapsed());
    sender.describe(&description).map_err(protocol)?;
    log::debug!(target: "fabvm::timing", "migration: described after {:?}", started.elapsed());

    // Round 1: everything, from the live identities (only stale pages are hashed now). The
    // migration's view of the dirty log opens first and forgets, at the sync's harvest, what
    // the sync hashed after it: every later write is in a later round, and no page is sent
    // twice for a write the identities had not yet seen (with `--identities off`, every write
    // since boot).
    let view = machine.memory.dirty_view();
    let (synced, all) = machine.memory.identities().sync_entries(&view)?;
    log::debug!(target: "fabvm::timing", "migration: synced after {:?}", started.elapsed());
    log::info!(
        "migration round 1 offers the live identities: {} stale pages hashed in {:.1} ms",
        synced.rehashed_pages,
        synced.ms
    );
    // While the guest is throttled a helper kicks its vCPUs every period.
    let throttle = machine.vcpus.throttle(0);
    let stop_kicks = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop_kicks.load(std::sync::atomic::Ordering::Relaxed) {
                if throttle.active() {
                    throttle.kick();
                }
                std::thread::sleep(crate::vcpu::THROTTLE_PERIOD);
            }
        });
        let result = if req.postcopy_after == Some(0) {
            postcopy::switch(
                machine,
                &view,
                was_paused,
                sender,
                &guest,
                Missing::All(all),
                0,
                started,
                req,
            )
            .map(|pc| postcopy_report(req, pc, Vec::new(), started, MigrationStats::default()))
        } else {
            precopy(
                machine, &view, was_paused, sender, &guest, all, req, started, progress,
            )
        };
        stop_kicks.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    });
    machine.vcpus.throttle(0);
    result
}

/// Pre-copy rounds until the rest fits the budget, throttling a guest that outruns the link.
#[allow(clippy::too_many_arguments)]
fn precopy(
    machine: &Machine,
    view: &DirtyView,
    was_paused: bool,
    mut sender: Sender<TcpStream>,
    guest: &GuestPages,
    all: Vec<(u64, Option<fabric::PageId>)>,
    req: &MigrateRequest,
    started: Instant,
    progress: &dyn Fn(serde_json::Value),
) -> Result<MigrationReport, MigrateError> {
    let protocol = |source| MigrateError::Protocol {
        dest: req.dest.clone(),
        source,
    };
    let read_page = |gfn: u64, out: &mut Page| guest.read(gfn, out);
    let mut rounds = vec![sender.round(all, &read_page).map_err(protocol)?];
    let mut throttle = 0u32;
    let mut max_throttle = 0u32;
    let mut previous_dirty = usize::MAX;
    let mut carried = Vec::new();
    loop {
        let mut dirty = view.take_frames()?;
        if !carried.is_empty() {
            dirty.append(&mut carried);
            dirty.sort_unstable();
            dirty.dedup();
        }
        let last = rounds.last().expect("one round done");
        // The link's rate, from the rounds that moved enough bytes to measure it (a round
        // of pages the destination held is bound by its local copying, not the link).
        // Without one the link has not been the limit so far: a small dirty set fits.
        let measured: Vec<&RoundStats> = rounds
            .iter()
            .filter(|r| r.bytes_sent >= MEASURABLE_BYTES)
            .collect();
        let bandwidth = if measured.is_empty() {
            None
        } else {
            Some(
                measured.iter().map(|r| r.bytes_sent).sum::<u64>() as f64
                    / (measured.iter().map(|r| r.duration_us).sum::<u64>().max(1) as f64 / 1e6),
            ) // bytes/s
        };
        let dirty_bytes = dirty.len() as f64 * PAGE_SIZE as f64;
        let expected = match bandwidth {
            Some(b) => Duration::from_secs_f64(dirty_bytes / b.max(1.0)),
            None if dirty.len() <= FEW_PAGES => Duration::ZERO,
            None => req.downtime * 2,
        };
        // The destination may still be installing the last round's pages (as many as the
        // socket buffers hold); the final round queues behind them, guest paused. So stop
        // only after a round whose pages fit the budget too: after a big first round, one
        // more short round lets the destination catch up while the guest runs.
        let backlog = match bandwidth {
            Some(b) if last.bytes_sent >= MEASURABLE_BYTES => {
                Duration::from_secs_f64(last.bytes_sent as f64 / b.max(1.0))
            }
            _ => Duration::ZERO,
        };
        let bandwidth = bandwidth.unwrap_or(0.0);
        let sent: u64 = rounds.iter().map(|r| r.bytes_sent).sum();
        progress(serde_json::json!({
            "round": rounds.len(),
            "bytes_sent": sent,
            "pages_sent": rounds.iter().map(|r| r.pages_sent).sum::<u64>(),
            "pages_found": rounds.iter().map(|r| r.pages_found).sum::<u64>(),
            "dirty_pages": dirty.len(),
            "dirty_rate_pages_per_s": dirty.len() as f64 / (last.duration_us.max(1) as f64 / 1e6),
            "bandwidth_mb_per_s": bandwidth / 1e6,
            "estimated_remaining_ms": expected.as_secs_f64() * 1000.0,
            "throttle_percent": throttle,
            "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
        }));
        log::info!(
            "migration round {}: {} pages dirty, {:.0} MB/s, {:?} to send them",
            rounds.len(),
            dirty.len(),
            bandwidth / 1e6,
            expected
        );
        if req.postcopy_after.is_some_and(|n| rounds.len() as u32 >= n) {
            let before = sender.stats();
            let pc = postcopy::switch(
                machine,
                view,
                was_paused,
                sender,
                guest,
                Missing::Dirty(dirty),
                rounds.len() as u32,
                started,
                req,
            )?;
            let mut report = postcopy_report(req, pc, rounds, started, before);
            report.max_throttle_percent = max_throttle;
            return Ok(report);
        }
        let fits = expected + backlog <= req.downtime;
        if fits || rounds.len() as u32 >= req.max_rounds {
            // Bytes of earlier rounds still in the socket's send queue would go out ahead
            // of the final round, guest paused: let them drain while it runs, then look at
            // the dirty set again.
            if drain(&sender, bandwidth, req.downtime) {
                carried = dirty;
                continue;
            }
            let converged = fits;
            // The final round starts from this dirty set plus what is dirtied until pause.
            let mut report = finish(
                machine, view, was_paused, sender, guest, dirty, converged, started, req,
            )?;
            report.max_throttle_percent = max_throttle;
            return Ok(report);
        }
        // Not shrinking by a tenth a round: the guest dirties faster than the link drains.
        if dirty.len() > FEW_PAGES
            && dirty.len() * 10 > previous_dirty.saturating_mul(9)
            && throttle < 80
        {
            throttle += 20;
            max_throttle = max_throttle.max(throttle);
            machine.vcpus.throttle(throttle);
            log::info!("migration: the guest dirties faster than the link drains; throttled to {throttle}%");
        }
        previous_dirty = dirty.len();
        rounds.push(sender.round_frames(&dirty, &read_page).map_err(protocol)?);
    }
}

/// Stops the guest for the stop-and-copy or the switch (unless it was paused already) and
/// returns what to do with an error before the destination runs it: resume the guest here
/// and pass the error on.
pub(super) fn stop_guest(
    machine: &Machine,
    was_paused: bool,
) -> Result<impl Fn(MigrateError) -> MigrateError + '_, MigrateError> {
    if !was_paused {
        machine.vcpus.pause()?;
    }
    Ok(move |e| {
        if !was_paused {
            if let Err(r) = machine.vcpus.resume() {
                log::error!("resuming the guest after a failed migration: {r}");
            }
        }
        e
    })
}

#[allow(clippy::too_many_arguments)]
fn finish(
    machine: &Machine,
    view: &DirtyView,
    was_paused: bool,
    mut sender: Sender<TcpStream>,
    guest: &GuestPages,
    mut dirty: Vec<u64>,
    converged: bool,
    started: Instant,
    req: &MigrateRequest,
) -> Result<MigrationReport, MigrateError> {
    let protocol = |source| MigrateError::Protocol {
        dest: req.dest.clone(),
        source,
    };
    let paused_at = Instant::now();
    let resume = stop_guest(machine, was_paused)?;
    // No device touches guest memory from here on (requests are synchronous under this lock).
    let virtio = machine.devices.virtio.lock();
    let state = view
        .take_frames()
        .map_err(MigrateError::from)
        .and_then(|mut more| {
            dirty.append(&mut more);
            dirty.sort_unstable();
            dirty.dedup();
            save_state(machine, guest, &virtio)
        });
    let state = match state {
        Ok(state) => state,
        Err(e) => {
            sender.abort("source failed to save the machine state");
            drop(virtio);
            return Err(resume(e));
        }
    };
    let read_page = |gfn: u64, out: &mut Page| guest.read(gfn, out);
    match sender.finish(&dirty, &read_page, &state) {
        Ok(stats) => {
            let downtime = paused_at.elapsed();
            drop(virtio);
            Ok(report(req, stats, converged, started, downtime))
        }
        Err(e) => {
            drop(virtio);
            Err(resume(protocol(e)))
        }
    }
}

/// The vCPU and device state blob, guest paused and the virtio devices locked (`virtio`).
pub(super) fn save_state(
    machine: &Machine,
    guest: &GuestPages,
    virtio: &crate::virtio::VirtioGuard<'_>,
) -> Result<Vec<u8>, MigrateError> {
    let (serial, i8042) = machine.devices.state();
    let state = SnapshotState {
        mem: machine.meta.mem,
        cpus: machine.meta.cpus,
        cmdline: machine.meta.cmdline.clone(),
        kernel: machine.meta.kernel.clone(),
        regions: guest.regions(),
        vm: VmState::save(&machine.vm.fd)?,
        vcpus: machine.vcpus.save_state()?,
        serial,
        i8042,
        virtio: virtio.state(),
        store: PathBuf::new(),
        root: String::new(),
        manifest_blake3: String::new(),
    };
    Ok(format::encode(&state))
}

/// The report of a migration that switched to post-copy after `rounds` (`protocol`: the
/// sender's figures at the switch).
fn postcopy_report(
    req: &MigrateRequest,
    pc: PostcopyReport,
    rounds: Vec<RoundStats>,
    started: Instant,
    protocol: MigrationStats,
) -> MigrationReport {
    MigrationReport {
        dest: req.dest.clone(),
        bytes_sent: pc.source.bytes_sent,
        bytes_received: pc.source.bytes_received,
        pages_offered: protocol.pages_offered,
        pages_found: protocol.pages_found,
        pages_sent: protocol.pages_sent + pc.source.sent_on_fault + pc.source.sent_streamed,
        pages_zero: protocol.pages_zero,
        compression_saved_bytes: protocol.compression_saved_bytes,
        rounds: rounds.len() as u32,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
        downtime_ms: pc.downtime_ms,
        converged: true,
        max_throttle_percent: 0,
        round_stats: rounds,
        protocol,
        postcopy: Some(pc),
    }
}

fn report(
    req: &MigrateRequest,
    stats: MigrationStats,
    converged: bool,
    started: Instant,
    downtime: Duration,
) -> MigrationReport {
    MigrationReport {
        dest: req.dest.clone(),
        bytes_sent: stats.bytes_sent,
        bytes_received: stats.bytes_received,
        pages_offered: stats.pages_offered,
        pages_found: stats.pages_found,
        pages_sent: stats.pages_sent,
        pages_zero: stats.pages_zero,
        compression_saved_bytes: stats.compression_saved_bytes,
        rounds: stats.rounds.len() as u32,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
        downtime_ms: downtime.as_secs_f64() * 1000.0,
        converged,
        max_throttle_percent: 0,
        round_stats: stats.rounds.clone(),
        protocol: stats,
        postcopy: None,
    }
}

/// Waits (at most [`DRAIN_LIMIT`]) until what the connection has not yet sent would drain in
/// a quarter of the downtime budget at `bandwidth` (bytes/s; 0 when unknown: 64 KiB).
/// Returns whether it had to wait.
fn drain(sender: &Sender<TcpStream>, bandwidth: f64, downtime: Duration) -> bool {
    let allowed = ((bandwidth * downtime.as_secs_f64() / 4.0) as u64).max(64 << 10);
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut waited = false;
    while sender.unsent_bytes().is_some_and(|n| n > allowed) && Instant::now() < deadline {
        waited = true;
        std::thread::sleep(Duration::from_millis(2));
    }
    if waited {
        log::info!("migration: waited for the connection's send queue to drain before pausing");
    }
    waited
}

fn connect(dest: &str) -> Result<TcpStream, MigrateError> {
    let err = |e| MigrateError::Connect(dest.to_string(), e);
    let addr = dest
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::other("no address")))?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(err)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(err)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(err)?;
    stream.set_nodelay(true).map_err(err)?;
    Ok(stream)
}
