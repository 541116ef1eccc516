//! Guest frames of the described regions as dense page indices (for per-page bitmaps),
//! and the bitmap itself.

use crate::manifest::Region;

/// The described regions, with the dense index of each region's first page.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// (first gfn, pages, index of the first page), sorted by gfn.
    regions: Vec<(u64, u64, u64)>,
    total: u64,
}

impl Layout {
    /// Regions must already be validated (sorted, disjoint, non-empty).
    pub(crate) fn new(regions: &[Region]) -> Layout {
        let mut total = 0;
        let regions = regions
            .iter()
            .map(|r| {
                let entry = (r.first_gfn(), r.pages, total);
                total += r.pages;
                entry
            })
            .collect();
        Layout { regions, total }
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Dense index of `gfn`, if it is in a region.
    pub(crate) fn index(&self, gfn: u64) -> Option<u64> {
        self.run(gfn, 1)
    }

    /// Dense index of `first`, if `first .. first + count` lies within one region.
    pub(crate) fn run(&self, first: u64, count: u64) -> Option<u64> {
        let pos = self
            .regions
            .partition_point(|&(start, _, _)| start <= first);
        let &(start, pages, base) = self.regions.get(pos.checked_sub(1)?)?;
        let offset = first - start;
        (count <= pages && offset <= pages - count).then_some(base + offset)
    }

    /// One past the last gfn of the region holding `gfn` (which must be in one).
    pub(crate) fn region_end(&self, gfn: u64) -> u64 {
        let pos = self.regions.partition_point(|&(start, _, _)| start <= gfn);
        let (start, pages, _) = self.regions[pos - 1];
        start + pages
    }

    /// The gfn of dense index `index` (which must be below `total`).
    pub(crate) fn gfn(&self, index: u64) -> u64 {
        let pos = self.regions.partition_point(|&(_, _, base)| base <= index);
        let (start, _, base) = self.regions[pos - 1];
        start + (index - base)
    }
}

/// A fixed-size set of page indices.
#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    pub(crate) fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Sets bit `i`; returns whether it was already set.
    pub(crate) fn test_and_set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        was
    }

    /// Whether bit `i` is set.
    pub(crate) fn test(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Clears bit `i`.
    pub(crate) fn unset(&mut self, i: u64) {
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }

    /// The first index set, if any.
    pub(crate) fn first_set(&self) -> Option<u64> {
        self.words
            .iter()
            .enumerate()
            .find(|(_, &w)| w != 0)
            .map(|(i, w)| i as u64 * 64 + u64::from(w.trailing_zeros()))
    }

    pub(crate) fn clear(&mut self) {
        self.words.fill(0);
    }

    /// The first index not set, if any.
    pub(crate) fn first_clear(&self) -> Option<u64> {
        self.words
            .iter()
            .enumerate()
            .find(|(_, &w)| w != u64::MAX)
            .map(|(i, w)| i as u64 * 64 + u64::from(w.trailing_ones()))
            .filter(|&i| i < self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(&[
            Region {
                guest_addr: 0,
                pages: 10,
            },
            Region {
                guest_addr: 0x10_0000,
                pages: 4,
            },
        ])
    }

    #[test]
    fn indices_and_runs() {
        let l = layout();
        assert_eq!(l.total(), 14);
        assert_eq!(l.index(0), Some(0));
        assert_eq!(l.index(9), Some(9));
        assert_eq!(l.index(10), None);
        assert_eq!(l.index(0x100), Some(10));
        assert_eq!(l.index(0x103), Some(13));
        assert_eq!(l.index(0x104), None);
        assert_eq!(l.index(u64::MAX), None);
        assert_eq!(l.run(8, 2), Some(8));
        assert_eq!(l.run(8, 3), None);
        assert_eq!(l.run(0x100, 4), Some(10));
        assert_eq!(l.run(0x101, u64::MAX), None);
        assert_eq!(l.region_end(3), 10);
        assert_eq!(l.region_end(0x101), 0x104);
        assert_eq!(l.gfn(0), 0);
        assert_eq!(l.gfn(10), 0x100);
        assert_eq!(l.gfn(13), 0x103);
    }

    #[test]
    fn bitmap() {
        let mut b = Bitmap::new(70);
        assert_eq!(b.first_clear(), Some(0));
        for i in 0..70 {
            assert!(!b.test_and_set(i));
        }
        assert!(b.test_and_set(69));
        assert_eq!(b.first_clear(), None);
        b.clear();
        b.test_and_set(0);
        assert_eq!(b.first_clear(), Some(1));
    }
}
