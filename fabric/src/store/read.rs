//! Bulk reads: many pages into one buffer with one read per run of consecutive pack slots
//! (a snapshot's pages are appended in guest order, so its pages mostly are), each page
//! checked against its identity.

use std::io;

use super::{Store, StoreError};
use crate::identity::{Page, PageId, PAGE_SIZE};

impl Store {
    /// Reads `ids` into consecutive 4 KiB pieces of `out` on the calling thread, coalescing
    /// reads of consecutive slots of one pack, and checks every page. Zero pages read as
    /// zeros. For parallel reads, call it from several threads on disjoint pieces.
    pub fn get_run(&self, ids: &[PageId], out: &mut [u8]) -> Result<(), StoreError> {
        if out.len() != ids.len() * PAGE_SIZE {
            return Err(StoreError::PageSize(out.len()));
        }
        let mut start = 0;
        while start < ids.len() {
            if ids[start].is_zero_page() {
                out[start * PAGE_SIZE..(start + 1) * PAGE_SIZE].fill(0);
                start += 1;
                continue;
            }
            let first = self.locate(&ids[start])?;
            let mut end = start + 1;
            while end < ids.len() && !ids[end].is_zero_page() {
                let next = self.locate(&ids[end])?;
                if next != (first.0, first.1 + (end - start) as u32) {
                    break;
                }
                end += 1;
            }
            let buf = &mut out[start * PAGE_SIZE..end * PAGE_SIZE];
            match self.packs.read(first.0, first.1, buf) {
                Ok(()) => {}
                Err(StoreError::Io { source, .. })
                    if source.kind() == io::ErrorKind::UnexpectedEof =>
                {
                    return Err(StoreError::PageMissing(ids[start]))
                }
                Err(StoreError::Corrupt(_)) => return Err(StoreError::PageMissing(ids[start])),
                Err(e) => return Err(e),
            }
            for (id, page) in ids[start..end].iter().zip(buf.chunks_exact(PAGE_SIZE)) {
                let page: &Page = page.try_into().expect("4 KiB pieces");
                if !id.matches(page) {
                    return Err(StoreError::PageCorrupt(*id));
                }
            }
            start = end;
        }
        Ok(())
    }

    fn locate(&self, id: &PageId) -> Result<(u32, u32), StoreError> {
        let entry = self
            .state
            .entries
            .get(id)
            .ok_or(StoreError::NotFound(*id))?;
        Ok((entry.pack, entry.slot))
    }
}

#[cfg(test)]
mod tests {
    use crate::identity::{PageId, PAGE_SIZE};
    use crate::store::{Store, StoreError};

    fn page(n: u8) -> Vec<u8> {
        let mut p = vec![n; PAGE_SIZE];
        p[0] = n.wrapping_add(1);
        p
    }

    #[test]
    fn runs_gaps_zero_pages_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let pages: Vec<Vec<u8>> = (1..=6).map(page).collect();
        let ids: Vec<PageId> = pages
            .iter()
            .map(|p| PageId::of(p.as_slice().try_into().unwrap()))
            .collect();
        let batch: Vec<(PageId, &[u8])> = ids
            .iter()
            .copied()
            .zip(pages.iter().map(|p| p.as_slice()))
            .collect();
        store.put_many(&batch).unwrap();
        let zero = PageId::ZERO;
        // A run, a zero page, a jump backwards, a repeat.
        let want = [ids[0], ids[1], zero, ids[4], ids[5], ids[2], ids[2]];
        let mut out = vec![0xffu8; want.len() * PAGE_SIZE];
        store.get_run(&want, &mut out).unwrap();
        for (i, id) in want.iter().enumerate() {
            let mut one = vec![0u8; PAGE_SIZE];
            store.get(id, &mut one).unwrap();
            assert_eq!(
                &out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
                &one[..],
                "page {i}"
            );
        }
        assert!(matches!(
            store.get_run(&want, &mut out[..PAGE_SIZE]),
            Err(StoreError::PageSize(_))
        ));
        let unknown = PageId::of(page(9).as_slice().try_into().unwrap());
        let mut one = vec![0u8; PAGE_SIZE];
        assert!(matches!(
            store.get_run(&[unknown], &mut one),
            Err(StoreError::NotFound(_))
        ));
        // A flipped byte in the pack is caught even inside a coalesced read.
        drop(store);
        let pack = dir.path().join("packs/00000000.pack");
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[PAGE_SIZE + 7] ^= 1;
        std::fs::write(&pack, bytes).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut out = vec![0u8; 3 * PAGE_SIZE];
        assert!(
            matches!(store.get_run(&ids[..3], &mut out), Err(StoreError::PageCorrupt(id)) if id == ids[1])
        );
    }
}
