//! The VMs running on this host and the pages they hold. Each fabvm registers its guest RAM
//! (host addresses) in a runtime directory; a reader (a migration destination, or the
//! sharing report) hashes their memory through `/proc/PID/mem` and copies pages out of them,
//! re-verifying each page against its identity at copy time, since a running guest may have
//! rewritten it since it was hashed.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use fabric::{hash_region, PageId, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Bytes read and hashed at a time.
const CHUNK: usize = 16 << 20;

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

/// This VM's registration; removed when dropped.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
}

impl Registration {
    /// Registers this process's guest memory.
    pub fn new(memory: &GuestMemory) -> Result<Self, IndexError> {
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
            continue;
        }
        vms.push(vm);
    }
    vms
}

/// Where a page can be found in another VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The VM's process.
    pub pid: u32,
    /// Host address of the page in that process.
    pub host_addr: u64,
}

/// Identities of the pages held by running VMs, hashed now.
#[derive(Debug, Default)]
pub struct RunningPages {
    pages: HashMap<PageId, Location>,
    /// Bytes of memory read and hashed to build the index.
    pub bytes_hashed: u64,
}

impl RunningPages {
    /// Hashes the memory of `vms` (one location kept per distinct page).
    pub fn hash(vms: &[RegisteredVm]) -> Self {
        let mut index = Self::default();
        let mut buf = vec![0u8; CHUNK];
        for vm in vms {
            for region in &vm.regions {
                let mut offset = 0;
                while offset < region.len {
                    let len = (region.len - offset).min(CHUNK as u64) as usize;
                    let host = region.host_addr + offset;
                    if read_remote(vm.pid, host, &mut buf[..len]).is_err() {
                        break; // the VM went away or unmapped: skip the rest of it
                    }
                    index.bytes_hashed += len as u64;
                    if let Ok(ids) = hash_region(&buf[..len]) {
                        for (i, id) in ids.into_iter().enumerate() {
                            if let Some(id) = id {
                                index.pages.entry(id).or_insert(Location {
                                    pid: vm.pid,
                                    host_addr: host + (i * PAGE_SIZE) as u64,
                                });
                            }
                        }
                    }
                    offset += len as u64;
                }
            }
        }
        index
    }

    /// Distinct non-zero pages known.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True when no page is known.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Whether a page with identity `id` was seen.
    pub fn contains(&self, id: &PageId) -> bool {
        self.pages.contains_key(id)
    }

    /// Copies the page `id` into `out` from the VM holding it, if it still has that content.
    pub fn fetch(&self, id: &PageId, out: &mut [u8]) -> bool {
        let Some(location) = self.pages.get(id) else {
            return false;
        };
        read_remote(location.pid, location.host_addr, &mut out[..PAGE_SIZE]).is_ok()
            && PageId::of(out[..PAGE_SIZE].try_into().expect("one page")) == *id
    }
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
    thread_local! {
        static OPEN: std::cell::RefCell<Vec<(u32, std::rc::Rc<fs::File>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_a_registered_process_are_found_and_reverified() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: tests in this module set the variable before anything reads it.
        unsafe { std::env::set_var("FABVM_RUNTIME_DIR", dir.path()) };
        let memory =
            GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
        let page = [0x5au8; PAGE_SIZE];
        vm_memory::Bytes::write_slice(
            &memory,
            &page,
            vm_memory::GuestAddress(3 * PAGE_SIZE as u64),
        )
        .unwrap();
        let registration = Registration::new(&memory).unwrap();
        // Our own process is a fine "other VM" for the reader.
        let vms = running_vms(None);
        assert_eq!(vms.len(), 1);
        let index = RunningPages::hash(&vms);
        let id = PageId::of(&page);
        assert!(index.contains(&id));
        assert_eq!(index.len(), 1, "zero pages are not indexed");
        let mut out = vec![0u8; PAGE_SIZE];
        assert!(index.fetch(&id, &mut out));
        assert_eq!(out, page);
        // The page changes after indexing: fetch refuses it.
        vm_memory::Bytes::write_slice(
            &memory,
            &[1u8],
            vm_memory::GuestAddress(3 * PAGE_SIZE as u64),
        )
        .unwrap();
        assert!(!index.fetch(&id, &mut out));
        assert!(running_vms(Some(std::process::id())).is_empty());
        drop(registration);
        assert!(running_vms(None).is_empty());
    }
}
