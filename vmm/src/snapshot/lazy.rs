//! Lazy restore: guest memory starts empty and each page is fetched from the store the first
//! time anything touches it (a vCPU or KVM itself), through userfaultfd; meanwhile the same
//! thread prefetches the rest in guest-physical order, so the store is released (and the
//! range unregistered) once every page is in, usually well under a second per GiB.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use fabric::{Manifest, PageId, Store, PAGE_SIZE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::open_store;
use super::restore::{Loaded, RestoreError};
use super::uffd::{Filled, Uffd};
use crate::memory::{self, GuestMemory};

/// Pages prefetched between two looks for faults.
const PREFETCH_BATCH: usize = 64;

/// What the lazy loader did, logged when it finishes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LazyStats {
    /// Pages installed because something touched them.
    pub faulted: u64,
    /// Pages installed ahead of use.
    pub prefetched: u64,
    /// Time until every page was in, ms.
    pub complete_ms: f64,
}

/// One guest RAM region as the loader sees it.
struct Span {
    host: u64,
    ids: Vec<Option<PageId>>,
    done: Vec<bool>,
}

/// Maps empty guest memory for the snapshot and starts the loader thread.
pub fn start(
    loaded: &Loaded,
    store_dir: &Path,
) -> Result<(GuestMemory, JoinHandle<LazyStats>), RestoreError> {
    let uffd_err = |source| RestoreError::Image {
        path: PathBuf::from("userfaultfd"),
        source,
    };
    // Small pages: userfaultfd installs 4 KiB at a time.
    let memory = memory::create(loaded.state.mem, false)
        .map_err(|e| uffd_err(std::io::Error::other(e.to_string())))?;
    let uffd = Uffd::new().map_err(uffd_err)?;
    let store = open_store(store_dir).map_err(|source| RestoreError::Store {
        store: store_dir.to_path_buf(),
        source,
    })?;
    let spans = spans(&memory, &loaded.manifest);
    for span in &spans {
        uffd.register(span.host, (span.ids.len() * PAGE_SIZE) as u64)
            .map_err(uffd_err)?;
    }
    let thread = std::thread::Builder::new()
        .name("lazy-restore".into())
        .spawn(move || serve(uffd, store, spans))
        .map_err(uffd_err)?;
    Ok((memory, thread))
}

fn spans(memory: &GuestMemory, manifest: &Manifest) -> Vec<Span> {
    memory
        .iter()
        .enumerate()
        .map(|(index, region)| {
            let ids = manifest.region_ids(index).unwrap_or_default().to_vec();
            let pages = (region.len() as usize) / PAGE_SIZE;
            Span {
                host: region.as_ptr() as u64,
                done: vec![false; pages],
                ids,
            }
        })
        .collect()
}

/// Serves faults first, prefetches between them, and stops when every page is in.
fn serve(uffd: Uffd, store: Store, mut spans: Vec<Span>) -> LazyStats {
    let started = Instant::now();
    let mut stats = LazyStats::default();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut cursor = (0usize, 0usize);
    loop {
        loop {
            match uffd.next_fault() {
                Ok(Some(addr)) => {
                    if let Some((s, p)) = locate(&spans, addr) {
                        if install(&uffd, &store, &mut spans[s], p, &mut page) {
                            stats.faulted += 1;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::error!("lazy restore: {e}");
                    return stats;
                }
            }
        }
        let mut fetched = 0;
        while fetched < PREFETCH_BATCH && cursor.0 < spans.len() {
            let (s, p) = cursor;
            if p >= spans[s].done.len() {
                cursor = (s + 1, 0);
                continue;
            }
            cursor.1 += 1;
            if !spans[s].done[p] && install(&uffd, &store, &mut spans[s], p, &mut page) {
                stats.prefetched += 1;
                fetched += 1;
            }
        }
        if cursor.0 >= spans.len() {
            break;
        }
    }
    for span in &spans {
        if let Err(e) = uffd.unregister(span.host, (span.done.len() * PAGE_SIZE) as u64) {
            log::warn!("lazy restore: unregister: {e}");
        }
    }
    drop(store);
    stats.complete_ms = started.elapsed().as_secs_f64() * 1000.0;
    log::info!(target: "fabvm::timing", "lazy restore complete: {stats:?}");
    stats
}

fn locate(spans: &[Span], addr: u64) -> Option<(usize, usize)> {
    spans.iter().enumerate().find_map(|(i, span)| {
        let offset = addr.checked_sub(span.host)? as usize / PAGE_SIZE;
        (offset < span.done.len()).then_some((i, offset))
    })
}

/// Installs page `p` of `span`; true if this call installed it.
fn install(uffd: &Uffd, store: &Store, span: &mut Span, p: usize, buf: &mut [u8]) -> bool {
    let dst = span.host + (p * PAGE_SIZE) as u64;
    let result = match span.ids.get(p).copied().flatten() {
        None => uffd.zero(dst, PAGE_SIZE as u64),
        Some(id) => match store.get(&id, buf) {
            Ok(()) => uffd.copy(dst, buf),
            Err(e) => {
                // The guest would block on this page forever: a store that lost a page is
                // fatal for the VM, and says so.
                log::error!("lazy restore: page {id} unavailable: {e}");
                std::process::exit(1);
            }
        },
    };
    span.done[p] = true;
    match result {
        Ok(Filled::Now) => true,
        Ok(Filled::Already) => false,
        Err(e) => {
            log::error!("lazy restore: installing page at {dst:#x}: {e}");
            false
        }
    }
}
