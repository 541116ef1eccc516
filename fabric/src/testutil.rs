//! Helpers shared by the unit tests: deterministic page contents from a seed.
//! Compiled only for tests.

use crate::identity::{Page, PageId, PAGE_SIZE};

/// Fills `page` with bytes derived from `seed` (splitmix64), never all zero.
pub fn fill_page(page: &mut [u8], seed: u64) {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    for word in page.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    page[0] |= 1;
}

/// A page derived from `seed`.
pub fn page(seed: u64) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    fill_page(&mut p[..], seed);
    p
}

/// Pages for `seeds` with their identities.
pub fn pages(seeds: impl IntoIterator<Item = u64>) -> Vec<(PageId, Box<Page>)> {
    seeds
        .into_iter()
        .map(|s| {
            let p = page(s);
            (PageId::of(&p), p)
        })
        .collect()
}
