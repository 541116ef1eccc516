//! Live page identities: every guest page's blake3 identity, kept current in the background
//! from the dirty log and published in an identity table other fabvm processes map.
//!
//! A background thread harvests the dirty log every period, marks the written pages stale
//! and rehashes stale pages under a CPU budget. A guest that dirties faster than the budget
//! leaves some identities stale, never wrong: stale pages are marked as such, and a consumer
//! that needs exact identities calls [`LiveIdentities::sync`], which harvests and rehashes
//! what is stale at once, on all cores. Snapshots (guest paused) and a migration's first
//! round read the table after a sync instead of hashing all of memory. The thread also
//! serves other processes' requests (see [`fabric::live::requests`]): a harvest, which
//! lets a migration destination trust pages it copied from this VM without hashing them,
//! and a sync, which the sharing leader asks for before it plans.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fabric::live::{IdentityTable, OwnerRequests, PageState, Request, TableRegion, CHUNK_PAGES};
use fabric::{identify, Manifest, Page, PageId, Region, PAGE_SIZE};
use rayon::prelude::*;
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::{for_each_bit, DirtyLog, DirtyView};
use super::{GuestMemory, MemoryError};

/// Pages rehashed per batch in the background (the lock is held for one batch).
const BATCH: usize = 256;
/// The longest the background thread sleeps at once (so it stops promptly).
const NAP: Duration = Duration::from_millis(20);

/// How identities are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdentityConfig {
    /// Keep them current in the background (off: only when a consumer syncs).
    pub background: bool,
    /// Most CPU the background thread uses, in percent of one core.
    pub budget_percent: f64,
    /// How often it harvests the dirty log.
    pub period: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            background: true,
            budget_percent: 10.0,
            period: Duration::from_millis(250),
        }
    }
}

/// What guest memory holds when identities start.
#[derive(Debug, Clone, Copy)]
pub enum Initial<'a> {
    /// Fresh memory: all zero, except what the VMM wrote (in its dirty bitmap).
    Zero,
    /// The contents a manifest describes (a restored snapshot, a received migration).
    Manifest(&'a Manifest),
}

/// A VM's live identities; the background thread stops when this is dropped.
#[derive(Debug)]
pub struct LiveIdentities {
    shared: Arc<Shared>,
    worker: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

#[derive(Debug)]
struct Shared {
    tracked: Mutex<Tracked>,
    view: DirtyView,
    requests: OwnerRequests,
    spans: Vec<Span>,
    config: IdentityConfig,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    harvests: AtomicU64,
    requested_harvests: AtomicU64,
    requested_syncs: AtomicU64,
    last_harvest_pages: AtomicU64,
    rehashed: AtomicU64,
    cpu_ns: AtomicU64,
    syncs: AtomicU64,
    sync_rehashed: AtomicU64,
    sync_us: AtomicU64,
}

#[derive(Debug)]
struct Tracked {
    table: IdentityTable,
    /// Bit per table page: written since last hashed.
    stale: Vec<u64>,
    stale_count: u64,
    /// Where the background rehash resumes.
    cursor: usize,
}

/// A region of guest RAM: table indices `first..first + pages` at host address `host`.
#[derive(Debug, Clone, Copy)]
struct Span {
    first: usize,
    pages: usize,
    first_gfn: u64,
    host: usize,
}

// SAFETY: a span is the address of guest RAM that the VM keeps mapped for as long as the
// identities live (they are dropped before the VM's memory); reading it races only with the
// guest, which the dirty log accounts for.
unsafe impl Send for Span {}
// SAFETY: as above.
unsafe impl Sync for Span {}

/// Every page as (guest frame, identity; `None` = zero page), in frame order.
pub type Offer = Vec<(u64, Option<PageId>)>;

/// What a sync did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SyncReport {
    /// Pages written since the previous harvest.
    pub dirty_pages: u64,
    /// Stale pages rehashed now.
    pub rehashed_pages: u64,
    /// Time taken, ms.
    pub ms: f64,
}

/// The result of checking every current identity against a fresh hash.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CheckReport {
    /// Pages checked (every page not stale after a harvest).
    pub checked_pages: u64,
    /// Pages stale at the check (not compared; they are known not to be current).
    pub stale_pages: u64,
    /// Current pages whose identity differs from their content: must be 0.
    pub mismatched_pages: u64,
    /// The first such page's guest frame.
    pub first_mismatch_gfn: Option<u64>,
    /// Time taken, ms.
    pub ms: f64,
}

/// Figures for `ctl stats`.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityStats {
    /// Kept current in the background.
    pub background: bool,
    /// The published table (`null`: not published).
    pub published: Option<std::path::PathBuf>,
    /// Pages of guest RAM.
    pub pages: u64,
    /// Non-zero pages whose identity is current.
    pub current: u64,
    /// Zero pages.
    pub zero: u64,
    /// Pages written since last hashed.
    pub stale: u64,
    /// Budget of the background thread, % of one core.
    pub budget_percent: f64,
    /// Harvest period, ms.
    pub harvest_period_ms: u64,
    /// Harvests done.
    pub harvests: u64,
    /// Of those, harvests other processes asked for (migration destinations confirming
    /// pages they copied from this VM).
    pub requested_harvests: u64,
    /// Syncs other processes asked for (the sharing leader, before it plans).
    pub requested_syncs: u64,
    /// Pages the last harvest found written.
    pub last_harvest_pages: u64,
    /// Pages rehashed in the background.
    pub rehashed_pages: u64,
    /// CPU the background thread used, ms.
    pub cpu_ms: f64,
    /// Syncs (snapshots, migrations, checks) and what they rehashed, and how long they took.
    pub syncs: u64,
    /// Pages rehashed by syncs.
    pub sync_rehashed_pages: u64,
    /// Time spent in syncs, ms.
    pub sync_ms: f64,
}

impl LiveIdentities {
    /// Starts keeping the identities of `memory`, published at `publish` when given (the
    /// table falls back to private memory, with a warning, when it cannot be created there).
    pub fn start(
        log: &Arc<DirtyLog>,
        memory: &GuestMemory,
        initial: Initial<'_>,
        config: IdentityConfig,
        publish: Option<&std::path::Path>,
    ) -> Result<Self, MemoryError> {
        let mut spans = Vec::new();
        let mut regions = Vec::new();
        let mut first = 0;
        for region in memory.iter() {
            let pages = region.len() as usize / PAGE_SIZE;
            spans.push(Span {
                first,
                pages,
                first_gfn: region.start_addr().0 / PAGE_SIZE as u64,
                host: region.as_ptr() as usize,
            });
            regions.push(TableRegion {
                guest_addr: region.start_addr().0,
                pages: pages as u64,
                host_addr: region.as_ptr() as u64,
            });
            first += pages;
        }
        let table = match publish.map(|p| IdentityTable::create(Some(p), &regions)) {
            Some(Ok(table)) => table,
            Some(Err(e)) => {
                log::warn!("{e}; identities are not published");
                IdentityTable::create(None, &regions)?
            }
            None => IdentityTable::create(None, &regions)?,
        };
        // The view opens before the initial contents are set: every write from here on is
        // harvested into it.
        let view = log.view();
        let mut tracked = Tracked {
            table,
            stale: vec![0; first.div_ceil(64)],
            stale_count: 0,
            cursor: 0,
        };
        if let Initial::Manifest(manifest) = initial {
            tracked.load(manifest, &spans);
        }
        let requests = tracked.table.requests();
        let shared = Arc::new(Shared {
            tracked: Mutex::new(tracked),
            view,
            requests,
            spans,
            config,
            counters: Counters::default(),
        });
        let worker = if config.background {
            let stop = Arc::new(AtomicBool::new(false));
            let (s, flag) = (shared.clone(), stop.clone());
            let handle = std::thread::Builder::new()
                .name("fabvm-ids".into())
                .spawn(move || {
                    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Identities);
                    s.background(&flag)
                })
                .map_err(MemoryError::Thread)?;
            shared.requests.set_serving(true);
            Some((stop, handle))
        } else {
            None
        };
        Ok(LiveIdentities { shared, worker })
    }

    /// Harvests the dirty log and rehashes every stale page now, on all cores. With the
    /// guest paused, every identity is exact afterwards.
    pub fn sync(&self) -> Result<SyncReport, MemoryError> {
        let mut tracked = self.shared.lock();
        self.shared.sync_locked(&mut tracked, None)
    }

    /// Syncs, then lists every page as (guest frame, identity; `None` = zero page): what a
    /// migration offers in its first round. `view` (the migration's own view of the dirty
    /// log) forgets what it gathered up to the sync's harvest: every page written before it
    /// is listed with its identity hashed after it, so only later writes need a later round.
    pub fn sync_entries(&self, view: &DirtyView) -> Result<(SyncReport, Offer), MemoryError> {
        let mut tracked = self.shared.lock();
        let report = self.shared.sync_locked(&mut tracked, Some(view))?;
        let mut entries = Vec::with_capacity(tracked.table.pages());
        for span in &self.shared.spans {
            for i in 0..span.pages {
                let entry = tracked.table.get(span.first + i);
                entries.push((span.first_gfn + i as u64, entry.id));
            }
        }
        Ok((report, entries))
    }

    /// Syncs, then returns the manifest of guest memory (exact when the guest is paused).
    pub fn sync_manifest(&self) -> Result<(SyncReport, Manifest), MemoryError> {
        let mut tracked = self.shared.lock();
        let report = self.shared.sync_locked(&mut tracked, None)?;
        let regions: Vec<Region> = self
            .shared
            .spans
            .iter()
            .map(|s| Region {
                guest_addr: s.first_gfn * PAGE_SIZE as u64,
                pages: s.pages as u64,
            })
            .collect();
        let ids = self
            .shared
            .spans
            .iter()
            .map(|s| {
                (0..s.pages)
                    .map(|i| tracked.table.get(s.first + i).id)
                    .collect()
            })
            .collect();
        let manifest = Manifest::from_ids(&regions, ids).map_err(MemoryError::Manifest)?;
        Ok((report, manifest))
    }

    /// Harvests, then compares every identity not stale with a fresh hash of its page (the
    /// guest should be paused), then syncs. A mismatch is a bug: a write the dirty log
    /// missed.
    pub fn check(&self) -> Result<CheckReport, MemoryError> {
        let started = Instant::now();
        let mut tracked = self.shared.lock();
        let dirty = self.shared.view.take()?;
        tracked.mark_stale(&dirty, &self.shared.spans);
        let shared = &self.shared;
        let table = &tracked.table;
        let stale = &tracked.stale;
        let mismatches: Vec<u64> = (0..table.pages())
            .into_par_iter()
            .with_min_len(CHUNK_PAGES)
            .filter(|&p| stale[p / 64] & (1 << (p % 64)) == 0)
            .filter(|&p| table.get(p).id != identify(shared.page(p)))
            .map(|p| shared.gfn(p))
            .collect();
        let report = CheckReport {
            checked_pages: table.pages() as u64 - tracked.stale_count,
            stale_pages: tracked.stale_count,
            mismatched_pages: mismatches.len() as u64,
            first_mismatch_gfn: mismatches.iter().min().copied(),
            ms: 0.0,
        };
        self.shared.sync_locked(&mut tracked, None)?;
        Ok(CheckReport {
            ms: started.elapsed().as_secs_f64() * 1000.0,
            ..report
        })
    }

    /// Figures for `ctl stats`.
    pub fn stats(&self) -> IdentityStats {
        let tracked = self.shared.lock();
        let table = &tracked.table;
        let (mut current, mut zero, mut stale) = (0, 0, 0);
        for p in 0..table.pages() {
            match table.get(p).state {
                PageState::Current => current += 1,
                PageState::Zero => zero += 1,
                PageState::Stale => stale += 1,
            }
        }
        let c = &self.shared.counters;
        let config = &self.shared.config;
        IdentityStats {
            background: config.background,
            published: table.path().map(std::path::Path::to_path_buf),
            pages: table.pages() as u64,
            current,
            zero,
            stale,
            budget_percent: config.budget_percent,
            harvest_period_ms: config.period.as_millis() as u64,
            harvests: c.harvests.load(Ordering::Relaxed),
            requested_harvests: c.requested_harvests.load(Ordering::Relaxed),
            requested_syncs: c.requested_syncs.load(Ordering::Relaxed),
            last_harvest_pages: c.last_harvest_pages.load(Ordering::Relaxed),
            rehashed_pages: c.rehashed.load(Ordering::Relaxed),
            cpu_ms: c.cpu_ns.load(Ordering::Relaxed) as f64 / 1e6,
            syncs: c.syncs.load(Ordering::Relaxed),
            sync_rehashed_pages: c.sync_rehashed.load(Ordering::Relaxed),
            sync_ms: c.sync_us.load(Ordering::Relaxed) as f64 / 1e3,
        }
    }
}

impl Drop for LiveIdentities {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.worker.take() {
            self.shared.requests.set_serving(false);
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Tracked> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The span holding table index `p`.
    fn span(&self, p: usize) -> &Span {
        self.spans
            .iter()
            .find(|s| p >= s.first && p < s.first + s.pages)
            .expect("page inside guest RAM")
    }

    /// Guest page at table index `p` (read while the guest may write it).
    fn page(&self, p: usize) -> &Page {
        let span = self.span(p);
        let addr = span.host + (p - span.first) * PAGE_SIZE;
        // SAFETY: `addr` is a whole page inside a mapping that lives as long as `self` (see
        // `Span`); the guest may write it meanwhile, which at worst gives an identity of
        // contents that the dirty log then reports as written again.
        unsafe { &*(addr as *const Page) }
    }

    fn gfn(&self, p: usize) -> u64 {
        let span = self.span(p);
        span.first_gfn + (p - span.first) as u64
    }

    /// Takes the dirty log into the table, answering every harvest request made before it.
    fn harvest(
        &self,
        tracked: &mut Tracked,
        reset: Option<&DirtyView>,
    ) -> Result<u64, MemoryError> {
        let requests = self.requests.count(Request::Harvest);
        let dirty = self.view.take_resetting(reset)?;
        let pages = tracked.mark_stale(&dirty, &self.spans);
        self.requests.answered(Request::Harvest, requests);
        self.counters.harvests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .last_harvest_pages
            .store(pages, Ordering::Relaxed);
        Ok(pages)
    }

    fn sync_locked(
        &self,
        tracked: &mut Tracked,
        reset: Option<&DirtyView>,
    ) -> Result<SyncReport, MemoryError> {
        let started = Instant::now();
        let dirty_pages = self.harvest(tracked, reset)?;
        let mut stale = Vec::with_capacity(tracked.stale_count as usize);
        for_each_bit(&tracked.stale, |p| stale.push(p));
        let ids: Vec<Option<PageId>> = stale
            .par_iter()
            .with_min_len(64)
            .map(|&p| identify(self.page(p)))
            .collect();
        tracked.install(&stale, &ids);
        let c = &self.counters;
        let us = started.elapsed().as_micros() as u64;
        c.syncs.fetch_add(1, Ordering::Relaxed);
        c.sync_rehashed
            .fetch_add(stale.len() as u64, Ordering::Relaxed);
        c.sync_us.fetch_add(us, Ordering::Relaxed);
        Ok(SyncReport {
            dirty_pages,
            rehashed_pages: stale.len() as u64,
            ms: us as f64 / 1000.0,
        })
    }

    /// The background thread: harvest every period and when asked, rehash stale pages
    /// within the budget.
    fn background(&self, stop: &AtomicBool) {
        let budget = (self.config.budget_percent / 100.0).clamp(0.001, 1.0);
        let mut next_harvest = Instant::now();
        let mut window = (Instant::now(), thread_cpu());
        let mut batch = Vec::with_capacity(BATCH);
        // Sleep needed to bring the window's CPU back within the budget.
        let owed = |window: (Instant, Duration)| {
            let spent = thread_cpu().saturating_sub(window.1).as_secs_f64();
            let allowed = window.0.elapsed().as_secs_f64() * budget;
            Duration::from_secs_f64(((spent - allowed) / budget).max(0.0))
        };
        while !stop.load(Ordering::Relaxed) {
            let before = thread_cpu();
            if self.requests.pending(Request::Sync) {
                let count = self.requests.count(Request::Sync);
                if let Err(e) = self.sync_locked(&mut self.lock(), None) {
                    log::warn!("live identities stop: {e}");
                    return;
                }
                self.requests.answered(Request::Sync, count);
                self.counters
                    .requested_syncs
                    .fetch_add(1, Ordering::Relaxed);
            }
            let periodic = Instant::now() >= next_harvest;
            let asked = self.requests.pending(Request::Harvest);
            if periodic || asked {
                let mut tracked = self.lock();
                if let Err(e) = self.harvest(&mut tracked, None) {
                    log::warn!("live identities stop: {e}");
                    return;
                }
                drop(tracked);
                if asked {
                    self.counters
                        .requested_harvests
                        .fetch_add(1, Ordering::Relaxed);
                }
                if periodic {
                    next_harvest = Instant::now() + self.config.period;
                    window = (Instant::now(), thread_cpu());
                }
            }
            // A harvest asked for between batches does not buy more rehashing.
            let over = owed(window);
            let done = if over.is_zero() {
                let mut tracked = self.lock();
                tracked.next_stale(&mut batch);
                let ids: Vec<Option<PageId>> =
                    batch.iter().map(|&p| identify(self.page(p))).collect();
                tracked.install(&batch, &ids);
                batch.len()
            } else {
                0
            };
            self.counters
                .rehashed
                .fetch_add(done as u64, Ordering::Relaxed);
            let used = thread_cpu().saturating_sub(before);
            self.counters
                .cpu_ns
                .fetch_add(used.as_nanos() as u64, Ordering::Relaxed);
            let wait = match (done, over.is_zero()) {
                (_, false) => over.min(next_harvest.saturating_duration_since(Instant::now())),
                (0, true) => next_harvest.saturating_duration_since(Instant::now()),
                _ => owed(window),
            };
            self.nap(stop, wait);
        }
    }

    /// Sleeps `total`, in short naps, returning early when `stop` is set or another process
    /// asks for something.
    fn nap(&self, stop: &AtomicBool, total: Duration) {
        let until = Instant::now() + total;
        while !stop.load(Ordering::Relaxed) && !self.requests.any_pending() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            self.requests.wait(left.min(NAP));
        }
    }
}

impl Tracked {
    /// Sets every page from `manifest` (same regions, in order), all current.
    fn load(&mut self, manifest: &Manifest, spans: &[Span]) {
        let mut pages = Vec::with_capacity(self.table.pages());
        let mut ids = Vec::with_capacity(self.table.pages());
        for (r, span) in spans.iter().enumerate() {
            let Some(region_ids) = manifest.region_ids(r) else {
                continue;
            };
            for (i, id) in region_ids.iter().take(span.pages).enumerate() {
                pages.push(span.first + i);
                ids.push(*id);
            }
        }
        self.install(&pages, &ids);
    }

    /// Marks the pages of `dirty` (one bitmap per region) stale; returns how many there were.
    fn mark_stale(&mut self, dirty: &[Vec<u64>], spans: &[Span]) -> u64 {
        let mut pages = Vec::new();
        for (span, words) in spans.iter().zip(dirty) {
            for_each_bit(words, |i| {
                if i < span.pages {
                    pages.push(span.first + i);
                }
            });
        }
        for group in pages.chunk_by(|a, b| a / CHUNK_PAGES == b / CHUNK_PAGES) {
            self.table.update_chunk(group[0] / CHUNK_PAGES, |w| {
                for &p in group {
                    w.mark_stale(p);
                }
            });
        }
        for &p in &pages {
            let (word, bit) = (p / 64, 1u64 << (p % 64));
            if self.stale[word] & bit == 0 {
                self.stale[word] |= bit;
                self.stale_count += 1;
            }
        }
        pages.len() as u64
    }

    /// Up to `BATCH` stale pages, from the cursor on (wrapping).
    fn next_stale(&mut self, out: &mut Vec<usize>) {
        out.clear();
        if self.stale_count == 0 {
            return;
        }
        let words = self.stale.len();
        let start = self.cursor / 64;
        for k in 0..=words {
            let w = (start + k) % words;
            let mut bits = self.stale[w];
            while bits != 0 && out.len() < BATCH {
                out.push(w * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
            if out.len() == BATCH {
                break;
            }
        }
        self.cursor = out.last().map_or(0, |&p| p + 1);
    }

    /// Installs freshly computed `ids` of `pages` (sorted) and clears their stale bits.
    fn install(&mut self, pages: &[usize], ids: &[Option<PageId>]) {
        let mut start = 0;
        for group in pages.chunk_by(|a, b| a / CHUNK_PAGES == b / CHUNK_PAGES) {
            let ids = &ids[start..start + group.len()];
            self.table.update_chunk(group[0] / CHUNK_PAGES, |w| {
                for (&p, &id) in group.iter().zip(ids) {
                    w.set(p, state_of(id), id);
                }
            });
            start += group.len();
        }
        for &p in pages {
            let (word, bit) = (p / 64, 1u64 << (p % 64));
            if self.stale[word] & bit != 0 {
                self.stale[word] &= !bit;
                self.stale_count -= 1;
            }
        }
    }
}

fn state_of(id: Option<PageId>) -> PageState {
    match id {
        None => PageState::Zero,
        Some(_) => PageState::Current,
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes only `ts`, a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
