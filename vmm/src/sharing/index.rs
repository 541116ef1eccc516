//! The host-wide view of page identities across the running VMs, for page sharing: every
//! registered VM's keys are read from the identity table it publishes (its live identities,
//! see `memory::identities`); nothing here reads or hashes another VM's memory. The counts
//! say which pages have twins.
//!
//! Identities are kept as [`Key`]s, the first 8 bytes of the blake3 identity: across even
//! 10^7 pages the chance of two different pages sharing a key is about 10^-5, and nothing
//! here trusts a key for content (KSM compares pages byte by byte before it merges them).
//! A page its VM has written since it was hashed keeps its last key: a hint, like the rest.

use std::collections::HashMap;

use fabric::live::{PageState, TableReader, CHUNK_PAGES};
#[cfg(test)]
use fabric::PageId;
use fabric::PAGE_SIZE;

use crate::host_index::{RegisteredRegion, RegisteredVm};

pub use fabric::live::{key_of, Key, ZERO_KEY};

/// One VM's pages as keys, in the order of its registered regions.
#[derive(Debug, Clone)]
pub struct VmPages {
    /// The VM's process.
    pub pid: u32,
    /// Its RAM regions.
    pub regions: Vec<RegisteredRegion>,
    /// One key per page.
    pub keys: Vec<Key>,
    /// Pages whose identity is stale (written since last hashed: their key is a hint).
    pub stale: u64,
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

/// The keys `vm` publishes in its identity table (`None`: no table, or its process is
/// gone).
pub fn vm_pages(vm: &RegisteredVm) -> Option<VmPages> {
    open_table(vm).map(|table| read_pages(vm, &table))
}

/// `vm`'s identity table (`None`: no table, or its process is gone).
pub fn open_table(vm: &RegisteredVm) -> Option<TableReader> {
    let table = TableReader::open(&crate::host_index::table_path(vm.pid)).ok()?;
    (table.pid() == vm.pid && table.owner_alive()).then_some(table)
}

/// The keys in `vm`'s identity `table`.
pub fn read_pages(vm: &RegisteredVm, table: &TableReader) -> VmPages {
    let mut keys = Vec::with_capacity(table.pages());
    let mut entries = Vec::with_capacity(CHUNK_PAGES);
    let mut stale = 0;
    for chunk in 0..table.chunks() {
        let first = chunk * CHUNK_PAGES;
        let end = (first + CHUNK_PAGES).min(table.pages());
        // A chunk its owner keeps rewriting counts as unknown this time (keys are hints).
        if table.read_chunk(chunk, &mut entries).is_none() {
            keys.extend(std::iter::repeat_n(ZERO_KEY, end - first));
            stale += (end - first) as u64;
            continue;
        }
        keys.extend(entries.iter().map(|e| key_of(e.id)));
        stale += entries
            .iter()
            .filter(|e| e.state == PageState::Stale)
            .count() as u64;
    }
    VmPages {
        pid: vm.pid,
        regions: vm.regions.clone(),
        keys,
        stale,
    }
}

/// [`vm_pages`] of each of `vms`.
pub fn published(vms: &[RegisteredVm]) -> Vec<Option<VmPages>> {
    vms.iter().map(vm_pages).collect()
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

/// Potential of one VM against the others: only this VM's keys are indexed, the others'
/// are streamed past them.
pub fn potential_against(own: &VmPages, others: &[VmPages]) -> VmCounts {
    let mut slots: HashMap<Key, usize> = HashMap::new();
    for &key in own.keys.iter().filter(|&&k| k != ZERO_KEY) {
        let next = slots.len();
        slots.entry(key).or_insert(next);
    }
    let mut twin = vec![false; slots.len()];
    for key in others.iter().flat_map(|o| &o.keys) {
        if let Some(&slot) = slots.get(key) {
            twin[slot] = true;
        }
    }
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
        if twin[slot] {
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
    fn potential_counts_twins_in_other_vms_only() {
        let vm = |keys: &[Key]| VmPages {
            pid: 1,
            regions: Vec::new(),
            keys: keys.to_vec(),
            stale: 0,
        };
        let own = vm(&[1, 2, 2, 0, 3]);
        let counts = potential_against(&own, &[vm(&[3, 9]), vm(&[1])]);
        assert_eq!(
            counts,
            VmCounts {
                pages: 5,
                zero_pages: 1,
                potential_pages: 2,
                duplicate_pages: 2,
            }
        );
    }

    #[test]
    fn published_keys_are_read_back() {
        use fabric::live::{IdentityTable, PageState, TableRegion};
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: tests in this module set the variable before anything reads it.
        unsafe { std::env::set_var("FABVM_RUNTIME_DIR", dir.path()) };
        std::fs::create_dir_all(crate::host_index::registry_dir()).unwrap();
        let pid = std::process::id();
        let path = crate::host_index::table_path(pid);
        let region = TableRegion {
            guest_addr: 0x10_0000,
            pages: 600,
            host_addr: 0,
        };
        let mut table = IdentityTable::create(Some(&path), &[region]).unwrap();
        let id = PageId::of(&[7u8; PAGE_SIZE]);
        table.set(513, PageState::Current, Some(id));
        let vm = RegisteredVm {
            pid,
            regions: vec![RegisteredRegion {
                guest_addr: 0x10_0000,
                host_addr: 0,
                len: 600 * PAGE_SIZE as u64,
            }],
            api_sock: None,
        };
        let pages = vm_pages(&vm).unwrap();
        assert_eq!(pages.keys.len(), 600);
        assert_eq!(pages.keys[513], key_of(Some(id)));
        assert_eq!(pages.zero_pages(), 599);
        assert_eq!(pages.gfn(513), 0x100 + 513);
        let other = RegisteredVm { pid: pid + 1, ..vm };
        assert!(vm_pages(&other).is_none(), "no table for that pid");
    }
}
