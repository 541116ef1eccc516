//! The pages this host holds, for a migration destination: the VMs running here (through
//! the identity tables they publish, see [`crate::host_index`]) and the host store, with
//! the range digests that answer a source's summaries; every page copied out of a running
//! VM is confirmed before use.

use std::sync::atomic::{AtomicU64, Ordering};

use fabric::live::{HostIndex, PageState, Request, TableReader, CHUNK_PAGES};
use fabric::migration::{FetchResult, GuestFrames, PageSource, RangeIndex};

use crate::host_ranges::HostRanges;
use fabric::{Page, PageId, Store, PAGE_SIZE};
use rayon::prelude::*;
use serde::Serialize;

use crate::host_index::{close_remote_files, read_remote, running_vms, table_path};

/// The pages this host holds, for a migration destination: the VMs running here (found
/// through the identity tables they publish; nothing is hashed to learn what they hold) and
/// the host store. The guest may have rewritten a page after its identity was published, so
/// every page copied out of a running VM is confirmed before use: it was current in the
/// owner's table, and a harvest the owner made after the copy left its chunk unchanged; or,
/// when the owner does not answer in time (or [`HostPages::hash_always`]), its copy hashes
/// to its identity. A page that fails is reported as such and asked from the source.
#[derive(Debug)]
pub struct HostPages {
    index: HostIndex,
    /// Range digests over the running VMs' identities (stale ones as hints: every page
    /// copied is confirmed anyway).
    ranges: HostRanges,
    pids: Vec<u32>,
    store: Option<Store>,
    counters: HostCounters,
    /// Hash every copied page, never trusting a harvest.
    hash_always: bool,
    /// Keep the range digests (a migration destination's; a host agent has no use for them).
    with_ranges: bool,
}

/// How long a destination waits for a running VM to harvest its dirty log on request before
/// it hashes the pages it copied from that VM instead.
const HARVEST_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Stale pages a running VM may have before a destination asks it to hash them first
/// (a running guest always has a few: its stack, its counters).
const SETTLE_STALE: u64 = 256;

/// What [`HostPages`] did.
#[derive(Debug, Default, Serialize)]
pub struct HostCounters {
    /// Running VMs whose tables were read.
    pub vms: AtomicU64,
    /// Pages found at the same frame of a running VM.
    pub same_frame: AtomicU64,
    /// Pages found elsewhere in a running VM (through the index).
    pub elsewhere: AtomicU64,
    /// Pages found in the store.
    pub store: AtomicU64,
    /// Pages copied from a running VM that no longer matched their identity.
    pub mismatched: AtomicU64,
    /// Copied pages confirmed by a harvest of their VM's dirty log (not hashed).
    pub confirmed_by_harvest: AtomicU64,
    /// Copied pages confirmed by hashing them.
    pub confirmed_by_hash: AtomicU64,
    /// Running VMs asked to hash their stale pages before the index was read.
    pub syncs_asked: AtomicU64,
    /// Harvests asked of running VMs, and how many were not answered in time.
    pub harvests_asked: AtomicU64,
    pub harvests_unanswered: AtomicU64,
    /// Reads of a running VM's memory that failed (it exited meanwhile).
    pub read_failures: AtomicU64,
    /// System calls made to copy pages out of running VMs.
    pub reads: AtomicU64,
    /// Pages found in each running VM (by index), verified.
    #[serde(skip)]
    found_per_vm: Vec<AtomicU64>,
}

impl HostPages {
    /// The VMs registered on this host (but `except`) that publish identities, and `store`.
    pub fn open(except: Option<u32>, store: Option<Store>) -> Self {
        let mut hosted = HostPages {
            index: HostIndex::new(),
            ranges: HostRanges::default(),
            pids: Vec::new(),
            store,
            counters: HostCounters::default(),
            hash_always: false,
            with_ranges: true,
        };
        hosted.refresh(except);
        hosted
    }

    /// Indexes VMs registered since (but `except`), drops those gone, and re-reads the
    /// chunks of identity tables that changed: cheap after [`HostPages::open`], so a
    /// destination opens before a source connects and refreshes once it has.
    pub fn refresh(&mut self, except: Option<u32>) {
        self.index.refresh();
        for vm in running_vms(except) {
            if self.pids.contains(&vm.pid) {
                continue;
            }
            match TableReader::open(&table_path(vm.pid)) {
                Ok(table) if table.pid() == vm.pid && table.owner_alive() => {
                    let at = self.index.add(table);
                    self.pids.resize(at + 1, 0);
                    self.pids[at] = vm.pid;
                }
                Ok(_) => {}
                Err(e) => log::debug!("VM {} not indexed: {e}", vm.pid),
            }
        }
        self.index_ranges();
        let c = &mut self.counters;
        c.found_per_vm
            .resize_with(self.pids.len(), AtomicU64::default);
        c.vms
            .store(self.index.vms().count() as u64, Ordering::Relaxed);
    }

    /// Asks each indexed VM with more than `SETTLE_STALE` (256) pages written since last hashed
    /// to hash them now (waiting up to `wait` for each: zero only asks), then re-reads what
    /// changed. A VM that started moments ago or was just rewritten then counts in full.
    pub fn settle(&mut self, wait: std::time::Duration) {
        let mut asked = false;
        for (vm, table) in self.index.vms() {
            if self
                .index
                .counts(vm)
                .is_some_and(|c| c.stale > SETTLE_STALE)
            {
                self.counters.syncs_asked.fetch_add(1, Ordering::Relaxed);
                asked |= table.request(Request::Sync, wait);
            }
        }
        if asked {
            self.index.refresh();
            self.index_ranges();
        }
    }

    /// Brings the range digests up to what the tables say now.
    fn index_ranges(&mut self) {
        if self.with_ranges {
            self.ranges.update(&self.index);
        }
    }

    /// Takes pages from `store` too.
    pub fn with_store(mut self, store: Option<Store>) -> Self {
        self.store = store;
        self
    }

    /// Keeps no range digests (for a reader that never answers a source's summaries: the
    /// host agent), so a refresh reads only the chunks that moved.
    pub fn without_ranges(mut self) -> Self {
        self.with_ranges = false;
        self.ranges = HostRanges::default();
        self
    }

    /// Hash every page copied from a running VM instead of confirming it by a harvest.
    pub fn hash_always(mut self, yes: bool) -> Self {
        self.hash_always = yes;
        self
    }

    /// The host index over the running VMs.
    pub fn index(&self) -> &HostIndex {
        &self.index
    }

    /// Its figures.
    pub fn counters(&self) -> &HostCounters {
        &self.counters
    }

    /// Its figures as JSON, with the pages each running VM gave (by pid).
    pub fn figures(&self) -> serde_json::Value {
        let mut figures = serde_json::to_value(&self.counters).unwrap_or_default();
        let per_vm: serde_json::Map<String, serde_json::Value> = self
            .pids
            .iter()
            .zip(&self.counters.found_per_vm)
            .map(|(pid, n)| (pid.to_string(), n.load(Ordering::Relaxed).into()))
            .collect();
        figures["found_per_vm"] = per_vm.into();
        figures
    }

    /// Where `id` is in a running VM, preferring frame `gfn`.
    fn locate(&self, gfn: Option<u64>, id: &PageId) -> Option<Found> {
        let (loc, same) = match gfn.and_then(|gfn| self.index.lookup_at(gfn, id)) {
            Some(loc) => (loc, true),
            None => (self.index.lookup(id)?, false),
        };
        let table = self.index.table(loc.vm)?;
        let addr = table.frames().host_addr(loc.page)?;
        let counter = if same {
            &self.counters.same_frame
        } else {
            &self.counters.elsewhere
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Some(Found {
            vm: loc.vm,
            page: loc.page,
            pid: self.pids[loc.vm],
            addr,
        })
    }

    /// The generation of `found`'s chunk at which its table entry says it holds `id`, hashed
    /// since last written: the mark a later harvest is checked against. `None`: the entry
    /// cannot vouch for the page (stale, another identity, or being written).
    fn vouched(&self, found: &Found, id: &PageId) -> Option<u64> {
        if self.hash_always {
            return None;
        }
        let (entry, gen) = self
            .index
            .table(found.vm)?
            .entry_at_generation(found.page)?;
        (entry.state == PageState::Current && entry.id.as_ref() == Some(id)).then_some(gen)
    }

    /// Asks each VM in `vms` (true: pages were copied from it on an entry's word) for a
    /// harvest; returns which answered.
    fn harvest(&self, vms: &[bool]) -> Vec<bool> {
        vms.iter()
            .enumerate()
            .map(|(vm, &asked)| {
                if !asked {
                    return false;
                }
                self.counters.harvests_asked.fetch_add(1, Ordering::Relaxed);
                let answered = self
                    .index
                    .table(vm)
                    .is_some_and(|t| t.request(Request::Harvest, HARVEST_WAIT));
                if !answered {
                    self.counters
                        .harvests_unanswered
                        .fetch_add(1, Ordering::Relaxed);
                }
                answered
            })
            .collect()
    }

    /// Whether a page copied from `found` on the word of generation `gen` is still vouched
    /// for after its VM answered a harvest asked for after the copy.
    fn confirmed(&self, found: &Found, gen: u64) -> bool {
        self.index
            .table(found.vm)
            .is_some_and(|t| t.chunk_generation(found.page / CHUNK_PAGES) == gen)
    }

    fn take_from_store(&self, id: &PageId, out: &mut Page) -> bool {
        let found = self.store.as_ref().is_some_and(|s| s.get(id, out).is_ok());
        if found {
            self.counters.store.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// One page (not on the batch path): always hashed.
    fn copy_from_vm(&self, gfn: Option<u64>, id: &PageId, out: &mut Page) -> FetchResult {
        let Some(found) = self.locate(gfn, id) else {
            return FetchResult::Absent;
        };
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        if read_remote(found.pid, found.addr, out).is_err() {
            self.counters.read_failures.fetch_add(1, Ordering::Relaxed);
            return FetchResult::Absent;
        }
        self.verify(found.vm, id, out)
    }

    fn verify(&self, vm: usize, id: &PageId, page: &Page) -> FetchResult {
        if id.matches(page) {
            self.counters
                .confirmed_by_hash
                .fetch_add(1, Ordering::Relaxed);
            self.found_in(vm);
            FetchResult::Verified
        } else {
            self.counters.mismatched.fetch_add(1, Ordering::Relaxed);
            FetchResult::Mismatch
        }
    }

    fn found_in(&self, vm: usize) {
        if let Some(n) = self.counters.found_per_vm.get(vm) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl PageSource for HostPages {
    fn ranges(&self) -> Option<&RangeIndex> {
        Some(self.ranges.index())
    }

    fn holds_any(&self) -> bool {
        !self.index.is_empty() || self.store.as_ref().is_some_and(|s| s.stats().pages > 0)
    }

    fn fetch(&self, id: &PageId, out: &mut Page) -> bool {
        self.copy_from_vm(None, id, out) == FetchResult::Verified || self.take_from_store(id, out)
    }

    fn fetch_at(&self, gfn: u64, id: &PageId, out: &mut Page) -> bool {
        self.copy_from_vm(Some(gfn), id, out) == FetchResult::Verified
            || self.take_from_store(id, out)
    }

    /// Copied pages are verified here; the store checks what it reads.
    fn verifies(&self) -> bool {
        true
    }

    /// Locates every page, copies runs that are contiguous in one VM's memory (and at
    /// their destination) with one read each, straight into empty guest frames where the
    /// receiver allows it, confirms every page (one harvest per VM it came from, hashing
    /// only what that cannot vouch for, on all cores), and takes what is still missing from
    /// the store.
    fn fetch_batch(
        &self,
        wanted: &[(u64, PageId)],
        direct: &[bool],
        frames: Option<&dyn GuestFrames>,
        out: &mut [u8],
        results: &mut [FetchResult],
    ) {
        let started = std::time::Instant::now();
        let out_base = out.as_mut_ptr() as usize;
        // Where each page goes: its guest frame, or its slot in `out`.
        let target = |i: usize| -> (usize, bool) {
            match frames
                .filter(|_| direct[i])
                .and_then(|f| f.frame_addr(wanted[i].0))
            {
                Some(addr) => (addr, true),
                None => (out_base + i * PAGE_SIZE, false),
            }
        };
        let mut runs: Vec<Run> = Vec::new();
        // Per page: where it was found, and the chunk generation its entry vouched at.
        let mut located: Vec<Option<(Found, Option<u64>)>> = vec![None; wanted.len()];
        let mut ask = vec![false; self.pids.len()];
        for (i, (gfn, id)) in wanted.iter().enumerate() {
            let Some(found) = self.locate(Some(*gfn), id) else {
                continue;
            };
            let vouched = self.vouched(&found, id);
            ask[found.vm] |= vouched.is_some();
            let (to, in_frames) = target(i);
            match runs.last_mut() {
                Some(run) if run.extends(found.pid, found.addr, to, in_frames) => run.count += 1,
                _ => runs.push(Run {
                    pid: found.pid,
                    addr: found.addr,
                    to,
                    in_frames,
                    count: 1,
                    pages: Vec::new(),
                }),
            }
            runs.last_mut().expect("a run").pages.push(i);
            located[i] = Some((found, vouched));
        }
        let read_ok: Vec<bool> = runs
            .par_iter()
            .map(|run| {
                self.counters.reads.fetch_add(1, Ordering::Relaxed);
                // SAFETY: `run.to` spans `run.count` whole pages that belong to this run
                // alone: distinct slots of `out`, or distinct empty guest frames the receiver
                // handed over for this call (an offer names each frame once); both outlive
                // the call.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(run.to as *mut u8, run.count * PAGE_SIZE)
                };
                if run.in_frames {
                    populate(buf); // fresh guest memory; `out` is touched already
                }
                read_remote(run.pid, run.addr, buf).is_ok()
            })
            .collect();
        let mut copied = vec![false; wanted.len()];
        for (run, ok) in runs.iter().zip(read_ok) {
            if ok {
                run.pages.iter().for_each(|&i| copied[i] = true);
            } else {
                self.counters.read_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        let read = started.elapsed();
        // Every copy is done: a harvest that starts now covers them all.
        let answered = self.harvest(&ask);
        results
            .par_iter_mut()
            .enumerate()
            .with_min_len(16)
            .for_each(|(i, result)| {
                let (addr, in_frame) = target(i);
                // SAFETY: as above: page `i`'s target is this task's alone.
                let page: &mut Page = unsafe { &mut *(addr as *mut Page) };
                let id = &wanted[i].1;
                *result = match &located[i] {
                    Some((found, Some(gen)))
                        if copied[i] && answered[found.vm] && self.confirmed(found, *gen) =>
                    {
                        self.counters
                            .confirmed_by_harvest
                            .fetch_add(1, Ordering::Relaxed);
                        self.found_in(found.vm);
                        FetchResult::Verified
                    }
                    Some((found, _)) if copied[i] => self.verify(found.vm, id, page),
                    _ => FetchResult::Absent,
                };
                if *result == FetchResult::Verified {
                    if in_frame {
                        *result = FetchResult::Installed;
                    }
                    return;
                }
                if in_frame && copied[i] {
                    page.fill(0); // leave no half-right page in the guest
                }
                if self.take_from_store(id, page) {
                    *result = if in_frame {
                        FetchResult::Installed
                    } else {
                        FetchResult::Verified
                    };
                }
            });
        log::debug!(
            target: "fabvm::timing",
            "host pages: {} pages located and read in {read:?}, confirmed in {:?}",
            wanted.len(),
            started.elapsed() - read
        );
    }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        close_remote_files();
    }
}

/// A page found in a running VM: VM `vm` of the index, page `page` of its table, at `addr`
/// in process `pid`.
#[derive(Debug, Clone, Copy)]
struct Found {
    vm: usize,
    page: usize,
    pid: u32,
    addr: u64,
}

/// Most pages copied by one read (4 MiB).
const MAX_RUN_PAGES: usize = 1024;

/// Batch pages `pages`, contiguous at `addr` in process `pid` and at host address `to`
/// here (empty guest frames when `in_frames`, else slots of the output buffer).
#[derive(Debug)]
struct Run {
    pid: u32,
    addr: u64,
    to: usize,
    in_frames: bool,
    count: usize,
    pages: Vec<usize>,
}

impl Run {
    /// Whether a page at `addr` in `pid`, going to `to` (a guest frame when `in_frames`),
    /// continues this run.
    fn extends(&self, pid: u32, addr: u64, to: usize, in_frames: bool) -> bool {
        self.pid == pid
            && self.in_frames == in_frames
            && self.addr + (self.count * PAGE_SIZE) as u64 == addr
            && self.to + self.count * PAGE_SIZE == to
            && self.count < MAX_RUN_PAGES
    }
}

/// Faults `buf` (whole, page-aligned pages of fresh memory) in with one system call before
/// it is written (a copy into fresh memory otherwise takes one page fault per page inside
/// the read). Best effort: kernels before
/// 5.14 lack `MADV_POPULATE_WRITE`, and the copy then faults as before.
fn populate(buf: &mut [u8]) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // SAFETY: `buf` is a whole number of pages of this process's writable memory, which the
    // caller owns for the call; populating writes nothing visible (it only maps the pages
    // that writes would map).
    unsafe { libc::madvise(buf.as_mut_ptr().cast(), buf.len(), MADV_POPULATE_WRITE) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_index::Registration;
    use crate::memory::GuestMemory;
    use fabric::live::{IdentityTable, PageState, TableRegion};

    /// This process's own buffer, published as a running VM's memory at frame 0.
    fn publish_own(mem: &[u8]) -> (Registration, IdentityTable) {
        let memory = GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), PAGE_SIZE)]).unwrap();
        let registration = Registration::new(&memory, None).unwrap();
        let path = table_path(std::process::id());
        let region = TableRegion {
            guest_addr: 0,
            pages: (mem.len() / PAGE_SIZE) as u64,
            host_addr: mem.as_ptr() as u64,
        };
        let mut table = IdentityTable::create(Some(&path), &[region]).unwrap();
        for (p, page) in mem.chunks(PAGE_SIZE).enumerate() {
            let id = fabric::identify(page.try_into().unwrap());
            let state = if id.is_some() {
                PageState::Current
            } else {
                PageState::Zero
            };
            table.set(p, state, id);
        }
        (registration, table)
    }

    #[test]
    fn published_pages_are_copied_in_runs_and_reverified() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: tests in this module set the variable before anything reads it.
        unsafe { std::env::set_var("FABVM_RUNTIME_DIR", dir.path()) };
        let mut mem = vec![0u8; 64 * PAGE_SIZE];
        for (i, page) in mem.chunks_mut(PAGE_SIZE).enumerate() {
            page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        }
        let (registration, table) = publish_own(&mem);
        let id = |p: usize| PageId::of(mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].try_into().unwrap());
        let host = HostPages::open(None, None);
        assert_eq!(host.index().len(), 64);

        // 32 pages at their own frames, then 8 asked at other frames (found elsewhere).
        let mut wanted: Vec<(u64, PageId)> = (0..32).map(|p| (p as u64, id(p))).collect();
        wanted.extend((40..48).map(|p| (p as u64 + 100, id(p))));
        let mut out = vec![0u8; wanted.len() * PAGE_SIZE];
        let mut results = vec![FetchResult::Absent; wanted.len()];
        host.fetch_batch(
            &wanted,
            &vec![false; wanted.len()],
            None,
            &mut out,
            &mut results,
        );
        assert!(
            results.iter().all(|r| *r == FetchResult::Verified),
            "{results:?}"
        );
        assert_eq!(&out[..32 * PAGE_SIZE], &mem[..32 * PAGE_SIZE]);
        assert_eq!(&out[32 * PAGE_SIZE..], &mem[40 * PAGE_SIZE..48 * PAGE_SIZE]);
        let c = host.counters();
        assert_eq!(c.same_frame.load(Ordering::Relaxed), 32);
        assert_eq!(c.elsewhere.load(Ordering::Relaxed), 8);
        assert_eq!(
            c.reads.load(Ordering::Relaxed),
            2,
            "two contiguous runs, two reads"
        );

        // The guest rewrites a page after publishing it: the copy is refused, not used.
        let old = id(3);
        let ids: Vec<PageId> = (10..20).map(id).collect();
        mem[3 * PAGE_SIZE] ^= 0xff;
        let mut out = vec![0u8; PAGE_SIZE];
        let mut results = vec![FetchResult::Absent];
        host.fetch_batch(&[(3, old)], &[false], None, &mut out, &mut results);
        assert_eq!(results[0], FetchResult::Mismatch);
        assert_eq!(host.counters().mismatched.load(Ordering::Relaxed), 1);

        // Straight into empty guest frames: pages land at their frames, and a page that no
        // longer matches leaves its frame zeroed.
        struct Frames(usize);
        impl GuestFrames for Frames {
            fn frame_addr(&self, gfn: u64) -> Option<usize> {
                (gfn < 64).then(|| self.0 + gfn as usize * PAGE_SIZE)
            }
        }
        let mut guest = vec![0u8; 64 * PAGE_SIZE];
        let frames = Frames(guest.as_mut_ptr() as usize);
        let wanted: Vec<(u64, PageId)> = (10..20)
            .zip(ids)
            .map(|(p, id)| (p as u64, id))
            .chain([(3, old)])
            .collect();
        let mut out = vec![0u8; wanted.len() * PAGE_SIZE];
        let mut results = vec![FetchResult::Absent; wanted.len()];
        let direct = vec![true; wanted.len()];
        host.fetch_batch(&wanted, &direct, Some(&frames), &mut out, &mut results);
        assert!(
            results[..10].iter().all(|r| *r == FetchResult::Installed),
            "{results:?}"
        );
        assert_eq!(results[10], FetchResult::Mismatch);
        assert_eq!(
            &guest[10 * PAGE_SIZE..20 * PAGE_SIZE],
            &mem[10 * PAGE_SIZE..20 * PAGE_SIZE]
        );
        assert!(guest[3 * PAGE_SIZE..4 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(
            out.iter().all(|&b| b == 0),
            "nothing went through the buffer"
        );

        assert!(running_vms(Some(std::process::id())).is_empty());
        drop(table);
        drop(registration);
        assert!(running_vms(None).is_empty());
    }
}
