//! Hashing whole memory regions into page identities, spread over all cores, and
//! rehashing only the pages a dirty bitmap marks.
//!
//! Parallelism is rayon's: its pool is created once and reused, so the small dirty sets of
//! every pre-copy round or background refresh do not pay a thread spawn per call (which
//! `std::thread::scope` would), and work stealing evens out regions where cheap zero pages
//! and expensive hashed pages are unevenly spread. A caller that must bound CPU use runs
//! these functions inside its own `rayon::ThreadPool::install`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::identity::{identify, pages, PageId, PAGE_SIZE};

/// Pages per parallel task for a full hash (256 KiB: large enough to amortise scheduling,
/// small enough to balance over cores).
const PAGES_PER_TASK: usize = 64;

/// Bitmap words per parallel task for a dirty rehash (512 pages).
const WORDS_PER_TASK: usize = 8;

/// Dirty sets this small are rehashed on the calling thread: spreading a few pages over
/// the pool costs more in task hand-offs (about 100 ns each) than it saves.
const INLINE_DIRTY_PAGES: u64 = 16;

/// Errors of hashing a region.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashingError {
    /// The region is not a whole number of pages.
    #[error("region of {0} bytes is not a whole number of pages")]
    Unaligned(usize),
    /// The output slice does not have one slot per page.
    #[error("region has {pages} pages but {slots} identity slots were given")]
    SlotCount { pages: usize, slots: usize },
    /// The dirty bitmap does not have one bit per page (rounded up to whole words).
    #[error("dirty bitmap has {got} words, region needs {expected}")]
    BitmapLength { expected: usize, got: usize },
}

/// What an incremental rehash did: observable proof that only dirty pages were hashed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RehashStats {
    /// Pages whose content was read and (unless zero) hashed.
    pub rehashed: u64,
    /// Of those, pages whose identity changed.
    pub changed: u64,
}

impl std::ops::AddAssign for RehashStats {
    fn add_assign(&mut self, rhs: Self) {
        self.rehashed += rhs.rehashed;
        self.changed += rhs.changed;
    }
}

/// Number of `u64` bitmap words for `pages` pages (bit `i` of word `i / 64` is page `i`).
pub fn bitmap_words(pages: usize) -> usize {
    pages.div_ceil(64)
}

/// Identities of every page of `mem` (`None` for zero pages), computed on all cores.
pub fn hash_region(mem: &[u8]) -> Result<Vec<Option<PageId>>, HashingError> {
    let mut ids = vec![None; page_count(mem)?];
    hash_region_into(mem, &mut ids)?;
    Ok(ids)
}

/// Like [`hash_region`], writing into `ids` (one slot per page).
pub fn hash_region_into(mem: &[u8], ids: &mut [Option<PageId>]) -> Result<(), HashingError> {
    let n = page_count(mem)?;
    if ids.len() != n {
        return Err(HashingError::SlotCount {
            pages: n,
            slots: ids.len(),
        });
    }
    ids.par_chunks_mut(PAGES_PER_TASK)
        .zip(mem.par_chunks(PAGES_PER_TASK * PAGE_SIZE))
        .for_each(|(ids, mem)| {
            for (slot, page) in ids.iter_mut().zip(pages(mem)) {
                *slot = identify(page);
            }
        });
    Ok(())
}

/// Rehashes the pages of `mem` whose bit is set in `dirty`, updating `ids` in place.
///
/// `dirty` has [`bitmap_words`]`(pages)` words; bits past the last page are ignored.
/// Work is split by bitmap words, so a sparse bitmap costs little more than scanning it.
pub fn rehash_dirty(
    mem: &[u8],
    dirty: &[u64],
    ids: &mut [Option<PageId>],
) -> Result<RehashStats, HashingError> {
    let n = page_count(mem)?;
    if ids.len() != n {
        return Err(HashingError::SlotCount {
            pages: n,
            slots: ids.len(),
        });
    }
    if dirty.len() != bitmap_words(n) {
        return Err(HashingError::BitmapLength {
            expected: bitmap_words(n),
            got: dirty.len(),
        });
    }
    let dirty_pages: u64 = dirty.iter().map(|w| u64::from(w.count_ones())).sum();
    if dirty_pages <= INLINE_DIRTY_PAGES {
        return Ok(rehash_task(mem, dirty, ids));
    }
    let pages_per_task = WORDS_PER_TASK * 64;
    let stats = ids
        .par_chunks_mut(pages_per_task)
        .zip(dirty.par_chunks(WORDS_PER_TASK))
        .zip(mem.par_chunks(pages_per_task * PAGE_SIZE))
        .map(|((ids, words), mem)| rehash_task(mem, words, ids))
        .reduce(RehashStats::default, |mut a, b| {
            a += b;
            a
        });
    Ok(stats)
}

/// One task of [`rehash_dirty`]: `ids` and `mem` start at the page of bit 0 of `words[0]`.
fn rehash_task(mem: &[u8], words: &[u64], ids: &mut [Option<PageId>]) -> RehashStats {
    let mut stats = RehashStats::default();
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = w * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let Some(slot) = ids.get_mut(page) else {
                // Bits past the end of the region.
                break;
            };
            let start = page * PAGE_SIZE;
            let id = identify(crate::identity::as_page(&mem[start..start + PAGE_SIZE]));
            stats.rehashed += 1;
            if *slot != id {
                stats.changed += 1;
                *slot = id;
            }
        }
    }
    stats
}

fn page_count(mem: &[u8]) -> Result<usize, HashingError> {
    if !mem.len().is_multiple_of(PAGE_SIZE) {
        return Err(HashingError::Unaligned(mem.len()));
    }
    Ok(mem.len() / PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fill_page;

    fn memory(pages: usize) -> Vec<u8> {
        let mut mem = vec![0u8; pages * PAGE_SIZE];
        for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
            // Every third page stays zero; pages 10 and 20 are identical.
            if i % 3 != 0 {
                fill_page(page, if i == 20 { 10 } else { i as u64 });
            }
        }
        mem
    }

    #[test]
    fn parallel_hash_matches_sequential() {
        let mem = memory(1000);
        let ids = hash_region(&mem).unwrap();
        let seq: Vec<_> = pages(&mem).map(identify).collect();
        assert_eq!(ids, seq);
        assert_eq!(ids[0], None);
        assert!(ids[1].is_some());
        assert_eq!(ids[10], ids[20]);
    }

    #[test]
    fn rejects_bad_lengths() {
        assert_eq!(hash_region(&[0u8; 100]), Err(HashingError::Unaligned(100)));
        let mem = memory(65);
        let mut ids = vec![None; 65];
        assert_eq!(
            rehash_dirty(&mem, &[0], &mut ids),
            Err(HashingError::BitmapLength {
                expected: 2,
                got: 1
            })
        );
        assert!(matches!(
            rehash_dirty(&mem, &[0, 0], &mut ids[..64]),
            Err(HashingError::SlotCount { .. })
        ));
    }

    #[test]
    fn only_dirty_pages_are_rehashed() {
        let n = 3000;
        let mut mem = memory(n);
        let mut ids = hash_region(&mem).unwrap();
        let before = ids.clone();

        // Change pages 5, 700 and 2999 but mark only 5 and 2999 (and 64, unchanged) dirty.
        for p in [5usize, 700, 2999] {
            fill_page(
                &mut mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                1_000_000 + p as u64,
            );
        }
        let mut dirty = vec![0u64; bitmap_words(n)];
        for p in [5usize, 64, 2999] {
            dirty[p / 64] |= 1 << (p % 64);
        }
        // Bits past the last page are ignored.
        *dirty.last_mut().unwrap() |= 1 << 63;

        let stats = rehash_dirty(&mem, &dirty, &mut ids).unwrap();
        assert_eq!(
            stats,
            RehashStats {
                rehashed: 3,
                changed: 2
            }
        );
        assert_ne!(ids[5], before[5]);
        assert_ne!(ids[2999], before[2999]);
        // Page 700 changed but was not dirty: its identity is stale, proving it was not read.
        assert_eq!(ids[700], before[700]);
        let fresh = hash_region(&mem).unwrap();
        assert_ne!(ids[700], fresh[700]);
    }

    #[test]
    fn large_dirty_sets_run_in_parallel_and_match_a_full_hash() {
        let n = 5000;
        let mut mem = memory(n);
        let mut ids = hash_region(&mem).unwrap();
        let mut dirty = vec![0u64; bitmap_words(n)];
        for p in (0..n).step_by(7) {
            fill_page(
                &mut mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                9_000_000 + p as u64,
            );
            dirty[p / 64] |= 1 << (p % 64);
        }
        let stats = rehash_dirty(&mem, &dirty, &mut ids).unwrap();
        assert_eq!(stats.rehashed, n.div_ceil(7) as u64);
        assert_eq!(stats.changed, stats.rehashed);
        assert_eq!(ids, hash_region(&mem).unwrap());
    }

    #[test]
    fn page_becoming_zero_is_noticed() {
        let mut mem = memory(4);
        let mut ids = hash_region(&mem).unwrap();
        assert!(ids[1].is_some());
        mem[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
        let stats = rehash_dirty(&mem, &[0b10], &mut ids).unwrap();
        assert_eq!(stats.changed, 1);
        assert_eq!(ids[1], None);
    }
}
