//! The host index: where on this host a page with a given identity can be found, built from
//! the identity tables the VMs running here publish (no reader hashes another VM's memory)
//! and kept current by re-reading only the chunks whose generation moved.
//!
//! Entries are keyed by the first 8 bytes of the identity ([`key_of`]); a lookup confirms
//! the whole identity against the table before it answers, and whoever copies the page
//! verifies its content, so a collision or a page rewritten since costs a miss, never a
//! wrong page.

use std::collections::HashMap;

use super::reader::TableReader;
use super::table::{Entry, PageState, CHUNK_PAGES};
use crate::identity::PageId;

/// An identity shortened to 64 bits; [`ZERO_KEY`] for a zero page.
pub type Key = u64;

/// The key of a zero page (and of a page with no identity).
pub const ZERO_KEY: Key = 0;

/// The key of an identity (`None`: zero page).
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

/// Where a page is: page `page` (table index) of indexed VM `vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    /// Index of the VM in the host index.
    pub vm: usize,
    /// Index of the page in that VM's table.
    pub page: usize,
}

/// What a refresh did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RefreshStats {
    /// Chunks re-read because their generation moved.
    pub chunks_read: u64,
    /// Chunks skipped because the owner was writing them (read next time).
    pub chunks_busy: u64,
    /// VMs dropped because their process is gone.
    pub vms_dropped: u64,
}

/// Page counts of one indexed VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmCounts {
    /// Pages in its table.
    pub pages: u64,
    /// Of those, zero pages.
    pub zero: u64,
    /// Non-zero pages hashed since last written.
    pub current: u64,
    /// Pages written since last hashed.
    pub stale: u64,
}

#[derive(Debug)]
struct IndexedVm {
    table: TableReader,
    /// Generation each chunk was read at (`u64::MAX`: never read).
    chunk_gens: Vec<u64>,
    /// Each page's key as last read.
    keys: Vec<Key>,
    counts: VmCounts,
    states: Vec<PageState>,
}

/// The host index over some published identity tables.
#[derive(Debug, Default)]
pub struct HostIndex {
    vms: Vec<Option<IndexedVm>>,
    map: HashMap<Key, Location>,
    scratch: Vec<Entry>,
}

impl HostIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a VM's table and reads it; returns its index.
    pub fn add(&mut self, table: TableReader) -> usize {
        let pages = table.pages();
        let chunks = table.chunks();
        self.vms.push(Some(IndexedVm {
            table,
            chunk_gens: vec![u64::MAX; chunks],
            keys: vec![ZERO_KEY; pages],
            counts: VmCounts {
                pages: pages as u64,
                zero: pages as u64,
                ..VmCounts::default()
            },
            states: vec![PageState::Zero; pages],
        }));
        let vm = self.vms.len() - 1;
        self.refresh_vm(vm);
        vm
    }

    /// The VMs indexed and still alive, by index.
    pub fn vms(&self) -> impl Iterator<Item = (usize, &TableReader)> + '_ {
        self.vms
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (i, &v.table)))
    }

    /// VM `vm`'s table, if it is still indexed.
    pub fn table(&self, vm: usize) -> Option<&TableReader> {
        self.vms.get(vm)?.as_ref().map(|v| &v.table)
    }

    /// VM `vm`'s page keys as last read (one per table page).
    pub fn keys(&self, vm: usize) -> Option<&[Key]> {
        self.vms.get(vm)?.as_ref().map(|v| v.keys.as_slice())
    }

    /// VM `vm`'s counts as last read.
    pub fn counts(&self, vm: usize) -> Option<VmCounts> {
        self.vms.get(vm)?.as_ref().map(|v| v.counts)
    }

    /// Distinct non-zero keys known.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no page is known.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Re-reads every chunk whose generation moved, and drops VMs whose process is gone.
    pub fn refresh(&mut self) -> RefreshStats {
        let mut stats = RefreshStats::default();
        for vm in 0..self.vms.len() {
            let Some(v) = &self.vms[vm] else { continue };
            if !v.table.owner_alive() {
                self.drop_vm(vm);
                stats.vms_dropped += 1;
                continue;
            }
            let s = self.refresh_vm(vm);
            stats.chunks_read += s.chunks_read;
            stats.chunks_busy += s.chunks_busy;
        }
        stats
    }

    /// Forgets VM `vm` (its process went away, or a copy from it failed).
    pub fn drop_vm(&mut self, vm: usize) {
        let Some(v) = self.vms.get_mut(vm).and_then(Option::take) else {
            return;
        };
        for (page, key) in v.keys.iter().enumerate() {
            if *key != ZERO_KEY && self.map.get(key) == Some(&Location { vm, page }) {
                self.map.remove(key);
            }
        }
    }

    fn refresh_vm(&mut self, vm: usize) -> RefreshStats {
        let mut stats = RefreshStats::default();
        let mut scratch = std::mem::take(&mut self.scratch);
        let v = self.vms[vm].as_mut().expect("live VM");
        for chunk in 0..v.table.chunks() {
            if v.table.chunk_generation(chunk) == v.chunk_gens[chunk] {
                continue;
            }
            let Some(gen) = v.table.read_chunk(chunk, &mut scratch) else {
                stats.chunks_busy += 1;
                continue;
            };
            stats.chunks_read += 1;
            v.chunk_gens[chunk] = gen;
            let first = chunk * CHUNK_PAGES;
            for (i, entry) in scratch.iter().enumerate() {
                let page = first + i;
                let old_state = v.states[page];
                count(&mut v.counts, old_state, -1);
                count(&mut v.counts, entry.state, 1);
                v.states[page] = entry.state;
                let new = key_of(entry.id);
                let old = v.keys[page];
                if new == old {
                    continue;
                }
                let here = Location { vm, page };
                if old != ZERO_KEY && self.map.get(&old) == Some(&here) {
                    self.map.remove(&old);
                }
                if new != ZERO_KEY {
                    self.map.entry(new).or_insert(here);
                }
                v.keys[page] = new;
            }
        }
        self.scratch = scratch;
        stats
    }

    /// Where a page with identity `id` is, as the tables say now (confirmed against the
    /// owner's current entry, so a location whose page changed since the last refresh is
    /// not returned).
    pub fn lookup(&self, id: &PageId) -> Option<Location> {
        let loc = *self.map.get(&key_of(Some(*id)))?;
        self.confirm(loc, id).then_some(loc)
    }

    /// Where a page with identity `id` is at guest frame `gfn` of some indexed VM (a VM
    /// started from the same image usually holds the same page at the same frame).
    pub fn lookup_at(&self, gfn: u64, id: &PageId) -> Option<Location> {
        self.vms().find_map(|(vm, table)| {
            let page = table.frames().index(gfn)?;
            let loc = Location { vm, page };
            self.confirm(loc, id).then_some(loc)
        })
    }

    fn confirm(&self, loc: Location, id: &PageId) -> bool {
        self.table(loc.vm)
            .and_then(|t| t.entry(loc.page))
            .is_some_and(|e| e.id == Some(*id))
    }
}

fn count(counts: &mut VmCounts, state: PageState, delta: i64) {
    let slot = match state {
        PageState::Zero => &mut counts.zero,
        PageState::Current => &mut counts.current,
        PageState::Stale => &mut counts.stale,
    };
    *slot = slot.wrapping_add_signed(delta);
}

#[cfg(test)]
mod tests {
    use super::super::reader::TableReader;
    use super::super::table::{IdentityTable, TableRegion};
    use super::*;
    use crate::identity::PAGE_SIZE;

    fn id(n: u32) -> PageId {
        let mut page = [0u8; PAGE_SIZE];
        page[..4].copy_from_slice(&n.to_le_bytes());
        PageId::of(&page)
    }

    fn table(dir: &std::path::Path, name: &str, pages: u64) -> (IdentityTable, TableReader) {
        let path = dir.join(name);
        let region = TableRegion {
            guest_addr: 0,
            pages,
            host_addr: 0,
        };
        let owner = IdentityTable::create(Some(&path), &[region]).unwrap();
        let reader = TableReader::open(&path).unwrap();
        (owner, reader)
    }

    #[test]
    fn pages_are_found_across_vms_and_follow_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, ra) = table(dir.path(), "a.ids", 2048);
        let (mut b, rb) = table(dir.path(), "b.ids", 2048);
        for p in 0..1000 {
            a.set(p, PageState::Current, Some(id(p as u32)));
            b.set(p, PageState::Current, Some(id(10_000 + p as u32)));
        }
        let mut index = HostIndex::new();
        let va = index.add(ra);
        let vb = index.add(rb);
        assert_eq!(index.len(), 2000);
        assert_eq!(index.lookup(&id(5)), Some(Location { vm: va, page: 5 }));
        assert_eq!(
            index.lookup(&id(10_007)),
            Some(Location { vm: vb, page: 7 })
        );
        assert_eq!(
            index.lookup_at(7, &id(10_007)),
            Some(Location { vm: vb, page: 7 })
        );
        assert_eq!(index.lookup_at(8, &id(10_007)), None);
        let counts = index.counts(va).unwrap();
        assert_eq!((counts.current, counts.zero, counts.stale), (1000, 1048, 0));

        // A page changes after the index read it: the lookup refuses the old location at
        // once, and after a refresh only the changed chunk is read.
        a.set(5, PageState::Current, Some(id(99_999)));
        assert_eq!(index.lookup(&id(5)), None);
        let stats = index.refresh();
        assert_eq!(stats.chunks_read, 1);
        assert_eq!(
            index.lookup(&id(99_999)),
            Some(Location { vm: va, page: 5 })
        );
        assert_eq!(index.refresh().chunks_read, 0, "nothing moved");

        // Stale pages stay findable as hints and are counted as stale.
        a.update_chunk(0, |w| w.mark_stale(6));
        index.refresh();
        assert_eq!(index.counts(va).unwrap().stale, 1);
        assert!(index.lookup(&id(6)).is_some());

        index.drop_vm(vb);
        assert_eq!(index.lookup(&id(10_007)), None);
        assert_eq!(index.len(), 1000);
        drop(b);
    }
}
