//! A VM's memory as content identities: guest frame number to page identity (or zero),
//! per guest RAM region, kept current from dirty bitmaps and saved in a checked binary file.
//!
//! The file is a hand-rolled fixed layout rather than a serde format crate: it is a few
//! region headers, a bitmap and a packed array of 32-byte identities, so owning the bytes
//! costs ~100 lines, gives one encoding that cannot drift with a dependency's releases
//! (manifests live in snapshots and stores for a long time), and makes bounding every
//! length against the input before allocating straightforward. Layout, little endian:
//!
//! ```text
//! magic "FABVMMAN" | version u32 | region count u32
//! per region:  guest address u64 | page count u64
//! per region:  non-zero bitmap (ceil(pages / 64) u64 words, bit set = non-zero page)
//!              | one 32-byte identity per set bit, in page order
//! blake3 of all the above (32 bytes)
//! ```

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::codec::{CodecError, Reader, Writer};
use crate::hashing::{self, bitmap_words, HashingError, RehashStats};
use crate::identity::{PageId, PAGE_SHIFT, PAGE_SIZE};

const MAGIC: &[u8; 8] = b"FABVMMAN";
const VERSION: u32 = 1;

/// Errors of building, updating or decoding a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A region is empty, unaligned, or runs past the end of the address space.
    #[error("invalid region at {guest_addr:#x} with {pages} pages")]
    BadRegion { guest_addr: u64, pages: u64 },
    /// Regions are not sorted by address or overlap.
    #[error("region at {0:#x} overlaps or precedes the region before it")]
    Overlap(u64),
    /// There is no region with this index.
    #[error("no region {0}")]
    NoSuchRegion(usize),
    /// The memory or bitmap slices given do not match the regions one to one.
    #[error("{got} slices given for {expected} regions")]
    RegionCount { expected: usize, got: usize },
    /// Hashing the region's memory failed (wrong length or bitmap size).
    #[error("region {region}")]
    Hashing {
        region: usize,
        #[source]
        source: HashingError,
    },
    /// The input is not a manifest.
    #[error("not a manifest (bad magic)")]
    BadMagic,
    /// The manifest was written by an incompatible version.
    #[error("unsupported manifest version {0}")]
    UnsupportedVersion(u32),
    /// The input is damaged or exceeds the decoding limits.
    #[error("malformed manifest")]
    Malformed(#[from] CodecError),
    /// The input is well formed but inconsistent.
    #[error("invalid manifest: {0}")]
    Invalid(&'static str),
}

/// A guest RAM region: guest physical base address and length in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Guest physical address of the first byte (page aligned).
    pub guest_addr: u64,
    /// Length in 4 KiB pages.
    pub pages: u64,
}

impl Region {
    /// Guest frame number of the first page.
    pub fn first_gfn(&self) -> u64 {
        self.guest_addr >> PAGE_SHIFT
    }

    /// Length in bytes.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let bad = ManifestError::BadRegion {
            guest_addr: self.guest_addr,
            pages: self.pages,
        };
        let end = self
            .pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|b| self.guest_addr.checked_add(b));
        if self.pages == 0 || !self.guest_addr.is_multiple_of(PAGE_SIZE as u64) || end.is_none() {
            return Err(bad);
        }
        Ok(())
    }
}

/// Limits applied when decoding a manifest from untrusted bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most regions accepted.
    pub max_regions: u32,
    /// Most pages accepted over all regions (each costs 33 bytes of memory once decoded).
    pub max_pages: u64,
}

impl Default for DecodeLimits {
    /// 64 regions and 64 GiB of guest memory.
    fn default() -> Self {
        DecodeLimits {
            max_regions: 64,
            max_pages: (64u64 << 30) / PAGE_SIZE as u64,
        }
    }
}

/// Page counts of a manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestCounts {
    /// Pages in all regions.
    pub total: u64,
    /// Zero pages.
    pub zero: u64,
    /// Distinct non-zero identities (what a store or a migration must hold).
    pub distinct: u64,
}

/// A VM's memory as page identities, region by region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    regions: Vec<RegionIds>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RegionIds {
    region: Region,
    /// One slot per page; `None` is a zero page.
    ids: Vec<Option<PageId>>,
}

impl Manifest {
    /// A manifest of all-zero memory (fresh guest RAM) for `regions`, which must be sorted
    /// by address, page aligned and disjoint.
    pub fn new(regions: &[Region]) -> Result<Self, ManifestError> {
        validate_regions(regions)?;
        Ok(Manifest {
            regions: regions
                .iter()
                .map(|&region| RegionIds {
                    region,
                    ids: vec![None; region.pages as usize],
                })
                .collect(),
        })
    }

    /// A manifest with every page of `mems` (one slice per region) hashed, on all cores.
    pub fn from_memory(regions: &[Region], mems: &[&[u8]]) -> Result<Self, ManifestError> {
        let mut manifest = Manifest::new(regions)?;
        check_count(regions.len(), mems.len())?;
        for (i, mem) in mems.iter().enumerate() {
            manifest.refresh(i, mem)?;
        }
        Ok(manifest)
    }

    /// A manifest of `regions` with the given identities, one list per region and one
    /// entry per page (`None` = zero page).
    pub fn from_ids(
        regions: &[Region],
        ids: Vec<Vec<Option<PageId>>>,
    ) -> Result<Self, ManifestError> {
        validate_regions(regions)?;
        check_count(regions.len(), ids.len())?;
        if regions
            .iter()
            .zip(&ids)
            .any(|(r, ids)| r.pages != ids.len() as u64)
        {
            return Err(ManifestError::Invalid(
                "identity count differs from the region's pages",
            ));
        }
        Ok(Manifest {
            regions: regions
                .iter()
                .zip(ids)
                .map(|(&region, ids)| RegionIds {
                    region,
                    ids: ids
                        .into_iter()
                        .map(|id| id.filter(|id| !id.is_zero_page()))
                        .collect(),
                })
                .collect(),
        })
    }

    /// The regions, in address order.
    pub fn regions(&self) -> impl ExactSizeIterator<Item = &Region> + '_ {
        self.regions.iter().map(|r| &r.region)
    }

    /// The identities of region `index`, one per page (`None` = zero page).
    pub fn region_ids(&self, index: usize) -> Option<&[Option<PageId>]> {
        self.regions.get(index).map(|r| r.ids.as_slice())
    }

    /// The identity at guest frame `gfn`: `None` outside every region, `Some(None)` for a
    /// zero page.
    pub fn get(&self, gfn: u64) -> Option<Option<PageId>> {
        let (r, i) = self.locate(gfn)?;
        Some(self.regions[r].ids[i])
    }

    /// Sets the identity at guest frame `gfn` (e.g. as pages arrive in a migration);
    /// returns false when `gfn` is outside every region.
    pub fn set(&mut self, gfn: u64, id: Option<PageId>) -> bool {
        let Some((r, i)) = self.locate(gfn) else {
            return false;
        };
        self.regions[r].ids[i] = id.filter(|id| !id.is_zero_page());
        true
    }

    /// Every (guest frame number, identity) in address order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Option<PageId>)> + '_ {
        self.regions.iter().flat_map(|r| {
            let base = r.region.first_gfn();
            r.ids
                .iter()
                .enumerate()
                .map(move |(i, id)| (base + i as u64, *id))
        })
    }

    /// Rehashes every page of region `index` from `mem`.
    pub fn refresh(&mut self, index: usize, mem: &[u8]) -> Result<RehashStats, ManifestError> {
        let r = self
            .regions
            .get_mut(index)
            .ok_or(ManifestError::NoSuchRegion(index))?;
        let before = r.ids.clone();
        hashing::hash_region_into(mem, &mut r.ids).map_err(|source| ManifestError::Hashing {
            region: index,
            source,
        })?;
        let changed = before.iter().zip(&r.ids).filter(|(a, b)| a != b).count();
        Ok(RehashStats {
            rehashed: r.ids.len() as u64,
            changed: changed as u64,
        })
    }

    /// Rehashes the pages of region `index` marked in `dirty` (bit `i` = page `i` of the
    /// region; the caller ORs KVM's dirty log with the VMM's own write bitmap). Pages not
    /// marked are not read.
    pub fn update(
        &mut self,
        index: usize,
        mem: &[u8],
        dirty: &[u64],
    ) -> Result<RehashStats, ManifestError> {
        let r = self
            .regions
            .get_mut(index)
            .ok_or(ManifestError::NoSuchRegion(index))?;
        hashing::rehash_dirty(mem, dirty, &mut r.ids).map_err(|source| ManifestError::Hashing {
            region: index,
            source,
        })
    }

    /// [`Manifest::update`] for every region: `mems` and `dirty` have one entry per region.
    pub fn update_all(
        &mut self,
        mems: &[&[u8]],
        dirty: &[&[u64]],
    ) -> Result<RehashStats, ManifestError> {
        check_count(self.regions.len(), mems.len())?;
        check_count(self.regions.len(), dirty.len())?;
        let mut total = RehashStats::default();
        for (i, (mem, dirty)) in mems.iter().zip(dirty).enumerate() {
            total += self.update(i, mem, dirty)?;
        }
        Ok(total)
    }

    /// Total, zero and distinct non-zero page counts.
    pub fn counts(&self) -> ManifestCounts {
        let mut distinct = HashSet::new();
        let mut counts = ManifestCounts::default();
        for r in &self.regions {
            counts.total += r.ids.len() as u64;
            for id in &r.ids {
                match id {
                    Some(id) => {
                        distinct.insert(*id);
                    }
                    None => counts.zero += 1,
                }
            }
        }
        counts.distinct = distinct.len() as u64;
        counts
    }

    /// The distinct non-zero identities, sorted.
    pub fn distinct_ids(&self) -> Vec<PageId> {
        let mut ids: Vec<PageId> = self
            .regions
            .iter()
            .flat_map(|r| r.ids.iter().flatten().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Encodes the manifest in its file format (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let nonzero: usize = self
            .regions
            .iter()
            .map(|r| r.ids.iter().flatten().count())
            .sum();
        let words: usize = self.regions.iter().map(|r| bitmap_words(r.ids.len())).sum();
        let mut w = Writer::with_capacity(16 + self.regions.len() * 16 + words * 8 + nonzero * 32);
        w.bytes(MAGIC);
        w.u32(VERSION);
        w.u32(self.regions.len() as u32);
        for r in &self.regions {
            w.u64(r.region.guest_addr);
            w.u64(r.region.pages);
        }
        for r in &self.regions {
            for chunk in r.ids.chunks(64) {
                let word = chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, id)| id.is_some())
                    .fold(0u64, |w, (bit, _)| w | (1 << bit));
                w.u64(word);
            }
            for id in r.ids.iter().flatten() {
                w.id(id);
            }
        }
        w.seal()
    }

    /// Decodes a manifest from untrusted bytes: checksum first, then every count is
    /// bounded by `limits` and by the bytes left before anything is allocated for it.
    pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Self, ManifestError> {
        let mut r = Reader::unseal(bytes)?;
        if &r.array::<8>("magic")? != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = r.u32("version")?;
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let count = r.u32("region count")?;
        let count = r.bound(count.into(), 16, limits.max_regions.into(), "region")?;
        let mut regions = Vec::with_capacity(count);
        let mut total_pages = 0u64;
        for _ in 0..count {
            let region = Region {
                guest_addr: r.u64("region address")?,
                pages: r.u64("region pages")?,
            };
            total_pages = total_pages.saturating_add(region.pages);
            if total_pages > limits.max_pages {
                return Err(CodecError::TooLarge {
                    what: "page",
                    count: total_pages,
                    limit: limits.max_pages,
                }
                .into());
            }
            regions.push(region);
        }
        validate_regions(&regions)?;

        let mut manifest = Manifest {
            regions: Vec::with_capacity(count),
        };
        for region in regions {
            let pages = region.pages as usize;
            let n_words = bitmap_words(pages);
            // A bitmap word per 64 pages must be present before the region is allocated.
            r.bound(n_words as u64, 8, u64::MAX, "non-zero bitmap")?;
            let mut words = Vec::with_capacity(n_words);
            for _ in 0..n_words {
                words.push(r.u64("non-zero bitmap")?);
            }
            if !pages.is_multiple_of(64) && words.last().is_some_and(|w| w >> (pages % 64) != 0) {
                return Err(ManifestError::Invalid("bitmap bits past the region end"));
            }
            let nonzero: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
            r.bound(nonzero, 32, u64::MAX, "identity")?;
            let mut ids = vec![None; pages];
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let page = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let id = r.id("identity")?;
                    if id.is_zero_page() {
                        return Err(ManifestError::Invalid("zero page listed as non-zero"));
                    }
                    ids[page] = Some(id);
                }
            }
            manifest.regions.push(RegionIds { region, ids });
        }
        r.finish()?;
        Ok(manifest)
    }

    /// Pages over all regions.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.region.pages).sum()
    }

    fn locate(&self, gfn: u64) -> Option<(usize, usize)> {
        // Regions are sorted and disjoint: the candidate is the last one starting at or
        // below `gfn`.
        let r = self
            .regions
            .partition_point(|r| r.region.first_gfn() <= gfn)
            .checked_sub(1)?;
        let offset = gfn - self.regions[r].region.first_gfn();
        (offset < self.regions[r].region.pages).then_some((r, offset as usize))
    }
}

fn validate_regions(regions: &[Region]) -> Result<(), ManifestError> {
    let mut end = 0u64;
    for (i, region) in regions.iter().enumerate() {
        region.validate()?;
        if i > 0 && region.guest_addr < end {
            return Err(ManifestError::Overlap(region.guest_addr));
        }
        end = region.guest_addr + region.bytes();
    }
    Ok(())
}

fn check_count(expected: usize, got: usize) -> Result<(), ManifestError> {
    if expected == got {
        Ok(())
    } else {
        Err(ManifestError::RegionCount { expected, got })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fill_page;

    /// Two regions with a hole between them, as guest RAM below and above 4 GiB.
    fn layout() -> Vec<Region> {
        vec![
            Region {
                guest_addr: 0,
                pages: 300,
            },
            Region {
                guest_addr: 1 << 32,
                pages: 130,
            },
        ]
    }

    fn memory(regions: &[Region]) -> Vec<Vec<u8>> {
        regions
            .iter()
            .enumerate()
            .map(|(r, region)| {
                let mut mem = vec![0u8; region.bytes() as usize];
                for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    match i % 4 {
                        0 => {}                                      // zero
                        1 => fill_page(page, 7_000_000),             // shared everywhere
                        _ => fill_page(page, (r * 1000 + i) as u64), // unique
                    }
                }
                mem
            })
            .collect()
    }

    fn slices(mems: &[Vec<u8>]) -> Vec<&[u8]> {
        mems.iter().map(|m| m.as_slice()).collect()
    }

    #[test]
    fn counts_and_lookup() {
        let regions = layout();
        let mems = memory(&regions);
        let m = Manifest::from_memory(&regions, &slices(&mems)).unwrap();
        let c = m.counts();
        assert_eq!(c.total, 430);
        assert_eq!(c.zero, 75 + 33);
        // One shared page plus the unique ones (two of every four pages).
        assert_eq!(c.distinct, 1 + 150 + 64);
        assert_eq!(m.distinct_ids().len() as u64, c.distinct);

        assert_eq!(m.get(0), Some(None));
        assert!(m.get(1).unwrap().is_some());
        assert_eq!(m.get(300), None, "hole below 4 GiB");
        let high = (1u64 << 32) >> PAGE_SHIFT;
        assert_eq!(m.get(high + 1), m.get(1));
        assert_eq!(m.get(high + 130), None);
        assert_eq!(m.iter().count(), 430);
        assert_eq!(m.iter().nth(300).unwrap().0, high);
    }

    #[test]
    fn rejects_bad_regions() {
        let bad = |regions: &[Region]| Manifest::new(regions).unwrap_err();
        assert!(matches!(
            bad(&[Region {
                guest_addr: 1,
                pages: 1
            }]),
            ManifestError::BadRegion { .. }
        ));
        assert!(matches!(
            bad(&[Region {
                guest_addr: 0,
                pages: 0
            }]),
            ManifestError::BadRegion { .. }
        ));
        assert!(matches!(
            bad(&[
                Region {
                    guest_addr: 0,
                    pages: 2
                },
                Region {
                    guest_addr: 4096,
                    pages: 1
                }
            ]),
            ManifestError::Overlap(4096)
        ));
        assert!(matches!(
            bad(&[Region {
                guest_addr: u64::MAX - 4095,
                pages: 2
            }]),
            ManifestError::BadRegion { .. }
        ));
    }

    #[test]
    fn update_from_dirty_bitmaps_rehashes_only_dirty_pages() {
        let regions = layout();
        let mut mems = memory(&regions);
        let mut m = Manifest::from_memory(&regions, &slices(&mems)).unwrap();
        let before = m.clone();

        // Write pages 2 and 3 of region 0 and page 129 of region 1, but report only
        // page 2 and page 129 as dirty, plus page 4, which did not change.
        for (r, p, seed) in [(0, 2, 50_000), (0, 3, 50_001), (1, 129, 50_002)] {
            fill_page(&mut mems[r][p * PAGE_SIZE..(p + 1) * PAGE_SIZE], seed);
        }
        let mut d0 = vec![0u64; bitmap_words(300)];
        d0[0] = (1 << 2) | (1 << 4);
        let mut d1 = vec![0u64; bitmap_words(130)];
        d1[129 / 64] = 1 << (129 % 64);

        let stats = m
            .update_all(&slices(&mems), &[d0.as_slice(), d1.as_slice()])
            .unwrap();
        assert_eq!(
            stats,
            RehashStats {
                rehashed: 3,
                changed: 2
            }
        );
        assert_ne!(m.get(2), before.get(2));
        assert_eq!(
            m.get(3),
            before.get(3),
            "page 3 was not dirty so not reread"
        );
        let high = (1u64 << 32) >> PAGE_SHIFT;
        assert_ne!(m.get(high + 129), before.get(high + 129));

        // Once page 3 is reported too, the manifest equals a full rehash.
        let mut d0 = vec![0u64; bitmap_words(300)];
        d0[0] = 1 << 3;
        assert_eq!(m.update(0, &mems[0], &d0).unwrap().changed, 1);
        assert_eq!(m, Manifest::from_memory(&regions, &slices(&mems)).unwrap());
    }

    #[test]
    fn update_checks_shapes() {
        let regions = layout();
        let mems = memory(&regions);
        let mut m = Manifest::new(&regions).unwrap();
        assert!(matches!(
            m.update(2, &mems[0], &[]),
            Err(ManifestError::NoSuchRegion(2))
        ));
        assert!(matches!(
            m.update(0, &mems[1], &[0; 5]),
            Err(ManifestError::Hashing { region: 0, .. })
        ));
        assert!(matches!(
            m.update_all(&slices(&mems), &[]),
            Err(ManifestError::RegionCount { .. })
        ));
    }

    #[test]
    fn encode_decode_round_trip() {
        let regions = layout();
        let mems = memory(&regions);
        let m = Manifest::from_memory(&regions, &slices(&mems)).unwrap();
        let bytes = m.encode();
        let back = Manifest::decode(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.counts(), m.counts());

        let empty = Manifest::new(&[]).unwrap();
        assert_eq!(
            Manifest::decode(&empty.encode(), &DecodeLimits::default()).unwrap(),
            empty
        );
    }

    #[test]
    fn truncated_or_flipped_manifest_is_rejected() {
        let regions = layout();
        let mems = memory(&regions);
        let bytes = Manifest::from_memory(&regions, &slices(&mems))
            .unwrap()
            .encode();
        let limits = DecodeLimits::default();
        for cut in [0, 1, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                Manifest::decode(&bytes[..cut], &limits).is_err(),
                "truncated at {cut}"
            );
        }
        for pos in [0, 9, 17, 40, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x10;
            assert!(
                matches!(
                    Manifest::decode(&bad, &limits),
                    Err(ManifestError::Malformed(CodecError::Checksum))
                ),
                "flip at {pos}"
            );
        }
    }

    /// Re-seals a hand-made body, as an attacker who knows the format would.
    fn sealed(build: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut w = Writer::default();
        build(&mut w);
        w.seal()
    }

    #[test]
    fn hostile_lengths_are_bounded_before_allocation() {
        let limits = DecodeLimits::default();
        // A huge region count.
        let bytes = sealed(|w| {
            w.bytes(MAGIC);
            w.u32(VERSION);
            w.u32(u32::MAX);
        });
        assert!(matches!(
            Manifest::decode(&bytes, &limits),
            Err(ManifestError::Malformed(CodecError::TooLarge { .. }))
        ));
        // A region claiming 2^40 pages with no bitmap behind it.
        let bytes = sealed(|w| {
            w.bytes(MAGIC);
            w.u32(VERSION);
            w.u32(1);
            w.u64(0);
            w.u64(1 << 40);
        });
        assert!(matches!(
            Manifest::decode(&bytes, &limits),
            Err(ManifestError::Malformed(CodecError::TooLarge { .. }))
        ));
        // Within the page limit but the bitmap is missing.
        let bytes = sealed(|w| {
            w.bytes(MAGIC);
            w.u32(VERSION);
            w.u32(1);
            w.u64(0);
            w.u64(1 << 20);
        });
        assert!(matches!(
            Manifest::decode(&bytes, &limits),
            Err(ManifestError::Malformed(CodecError::Truncated(_)))
        ));
        // A full bitmap with no identities behind it.
        let bytes = sealed(|w| {
            w.bytes(MAGIC);
            w.u32(VERSION);
            w.u32(1);
            w.u64(0);
            w.u64(64);
            w.u64(u64::MAX);
        });
        assert!(matches!(
            Manifest::decode(&bytes, &limits),
            Err(ManifestError::Malformed(CodecError::Truncated(_)))
        ));
        // Wrong magic and version.
        let bytes = sealed(|w| w.bytes(b"NOTAMANIFEST...."));
        assert!(matches!(
            Manifest::decode(&bytes, &limits),
            Err(ManifestError::BadMagic)
        ));
        let bytes = sealed(|w| {
            w.bytes(MAGIC);
            w.u32(99);
        });
        assert!(matches!(
            Manifest::decode(&bytes, &limits),
            Err(ManifestError::UnsupportedVersion(99))
        ));
        // Bits past the end of a region.
        let bytes = sealed(|w| {
            w.bytes(MAGIC);
            w.u32(VERSION);
            w.u32(1);
            w.u64(0);
            w.u64(1);
            w.u64(0b10);
            w.id(&PageId([1; 32]));
        });
        assert!(matches!(
            Manifest::decode(&bytes, &limits),
            Err(ManifestError::Invalid(_))
        ));
    }

    #[test]
    fn set_ignores_zero_identity() {
        let mut m = Manifest::new(&layout()).unwrap();
        assert!(m.set(5, Some(PageId([1; 32]))));
        assert_eq!(m.get(5), Some(Some(PageId([1; 32]))));
        assert!(m.set(5, Some(PageId::ZERO)));
        assert_eq!(m.get(5), Some(None));
        assert!(!m.set(300, None));
    }
}
