//! The manifest decoder (`fabric::Manifest::decode`) over fuzzed bytes: the whole file
//! (first byte even) or a body sealed here with a valid checksum (odd), so the fuzzer
//! reaches the region and bitmap decoding. An accepted manifest must encode back to the
//! exact bytes it came from (one encoding per manifest) and answer lookups consistently.
#![no_main]

use fabric::{DecodeLimits, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut sealed = rest.to_vec();
        sealed.extend_from_slice(blake3::hash(rest).as_bytes());
        sealed
    };
    let Ok(manifest) = Manifest::decode(&bytes, &DecodeLimits::default()) else {
        return;
    };
    assert!(
        manifest.encode() == bytes,
        "decode then encode changes the bytes"
    );
    let counts = manifest.counts();
    assert_eq!(counts.total, manifest.total_pages());
    assert!(counts.zero + counts.distinct <= counts.total);
    assert_eq!(manifest.distinct_ids().len() as u64, counts.distinct);
    let mut pages = 0u64;
    for (gfn, id) in manifest.iter() {
        assert_eq!(manifest.get(gfn), Some(id), "gfn {gfn}");
        pages += 1;
    }
    assert_eq!(pages, counts.total);
    for region in manifest.regions() {
        let last = region.first_gfn() + region.pages - 1;
        assert!(manifest.get(region.first_gfn()).is_some() && manifest.get(last).is_some());
    }
});
