//! The host-wide index of page identities across the running VMs: every registered VM's
//! memory is read through `/proc/PID/mem` (its own process included, so a guest writing
//! while we read is never a data race in ours) and hashed into fabric identities, on
//! request and spread over worker threads; the counts say which pages have twins.
//!
//! Identities are kept as [`Key`]s, the first 8 bytes of the blake3 identity: across even
//! 10^7 pages the chance of two different pages sharing a key is about 10^-5, and nothing
//! here trusts a key for content (KSM compares pages byte by byte before it merges them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use fabric::{identify, PageId, PAGE_SIZE};

use crate::host_index::{read_remote, RegisteredRegion, RegisteredVm};

/// A page identity shortened to 64 bits; [`ZERO_KEY`] for a zero page.
pub type Key = u64;

/// The key of a zero page.
pub const ZERO_KEY: Key = 0;

/// Pages read and hashed per work item (4 MiB).
const CHUNK_PAGES: usize = 1024;

/// How hashing may use the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    /// On request: one worker per core.
    AllCores,
    /// In the background: one worker, so the cost stays under one core.
    OneCore,
}

impl Effort {
    fn workers(self, items: usize) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        match self {
            Effort::AllCores => cores.min(items).max(1),
            Effort::OneCore => 1,
        }
    }
}

/// The key of a page's identity.
pub fn key_of(id: Option<PageId>) -> Key {
    match id {
        None => ZERO_KEY,
        Some(id) => {
            let mut first = [0u8; 8];
            first.copy_from_slice(&id.as_bytes()[..8]);
            // A non-zero page never gets the zero page's key.
            u64::from_le_bytes(first).max(1)
        }
    }
}

/// One VM's pages as keys, in the order of its registered regions.
#[derive(Debug, Clone)]
pub struct VmPages {
    /// The VM's process.
    pub pid: u32,
    /// Its RAM regions.
    pub regions: Vec<RegisteredRegion>,
    /// One key per page.
    pub keys: Vec<Key>,
}

impl VmPages {
    /// Guest frame number of page `index` (pages numbered across the regions in order).
    pub fn gfn(&self, index: usize) -> u64 {
        gfn_of(&self.regions, index)
    }

    /// Zero pages.
    pub fn zero_pages(&self) -> u64 {
        self.keys.iter().filter(|&&k| k == ZERO_KEY).count() as u64
    }
}

/// Guest frame number of page `index` of `regions`.
pub fn gfn_of(regions: &[RegisteredRegion], mut index: usize) -> u64 {
    for region in regions {
        let pages = (region.len / PAGE_SIZE as u64) as usize;
        if index < pages {
            return region.guest_addr / PAGE_SIZE as u64 + index as u64;
        }
        index -= pages;
    }
    u64::MAX
}

/// Bytes of guest RAM registered for `vm`.
pub fn vm_bytes(vm: &RegisteredVm) -> u64 {
    vm.regions.iter().map(|r| r.len).sum()
}

/// Hashes the memory of `vms`; a VM that cannot be read (it exited meanwhile, or we may not
/// read it) is `None`.
pub fn hash_vms(vms: &[RegisteredVm], effort: Effort) -> Vec<Option<VmPages>> {
    let keys: Vec<Mutex<Vec<Key>>> = vms
        .iter()
        .map(|vm| Mutex::new(vec![ZERO_KEY; (vm_bytes(vm) / PAGE_SIZE as u64) as usize]))
        .collect();
    let ok = for_each_chunk(vms, effort, |vm, first, chunk| {
        let mut keys = keys[vm].lock().unwrap_or_else(|e| e.into_inner());
        keys[first..first + chunk.len()].copy_from_slice(chunk);
    });
    vms.iter()
        .zip(keys)
        .zip(ok)
        .map(|((vm, keys), ok)| {
            ok.then(|| VmPages {
                pid: vm.pid,
                regions: vm.regions.clone(),
                keys: keys.into_inner().unwrap_or_else(|e| e.into_inner()),
            })
        })
        .collect()
}

/// Reads and hashes every VM of `vms` in chunks, calling `each(vm index, first page, keys)`
/// from worker threads; returns, per VM, whether all of it could be read.
pub fn for_each_chunk(
    vms: &[RegisteredVm],
    effort: Effort,
    each: impl Fn(usize, usize, &[Key]) + Sync,
) -> Vec<bool> {
    // Work items: (vm, region, first page of the chunk in the region, first page in the VM).
    let mut items = Vec::new();
    for (v, vm) in vms.iter().enumerate() {
        let mut base = 0;
        for (r, region) in vm.regions.iter().enumerate() {
            let pages = (region.len / PAGE_SIZE as u64) as usize;
            for start in (0..pages).step_by(CHUNK_PAGES) {
                items.push((v, r, start, base + start, (pages - start).min(CHUNK_PAGES)));
            }
            base += pages;
        }
    }
    let failed: Vec<std::sync::atomic::AtomicBool> = vms
        .iter()
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    let next = AtomicUsize::new(0);
    let work = || {
        let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
        let mut keys = vec![ZERO_KEY; CHUNK_PAGES];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(v, r, start, first, pages)) = items.get(i) else {
                break;
            };
            if failed[v].load(Ordering::Relaxed) {
                continue;
            }
            let region = &vms[v].regions[r];
            let bytes = &mut buf[..pages * PAGE_SIZE];
            let addr = region.host_addr + (start * PAGE_SIZE) as u64;
            if read_remote(vms[v].pid, addr, bytes).is_err() {
                failed[v].store(true, Ordering::Relaxed);
                continue;
            }
            for (key, page) in keys.iter_mut().zip(bytes.chunks_exact(PAGE_SIZE)) {
                *key = key_of(identify(page.try_into().expect("one page")));
            }
            each(v, first, &keys[..pages]);
        }
    };
    let workers = effort.workers(items.len());
    std::thread::scope(|scope| {
        for _ in 1..workers {
            scope.spawn(work);
        }
        work();
    });
    failed.iter().map(|f| !f.load(Ordering::Relaxed)).collect()
}

/// How one identity is held across the indexed VMs.
#[derive(Debug, Clone, Copy)]
struct Holders {
    /// Pages with this identity, in every VM.
    pages: u32,
    /// The first VM (index) seen holding it.
    first_vm: u32,
    /// Whether a second VM holds it too.
    several_vms: bool,
}

/// What the index says about one VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmCounts {
    /// Guest pages.
    pub pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Non-zero pages identical to a page of another indexed VM.
    pub potential_pages: u64,
    /// Non-zero pages identical to another page of this VM only.
    pub duplicate_pages: u64,
}

/// What the index says about all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostCounts {
    /// Guest pages of every indexed VM.
    pub pages: u64,
    /// Zero pages among them.
    pub zero_pages: u64,
    /// Distinct non-zero identities.
    pub distinct_pages: u64,
    /// Sum of the VMs' potential pages.
    pub potential_pages: u64,
    /// Pages full merging would free: for each non-zero identity, its copies but one.
    pub saving_pages: u64,
}

/// Counts identities across VMs.
#[derive(Debug, Default)]
pub struct Index {
    holders: HashMap<Key, Holders>,
}

impl Index {
    /// Indexes the keys of each VM (VM index = position in `vms`).
    pub fn new<'a>(vms: impl IntoIterator<Item = &'a [Key]>) -> Self {
        let mut holders: HashMap<Key, Holders> = HashMap::new();
        for (v, keys) in vms.into_iter().enumerate() {
            for &key in keys.iter().filter(|&&k| k != ZERO_KEY) {
                holders
                    .entry(key)
                    .and_modify(|h| {
                        h.pages += 1;
                        h.several_vms |= h.first_vm != v as u32;
                    })
                    .or_insert(Holders {
                        pages: 1,
                        first_vm: v as u32,
                        several_vms: false,
                    });
            }
        }
        Self { holders }
    }

    /// The figures for a VM whose keys are `keys`.
    pub fn vm_counts(&self, keys: &[Key]) -> VmCounts {
        let mut counts = VmCounts {
            pages: keys.len() as u64,
            ..VmCounts::default()
        };
        for key in keys {
            if *key == ZERO_KEY {
                counts.zero_pages += 1;
            } else if let Some(h) = self.holders.get(key) {
                if h.several_vms {
                    counts.potential_pages += 1;
                } else if h.pages > 1 {
                    counts.duplicate_pages += 1;
                }
            }
        }
        counts
    }

    /// Host-wide figures, given the per-VM ones.
    pub fn host_counts(&self, vms: &[VmCounts]) -> HostCounts {
        HostCounts {
            pages: vms.iter().map(|v| v.pages).sum(),
            zero_pages: vms.iter().map(|v| v.zero_pages).sum(),
            distinct_pages: self.holders.len() as u64,
            potential_pages: vms.iter().map(|v| v.potential_pages).sum(),
            saving_pages: self.holders.values().map(|h| u64::from(h.pages - 1)).sum(),
        }
    }
}

/// Potential of one VM against the others without indexing the others' pages: only this
/// VM's keys are held, the others' are streamed past them.
pub fn potential_against(own: &VmPages, others: &[RegisteredVm], effort: Effort) -> VmCounts {
    let mut slots: HashMap<Key, usize> = HashMap::new();
    for &key in own.keys.iter().filter(|&&k| k != ZERO_KEY) {
        let next = slots.len();
        slots.entry(key).or_insert(next);
    }
    let twin: Vec<std::sync::atomic::AtomicBool> = (0..slots.len())
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    for_each_chunk(others, effort, |_, _, keys| {
        for key in keys {
            if let Some(&slot) = slots.get(key) {
                twin[slot].store(true, Ordering::Relaxed);
            }
        }
    });
    let mut seen = vec![0u32; slots.len()];
    for key in own.keys.iter().filter(|&&k| k != ZERO_KEY) {
        seen[slots[key]] += 1;
    }
    let mut counts = VmCounts {
        pages: own.keys.len() as u64,
        zero_pages: own.zero_pages(),
        ..VmCounts::default()
    };
    for key in own.keys.iter().filter(|&&k| k != ZERO_KEY) {
        let slot = slots[key];
        if twin[slot].load(Ordering::Relaxed) {
            counts.potential_pages += 1;
        } else if seen[slot] > 1 {
            counts.duplicate_pages += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_across_vms() {
        // VM 0: a b c 0 c ; VM 1: a d 0 ; VM 2: b a
        let vms: [&[Key]; 3] = [&[1, 2, 3, 0, 3], &[1, 4, 0], &[2, 1]];
        let index = Index::new(vms);
        let counts: Vec<VmCounts> = vms.iter().map(|k| index.vm_counts(k)).collect();
        assert_eq!(
            counts[0],
            VmCounts {
                pages: 5,
                zero_pages: 1,
                potential_pages: 2,
                duplicate_pages: 2,
            }
        );
        assert_eq!(counts[1].potential_pages, 1);
        assert_eq!(counts[2].potential_pages, 2);
        let host = index.host_counts(&counts);
        assert_eq!(host.pages, 10);
        assert_eq!(host.zero_pages, 2);
        assert_eq!(host.distinct_pages, 4);
        assert_eq!(host.potential_pages, 5);
        // a: 3 copies, b: 2, c: 2 -> 2 + 1 + 1 saved.
        assert_eq!(host.saving_pages, 4);
    }

    #[test]
    fn keys_keep_zero_apart() {
        assert_eq!(key_of(None), ZERO_KEY);
        assert_ne!(key_of(Some(PageId([0; 32]))), ZERO_KEY);
        let id = PageId::of(&[7u8; PAGE_SIZE]);
        assert_eq!(
            key_of(Some(id)),
            u64::from_le_bytes(id.as_bytes()[..8].try_into().unwrap())
        );
    }

    #[test]
    fn this_process_is_hashed_and_compared() {
        // Two "VMs" in this process: the same pages at different addresses, one page apart.
        let pages = 2 * CHUNK_PAGES + 3;
        let mut a = vec![0u8; pages * PAGE_SIZE];
        for (i, page) in a.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i % 5 != 0 {
                page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            }
        }
        let mut b = a.clone();
        b[PAGE_SIZE..PAGE_SIZE + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let vm = |mem: &[u8]| RegisteredVm {
            pid: std::process::id(),
            regions: vec![RegisteredRegion {
                guest_addr: 0x10_0000,
                host_addr: mem.as_ptr() as u64,
                len: mem.len() as u64,
            }],
        };
        let vms = [vm(&a), vm(&b)];
        for effort in [Effort::AllCores, Effort::OneCore] {
            let hashed = hash_vms(&vms, effort);
            let own = hashed[0].clone().unwrap();
            assert_eq!(own.keys.len(), pages);
            assert_eq!(own.gfn(0), 0x100);
            let zero = pages.div_ceil(5) as u64;
            assert_eq!(own.zero_pages(), zero);
            let counts = potential_against(&own, &vms[1..], effort);
            assert_eq!(counts.zero_pages, zero);
            assert_eq!(counts.potential_pages, pages as u64 - zero - 1);
            let index = Index::new(hashed.iter().map(|v| v.as_ref().unwrap().keys.as_slice()));
            assert_eq!(index.vm_counts(&own.keys), counts);
        }
        let gone = RegisteredVm {
            pid: u32::MAX / 2,
            regions: vms[0].regions.clone(),
        };
        assert!(hash_vms(&[gone], Effort::OneCore)[0].is_none());
    }
}
