//! `Store::verify`: every page read back and rehashed, the index on disk compared with
//! the one in memory, packs, roots and reference counts checked against each other.

use std::collections::HashMap;
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

    /// Rehashes every page, pack by pack, and checks slot occupancy.
    fn verify_packs(&self, report: &mut VerifyReport) -> Result<(), StoreError> {
        let mut slots: HashMap<u32, Vec<Option<PageId>>> = self
            .state
            .packs
            .iter()
            .map(|(&pack, &len)| (pack, vec![None; len as usize]))
            .collect();
        for (id, e) in &self.state.entries {
            match slots
                .get_mut(&e.pack)
                .and_then(|s| s.get_mut(e.slot as usize))
            {
                Some(slot @ None) => *slot = Some(*id),
                Some(Some(other)) => report.problems.push(format!(
                    "pages {id} and {other} share slot {} of pack {}",
                    e.slot, e.pack
                )),
                None => report.problems.push(format!(
                    "page {id} is at slot {} of pack {}, which is not in the index",
                    e.slot, e.pack
                )),
            }
        }

        let mut buf = vec![0u8; READ_CHUNK * PAGE_SIZE];
        for (&pack, table) in &slots {
            let on_disk = match self.packs.slots_on_disk(pack) {
                Ok((n, _)) => n.min(table.len() as u64) as usize,
                Err(_) => {
                    report.problems.push(format!("pack {pack} is missing"));
                    0
                }
            };
            for (slot, id) in table.iter().enumerate() {
                match id {
                    None => report
                        .problems
                        .push(format!("slot {slot} of pack {pack} holds no page")),
                    Some(id) if slot >= on_disk => report.missing.push(*id),
                    Some(_) => {}
                }
            }
            for start in (0..on_disk).step_by(READ_CHUNK) {
                let n = READ_CHUNK.min(on_disk - start);
                let chunk = &mut buf[..n * PAGE_SIZE];
                self.packs.read(pack, start as u32, chunk)?;
                let corrupt: Vec<PageId> = chunk
                    .par_chunks(PAGE_SIZE)
                    .zip(&table[start..start + n])
                    .filter_map(|(data, id)| {
                        let id = (*id)?;
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
