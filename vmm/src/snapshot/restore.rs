//! Starting from a snapshot: the state file and manifest are read and checked as untrusted
//! input, guest memory is mapped copy-on-write (`MAP_PRIVATE`) from an image file built once
//! per snapshot and host ([`super::image`]), so VMs restored from one snapshot share its
//! untouched pages.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use fabric::{DecodeLimits, Manifest};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use super::format::{self, FormatError, SnapshotState};
use super::{MANIFEST_FILE, STATE_FILE};
use crate::config::MAX_CPUS;
use crate::layout;
use crate::memory::GuestMemory;

/// Errors from loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A snapshot file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is larger than any valid one.
    #[error("{0} is too large to be a snapshot file")]
    TooLarge(PathBuf),
    /// The state file is invalid.
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: FormatError },
    /// The manifest is invalid.
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        source: fabric::ManifestError,
    },
    /// The manifest is not the one the state file was written with.
    #[error("{0}: does not belong to this snapshot (checksum differs from the state file's)")]
    ManifestMismatch(PathBuf),
    /// The state is self-inconsistent or not something this fabvm can run.
    #[error("snapshot {dir}: {reason}")]
    Inconsistent { dir: PathBuf, reason: String },
    /// The store lacks a page or failed.
    #[error("page store {store}: {source}")]
    Store {
        store: PathBuf,
        source: fabric::StoreError,
    },
    /// Building or mapping the memory image failed.
    #[error("memory image {path}: {source}")]
    Image {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A snapshot read from disk and checked.
#[derive(Debug)]
pub struct Loaded {
    /// The state file.
    pub state: SnapshotState,
    /// The memory manifest.
    pub manifest: Manifest,
    /// The manifest file's bytes' blake3 (names the memory image).
    pub manifest_blake3: String,
}

/// Reads and checks a snapshot directory.
pub fn load(dir: &Path) -> Result<Loaded, RestoreError> {
    let state = load_state(dir)?;
    let (manifest, manifest_blake3) = load_manifest(dir, &state.manifest_blake3)?;
    Loaded::new(dir, state, manifest, manifest_blake3)
}

impl Loaded {
    /// Puts a state file and its manifest (from [`load_state`], [`load_manifest`]) together,
    /// checking that they agree.
    pub fn new(
        dir: &Path,
        state: SnapshotState,
        manifest: Manifest,
        manifest_blake3: String,
    ) -> Result<Loaded, RestoreError> {
        check(dir, &state, &manifest)?;
        Ok(Loaded {
            state,
            manifest,
            manifest_blake3,
        })
    }
}

/// Reads and decodes a snapshot's state file.
pub fn load_state(dir: &Path) -> Result<SnapshotState, RestoreError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = read_limited(&state_path, format::MAX_BODY + 64)?;
    format::decode(&bytes).map_err(|source| RestoreError::Format {
        path: state_path,
        source,
    })
}

/// Reads a snapshot's manifest, which must hash to `expected` (the state file's), and
/// decodes it; returns it with that hash.
pub fn load_manifest(dir: &Path, expected: &str) -> Result<(Manifest, String), RestoreError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let limits = DecodeLimits::default();
    let manifest_bytes = read_limited(&manifest_path, limits.max_pages * 40 + (1 << 20))?;
    let manifest_blake3 = blake3::hash(&manifest_bytes).to_hex().to_string();
    if manifest_blake3 != expected {
        return Err(RestoreError::ManifestMismatch(manifest_path));
    }
    let manifest =
        Manifest::decode(&manifest_bytes, &limits).map_err(|source| RestoreError::Manifest {
            path: manifest_path,
            source,
        })?;
    Ok((manifest, manifest_blake3))
}

fn check(dir: &Path, state: &SnapshotState, manifest: &Manifest) -> Result<(), RestoreError> {
    let bad = |reason: String| RestoreError::Inconsistent {
        dir: dir.to_path_buf(),
        reason,
    };
    if state.cpus == 0 || state.cpus > MAX_CPUS || state.vcpus.len() != state.cpus as usize {
        return Err(bad(format!(
            "{} vCPUs with {} vCPU states",
            state.cpus,
            state.vcpus.len()
        )));
    }
    if state.mem < layout::MIN_MEM
        || state.mem > layout::MAX_MEM
        || !state.mem.is_multiple_of(layout::PAGE_SIZE)
    {
        return Err(bad(format!("memory size {} is out of range", state.mem)));
    }
    let expected: Vec<(u64, u64)> = layout::ram_regions(state.mem);
    let regions: Vec<(u64, u64)> = state
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.bytes()))
        .collect();
    let in_manifest: Vec<(u64, u64)> = manifest
        .regions()
        .map(|r| (r.guest_addr, r.bytes()))
        .collect();
    if regions != expected || in_manifest != expected {
        return Err(bad("memory regions do not match its memory size".into()));
    }
    Ok(())
}

/// Reads a file of at most `limit` bytes.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, RestoreError> {
    let err = |source| RestoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    if len > limit {
        return Err(RestoreError::TooLarge(path.to_path_buf()));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(err)?;
    Ok(bytes)
}

/// Maps the image copy-on-write as guest memory, region after region.
pub fn map_image(image: &Path, state: &SnapshotState) -> Result<GuestMemory, RestoreError> {
    let file = super::image::open_in_use(image).map_err(|source| RestoreError::Image {
        path: image.to_path_buf(),
        source,
    })?;
    map_file(&file, image, state)
}

/// [`map_image`] of an open image file (`image` names it in errors).
pub fn map_file(
    file: &File,
    image: &Path,
    state: &SnapshotState,
) -> Result<GuestMemory, RestoreError> {
    let img_err = |source| RestoreError::Image {
        path: image.to_path_buf(),
        source,
    };
    if file.metadata().map_err(img_err)?.len() != state.mem {
        return Err(img_err(std::io::Error::other(
            "size differs from the snapshot's memory",
        )));
    }
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for region in &state.regions {
        let size = region.bytes() as usize;
        let file = file.try_clone().map_err(img_err)?;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| img_err(std::io::Error::other(e.to_string())))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr))
            .ok_or_else(|| img_err(std::io::Error::other("region wraps the address space")))?;
        regions.push(region);
        offset += size as u64;
    }
    GuestMemory::from_regions(regions).map_err(|e| img_err(std::io::Error::other(e.to_string())))
}
