//! Post-copy on the source: after the pre-copy rounds asked for (or none) the guest stops
//! here for good; the pages the destination has not got are listed with their identities,
//! the state goes, and the destination resumes the guest. This side then serves the listed
//! pages: those the destination faults on first, the rest streamed in the background,
//! hottest first (the pages dirtied last, then guest-frame order). It returns once the
//! destination reports every page in; the caller then exits.
//!
//! Before the destination acknowledges resuming, any failure resumes the guest here (as in
//! pre-copy). After that the guest's only copy of the pages not yet sent is here: a failure
//! is [`MigrateError::PostcopyLost`], and this process exits non-zero.

use std::collections::HashSet;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use fabric::migration::{Pace, PostcopySourceStats, Sender};
use fabric::{Page, PageId, PAGE_SIZE};
use rayon::prelude::*;
use serde::Serialize;

use super::guest::GuestPages;
use super::source::{save_state, stop_guest, MigrateError, MigrateRequest};
use crate::event_loop::Machine;
use crate::memory::dirty::DirtyView;

/// A link that moves nothing for this long during post-copy is dead: long, since the guest
/// only waits (its faults block) while the link stalls, and comes back when it returns.
pub const POSTCOPY_TIMEOUT: Duration = Duration::from_secs(120);

/// For tests and benchmarks only: at most this many pages a second in the background
/// stream (faulted pages are never held back), so a test can act while pages are missing.
pub const PACE_ENV: &str = "FABVM_POSTCOPY_STREAM_PAGES_PER_S";

/// The post-copy part of a migration report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopyReport {
    /// Pre-copy rounds before the switch (0: at once).
    pub rounds_before: u32,
    /// From the start of the migration until the guest stopped here, ms.
    pub switchover_ms: f64,
    /// From the guest stopping here until it ran at the destination (its `Ack`), ms.
    pub downtime_ms: f64,
    /// From the guest stopping here until every page was in at the destination, ms.
    pub complete_ms: f64,
    /// Data pages listed as missing at the switch.
    pub pages: u64,
    /// Of those, installed after a fault, from the stream, and from the destination's own
    /// host (store, VMs, cluster): `faulted + streamed + held = pages`.
    pub faulted: u64,
    pub streamed: u64,
    pub held: u64,
    /// Pages that reached the destination twice (dropped there).
    pub duplicates: u64,
    /// The source's own figures (pages sent on fault / streamed, bytes).
    pub source: PostcopySourceStats,
}

/// What the destination has not got at the switch.
#[derive(Debug)]
pub enum Missing {
    /// No pre-copy round ran: every page, with its live identity (rehashed where the guest
    /// wrote it since).
    All(Vec<(u64, Option<PageId>)>),
    /// After pre-copy rounds: the frames dirtied since the last.
    Dirty(Vec<u64>),
}

/// Stops the guest, switches to post-copy and serves pages until the destination has
/// them all. `Ok` means the VM runs there: exit.
#[allow(clippy::too_many_arguments)]
pub fn switch(
    machine: &Machine,
    view: &DirtyView,
    was_paused: bool,
    sender: Sender<TcpStream>,
    guest: &GuestPages,
    missing: Missing,
    rounds_before: u32,
    started: Instant,
    req: &MigrateRequest,
) -> Result<PostcopyReport, MigrateError> {
    let protocol = |source| MigrateError::Protocol {
        dest: req.dest.clone(),
        source,
    };
    let paused_at = Instant::now();
    let switchover_ms = started.elapsed().as_secs_f64() * 1000.0;
    let resume = stop_guest(machine, was_paused)?;
    // No device touches guest memory from here on; the guest never runs here again
    // unless the switch fails before the destination resumes it.
    let virtio = machine.devices.virtio.lock();
    let prepared = (|| -> Result<_, MigrateError> {
        let late = view.take_frames()?;
        let (list, hot) = listed(guest, missing, late);
        Ok((list, hot, save_state(machine, guest, &virtio)?))
    })();
    let (list, hot, state) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let mut sender = sender;
            sender.abort("source failed to save the machine state");
            drop(virtio);
            return Err(resume(e));
        }
    };
    let stream = sender.stream().try_clone();
    let mut pc = match sender.switchover(&list, &state) {
        Ok(pc) => pc,
        Err(e) => {
            drop(virtio);
            return Err(resume(protocol(e)));
        }
    };
    // Faults block the guest while the link stalls: wait long before calling it dead.
    if let Ok(s) = &stream {
        let _ = s.set_read_timeout(Some(POSTCOPY_TIMEOUT));
        let _ = s.set_write_timeout(Some(POSTCOPY_TIMEOUT));
    }
    pc.prefer(&hot);
    let pace = Pace {
        pages_per_s: std::env::var(PACE_ENV).ok().and_then(|v| v.parse().ok()),
    };
    log::info!(
        "migration: switched to post-copy after {rounds_before} rounds; {} pages to serve",
        pc.stats().listed
    );
    let read_page = |gfn: u64, out: &mut Page| guest.read(gfn, out);
    let mut resumed_at = None;
    let served = pc.serve(&read_page, pace, || resumed_at = Some(Instant::now()));
    drop(virtio);
    let all = match served {
        Ok(all) => all,
        Err(e) if !pc.switched() => return Err(resume(protocol(e))),
        Err(source) => {
            return Err(MigrateError::PostcopyLost {
                dest: req.dest.clone(),
                missing: pc.stats().listed.saturating_sub(
                    pc.stats().sent_on_fault
                        + pc.stats().sent_streamed
                        + pc.stats().held_at_destination,
                ),
                source,
            })
        }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(PostcopyReport {
        rounds_before,
        switchover_ms,
        downtime_ms: ms(resumed_at.unwrap_or_else(Instant::now) - paused_at),
        complete_ms: ms(paused_at.elapsed()),
        pages: pc.stats().listed,
        faulted: all.faulted,
        streamed: all.streamed,
        held: all.held,
        duplicates: all.duplicates,
        source: pc.stats(),
    })
}

/// The `Missing` list (every frame the destination has not got in its current content,
/// with its identity now) and the hot frames to stream first (the ones dirtied after the
/// last round's dirty set was taken, i.e. while the guest last ran).
fn listed(
    guest: &GuestPages,
    missing: Missing,
    late: Vec<u64>,
) -> (Vec<(u64, Option<PageId>)>, Vec<u64>) {
    let identify = |gfn: u64| {
        let mut page = [0u8; PAGE_SIZE];
        guest.read(gfn, &mut page);
        (gfn, fabric::identify(&page))
    };
    match missing {
        Missing::All(mut all) => {
            let dirty: HashSet<u64> = late.iter().copied().collect();
            all.par_iter_mut()
                .filter(|(gfn, _)| dirty.contains(gfn))
                .for_each(|entry| *entry = identify(entry.0));
            (all, late)
        }
        Missing::Dirty(mut frames) => {
            frames.extend_from_slice(&late);
            frames.sort_unstable();
            frames.dedup();
            let list = frames.par_iter().map(|&gfn| identify(gfn)).collect();
            (list, late)
        }
    }
}
