//! Store recovery (`fabric::Store::open`) over a store directory whose index, journal, pack
//! and root files come from the fuzz input, raw or with valid checksums and batch frames (see
//! `fabric::store::fuzzing` for the input format). The opened store is read, changed and
//! reopened: no panic, and a store that took changes opens again with the same contents.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::Builder::new()
        .prefix("fabvm-fuzz-store-")
        .tempdir()
        .unwrap();
    fabric::store::fuzzing::run_open(&dir.path().join("store"), data);
});
