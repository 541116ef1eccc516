//! A snapshot's memory image: one sparse file per snapshot and host (zero pages are holes),
//! built once from the store and mapped copy-on-write by every VM restored from it, so
//! untouched pages exist once in the host's page cache.
//!
//! Single flight across processes: `<hash>.lock` next to the image is flock'd by the one
//! process building it, which writes `.<hash>.<pid>.tmp` and renames it to `<hash>.img`;
//! the others wait on the lock and then map the finished file. A builder killed half way
//! leaves only a `.tmp` (never an `.img`), deleted by the next builder under the lock.
//!
//! Images live in `$FABVM_IMAGE_DIR`, else `/dev/shm/fabvm-<uid>` (tmpfs: page-cache speed,
//! gone at reboot so never torn by a power cut, and shmem, which lets lazy restores share
//! it, see [`super::lazy`]), else `STORE/images` (synced before the rename).

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fabric::{PageId, Store, PAGE_SIZE};
use rayon::prelude::*;

use super::open_store;
use super::restore::{Loaded, RestoreError};

/// Pages read and written per task of a build (2 MiB).
pub const CHUNK_PAGES: usize = 512;
/// How long a restore waits for another process building the same image.
const BUILD_WAIT: Duration = Duration::from_secs(120);
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The directory holding memory images for snapshots whose pages are in `store`, created
/// private (mode 0700) if missing; refused if another user could write into it.
pub fn dir(store: &Path) -> Result<PathBuf, RestoreError> {
    let dir = match std::env::var_os("FABVM_IMAGE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None if is_tmpfs(Path::new("/dev/shm")) => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            PathBuf::from(format!("/dev/shm/fabvm-{}", unsafe { libc::geteuid() }))
        }
        None => store.join("images"),
    };
    let err = |source| RestoreError::Image {
        path: dir.clone(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(err)?;
    let meta = fs::metadata(&dir).map_err(err)?;
    // SAFETY: as above.
    let ours = meta.uid() == unsafe { libc::geteuid() };
    if !ours || meta.mode() & 0o022 != 0 {
        return Err(err(std::io::Error::other(
            "image directory must belong to this user and not be writable by others",
        )));
    }
    Ok(dir)
}

/// Whether `path` is on tmpfs (shmem: userfaultfd can serve a private mapping of it).
pub fn is_tmpfs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into `buf`, which is a properly sized statfs.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `buf` is writable.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    rc == 0 && buf.f_type as i64 == TMPFS_MAGIC
}

/// The image path of a snapshot in `dir`.
pub fn path(dir: &Path, loaded: &Loaded) -> PathBuf {
    dir.join(format!("{}.img", loaded.manifest_blake3))
}

/// The finished image of the snapshot whose manifest hashes to `manifest_blake3`, if this
/// host has one (the fast path of a restore: no manifest needed to map it).
pub fn existing(store: &Path, manifest_blake3: &str) -> Result<Option<PathBuf>, RestoreError> {
    let image = dir(store)?.join(format!("{manifest_blake3}.img"));
    Ok(image.exists().then_some(image))
}

/// Opens an image to map it, with a shared flock held as long as the file (or a clone of
/// it, such as the one a mapping keeps) is open: [`remove_unused`] leaves such images alone.
pub fn open_in_use(path: &Path) -> std::io::Result<File> {
    let file = File::open(path)?;
    mark_in_use(&file)?;
    Ok(file)
}

/// Takes the shared "in use" flock on an open image.
pub fn mark_in_use(file: &File) -> std::io::Result<()> {
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes the images in `dir` that no running VM maps (for `fabvm store gc`): on tmpfs each
/// holds RAM. Returns how many were deleted and their bytes.
pub fn remove_unused(dir: &Path) -> (u64, u64) {
    let (mut count, mut bytes) = (0, 0);
    let Ok(entries) = fs::read_dir(dir) else {
        return (0, 0);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "img") {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // SAFETY: flock only reads the descriptor, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        let size = file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        if fs::remove_file(&path).is_ok() {
            count += 1;
            bytes += size;
        }
    }
    (count, bytes)
}

/// The build lock of one image, held while it is built.
#[derive(Debug)]
pub struct BuildLock {
    _file: File,
    dir: PathBuf,
    hash: String,
}

/// What a restore found when it came to an image.
#[derive(Debug)]
pub enum Claim {
    /// The image exists: map it.
    Ready(PathBuf),
    /// No image: this process holds the lock and must build it.
    Build(BuildLock),
}

/// Returns the finished image, waiting while another process builds it, or the lock to
/// build it under.
pub fn claim(dir: &Path, loaded: &Loaded) -> Result<Claim, RestoreError> {
    let image = path(dir, loaded);
    if image.exists() {
        return Ok(Claim::Ready(image));
    }
    let lock_path = dir.join(format!("{}.lock", loaded.manifest_blake3));
    let err = |source| RestoreError::Image {
        path: lock_path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(err)?;
    let deadline = Instant::now() + BUILD_WAIT;
    let mut waited = false;
    loop {
        // SAFETY: flock only reads the descriptor, which `file` keeps open; the lock goes
        // with the file (also when the process dies).
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err(e));
        }
        if Instant::now() >= deadline {
            return Err(err(std::io::Error::other(
                "another process has been building this image for too long",
            )));
        }
        waited = true;
        std::thread::sleep(Duration::from_millis(2));
    }
    if waited {
        log::debug!(target: "fabvm::timing", "waited for another process's image build");
    }
    if image.exists() {
        return Ok(Claim::Ready(image));
    }
    let lock = BuildLock {
        _file: file,
        dir: dir.to_path_buf(),
        hash: loaded.manifest_blake3.clone(),
    };
    lock.remove_stale();
    Ok(Claim::Build(lock))
}

impl BuildLock {
    /// The temporary file this process builds into.
    pub fn tmp_path(&self) -> PathBuf {
        self.dir
            .join(format!(".{}.{}.tmp", self.hash, std::process::id()))
    }

    /// Creates the temporary image, `mem` bytes of holes.
    pub fn create_tmp(&self, mem: u64) -> Result<File, RestoreError> {
        let tmp = self.tmp_path();
        let err = |source| RestoreError::Image {
            path: tmp.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        file.set_len(mem).map_err(err)?;
        Ok(file)
    }

    /// Makes the finished temporary image the image (synced first unless on tmpfs, which
    /// does not outlive a crash of the host); the lock is released when `self` drops.
    pub fn publish(self, file: &File) -> Result<PathBuf, RestoreError> {
        let tmp = self.tmp_path();
        let image = self.dir.join(format!("{}.img", self.hash));
        let err = |source| RestoreError::Image {
            path: image.clone(),
            source,
        };
        if !is_tmpfs(&self.dir) {
            file.sync_all().map_err(err)?;
        }
        fs::rename(&tmp, &image).map_err(err)?;
        Ok(image)
    }

    /// Deletes what builders of this image that died left behind.
    fn remove_stale(&self) {
        let prefix = format!(".{}.", self.hash);
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                log::info!("removing {name}, left by an image build that did not finish");
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        // A build that failed leaves nothing behind (a published one was renamed away).
        let _ = fs::remove_file(self.tmp_path());
    }
}

/// The memory image of a snapshot, built from the store unless it exists (concurrent
/// callers on one host build it once), opened and marked in use.
pub fn ensure(loaded: &Loaded, store_dir: &Path) -> Result<(PathBuf, File), RestoreError> {
    let dir = dir(store_dir)?;
    let lock = match claim(&dir, loaded)? {
        Claim::Ready(image) => {
            let file = open_in_use(&image).map_err(|source| RestoreError::Image {
                path: image.clone(),
                source,
            })?;
            return Ok((image, file));
        }
        Claim::Build(lock) => lock,
    };
    let started = Instant::now();
    let cpu = cpu_time();
    let store = open_store(store_dir).map_err(|source| RestoreError::Store {
        store: store_dir.to_path_buf(),
        source,
    })?;
    let opened = started.elapsed();
    let file = lock.create_tmp(loaded.state.mem)?;
    mark_in_use(&file).map_err(|source| RestoreError::Image {
        path: lock.tmp_path(),
        source,
    })?;
    let pages = plan(loaded);
    fill(&store, &file, &pages, store_dir, &lock.tmp_path())?;
    drop(store);
    let filled = started.elapsed();
    let image = lock.publish(&file)?;
    log::debug!(
        target: "fabvm::timing",
        "image built: {} pages, store open {opened:?}, filled {filled:?}, published {:?}, cpu {:?}",
        pages.len(),
        started.elapsed(),
        cpu_time().saturating_sub(cpu)
    );
    Ok((image, file))
}

/// The image's non-zero pages: (page index in the file, identity), in file order.
pub fn plan(loaded: &Loaded) -> Vec<(u64, PageId)> {
    let mut pages = Vec::new();
    let mut base = 0u64;
    for (index, region) in loaded.manifest.regions().enumerate() {
        let ids = loaded.manifest.region_ids(index).unwrap_or_default();
        pages.extend(
            ids.iter()
                .enumerate()
                .filter_map(|(i, id)| id.map(|id| (base + i as u64, id))),
        );
        base += region.bytes() / PAGE_SIZE as u64;
    }
    pages
}

/// Writes `pages` into `file` from the store, every page checked against its identity:
/// chunks in parallel, one write per run of consecutive pages.
pub fn fill(
    store: &Store,
    file: &File,
    pages: &[(u64, PageId)],
    store_dir: &Path,
    file_path: &Path,
) -> Result<(), RestoreError> {
    pages
        .par_chunks(CHUNK_PAGES)
        .try_for_each_init(
            || vec![0u8; CHUNK_PAGES * PAGE_SIZE],
            |buf, chunk| fill_chunk(store, file, chunk, buf),
        )
        .map_err(|e| match e {
            ChunkError::Store(source) => RestoreError::Store {
                store: store_dir.to_path_buf(),
                source,
            },
            ChunkError::Write(source) => RestoreError::Image {
                path: file_path.to_path_buf(),
                source,
            },
        })
}

/// Why a chunk could not be written (mapped to [`RestoreError`] by the caller).
#[derive(Debug)]
pub enum ChunkError {
    /// Reading from the store.
    Store(fabric::StoreError),
    /// Writing the image.
    Write(std::io::Error),
}

/// Reads one chunk's pages and writes them in runs of consecutive file pages.
pub fn fill_chunk(
    store: &Store,
    file: &File,
    chunk: &[(u64, PageId)],
    buf: &mut [u8],
) -> Result<(), ChunkError> {
    let ids: Vec<PageId> = chunk.iter().map(|&(_, id)| id).collect();
    store
        .get_run(&ids, &mut buf[..chunk.len() * PAGE_SIZE])
        .map_err(ChunkError::Store)?;
    let mut start = 0;
    while start < chunk.len() {
        let mut end = start + 1;
        while end < chunk.len() && chunk[end].0 == chunk[end - 1].0 + 1 {
            end += 1;
        }
        file.write_all_at(
            &buf[start * PAGE_SIZE..end * PAGE_SIZE],
            chunk[start].0 * PAGE_SIZE as u64,
        )
        .map_err(ChunkError::Write)?;
        start = end;
    }
    Ok(())
}

/// CPU time (user and system) of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes only into `usage`, a properly sized rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_images_are_removed_and_mapped_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["used.img", "unused.img", "other.lock"] {
            fs::write(dir.path().join(name), [1u8; 4096]).unwrap();
        }
        let held = open_in_use(&dir.path().join("used.img")).unwrap();
        let clone = held.try_clone().unwrap();
        drop(held);
        let (count, bytes) = remove_unused(dir.path());
        assert_eq!(count, 1);
        assert!(bytes >= 4096);
        assert!(dir.path().join("used.img").exists(), "a mapped image stays");
        assert!(!dir.path().join("unused.img").exists());
        assert!(dir.path().join("other.lock").exists());
        drop(clone);
        assert_eq!(remove_unused(dir.path()).0, 1);
        assert!(!dir.path().join("used.img").exists());
    }
}
