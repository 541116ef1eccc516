//! The range digests of the VMs running on this host (what answers a migration source's
//! range summaries), kept current from their published identity tables one chunk at a time:
//! a refresh costs what changed since the last, not the size of the VMs.

use std::collections::HashMap;

use fabric::live::{HostIndex, CHUNK_PAGES};
use fabric::migration::ranges::RANGE_PAGES;
use fabric::migration::{RangeHolder, RangeIndex};
use fabric::PageId;

// A table chunk is a top-level range: a changed chunk re-digests exactly one range.
const _: () = assert!(CHUNK_PAGES == RANGE_PAGES);

/// Range digests over the running VMs of a [`HostIndex`].
#[derive(Debug, Default)]
pub struct HostRanges {
    index: RangeIndex,
    /// Per VM of the host index: its process, its place in `index` and the chunk
    /// generations its identities were read at.
    vms: HashMap<usize, Tracked>,
}

#[derive(Debug)]
struct Tracked {
    pid: u32,
    holder: Option<RangeHolder>,
    gens: Vec<u64>,
}

impl HostRanges {
    /// Re-reads the chunks of `host`'s tables that changed since the last update (all of a
    /// VM new to it), and forgets VMs no longer there. A chunk the owner is writing is left
    /// for the next update: its old identities still hash to their old digests, and every
    /// page copied by them is confirmed anyway.
    pub fn update(&mut self, host: &HostIndex) {
        let index = &mut self.index;
        self.vms.retain(|&vm, t| {
            let here = host.table(vm).is_some_and(|table| table.pid() == t.pid);
            if !here {
                if let Some(holder) = t.holder {
                    index.remove(holder);
                }
            }
            here
        });
        let mut entries = Vec::new();
        let mut ids: Vec<Option<PageId>> = Vec::new();
        for (vm, table) in host.vms() {
            let t = self.vms.entry(vm).or_insert_with(|| Tracked {
                pid: table.pid(),
                holder: None,
                gens: vec![u64::MAX; table.chunks()],
            });
            let Some(holder) = t.holder else {
                // New here: read it whole, or try again next time.
                ids.clear();
                for chunk in 0..table.chunks() {
                    match table.read_chunk(chunk, &mut entries) {
                        Some(gen) => t.gens[chunk] = gen,
                        None => break,
                    }
                    ids.extend(entries.iter().map(|e| e.id));
                }
                if ids.len() == table.pages() {
                    t.holder = Some(index.add(std::mem::take(&mut ids)));
                }
                continue;
            };
            for chunk in 0..table.chunks() {
                if table.chunk_generation(chunk) == t.gens[chunk] {
                    continue;
                }
                if let Some(gen) = table.read_chunk(chunk, &mut entries) {
                    t.gens[chunk] = gen;
                    ids.clear();
                    ids.extend(entries.iter().map(|e| e.id));
                    index.update(holder, chunk * CHUNK_PAGES, &ids);
                }
            }
        }
    }

    /// The digests.
    pub fn index(&self) -> &RangeIndex {
        &self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric::live::{IdentityTable, PageState, TableReader, TableRegion};
    use fabric::migration::ranges::digest;
    use fabric::PAGE_SIZE;

    fn id(n: u32) -> PageId {
        let mut page = [0u8; PAGE_SIZE];
        page[..4].copy_from_slice(&n.to_le_bytes());
        PageId::of(&page)
    }

    #[test]
    fn ranges_follow_the_tables_chunk_by_chunk_and_forget_vms_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.ids");
        let region = TableRegion {
            guest_addr: 0,
            pages: 2 * RANGE_PAGES as u64,
            host_addr: 0,
        };
        let mut owner = IdentityTable::create(Some(&path), &[region]).unwrap();
        let mut ids: Vec<Option<PageId>> =
            (0..2 * RANGE_PAGES as u32).map(|p| Some(id(p))).collect();
        for (p, i) in ids.iter().enumerate() {
            owner.set(p, PageState::Current, *i);
        }
        let mut host = HostIndex::new();
        let vm = host.add(TableReader::open(&path).unwrap());
        let mut ranges = HostRanges::default();
        ranges.update(&host);
        let (first, second) = ids.split_at(RANGE_PAGES);
        let (first, second) = (first.to_vec(), second.to_vec());
        assert!(ranges.index().get(&digest(&first), RANGE_PAGES).is_some());
        assert!(ranges.index().get(&digest(&second), RANGE_PAGES).is_some());

        // One page of the second range changes: that range is found by its new digest only,
        // the first is untouched.
        owner.set(RANGE_PAGES + 7, PageState::Current, Some(id(99_999)));
        ids[RANGE_PAGES + 7] = Some(id(99_999));
        host.refresh();
        ranges.update(&host);
        let changed = &ids[RANGE_PAGES..];
        assert_eq!(ranges.index().get(&digest(&second), RANGE_PAGES), None);
        assert_eq!(
            ranges.index().get(&digest(changed), RANGE_PAGES),
            Some(changed)
        );
        assert!(ranges.index().get(&digest(&first), RANGE_PAGES).is_some());

        // The VM goes away: nothing of it is found.
        host.drop_vm(vm);
        ranges.update(&host);
        assert!(ranges.index().is_empty());
    }
}
