//! Lazy restore: the VM starts at once on a private mapping of the snapshot's memory image
//! while this process is still building it (a tmpfs file, see [`super::image`]). A page the
//! guest or KVM touches before the build reaches it raises a userfaultfd missing-page fault
//! (shmem reports a page absent from the file); the loader writes that page into the shared
//! file and wakes the faulting thread, which then maps the file's page like any other. So
//! lazily restored VMs share untouched pages with each other exactly as eager ones do: the
//! image is the one copy. Zero pages are mapped as the zero page.
//!
//! Between faults the loader fills the rest of the image in parallel batches; then it
//! publishes the image (other restores were waiting for it), unregisters the range and
//! releases the store. When the image exists already, a lazy restore simply maps it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use fabric::{PageId, Store, PAGE_SIZE};
use rayon::prelude::*;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::image::{self, BuildLock, ChunkError, Claim};
use super::open_store;
use super::restore::{self, Loaded, RestoreError};
use super::uffd::Uffd;
use crate::memory::GuestMemory;

/// Pages filled between two looks for faults (1 MiB), in tasks of [`TASK_PAGES`].
const BATCH_PAGES: usize = 256;
const TASK_PAGES: usize = 64;

/// What the lazy loader did, logged when it finishes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LazyStats {
    /// Pages written into the image because something touched them first.
    pub faulted: u64,
    /// Pages written ahead of use.
    pub prefetched: u64,
    /// Zero pages mapped because something touched them.
    pub zero_faults: u64,
    /// Time until the image was complete, ms.
    pub complete_ms: f64,
}

/// Maps guest memory for the snapshot: the finished image if there is one (or another
/// process is about to finish it), else the image this process starts building, with the
/// loader thread that completes it.
pub fn start(
    loaded: &Loaded,
    store_dir: &Path,
) -> Result<(GuestMemory, Option<JoinHandle<LazyStats>>), RestoreError> {
    let dir = image::dir(store_dir)?;
    if !image::is_tmpfs(&dir) {
        log::info!(
            "lazy restore needs the image directory on tmpfs ({} is not): building the image first",
            dir.display()
        );
        let (path, file) = image::ensure(loaded, store_dir)?;
        return Ok((restore::map_file(&file, &path, &loaded.state)?, None));
    }
    let lock = match image::claim(&dir, loaded)? {
        Claim::Ready(path) => {
            log::info!(target: "fabvm::timing", "lazy restore: the image exists, mapped it");
            return Ok((restore::map_image(&path, &loaded.state)?, None));
        }
        Claim::Build(lock) => lock,
    };
    let tmp = lock.tmp_path();
    let file = lock.create_tmp(loaded.state.mem)?;
    image::mark_in_use(&file).map_err(|source| RestoreError::Image {
        path: tmp.clone(),
        source,
    })?;
    let memory = restore::map_file(&file, &tmp, &loaded.state)?;
    let uffd_err = |source| RestoreError::Image {
        path: PathBuf::from("userfaultfd"),
        source,
    };
    let uffd = Uffd::new().map_err(uffd_err)?;
    let store = open_store(store_dir).map_err(|source| RestoreError::Store {
        store: store_dir.to_path_buf(),
        source,
    })?;
    let mut spans = Vec::new();
    let mut first = 0u64;
    for region in memory.iter() {
        let pages = region.len() / PAGE_SIZE as u64;
        spans.push((region.as_ptr() as u64, pages, first));
        uffd.register(region.as_ptr() as u64, region.len())
            .map_err(uffd_err)?;
        first += pages;
    }
    let mut ids = vec![None; first as usize];
    let plan = image::plan(loaded);
    for &(page, id) in &plan {
        ids[page as usize] = Some(id);
    }
    let loader = Loader {
        done: vec![false; ids.len()],
        ids,
        plan,
        spans,
        uffd,
        store,
        file,
        lock: Some(lock),
        stats: LazyStats::default(),
    };
    let thread = std::thread::Builder::new()
        .name("lazy-restore".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::LazyRestore);
            loader.run()
        })
        .map_err(uffd_err)?;
    Ok((memory, Some(thread)))
}

/// The loader thread's state.
struct Loader {
    /// Identity of each page of the image (None: zero).
    ids: Vec<Option<PageId>>,
    /// Pages already in the image file.
    done: Vec<bool>,
    /// Non-zero pages in file order, the prefetch order.
    plan: Vec<(u64, PageId)>,
    /// Guest mappings: (host address, pages, first page in the image).
    spans: Vec<(u64, u64, u64)>,
    uffd: Uffd,
    store: Store,
    file: File,
    lock: Option<BuildLock>,
    stats: LazyStats,
}

impl Loader {
    /// Serves faults first, fills between them, and publishes the image when complete.
    fn run(mut self) -> LazyStats {
        let started = Instant::now();
        let mut cursor = 0;
        let mut batch = Vec::with_capacity(BATCH_PAGES);
        while cursor < self.plan.len() {
            self.serve_faults();
            batch.clear();
            while batch.len() < BATCH_PAGES && cursor < self.plan.len() {
                let (page, id) = self.plan[cursor];
                if !self.done[page as usize] {
                    batch.push((page, id));
                }
                cursor += 1;
            }
            let (store, file) = (&self.store, &self.file);
            let filled = batch.par_chunks(TASK_PAGES).try_for_each_init(
                || vec![0u8; TASK_PAGES * PAGE_SIZE],
                |buf, chunk| image::fill_chunk(store, file, chunk, buf),
            );
            if let Err(e) = filled {
                fatal(e);
            }
            for &(page, _) in &batch {
                self.done[page as usize] = true;
            }
            self.stats.prefetched += batch.len() as u64;
        }
        self.serve_faults();
        let lock = self.lock.take().expect("the loader holds the build lock");
        match lock.publish(&self.file) {
            Ok(path) => log::debug!("memory image {} published", path.display()),
            Err(e) => log::warn!("lazy restore: {e}"),
        }
        for &(host, pages, _) in &self.spans {
            if let Err(e) = self.uffd.unregister(host, pages * PAGE_SIZE as u64) {
                log::warn!("lazy restore: unregister: {e}");
            }
        }
        self.stats.complete_ms = started.elapsed().as_secs_f64() * 1000.0;
        log::info!(target: "fabvm::timing", "lazy restore complete: {:?}", self.stats);
        self.stats
    }

    fn serve_faults(&mut self) {
        loop {
            match self.uffd.next_fault() {
                Ok(Some(addr)) => self.serve(addr & !(PAGE_SIZE as u64 - 1)),
                Ok(None) => return,
                Err(e) => {
                    log::error!("lazy restore: {e}");
                    std::process::exit(1);
                }
            }
        }
    }

    /// Makes the page at host address `addr` present and wakes whoever waits for it.
    fn serve(&mut self, addr: u64) {
        let Some(page) = self.spans.iter().find_map(|&(host, pages, first)| {
            let index = addr.checked_sub(host)? / PAGE_SIZE as u64;
            (index < pages).then_some(first + index)
        }) else {
            return;
        };
        let result = match self.ids[page as usize] {
            None => {
                self.stats.zero_faults += 1;
                self.uffd.zero(addr, PAGE_SIZE as u64).map(|_| ())
            }
            Some(id) => {
                if !self.done[page as usize] {
                    let mut buf = [0u8; PAGE_SIZE];
                    if let Err(e) =
                        image::fill_chunk(&self.store, &self.file, &[(page, id)], &mut buf)
                    {
                        fatal(e);
                    }
                    self.done[page as usize] = true;
                    self.stats.faulted += 1;
                }
                Ok(())
            }
        };
        if let Err(e) = result.and_then(|()| self.uffd.wake(addr, PAGE_SIZE as u64)) {
            log::error!("lazy restore: serving the page at {addr:#x}: {e}");
        }
    }
}

/// The guest would block on a page forever: a store that lost a page, or an image that
/// cannot be written, is fatal for the VM, and says so.
fn fatal(e: ChunkError) -> ! {
    match e {
        ChunkError::Store(e) => log::error!("lazy restore: {e}"),
        ChunkError::Write(e) => log::error!("lazy restore: writing the memory image: {e}"),
    }
    std::process::exit(1);
}
