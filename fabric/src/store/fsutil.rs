//! File system plumbing for the store: the process lock, directory syncs, atomic file
//! replacement, and where a store lives by default.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::StoreError;

/// Where a store lives when no `--store` is given: `/var/lib/fabvm/store` for root,
/// otherwise `$XDG_DATA_HOME/fabvm/store` (falling back to `~/.local/share/fabvm/store`).
pub fn default_dir() -> PathBuf {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    let euid = unsafe { libc::geteuid() };
    dir_for(
        euid,
        std::env::var_os("XDG_DATA_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// [`default_dir`] as a pure function of the user and environment.
fn dir_for(euid: u32, xdg_data_home: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/var/lib/fabvm/store");
    }
    // The XDG spec says relative values are invalid and must be ignored.
    let data_home = xdg_data_home
        .filter(|p| p.is_absolute())
        .or_else(|| home.map(|h| h.join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    data_home.join("fabvm/store")
}

/// Wraps an I/O error with what was being done and to which path.
pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// How long `lock` retries a held lock before giving up.
///
/// Not zero because a lock can be held for a moment by someone else's child: a process
/// that forks while holding the store shares the lock's open file until the child execs.
const LOCK_WAIT: Duration = Duration::from_millis(500);

/// Takes the store's exclusive lock (`LOCK` in `dir`), retrying for up to half a second.
pub(crate) fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("create", &path))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps open for the
        // duration of the call; the lock is released when `file` is closed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_err("lock", &path)(err));
        }
        if Instant::now() >= deadline {
            return Err(StoreError::Busy(dir.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Makes the entries of `dir` (created, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// Replaces `path` with `bytes` atomically: a reader (or a reopen after a crash) sees
/// either the old file or the new one, whole. `path` must have a parent directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = tmp_path(path);
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("sync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("rename", &tmp))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The temporary name [`write_atomic`] uses for `path`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Size of `path` in bytes, 0 when it does not exist.
pub(crate) fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Opens an existing file for reading and writing.
pub(crate) fn open_rw(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dir_rules() {
        assert_eq!(
            dir_for(0, Some("/x".into()), Some("/home/a".into())),
            PathBuf::from("/var/lib/fabvm/store")
        );
        assert_eq!(
            dir_for(1000, Some("/x".into()), Some("/home/a".into())),
            PathBuf::from("/x/fabvm/store")
        );
        assert_eq!(
            dir_for(1000, Some("relative".into()), Some("/home/a".into())),
            PathBuf::from("/home/a/.local/share/fabvm/store")
        );
        assert!(default_dir().ends_with("fabvm/store"));
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        assert!(matches!(lock(dir.path()), Err(StoreError::Busy(_))));
        drop(held);
        lock(dir.path()).unwrap();
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!tmp_path(&path).exists());
        assert_eq!(file_len(&path), 3);
        assert_eq!(file_len(&dir.path().join("none")), 0);
    }
}
