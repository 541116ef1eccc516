//! `Store::gc`: drops pages nobody references and compacts the packs that held them.
//! Live pages are copied and verified into new packs, one checkpoint switches over.

use std::collections::BTreeSet;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::fsutil::sync_dir;
use super::{PackWriter, Store, StoreError, WRITE_CHUNK};
use crate::identity::{as_page, PageId, PAGE_SIZE};

/// What `gc` did (for `fabvm store gc`; serializes to JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Pages with no reference that were dropped.
    pub pages_removed: u64,
    /// Live pages copied out of compacted packs.
    pub pages_moved: u64,
    /// Packs rewritten (and deleted).
    pub packs_compacted: u64,
    /// Bytes of the store on disk before.
    pub bytes_before: u64,
    /// Bytes of the store on disk after.
    pub bytes_after: u64,
}

impl GcReport {
    /// Bytes freed on disk.
    pub fn bytes_reclaimed(&self) -> u64 {
        self.bytes_before.saturating_sub(self.bytes_after)
    }
}

impl Store {
    /// Drops every page with no reference and compacts the packs that held one. Also
    /// checkpoints the index. A kill at any point leaves either the old or the new store.
    /// A live page that fails verification while being copied stops gc with
    /// [`StoreError::PageCorrupt`] and changes nothing.
    pub fn gc(&mut self) -> Result<GcReport, StoreError> {
        self.mutate(|s| s.gc_inner())
    }

    fn gc_inner(&mut self) -> Result<GcReport, StoreError> {
        let mut report = GcReport {
            bytes_before: self.stats().bytes_on_disk,
            ..GcReport::default()
        };
        let dead: Vec<PageId> = self
            .state
            .entries
            .iter()
            .filter(|(_, e)| e.refs == 0)
            .map(|(id, _)| *id)
            .collect();
        let compact: BTreeSet<u32> = dead.iter().map(|id| self.state.entries[id].pack).collect();

        let mut next = self
            .state
            .successor()
            .ok_or_else(super::generation_exhausted)?;
        for id in &dead {
            next.entries.remove(id);
        }
        for pack in &compact {
            next.packs.remove(pack);
        }
        report.pages_removed = dead.len() as u64;
        report.packs_compacted = compact.len() as u64;

        // Live pages of the packs being compacted, each pack's in slot order.
        let mut live: Vec<(u32, u32, PageId)> = next
            .entries
            .iter()
            .filter(|(_, e)| compact.contains(&e.pack))
            .map(|(id, e)| (e.pack, e.slot, *id))
            .collect();
        live.sort_unstable();
        report.pages_moved = live.len() as u64;

        let mut writer = PackWriter::new(None, &next, self.options.pack_pages);
        let copied = self.copy_live(&live, &mut writer, &mut next);
        let copied = copied.and_then(|()| writer.sync(&self.packs));
        if let Err(e) = copied {
            for &pack in &writer.touched {
                let _ = self.packs.remove(pack);
            }
            return Err(e);
        }
        // `next` already names the new packs through their entries; record their lengths.
        for e in next.entries.values() {
            if writer.touched.contains(&e.pack) {
                *next.packs.entry(e.pack).or_insert(0) += 1;
            }
        }
        next.next_pack = writer.next_pack;

        self.install_checkpoint(next)?;
        // From here the old packs are unreferenced; a crash before they are deleted
        // leaves files the next open deletes.
        for &pack in &compact {
            self.packs.remove(pack)?;
        }
        sync_dir(self.packs.dir())?;
        self.append = writer
            .append_after()
            .or_else(|| self.append.filter(|p| self.state.packs.contains_key(p)));
        report.bytes_after = self.stats().bytes_on_disk;
        Ok(report)
    }

    /// Copies the `live` pages (sorted by pack and slot) into new packs through `writer`,
    /// verifying each, and points their entries in `next` at the new places.
    fn copy_live(
        &mut self,
        live: &[(u32, u32, PageId)],
        writer: &mut PackWriter,
        next: &mut super::state::State,
    ) -> Result<(), StoreError> {
        let mut page = vec![0u8; PAGE_SIZE];
        let mut out = Vec::with_capacity(WRITE_CHUNK.min(live.len()) * PAGE_SIZE);
        let mut placed: Vec<PageId> = Vec::with_capacity(WRITE_CHUNK);
        let mut rest = live;
        while !rest.is_empty() {
            let (pack, first, room) = writer.target(&mut self.packs)?;
            let (run, tail) = rest.split_at(rest.len().min(room).min(WRITE_CHUNK));
            out.clear();
            placed.clear();
            for &(old_pack, old_slot, id) in run {
                self.packs.read(old_pack, old_slot, &mut page)?;
                out.extend_from_slice(&page);
                placed.push(id);
            }
            let bad = out
                .par_chunks(PAGE_SIZE)
                .zip(placed.par_iter())
                .find_any(|(data, id)| !id.matches(as_page(data)));
            if let Some((_, id)) = bad {
                return Err(StoreError::PageCorrupt(*id));
            }
            self.packs.write(pack, first, &out)?;
            for (i, id) in placed.iter().enumerate() {
                let entry = next.entries.get_mut(id).expect("live page is in the index");
                entry.pack = pack;
                entry.slot = first + i as u32;
            }
            writer.advance(run.len() as u32);
            rest = tail;
        }
        Ok(())
    }
}
