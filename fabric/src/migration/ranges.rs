//! Range summaries: one digest over the identities of a range of guest pages, so a
//! destination that already holds a whole range learns so from 44 bytes instead of 32 a
//! page. Ranges are cut in the VM's page order (its regions one after the other, the
//! order of a manifest and of a published identity table): 512 pages (2 MiB) at the top,
//! 32 pages below, and a range matches wherever the same identities stand in the same
//! order, at the same frames or not.

use std::collections::HashMap;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::identity::PageId;

/// Pages of a top-level range.
pub const RANGE_PAGES: usize = 512;
/// Pages of a sub-range (a top-level range holds 16).
pub const SUB_RANGE_PAGES: usize = 32;

/// Pages a destination looks up one by one before it judges whether this host holds
/// enough of the VM to keep describing pages, or should have the rest pushed (the source
/// descends one range at a time until then).
pub const EVIDENCE_PAGES: u64 = 2048;

/// A range's digest.
pub type Digest = [u8; 32];

const CONTEXT: &str = "fabvm 2026 migration range digest v3";

/// The digest of the identities of consecutive pages (`None` = zero page): blake3 keyed by
/// this protocol, over the count and then each identity (32 zero bytes for a zero page).
pub fn digest(ids: &[Option<PageId>]) -> Digest {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT);
    h.update(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        h.update(id.as_ref().map_or(&[0u8; 32], |id| &id.0));
    }
    *h.finalize().as_bytes()
}

/// The digest of `pages` zero pages (cached for the two range sizes).
pub fn zero_digest(pages: usize) -> Digest {
    static FULL: OnceLock<(Digest, Digest)> = OnceLock::new();
    let (top, sub) = FULL.get_or_init(|| {
        (
            digest(&[None; RANGE_PAGES]),
            digest(&[None; SUB_RANGE_PAGES]),
        )
    });
    match pages {
        RANGE_PAGES => *top,
        SUB_RANGE_PAGES => *sub,
        n => digest(&vec![None; n]),
    }
}

/// The digests of the ranges a host holds, each with its identities: built from the
/// identity tables of the VMs running there and the manifests in its store, and kept
/// current a top-level range at a time as they change. A range with only zero pages is not
/// indexed (every destination holds those). Every range it returns hashes to the digest
/// asked for.
#[derive(Debug, Default)]
pub struct RangeIndex {
    holders: Vec<Option<Vec<Option<PageId>>>>,
    map: HashMap<Digest, Place>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    holder: u32,
    start: u32,
    len: u32,
}

/// A VM or manifest in a [`RangeIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder(u32);

impl RangeIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Indexes the pages of one VM or manifest, in page order: every top-level range and
    /// every sub-range.
    pub fn add(&mut self, ids: Vec<Option<PageId>>) -> Holder {
        let holder = self.holders.len() as u32;
        let found = places(holder, &ids, 0, ids.len());
        for (d, place) in found {
            self.map.entry(d).or_insert(place);
        }
        self.holders.push(Some(ids));
        Holder(holder)
    }

    /// Replaces the identities of `holder` from page `start` (a multiple of
    /// [`RANGE_PAGES`]) with `ids`, re-digesting only the ranges that changed.
    pub fn update(&mut self, holder: Holder, start: usize, ids: &[Option<PageId>]) {
        assert!(
            start.is_multiple_of(RANGE_PAGES),
            "updates start at a top-level range"
        );
        let Some(Some(held)) = self.holders.get_mut(holder.0 as usize) else {
            return;
        };
        let end = (start + ids.len()).min(held.len());
        let mut top = start;
        while top < end {
            let stop = (top + RANGE_PAGES).min(end);
            if held[top..stop] != ids[top - start..stop - start] {
                let old = places(holder.0, held, top, stop);
                held[top..stop].copy_from_slice(&ids[top - start..stop - start]);
                let new = places(holder.0, held, top, stop);
                for (d, place) in old {
                    if self.map.get(&d) == Some(&place) {
                        self.map.remove(&d);
                    }
                }
                for (d, place) in new {
                    self.map.entry(d).or_insert(place);
                }
            }
            top = stop;
        }
    }

    /// Forgets `holder` (its VM went away).
    pub fn remove(&mut self, holder: Holder) {
        if let Some(slot) = self.holders.get_mut(holder.0 as usize) {
            if slot.take().is_some() {
                self.map.retain(|_, place| place.holder != holder.0);
            }
        }
    }

    /// The identities of a range of `pages` pages with digest `d`, if held.
    pub fn get(&self, d: &Digest, pages: usize) -> Option<&[Option<PageId>]> {
        let place = self.map.get(d)?;
        if place.len as usize != pages {
            return None;
        }
        let start = place.start as usize;
        let ids = self.holders[place.holder as usize]
            .as_ref()?
            .get(start..start + pages)?;
        // Cheap (16 KiB hashed per top-level range) and it makes the index's bookkeeping
        // unable to hand out identities that are not the range's.
        (digest(ids) == *d).then_some(ids)
    }

    /// Ranges indexed.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The digest and place of every top-level range and sub-range of `ids[from..to]` (`from` a
/// multiple of [`RANGE_PAGES`]) that holds a data page.
fn places(holder: u32, ids: &[Option<PageId>], from: usize, to: usize) -> Vec<(Digest, Place)> {
    [RANGE_PAGES, SUB_RANGE_PAGES]
        .par_iter()
        .flat_map(|&size| {
            ids[from..to]
                .par_chunks(size)
                .enumerate()
                .filter(|(_, range)| range.iter().any(Option::is_some))
                .map(move |(i, range)| {
                    let place = Place {
                        holder,
                        start: (from + i * size) as u32,
                        len: range.len() as u32,
                    };
                    (digest(range), place)
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::identify;
    use crate::testutil::page;

    fn ids(seed: u8, n: usize) -> Vec<Option<PageId>> {
        (0..n)
            .map(|i| identify(&page(u64::from(seed) * 1000 + (i % 200) as u64)))
            .collect()
    }

    #[test]
    fn digests_tell_order_count_and_zero_pages_apart() {
        let a = ids(1, 4);
        let mut b = a.clone();
        b.swap(0, 1);
        assert_ne!(digest(&a), digest(&b));
        assert_ne!(digest(&a[..3]), digest(&a));
        assert_eq!(zero_digest(RANGE_PAGES), digest(&[None; RANGE_PAGES]));
        assert_eq!(zero_digest(7), digest(&[None; 7]));
        assert_ne!(zero_digest(7), zero_digest(8));
    }

    #[test]
    fn index_finds_ranges_anywhere_and_checks_length() {
        let vm = ids(3, 2 * RANGE_PAGES + 40);
        let mut index = RangeIndex::new();
        index.add(vm.clone());
        // A top range, a sub-range, and the short tail range.
        let top = &vm[RANGE_PAGES..2 * RANGE_PAGES];
        assert_eq!(index.get(&digest(top), RANGE_PAGES), Some(top));
        let sub = &vm[64..96];
        assert_eq!(index.get(&digest(sub), SUB_RANGE_PAGES), Some(sub));
        let tail = &vm[2 * RANGE_PAGES..];
        assert_eq!(index.get(&digest(tail), tail.len()), Some(tail));
        assert_eq!(index.get(&digest(top), SUB_RANGE_PAGES), None);
        // Not aligned to a range: not indexed.
        assert_eq!(index.get(&digest(&vm[1..33]), SUB_RANGE_PAGES), None);
        // Zero ranges are left out.
        let mut zeros = RangeIndex::new();
        zeros.add(vec![None; RANGE_PAGES]);
        assert!(zeros.is_empty());
    }

    #[test]
    fn updates_replace_changed_ranges_and_removal_forgets() {
        let vm = ids(4, 3 * RANGE_PAGES);
        let mut index = RangeIndex::new();
        let h = index.add(vm.clone());
        let other = index.add(ids(5, RANGE_PAGES));
        let old_top = vm[RANGE_PAGES..2 * RANGE_PAGES].to_vec();
        let mut changed = old_top.clone();
        changed[40] = identify(&page(999_999));
        index.update(h, RANGE_PAGES, &changed);
        // The changed range and its changed sub-range are found by their new digests only;
        // an unchanged sub-range of it still is.
        assert_eq!(index.get(&digest(&old_top), RANGE_PAGES), None);
        assert_eq!(
            index.get(&digest(&changed), RANGE_PAGES),
            Some(&changed[..])
        );
        assert_eq!(index.get(&digest(&old_top[32..64]), SUB_RANGE_PAGES), None);
        assert!(index
            .get(&digest(&changed[32..64]), SUB_RANGE_PAGES)
            .is_some());
        assert!(index
            .get(&digest(&changed[64..96]), SUB_RANGE_PAGES)
            .is_some());
        // Other ranges untouched.
        let first = &vm[..RANGE_PAGES];
        assert_eq!(index.get(&digest(first), RANGE_PAGES), Some(first));
        index.remove(h);
        assert_eq!(index.get(&digest(first), RANGE_PAGES), None);
        let o = ids(5, RANGE_PAGES);
        assert_eq!(index.get(&digest(&o), RANGE_PAGES), Some(&o[..]));
        index.remove(other);
        assert!(index.is_empty());
    }
}
