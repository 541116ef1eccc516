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
mod tests;
