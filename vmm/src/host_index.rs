//! The VMs running on this host: each fabvm registers its guest RAM (host addresses,
//! `PID.json`) and publishes its live page identities (`PID.ids`, see `memory::identities`)
//! in a runtime directory; a reader (a migration destination through
//! [`crate::host_pages::HostPages`], the sharing leader, the host figures) learns what they
//! hold from those tables, without hashing their memory, and copies pages out through
//! `/proc/PID/mem` (`read_remote`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use fabric::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Errors from the host index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The registry directory cannot be written.
    #[error("VM registry {path}: {source}")]
    Registry { path: PathBuf, source: io::Error },
}

/// One RAM region of a running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredRegion {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Host virtual address of its mapping in the VM's process.
    pub host_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A running VM as registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredVm {
    /// fabvm's process id.
    pub pid: u32,
    /// Its guest RAM.
    pub regions: Vec<RegisteredRegion>,
    /// Its API socket, if it serves one (the host agent migrates VMs through it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_sock: Option<PathBuf>,
}

impl RegisteredVm {
    /// Copies the page at guest frame `gfn` of this VM into `out` (one page); false when
    /// the frame is not in its RAM or the VM is gone.
    pub fn read_page(&self, gfn: u64, out: &mut [u8]) -> bool {
        let addr = gfn * PAGE_SIZE as u64;
        self.regions
            .iter()
            .find(|r| addr >= r.guest_addr && addr - r.guest_addr < r.len)
            .is_some_and(|r| {
                read_remote(
                    self.pid,
                    r.host_addr + (addr - r.guest_addr),
                    &mut out[..PAGE_SIZE],
                )
                .is_ok()
            })
    }
}

/// The registry directory: `$FABVM_RUNTIME_DIR`, else `/run/fabvm/vms` as root, else
/// `$XDG_RUNTIME_DIR/fabvm/vms`, else the temp dir.
pub fn registry_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FABVM_RUNTIME_DIR") {
        return PathBuf::from(dir).join("vms");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/fabvm/vms");
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("fabvm/vms")
}

/// Where the VM of process `pid` publishes its identity table: `PID.ids` in the registry.
pub fn table_path(pid: u32) -> PathBuf {
    registry_dir().join(format!("{pid}.ids"))
}

/// This VM's registration; removed when dropped.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
}

impl Registration {
    /// Registers this process's guest memory and API socket (absolute).
    pub fn new(memory: &GuestMemory, api_sock: Option<&Path>) -> Result<Self, IndexError> {
        let dir = registry_dir();
        let err = |source| IndexError::Registry {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(err)?;
        let vm = RegisteredVm {
            pid: std::process::id(),
            regions: memory
                .iter()
                .map(|r| RegisteredRegion {
                    guest_addr: r.start_addr().0,
                    host_addr: r.as_ptr() as u64,
                    len: r.len(),
                })
                .collect(),
            api_sock: api_sock.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
        };
        let path = dir.join(format!("{}.json", vm.pid));
        let tmp = dir.join(format!(".{}.tmp", vm.pid));
        fs::write(&tmp, serde_json::to_vec(&vm).expect("serializes")).map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)?;
        Ok(Self { path })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The VMs registered on this host, except `except` (our own pid); entries of processes that
/// are gone are removed.
pub fn running_vms(except: Option<u32>) -> Vec<RegisteredVm> {
    let dir = registry_dir();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut vms = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Some(vm) = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<RegisteredVm>(&b).ok())
        else {
            continue;
        };
        if Some(vm.pid) == except {
            continue;
        }
        if !Path::new(&format!("/proc/{}", vm.pid)).exists() {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(table_path(vm.pid));
            continue;
        }
        vms.push(vm);
    }
    vms
}

/// Closes the `/proc/PID/mem` files [`read_remote`] keeps open, on this thread and on every
/// thread of rayon's pool (where batches read), so nothing outlives the reading.
pub(crate) fn close_remote_files() {
    OPEN.with_borrow_mut(Vec::clear);
    rayon::broadcast(|_| OPEN.with_borrow_mut(Vec::clear));
}

/// Reads another process's memory, through `/proc/PID/mem`.
///
/// Not `process_vm_readv`: it pins the pages it copies, and the kernel unshares a page
/// before pinning it read-only if the page is merged by KSM (a KSM page is never exclusive
/// to one process), so reading a `--share` VM's memory that way would undo its merging
/// (measured: ten 128 MiB guests back from 240 MiB to 1240 MiB of PSS after one
/// `fabvm host stats`). `/proc/PID/mem` copies without pinning. Open files are kept per
/// thread, a few at a time.
pub(crate) fn read_remote(pid: u32, addr: u64, out: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const KEEP: usize = 64;
    let file = |fresh: bool| -> io::Result<std::rc::Rc<fs::File>> {
        OPEN.with_borrow_mut(|open| {
            if let Some(i) = open.iter().position(|(p, _)| *p == pid) {
                let (_, file) = open.remove(i);
                if !fresh {
                    open.push((pid, file.clone()));
                    return Ok(file);
                }
            }
            let file = std::rc::Rc::new(fs::File::open(format!("/proc/{pid}/mem"))?);
            if open.len() >= KEEP {
                open.remove(0);
            }
            open.push((pid, file.clone()));
            Ok(file)
        })
    };
    // A kept file may belong to an earlier process with this pid: retry once with a new one.
    let mut result = file(false)?.read_exact_at(out, addr);
    if result.is_err() {
        result = file(true)?.read_exact_at(out, addr);
    }
    result
}

thread_local! {
    /// `/proc/PID/mem` files [`read_remote`] keeps open on this thread, most recent last.
    static OPEN: std::cell::RefCell<Vec<(u32, std::rc::Rc<fs::File>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}
