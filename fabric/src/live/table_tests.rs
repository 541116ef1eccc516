//! Tests of the identity table: owner and readers in one process.

use super::*;
use crate::identity::PAGE_SIZE;
use crate::live::reader::TableReader;

fn regions() -> Vec<TableRegion> {
    vec![
        TableRegion {
            guest_addr: 0,
            pages: 1000,
            host_addr: 0x7000_0000_0000,
        },
        TableRegion {
            guest_addr: 1 << 32,
            pages: 100,
            host_addr: 0x7100_0000_0000,
        },
    ]
}

fn id(n: u8) -> PageId {
    PageId::of(&[n; PAGE_SIZE])
}

#[test]
fn a_reader_sees_what_the_owner_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("1.ids");
    let mut table = IdentityTable::create(Some(&path), &regions()).unwrap();
    let reader = TableReader::open(&path).unwrap();
    assert_eq!(reader.pages(), 1100);
    assert_eq!(reader.pid(), std::process::id());
    assert!(reader.owner_alive());
    assert_eq!(reader.frames().regions(), regions().as_slice());
    let zero = reader.entry(5).unwrap();
    assert_eq!((zero.state, zero.id), (PageState::Zero, None));

    let gen = reader.generation();
    let chunk_gen = reader.chunk_generation(1);
    table.set(600, PageState::Current, Some(id(7)));
    assert_ne!(reader.generation(), gen);
    assert_ne!(reader.chunk_generation(1), chunk_gen);
    assert_eq!(reader.chunk_generation(0), 0, "other chunks untouched");
    let e = reader.entry(600).unwrap();
    assert_eq!((e.state, e.id), (PageState::Current, Some(id(7))));

    table.update_chunk(1, |w| w.mark_stale(600));
    let e = reader.entry(600).unwrap();
    assert_eq!(
        (e.state, e.id),
        (PageState::Stale, Some(id(7))),
        "hint kept"
    );

    let mut out = Vec::new();
    assert!(reader.read_chunk(2, &mut out).is_some());
    assert_eq!(out.len(), 1100 - 1024, "the last chunk is short");
    // Frames: the second region starts at index 1000.
    let high = (1u64 << 32) / PAGE_SIZE as u64;
    assert_eq!(reader.frames().index(high + 3), Some(1003));
    assert_eq!(reader.frames().gfn(1003), Some(high + 3));
    assert_eq!(reader.frames().index(1000), None, "hole between regions");
    assert_eq!(
        reader.frames().host_addr(1001),
        Some(0x7100_0000_0000 + PAGE_SIZE as u64)
    );
    drop(table);
    assert!(!path.exists(), "the owner removes its table");
}

#[test]
fn malformed_tables_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.ids");
    std::fs::write(&path, b"short").unwrap();
    assert!(matches!(
        TableReader::open(&path),
        Err(TableError::Invalid { .. })
    ));
    let table = IdentityTable::create(Some(&path), &regions()).unwrap();
    let good = std::fs::read(&path).unwrap();
    // Bad magic, then a page count that does not match the size.
    for (offset, value) in [(0usize, 0u8), (32, 0x55)] {
        let mut bad = good.clone();
        bad[offset] = value;
        let p = dir.path().join(format!("bad{offset}.ids"));
        std::fs::write(&p, &bad).unwrap();
        assert!(
            matches!(TableReader::open(&p), Err(TableError::Invalid { .. })),
            "offset {offset}"
        );
    }
    // Truncated.
    let p = dir.path().join("cut.ids");
    std::fs::write(&p, &good[..good.len() - 4096]).unwrap();
    assert!(TableReader::open(&p).is_err());
    drop(table);
}

#[test]
fn readers_never_see_half_written_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.ids");
    let mut table = IdentityTable::create(Some(&path), &regions()).unwrap();
    let reader = TableReader::open(&path).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Every write sets the whole chunk to one identity.
            for n in 0..2000u32 {
                let v = id((n % 251) as u8);
                table.update_chunk(0, |w| {
                    for p in 0..CHUNK_PAGES {
                        w.set(p, PageState::Current, Some(v));
                    }
                });
            }
            stop.store(true, Ordering::Relaxed);
        });
        let mut out = Vec::new();
        let mut consistent = 0;
        while !stop.load(Ordering::Relaxed) {
            if reader.read_chunk(0, &mut out).is_some() {
                assert!(out.iter().all(|e| e.id == out[0].id), "torn chunk");
                consistent += 1;
            }
        }
        assert!(consistent > 0);
    });
}

#[test]
fn a_request_is_answered_only_by_work_that_started_after_it() {
    use crate::live::requests::Request::{Harvest, Sync};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("3.ids");
    let table = IdentityTable::create(Some(&path), &regions()).unwrap();
    let reader = TableReader::open(&path).unwrap();
    let owner = table.requests();
    // An owner that does not serve requests is not waited for.
    let started = std::time::Instant::now();
    assert!(!reader.request(Harvest, Duration::from_secs(5)));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!owner.any_pending());

    owner.set_serving(true);
    // Serving but not answering: the reader gives up after its wait; the request stays.
    assert!(!reader.request(Harvest, Duration::from_millis(50)));
    assert!(owner.pending(Harvest) && !owner.pending(Sync));
    owner.answered(Harvest, owner.count(Harvest));
    assert!(!owner.any_pending());
    // Work that began before the request does not answer it; work after it does.
    let before = owner.count(Sync);
    let asking = std::thread::spawn(move || reader.request(Sync, Duration::from_secs(10)));
    while !owner.pending(Sync) {
        std::thread::yield_now();
    }
    owner.answered(Sync, before);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !asking.is_finished(),
        "answered by work that began before the request"
    );
    owner.wait(Duration::from_secs(5)); // returns at once: a request is pending
    owner.answered(Sync, owner.count(Sync));
    assert!(asking.join().unwrap());
    // A request left to be served (no wait) is answered later.
    let reader = TableReader::open(&path).unwrap();
    assert!(!reader.request(Harvest, Duration::ZERO));
    assert!(owner.pending(Harvest));
    owner.set_serving(false);
    assert!(!reader.request(Harvest, Duration::from_secs(5)));
}

#[test]
fn a_reader_gets_the_generation_an_entry_was_read_at() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("4.ids");
    let mut table = IdentityTable::create(Some(&path), &regions()).unwrap();
    let reader = TableReader::open(&path).unwrap();
    let (_, before) = reader.entry_at_generation(600).unwrap();
    table.set(600, PageState::Current, Some(id(3)));
    let (entry, after) = reader.entry_at_generation(600).unwrap();
    assert_eq!((entry.state, entry.id), (PageState::Current, Some(id(3))));
    assert_ne!(before, after);
    assert_eq!(after, reader.chunk_generation(600 / CHUNK_PAGES));
}

/// Found by the identity_table fuzz target: a region whose host address runs past the end of
/// the address space overflowed `Frames::host_addr`.
#[test]
fn host_addresses_past_the_address_space_are_none() {
    let frames = Frames::new(vec![TableRegion {
        guest_addr: 0,
        pages: 4,
        host_addr: u64::MAX - 4095,
    }]);
    assert_eq!(frames.host_addr(0), Some(u64::MAX - 4095));
    assert_eq!(frames.host_addr(1), None);
    assert_eq!(frames.host_addr(4), None);
}
