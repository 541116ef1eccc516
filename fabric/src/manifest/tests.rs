//! Tests of manifests: hashing, incremental updates, the file format and its decoder.

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
