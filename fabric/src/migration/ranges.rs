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
/// identity tables of the VMs running there and the manifests in its store. A range with
/// only zero pages is not indexed (every destination holds those).
#[derive(Debug, Default)]
pub struct RangeIndex {
    holders: Vec<Vec<Option<PageId>>>,
    map: HashMap<Digest, Place>,
}

#[derive(Debug, Clone, Copy)]
struct Place {
    holder: u32,
    start: u32,
    len: u32,
}

impl RangeIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Indexes the pages of one VM or manifest, in page order: every top-level range and
    /// every sub-range.
    pub fn add(&mut self, ids: Vec<Option<PageId>>) {
        let holder = self.holders.len() as u32;
        let mut found: Vec<(Digest, Place)> = [RANGE_PAGES, SUB_RANGE_PAGES]
            .par_iter()
            .flat_map(|&size| {
                ids.par_chunks(size)
                    .enumerate()
                    .filter(|(_, range)| range.iter().any(Option::is_some))
                    .map(move |(i, range)| {
                        let place = Place {
                            holder,
                            start: (i * size) as u32,
                            len: range.len() as u32,
                        };
                        (digest(range), place)
                    })
            })
            .collect();
        for (d, place) in found.drain(..) {
            self.map.entry(d).or_insert(place);
        }
        self.holders.push(ids);
    }

    /// The identities of a range of `pages` pages with digest `d`, if held.
    pub fn get(&self, d: &Digest, pages: usize) -> Option<&[Option<PageId>]> {
        let place = self.map.get(d)?;
        if place.len as usize != pages {
            return None;
        }
        let start = place.start as usize;
        self.holders[place.holder as usize].get(start..start + pages)
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
}
