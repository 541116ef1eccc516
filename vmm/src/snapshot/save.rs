//! Taking a snapshot of a paused VM: device and vCPU state, a manifest of its memory, and the
//! pages the store lacks. The state file is written last, so a snapshot directory either has
//! a complete, checksummed state file or none.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fabric::{Manifest, PageId, Region, StoreError, PAGE_SIZE};
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::format::{self, SnapshotState};
use super::{open_store, MANIFEST_FILE, STATE_FILE};
use crate::device_manager::DeviceManager;
use crate::memory::{self, GuestMemory};
use crate::vcpu::{VcpuError, Vcpus};
use crate::vm_state::{VmState, VmStateError};

/// Pages handed to the store per `put_many`.
const BATCH: usize = 4096;

/// Errors from taking a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The target directory is unusable.
    #[error("snapshot directory {path}: {reason}")]
    Dir { path: PathBuf, reason: String },
    /// A vCPU could not be saved.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VM state could not be saved.
    #[error(transparent)]
    Vm(#[from] VmStateError),
    /// The manifest could not be built.
    #[error("cannot hash guest memory: {0}")]
    Manifest(#[from] fabric::ManifestError),
    /// Dirty tracking failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The store failed.
    #[error("page store: {0}")]
    Store(#[from] StoreError),
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
    /// Whole snapshot, ms (the guest is paused throughout).
    pub total_ms: f64,
}

/// The parts of a running VM a snapshot reads. The vCPUs must be paused.
#[derive(Debug)]
pub struct Source<'a> {
    /// KVM VM fd.
    pub vm: &'a kvm_ioctls::VmFd,
    /// Guest memory.
    pub memory: &'a GuestMemory,
    /// The (paused) vCPUs.
    pub vcpus: &'a Vcpus,
    /// Devices.
    pub devices: &'a DeviceManager,
    /// Boot parameters.
    pub meta: &'a VmMeta,
}

/// Snapshots a paused VM into `dir`, putting its pages into the store at `store_dir`.
///
/// `tracked` is the VM's manifest kept from an earlier snapshot, or `None` the first time.
/// With one, only pages dirtied since (KVM's dirty log OR vm-memory's bitmap) are rehashed;
/// without, all memory is hashed and dirty logging is switched on for next time. On return
/// `tracked` holds the manifest of the memory just saved.
pub fn save(
    source: &Source<'_>,
    dir: &Path,
    store_dir: &Path,
    tracked: &mut Option<Manifest>,
) -> Result<SaveReport, SaveError> {
    let started = Instant::now();
    prepare_dir(dir)?;
    // Held until the snapshot is written: no virtio device touches guest memory, its queues or
    // the interrupt lines while vCPU, VM and memory state are taken.
    let virtio_lock = source.devices.virtio.lock();
    let virtio = virtio_lock.state();
    let vcpus = source.vcpus.save_state()?;
    let vm = VmState::save(source.vm)?;
    let (serial, i8042) = source.devices.state();
    let state_ms = ms(started);

    let hashing = Instant::now();
    let (regions, slices) = memory_slices(source.memory);
    let mut rehashed = 0;
    match tracked.take() {
        Some(mut manifest) => {
            let dirty = memory::take_dirty(source.vm, source.memory)?;
            for (index, words) in dirty.iter().enumerate() {
                rehashed += manifest.update(index, slices[index], words)?.rehashed;
            }
            *tracked = Some(manifest);
        }
        None => {
            let manifest = Manifest::from_memory(&regions, &slices)?;
            rehashed = manifest.counts().total;
            // From now on KVM logs guest writes; the VMM's own are in vm-memory's bitmap.
            memory::enable_dirty_log(source.vm, source.memory)?;
            memory::take_dirty(source.vm, source.memory)?;
            *tracked = Some(manifest);
        }
    }
    let manifest = tracked.as_ref().expect("set above");
    let counts = manifest.counts();
    let hash_ms = ms(hashing);

    let storing = Instant::now();
    let mut store = open_store(store_dir)?;
    let distinct = manifest.distinct_ids();
    let mut missing: HashSet<PageId> = store.missing(&distinct).into_iter().collect();
    let mut new_pages = 0;
    let mut batch: Vec<(PageId, &[u8])> = Vec::with_capacity(BATCH);
    for (index, mem) in slices.iter().enumerate() {
        let ids = manifest.region_ids(index).expect("region exists");
        for (page, id) in ids.iter().enumerate() {
            let Some(id) = id else { continue };
            if missing.remove(id) {
                let offset = page * PAGE_SIZE;
                batch.push((*id, &mem[offset..offset + PAGE_SIZE]));
                if batch.len() == BATCH {
                    new_pages += store.put_many(&batch)?;
                    batch.clear();
                }
            }
        }
    }
    new_pages += store.put_many(&batch)?;
    let root = root_name();
    store.add_root(&root, &distinct)?;
    drop(store);
    let store_ms = ms(storing);

    let manifest_bytes = manifest.encode();
    write_atomic(&dir.join(MANIFEST_FILE), &manifest_bytes)?;
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
        root,
        manifest_blake3: blake3::hash(&manifest_bytes).to_hex().to_string(),
    };
    write_atomic(&dir.join(STATE_FILE), &format::encode(&state))?;
    drop(virtio_lock);
    Ok(SaveReport {
        dir: absolute(dir),
        store: absolute(store_dir),
        pages: counts.total,
        zero_pages: counts.zero,
        distinct_pages: counts.distinct,
        rehashed_pages: rehashed,
        new_pages,
        bytes_written: new_pages * PAGE_SIZE as u64,
        state_ms,
        hash_ms,
        store_ms,
        total_ms: ms(started),
    })
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
        // SAFETY: the mapping is live for as long as `memory` is borrowed, and nothing writes
        // guest memory while we read it: every vCPU is paused and no device does DMA.
        slices.push(unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) });
    }
    (regions, slices)
}

fn prepare_dir(dir: &Path) -> Result<(), SaveError> {
    let err = |reason: String| SaveError::Dir {
        path: dir.to_path_buf(),
        reason,
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(err("exists and is not empty".into()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SaveError> {
    let err = |source| SaveError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp).map_err(err)?;
        file.write_all(bytes).map_err(err)?;
        file.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
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
