//! Taking a snapshot of a paused VM: device and vCPU state, a manifest of its memory (from the
//! live identities), and the pages the store lacks (after the guest resumes, when a previous
//! snapshot says which pages changed). The state file is written last, so a snapshot
//! directory either has a complete, checksummed state file or none.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use fabric::{Manifest, PageId, Region, StoreError, PAGE_SIZE};
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::format::{self, SnapshotState};
use super::staging::Staging;
use super::{open_store, MANIFEST_FILE, STATE_FILE};
use crate::device_manager::DeviceManager;
use crate::memory::identities::LiveIdentities;
use crate::memory::GuestMemory;
use crate::vcpu::{VcpuError, Vcpus};
use crate::vm_state::{VmState, VmStateError};

/// Pages handed to the store per `put_many`.
const BATCH: usize = 4096;

/// Errors from taking a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The target directory is unusable, or its files cannot be written.
    #[error(transparent)]
    Dir(#[from] super::staging::StagingError),
    /// A vCPU could not be saved.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VM state could not be saved.
    #[error(transparent)]
    Vm(#[from] VmStateError),
    /// The manifest could not be built.
    #[error("cannot hash guest memory: {0}")]
    Manifest(#[from] fabric::ManifestError),
    /// Dirty tracking or the live identities failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The store failed.
    #[error("page store: {0}")]
    Store(#[from] StoreError),
    /// A page the store lacked changed before it could be stored (the previous snapshot's
    /// pages are no longer in the store).
    #[error("the page at guest frame {gfn} changed before the store had it (the store lacks pages of the previous snapshot); take the snapshot again")]
    Changed { gfn: u64 },
    /// Writing the snapshot files failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the VM was started with, recorded in the snapshot.
#[derive(Debug, Clone)]
pub struct VmMeta {
    /// Memory size.
    pub mem: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Command line.
    pub cmdline: String,
    /// Kernel path.
    pub kernel: String,
}

/// What a snapshot did (returned as JSON by the API).
#[derive(Debug, Clone, Serialize)]
pub struct SaveReport {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The store the pages went to.
    pub store: PathBuf,
    /// Guest pages in all.
    pub pages: u64,
    /// Zero pages (not stored).
    pub zero_pages: u64,
    /// Distinct non-zero pages.
    pub distinct_pages: u64,
    /// Pages hashed for this snapshot (all of them the first time, then the dirty ones).
    pub rehashed_pages: u64,
    /// Pages the store did not hold yet and now does.
    pub new_pages: u64,
    /// Bytes of page data written to the store.
    pub bytes_written: u64,
    /// Time to save vCPU, VM and device state, ms.
    pub state_ms: f64,
    /// Time to hash guest memory, ms.
    pub hash_ms: f64,
    /// Time to write new pages and the root to the store, ms.
    pub store_ms: f64,
    /// Pages that changed since the previous snapshot, copied aside while paused.
    pub copied_pages: u64,
    /// Time the guest was paused for the snapshot, ms.
    pub pause_ms: f64,
    /// Whole snapshot, ms.
    pub total_ms: f64,
}

/// The parts of a running VM a snapshot reads. The vCPUs must be paused.
#[derive(Debug)]
pub struct Source<'a> {
    /// KVM VM fd.
    pub vm: &'a kvm_ioctls::VmFd,
    /// Guest memory.
    pub memory: &'a GuestMemory,
    /// Its live identities: the manifest comes from them.
    pub identities: &'a LiveIdentities,
    /// The (paused) vCPUs.
    pub vcpus: &'a Vcpus,
    /// Devices.
    pub devices: &'a DeviceManager,
    /// Boot parameters.
    pub meta: &'a VmMeta,
}

/// The manifest of this VM's previous snapshot and the store it went to: pages unchanged
/// since are in that store already, so a snapshot into the same store copies only the pages
/// that changed while the guest is paused, and writes them after it runs again.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// The store the previous snapshot's pages are in.
    pub store: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// Snapshots the VM into `dir`, its pages into the store at `store_dir`. The vCPUs are
/// paused on entry; `resume` is called as soon as the guest may run again.
///
/// The manifest comes from the VM's live identities: only pages written since they were
/// last hashed (in the background, or by the previous snapshot) are hashed now. With a
/// `baseline` for the same store, the pages that changed since it are copied aside, the
/// guest resumes, and the store is written afterwards (a page the store turns out to lack
/// that was not copied is read from the running guest and used only if it still has its
/// identity); without one, new pages are written to the store while the guest is paused.
/// On success `baseline` becomes this snapshot.
pub fn save(
    source: &Source<'_>,
    dir: &Path,
    store_dir: &Path,
    baseline: &mut Option<Baseline>,
    resume: impl FnOnce(),
) -> Result<SaveReport, SaveError> {
    let started = Instant::now();
    let mut resume = Some(resume);
    let mut resume_now = || {
        if let Some(resume) = resume.take() {
            resume();
        }
    };
    let result = save_inner(source, dir, store_dir, baseline, started, &mut resume_now);
    resume_now();
    result
}

fn save_inner(
    source: &Source<'_>,
    dir: &Path,
    store_dir: &Path,
    baseline: &mut Option<Baseline>,
    started: Instant,
    resume: &mut dyn FnMut(),
) -> Result<SaveReport, SaveError> {
    let staging = Staging::new(dir)?;
    // Held while paused: no virtio device touches guest memory, its queues or the
    // interrupt lines while vCPU, VM and memory state are taken.
    let virtio_lock = source.devices.virtio.lock();
    let virtio = virtio_lock.state();
    let vcpus = source.vcpus.save_state()?;
    let vm = VmState::save(source.vm)?;
    let (serial, i8042) = source.devices.state();
    let state_ms = ms(started);

    let hashing = Instant::now();
    let (regions, slices) = memory_slices(source.memory);
    let (synced, manifest) = source.identities.sync_manifest()?;
    let hash_ms = ms(hashing);

    let storing = Instant::now();
    let base = baseline
        .as_ref()
        .filter(|b| b.store == absolute(store_dir) && same_regions(&b.manifest, &manifest));
    let (mut store, distinct, new_pages, copied_pages, pause_ms) = match base {
        Some(base) => {
            // Copy aside what changed since the baseline, then let the guest run.
            let copied = changed_pages(&base.manifest, &manifest, &slices);
            drop(virtio_lock);
            let pause_ms = ms(started);
            resume();
            let copied_pages = copied.len() as u64;
            let mut store = open_store(store_dir)?;
            let distinct = manifest.distinct_ids();
            let new = store_pages(&mut store, &distinct, &manifest, &slices, Some(copied))?;
            (store, distinct, new, copied_pages, pause_ms)
        }
        None => {
            let mut store = open_store(store_dir)?;
            let distinct = manifest.distinct_ids();
            let new = store_pages(&mut store, &distinct, &manifest, &slices, None)?;
            drop(virtio_lock);
            let pause_ms = ms(started);
            resume();
            (store, distinct, new, 0, pause_ms)
        }
    };
    let root = root_name();
    store.add_root(&root, &distinct)?;
    drop(store);
    let store_ms = ms(storing);

    let counts = manifest.counts();
    let manifest_bytes = manifest.encode();
    staging.write(MANIFEST_FILE, &manifest_bytes)?;
    let state = SnapshotState {
        mem: source.meta.mem,
        cpus: source.meta.cpus,
        cmdline: source.meta.cmdline.clone(),
        kernel: source.meta.kernel.clone(),
        regions,
        vm,
        vcpus,
        serial,
        i8042,
        virtio,
        store: absolute(store_dir),
        root: root.clone(),
        manifest_blake3: blake3::hash(&manifest_bytes).to_hex().to_string(),
    };
    staging.write(STATE_FILE, &format::encode(&state))?;
    staging.publish()?;
    *baseline = Some(Baseline {
        store: absolute(store_dir),
        manifest,
    });
    Ok(SaveReport {
        dir: absolute(dir),
        store: absolute(store_dir),
        pages: counts.total,
        zero_pages: counts.zero,
        distinct_pages: counts.distinct,
        rehashed_pages: synced.rehashed_pages,
        copied_pages,
        new_pages,
        bytes_written: new_pages * PAGE_SIZE as u64,
        state_ms,
        hash_ms,
        store_ms,
        pause_ms,
        total_ms: ms(started),
    })
}

fn same_regions(a: &Manifest, b: &Manifest) -> bool {
    a.regions().eq(b.regions())
}

/// The pages of `now` whose identity differs from `before`'s at the same frame, copied
/// (each identity once).
fn changed_pages(before: &Manifest, now: &Manifest, slices: &[&[u8]]) -> HashMap<PageId, Vec<u8>> {
    let mut copied = HashMap::new();
    for (index, mem) in slices.iter().enumerate() {
        let (Some(old), Some(new)) = (before.region_ids(index), now.region_ids(index)) else {
            continue;
        };
        for (page, (old, new)) in old.iter().zip(new).enumerate() {
            let Some(id) = new else { continue };
            if old != new {
                copied
                    .entry(*id)
                    .or_insert_with(|| mem[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].to_vec());
            }
        }
    }
    copied
}

/// Puts the pages of `manifest` that the store lacks into it: from `copied` when given
/// (the guest runs meanwhile: a page not copied is read from guest memory and used only if
/// it still has its identity), else straight from guest memory (the guest is paused).
fn store_pages(
    store: &mut fabric::Store,
    distinct: &[PageId],
    manifest: &Manifest,
    slices: &[&[u8]],
    copied: Option<HashMap<PageId, Vec<u8>>>,
) -> Result<u64, SaveError> {
    let mut missing: HashSet<PageId> = store.missing(distinct).into_iter().collect();
    let mut new_pages = 0;
    if let Some(copied) = &copied {
        let mut batch: Vec<(PageId, &[u8])> = Vec::with_capacity(BATCH);
        for (id, page) in copied {
            if missing.remove(id) {
                batch.push((*id, page));
                if batch.len() == BATCH {
                    new_pages += store.put_many(&batch)?;
                    batch.clear();
                }
            }
        }
        new_pages += store.put_many(&batch)?;
    }
    let mut batch: Vec<(PageId, Vec<u8>)> = Vec::new();
    for (index, mem) in slices.iter().enumerate() {
        if missing.is_empty() {
            break;
        }
        let ids = manifest.region_ids(index).expect("region exists");
        for (page, id) in ids.iter().enumerate() {
            let Some(id) = id else { continue };
            if !missing.remove(id) {
                continue;
            }
            let bytes = mem[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].to_vec();
            if copied.is_some() && !id.matches(bytes.as_slice().try_into().expect("a page")) {
                let gfn = manifest.regions().nth(index).expect("region").first_gfn() + page as u64;
                return Err(SaveError::Changed { gfn });
            }
            batch.push((*id, bytes));
            if batch.len() == BATCH {
                new_pages += put_owned(store, &batch)?;
                batch.clear();
            }
        }
    }
    new_pages += put_owned(store, &batch)?;
    Ok(new_pages)
}

fn put_owned(store: &mut fabric::Store, batch: &[(PageId, Vec<u8>)]) -> Result<u64, SaveError> {
    let refs: Vec<(PageId, &[u8])> = batch.iter().map(|(id, b)| (*id, b.as_slice())).collect();
    Ok(store.put_many(&refs)?)
}

/// The guest's RAM regions and their host bytes.
fn memory_slices(memory: &GuestMemory) -> (Vec<Region>, Vec<&[u8]>) {
    let mut regions = Vec::new();
    let mut slices = Vec::new();
    for region in memory.iter() {
        regions.push(Region {
            guest_addr: region.start_addr().0,
            pages: region.len() / PAGE_SIZE as u64,
        });
        // SAFETY: the mapping is live for as long as `memory` is borrowed. While the guest is
        // paused nothing writes it; after it resumes, a page read here is stored only if it
        // still has the identity the paused guest's manifest gave it.
        slices.push(unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) });
    }
    (regions, slices)
}

/// A root name unique to this snapshot: time and process id.
fn root_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("snapshot-{nanos}-{}", std::process::id())
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
