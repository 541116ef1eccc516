//! `Store::verify`: every page read back and rehashed, the index on disk compared with
//! the one in memory, packs, roots and reference counts checked against each other.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fs;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::state::State;
use super::{journal, roots, Store, StoreError, INDEX, JOURNAL};
use crate::identity::{PageId, PAGE_SIZE};

/// Pages read per chunk while verifying (4 MiB).
const READ_CHUNK: usize = 1024;

/// What `verify` found (for `fabvm store verify`; serializes to JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Pages read and rehashed.
    pub pages_checked: u64,
    /// Bytes read and rehashed.
    pub bytes_checked: u64,
    /// Pages whose content no longer matches their identity.
    pub corrupt: Vec<PageId>,
    /// Pages the index lists but their pack does not hold.
    pub missing: Vec<PageId>,
    /// Inconsistencies of the index, roots or reference counts, one line each.
    pub problems: Vec<String>,
    /// Root page lists read and checked.
    pub roots_checked: u64,
    /// Pages with no reference (not a fault: the next `gc` reclaims them).
    pub unreferenced_pages: u64,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.problems.is_empty()
    }
}

impl Store {
    /// Checks the whole store: rehashes every page, rereads the index from disk and
    /// compares it with the open one, and checks that each pack slot holds exactly one
    /// page and that every root's pages are stored and referenced. Damage is reported, not
    /// returned as an error; errors are reserved for failing to read at all.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        self.verify_index_on_disk(&mut report);
        self.verify_packs(&mut report)?;
        self.verify_roots(&mut report);
        report.unreferenced_pages =
            self.state.entries.values().filter(|e| e.refs == 0).count() as u64;
        Ok(report)
    }

    /// Rebuilds the index from the checkpoint and journal files and compares.
    fn verify_index_on_disk(&self, report: &mut VerifyReport) {
        let rebuilt = (|| -> Result<State, String> {
            let index = fs::read(self.dir.join(INDEX)).map_err(|e| format!("index: {e}"))?;
            let mut state = State::decode(&index)?;
            let bytes = fs::read(self.dir.join(JOURNAL)).map_err(|e| format!("journal: {e}"))?;
            let replay = journal::replay(&bytes)?;
            if replay.generation != state.generation {
                return Err("journal and index generations differ".into());
            }
            if replay.valid_len != bytes.len() as u64 {
                return Err("journal has a damaged tail".into());
            }
            for record in replay.batches.iter().flatten() {
                state.apply(record)?;
            }
            Ok(state)
        })();
        match rebuilt {
            Ok(state) if state == self.state => {}
            Ok(_) => report
                .problems
                .push("index on disk differs from the open index".into()),
            Err(m) => report
                .problems
                .push(format!("index on disk unreadable: {m}")),
        }
    }

    /// Rehashes every page, pack by pack, and checks slot occupancy. Memory and time are
    /// bounded by the pages in the index and the bytes on disk, never by a pack length the
    /// index states (a damaged one may say anything).
    fn verify_packs(&self, report: &mut VerifyReport) -> Result<(), StoreError> {
        let mut slots: HashMap<u32, BTreeMap<u32, PageId>> = self
            .state
            .packs
            .keys()
            .map(|&p| (p, BTreeMap::new()))
            .collect();
        for (id, e) in &self.state.entries {
            let in_pack = self
                .state
                .packs
                .get(&e.pack)
                .is_some_and(|&len| e.slot < len);
            let table = slots.get_mut(&e.pack).filter(|_| in_pack);
            match table.map(|t| t.entry(e.slot)) {
                Some(Entry::Vacant(slot)) => {
                    slot.insert(*id);
                }
                Some(Entry::Occupied(other)) => report.problems.push(format!(
                    "pages {id} and {} share slot {} of pack {}",
                    other.get(),
                    e.slot,
                    e.pack
                )),
                None => report.problems.push(format!(
                    "page {id} is at slot {} of pack {}, which is not in the index",
                    e.slot, e.pack
                )),
            }
        }

        let mut buf = vec![0u8; READ_CHUNK * PAGE_SIZE];
        for (&pack, &len) in &self.state.packs {
            let table = &slots[&pack];
            let empty = u64::from(len) - table.len() as u64;
            if empty > 0 {
                report.problems.push(format!(
                    "{empty} of the {len} slots of pack {pack} hold no page"
                ));
            }
            let on_disk = match self.packs.slots_on_disk(pack) {
                Ok((n, _)) => n.min(u64::from(len)) as u32,
                Err(_) => {
                    report.problems.push(format!("pack {pack} is missing"));
                    0
                }
            };
            report
                .missing
                .extend(table.range(on_disk..).map(|(_, id)| *id));
            for start in (0..on_disk).step_by(READ_CHUNK) {
                let n = READ_CHUNK.min((on_disk - start) as usize);
                let chunk = &mut buf[..n * PAGE_SIZE];
                self.packs.read(pack, start, chunk)?;
                let held: Vec<(u32, PageId)> = table
                    .range(start..start + n as u32)
                    .map(|(&slot, &id)| (slot, id))
                    .collect();
                let corrupt: Vec<PageId> = held
                    .par_iter()
                    .filter_map(|&(slot, id)| {
                        let at = (slot - start) as usize * PAGE_SIZE;
                        let data = &chunk[at..at + PAGE_SIZE];
                        (!id.matches(crate::identity::as_page(data))).then_some(id)
                    })
                    .collect();
                report.corrupt.extend(corrupt);
                report.pages_checked += n as u64;
                report.bytes_checked += (n * PAGE_SIZE) as u64;
            }
        }
        Ok(())
    }

    /// Checks each root's page list against the index and the reference counts.
    fn verify_roots(&self, report: &mut VerifyReport) {
        let mut holds: HashMap<PageId, u64> = HashMap::new();
        for (name, info) in &self.state.roots {
            let ids = match roots::read(&self.dir, name, &info.digest) {
                Ok(ids) => ids,
                Err(e) => {
                    report.problems.push(format!("root {name}: {e}"));
                    continue;
                }
            };
            report.roots_checked += 1;
            if ids.len() as u64 != info.pages {
                report.problems.push(format!(
                    "root {name} lists {} pages, index says {}",
                    ids.len(),
                    info.pages
                ));
            }
            for id in ids {
                if !self.state.entries.contains_key(&id) {
                    report
                        .problems
                        .push(format!("root {name} holds page {id}, which is not stored"));
                }
                *holds.entry(id).or_default() += 1;
            }
        }
        for (id, n) in holds {
            if let Some(e) = self.state.entries.get(&id).filter(|e| e.refs < n) {
                report.problems.push(format!(
                    "page {id} has {} references but {n} roots hold it",
                    e.refs
                ));
            }
        }
    }
}
