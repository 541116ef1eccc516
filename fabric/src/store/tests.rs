//! Unit tests of the page store: put, get, dedup, references, roots, gc, verify, and
//! detection of damaged pages and a damaged index.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use super::*;
use crate::identity::Page;
use crate::testutil::pages;

/// Small packs so that tests cross pack boundaries.
const SMALL: StoreOptions = StoreOptions {
    pack_pages: 64,
    checkpoint_bytes: 1 << 30,
};

fn refs(pages: &[(PageId, Box<Page>)]) -> Vec<(PageId, &[u8])> {
    pages.iter().map(|(id, p)| (*id, &p[..])).collect()
}

fn ids(pages: &[(PageId, Box<Page>)]) -> Vec<PageId> {
    pages.iter().map(|(id, _)| *id).collect()
}

fn read(store: &Store, id: &PageId) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; PAGE_SIZE];
    store.get(id, &mut buf).map(|()| buf)
}

/// Flips one bit of a stored page in its pack file.
fn damage_page(store: &Store, id: &PageId) {
    let e = store.state.entries[id];
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(store.packs.path(e.pack))
        .unwrap();
    let offset = u64::from(e.slot) * PAGE_SIZE as u64 + 100;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, offset).unwrap();
    file.write_all_at(&[b[0] ^ 1], offset).unwrap();
}

#[test]
fn put_get_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), SMALL).unwrap();
    let batch = pages(0..200);
    assert_eq!(store.put_many(&refs(&batch)).unwrap(), 200);
    // Again, plus duplicates within the batch and the zero page: nothing new.
    let mut again = refs(&batch);
    again.extend(refs(&batch[..10]));
    let zero = [0u8; PAGE_SIZE];
    again.push((PageId::ZERO, &zero));
    assert_eq!(store.put_many(&again).unwrap(), 0);
    assert_eq!(store.put_many(&refs(&pages(150..260))).unwrap(), 60);

    for (id, page) in &batch {
        assert!(store.contains(id));
        assert_eq!(read(&store, id).unwrap(), page[..]);
    }
    assert_eq!(read(&store, &PageId::ZERO).unwrap(), vec![0u8; PAGE_SIZE]);
    let unknown = pages([9999])[0].0;
    assert!(matches!(
        read(&store, &unknown),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.missing(&[batch[0].0, unknown]), vec![unknown]);
    assert_eq!(store.stats().pages, 260);
    assert_eq!(store.stats().packs, 5);

    let want = ids(&batch[..70]);
    let mut out = vec![0u8; 70 * PAGE_SIZE];
    store.get_many(&want, &mut out).unwrap();
    for (chunk, (_, page)) in out.chunks(PAGE_SIZE).zip(&batch) {
        assert_eq!(chunk, &page[..]);
    }

    // Everything survives a reopen.
    drop(store);
    let store = Store::open_with(dir.path(), SMALL).unwrap();
    assert_eq!(store.stats().pages, 260);
    assert_eq!(read(&store, &batch[199].0).unwrap(), batch[199].1[..]);
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn put_rejects_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let a = pages([1, 2]);
    let lie = [(a[0].0, &a[1].1[..])];
    assert!(matches!(
        store.put_many(&lie),
        Err(StoreError::PageMismatch(_))
    ));
    let short = [(a[0].0, &a[0].1[..100])];
    assert!(matches!(
        store.put_many(&short),
        Err(StoreError::PageSize(100))
    ));
    assert_eq!(store.stats().pages, 0);
    // The store is still usable.
    assert_eq!(store.put_many(&refs(&a)).unwrap(), 2);
}

#[test]
fn reference_counts() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let batch = pages(0..4);
    store.put_many(&refs(&batch)).unwrap();
    let (a, b) = (batch[0].0, batch[1].0);
    store.incref(&[a, a, b, PageId::ZERO]).unwrap();
    assert_eq!(store.refs(&a), Some(2));
    assert_eq!(store.refs(&b), Some(1));
    // All or nothing: b would underflow, so a is not decremented either.
    assert!(matches!(
        store.decref(&[a, b, b]),
        Err(StoreError::RefUnderflow(id)) if id == b
    ));
    assert_eq!(store.refs(&a), Some(2));
    let unknown = pages([77])[0].0;
    assert!(matches!(
        store.incref(&[a, unknown]),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.refs(&a), Some(2));
    store.decref(&[a]).unwrap();

    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.refs(&a), Some(1));
    assert_eq!(store.refs(&b), Some(1));
    let s = store.stats();
    assert_eq!((s.referenced_pages, s.unreferenced_pages), (2, 2));
    assert_eq!(s.logical_bytes, 2 * PAGE_SIZE as u64);
}

/// Found by the store_open fuzz target: a journal that raises a page's reference count
/// past 2^52 made `stats` overflow (logical bytes = references x 4096).
#[test]
fn huge_reference_counts_from_the_journal_do_not_overflow_stats() {
    let dir = tempfile::tempdir().unwrap();
    let batch = pages(0..1);
    let id = batch[0].0;
    {
        let mut store = Store::open(dir.path()).unwrap();
        store.put_many(&refs(&batch)).unwrap();
    }
    let path = dir.path().join(JOURNAL);
    let mut bytes = fs::read(&path).unwrap();
    let seq = journal::payloads(&bytes).len() as u64;
    bytes.extend(journal::batch(
        seq,
        &[Record::Ref {
            id,
            delta: i64::MAX,
        }],
    ));
    fs::write(&path, bytes).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.refs(&id), Some(i64::MAX as u64));
    let s = store.stats();
    assert_eq!(s.logical_bytes, u64::MAX);
    assert_eq!(s.referenced_pages, 1);
}

#[test]
fn roots_hold_references() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let batch = pages(0..10);
    store.put_many(&refs(&batch)).unwrap();
    let mut snap = ids(&batch[..6]);
    snap.push(snap[0]);
    snap.push(PageId::ZERO);
    let root = store.add_root("snap-1", &snap).unwrap();
    assert_eq!(root.pages, 6);
    store.add_root("snap-2", &ids(&batch[4..])).unwrap();
    assert!(matches!(
        store.add_root("snap-1", &[]),
        Err(StoreError::RootExists(_))
    ));
    assert!(matches!(
        store.add_root("bad/name", &[]),
        Err(StoreError::BadRootName(_))
    ));
    assert!(matches!(
        store.add_root("x", &ids(&pages([500]))),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.refs(&batch[5].0), Some(2));
    assert_eq!(store.root_ids("snap-2").unwrap().len(), 6);

    drop(store);
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store
            .roots()
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["snap-1", "snap-2"]
    );
    assert!(store.verify().unwrap().is_clean());
    assert_eq!(store.remove_root("snap-1").unwrap(), 6);
    assert!(matches!(
        store.remove_root("snap-1"),
        Err(StoreError::NoSuchRoot(_))
    ));
    assert_eq!(store.refs(&batch[0].0), Some(0));
    assert_eq!(store.refs(&batch[5].0), Some(1));
    assert!(!roots::path(dir.path(), "snap-1").exists());
    let s = store.stats();
    assert_eq!(s.roots, 1);
    assert_eq!(s.logical_bytes, 6 * PAGE_SIZE as u64);
}

#[test]
fn gc_reclaims_unreferenced_pages_and_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), SMALL).unwrap();
    let batch = pages(0..256);
    store.put_many(&refs(&batch)).unwrap();
    // Keep every fourth page and all of the last pack.
    let keep: Vec<PageId> = batch
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 == 0 || *i >= 192)
        .map(|(_, (id, _))| *id)
        .collect();
    store.add_root("keep", &keep).unwrap();
    let before = store.stats();

    let report = store.gc().unwrap();
    assert_eq!(report.pages_removed, 256 - keep.len() as u64);
    assert_eq!(
        report.packs_compacted, 3,
        "the full last pack is left alone"
    );
    assert_eq!(report.pages_moved, 48);
    assert!(report.bytes_reclaimed() >= 144 * PAGE_SIZE as u64);
    let after = store.stats();
    assert_eq!(after.pages, keep.len() as u64);
    assert_eq!(after.unreferenced_pages, 0);
    assert!(after.bytes_on_disk < before.bytes_on_disk);
    for id in &keep {
        assert!(read(&store, id).is_ok());
    }
    assert!(matches!(
        read(&store, &batch[1].0),
        Err(StoreError::NotFound(_))
    ));
    assert!(store.verify().unwrap().is_clean());

    // New pages after gc, then a reopen.
    store.put_many(&refs(&pages(1000..1010))).unwrap();
    drop(store);
    let mut store = Store::open_with(dir.path(), SMALL).unwrap();
    assert!(store.verify().unwrap().is_clean());
    assert_eq!(store.stats().pages, keep.len() as u64 + 10);
    // Dropping the root and collecting again empties the store.
    store.remove_root("keep").unwrap();
    store.gc().unwrap();
    let s = store.stats();
    assert_eq!((s.pages, s.packs), (0, 0));
    assert_eq!(fs::read_dir(dir.path().join(pack::DIR)).unwrap().count(), 0);
}

#[test]
fn corrupted_page_is_detected_by_get_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), SMALL).unwrap();
    let batch = pages(0..100);
    store.put_many(&refs(&batch)).unwrap();
    store.add_root("all", &ids(&batch)).unwrap();
    let victim = batch[70].0;
    damage_page(&store, &victim);

    assert!(matches!(read(&store, &victim), Err(StoreError::PageCorrupt(id)) if id == victim));
    assert!(read(&store, &batch[69].0).is_ok());
    let report = store.verify().unwrap();
    assert_eq!(report.corrupt, vec![victim]);
    assert!(!report.is_clean());
    assert_eq!(report.pages_checked, 100);
    // gc will not copy a damaged page into a new pack.
    store.remove_root("all").unwrap();
    store.incref(&[victim]).unwrap();
    assert!(matches!(store.gc(), Err(StoreError::PageCorrupt(_))));
    assert_eq!(store.stats().pages, 100, "a failed gc changes nothing");
}

#[test]
fn truncated_pack_is_reported_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), SMALL).unwrap();
    let batch = pages(0..10);
    store.put_many(&refs(&batch)).unwrap();
    let path = store.packs.path(0);
    drop(store);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(8 * PAGE_SIZE as u64).unwrap();
    let mut store = Store::open_with(dir.path(), SMALL).unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.missing.len(), 2);
    assert!(matches!(
        read(&store, &batch[9].0),
        Err(StoreError::PageMissing(_))
    ));
    // New pages go to a new pack rather than after the hole.
    store.put_many(&refs(&pages(20..21))).unwrap();
    assert_eq!(store.stats().packs, 2);
}

/// Found by the store_open fuzz target: an index stating a pack of 2^32 - 1 slots made
/// verify allocate a slot table that long (out of memory).
#[test]
fn verify_is_bounded_by_the_pages_not_by_a_stated_pack_length() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.put_many(&refs(&pages(0..1))).unwrap();
    store.checkpoint().unwrap();
    drop(store);
    let index = dir.path().join(INDEX);
    let mut state = State::decode(&fs::read(&index).unwrap()).unwrap();
    let pack = *state.packs.keys().next().unwrap();
    state.packs.insert(pack, u32::MAX);
    fs::write(&index, state.encode()).unwrap();

    let store = Store::open(dir.path()).unwrap();
    let report = store.verify().unwrap();
    let hole = format!(
        "{} of the {} slots of pack {pack} hold no page",
        u32::MAX - 1,
        u32::MAX
    );
    assert!(report.problems.contains(&hole), "{report:?}");
    assert_eq!(report.pages_checked, 1);
    assert!(report.corrupt.is_empty() && report.missing.is_empty());
}

/// Found by the store_open fuzz target: with every pack number used (an index saying the
/// next is u32::MAX), a put that needed a new pack overflowed the pack number.
#[test]
fn a_put_without_a_pack_number_left_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let one_page_packs = StoreOptions {
        pack_pages: 1,
        ..SMALL
    };
    let mut store = Store::open_with(dir.path(), one_page_packs).unwrap();
    store.put_many(&refs(&pages(0..1))).unwrap();
    store.checkpoint().unwrap();
    drop(store);
    let index = dir.path().join(INDEX);
    let mut state = State::decode(&fs::read(&index).unwrap()).unwrap();
    state.next_pack = u32::MAX;
    fs::write(&index, state.encode()).unwrap();

    let mut store = Store::open_with(dir.path(), one_page_packs).unwrap();
    assert!(matches!(
        store.put_many(&refs(&pages(1..2))),
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(store.stats().pages, 1);
    drop(store);
    let store = Store::open_with(dir.path(), one_page_packs).unwrap();
    assert_eq!(store.stats().pages, 1);
}

/// Seen while fixing the store_open findings: an index at generation u64::MAX made the
/// next checkpoint (explicit, after a large journal, or by gc) overflow the generation.
#[test]
fn a_checkpoint_past_the_last_generation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.put_many(&refs(&pages(0..2))).unwrap();
    store.checkpoint().unwrap();
    drop(store);
    let index = dir.path().join(INDEX);
    let mut state = State::decode(&fs::read(&index).unwrap()).unwrap();
    state.generation = u64::MAX;
    fs::write(&index, state.encode()).unwrap();

    let mut store = Store::open(dir.path()).unwrap();
    assert!(matches!(store.checkpoint(), Err(StoreError::Corrupt(_))));
    assert!(matches!(store.gc(), Err(StoreError::Corrupt(_))));
    // Batches still commit; only the automatic checkpoint after them is skipped.
    store.incref(&ids(&pages(0..1))).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.stats().pages, 2);
    assert_eq!(store.refs(&pages(0..1)[0].0), Some(1));
}

#[test]
fn corrupted_index_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let batch = pages(0..50);
    store.put_many(&refs(&batch[..20])).unwrap();
    store.checkpoint().unwrap();
    store.put_many(&refs(&batch[20..30])).unwrap();
    store.put_many(&refs(&batch[30..])).unwrap();
    drop(store);

    let flip = |name: &str, pos: usize| {
        let path = dir.path().join(name);
        let mut bytes = fs::read(&path).unwrap();
        bytes[pos] ^= 0x20;
        fs::write(&path, bytes).unwrap();
    };
    // A bit flipped in the checkpoint.
    let index_len = fs::metadata(dir.path().join(INDEX)).unwrap().len() as usize;
    flip(INDEX, index_len / 2);
    let opened = Store::open(dir.path());
    assert!(matches!(opened, Err(StoreError::Corrupt(_))), "{opened:?}");
    flip(INDEX, index_len / 2);
    Store::open(dir.path()).unwrap();

    // A bit flipped in the first of two journal batches: not a torn tail.
    flip(JOURNAL, journal::HEADER_LEN + 100);
    let opened = Store::open(dir.path());
    assert!(matches!(opened, Err(StoreError::Corrupt(_))), "{opened:?}");
    flip(JOURNAL, journal::HEADER_LEN + 100);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.stats().pages, 50);

    // Damage made while the store is open is caught by verify.
    let path = dir.path().join(INDEX);
    let mut bytes = fs::read(&path).unwrap();
    bytes[40] ^= 1;
    fs::write(&path, bytes).unwrap();
    let report = store.verify().unwrap();
    assert!(!report.is_clean());
    assert!(report.problems[0].contains("index on disk"));
}

#[test]
fn torn_journal_tail_and_orphans_are_cleaned_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), SMALL).unwrap();
    let batch = pages(0..10);
    store.put_many(&refs(&batch)).unwrap();
    drop(store);
    // Simulate a crash mid-put: half a batch in the journal, page bytes past the end of
    // the pack, an orphan pack and root file, leftover temporary files.
    let journal_path = dir.path().join(JOURNAL);
    let good_len = fs::metadata(&journal_path).unwrap().len();
    let torn = journal::batch(
        1,
        &[Record::Put {
            id: PageId([5; 32]),
            pack: 0,
            slot: 10,
        }],
    );
    let mut bytes = fs::read(&journal_path).unwrap();
    bytes.extend_from_slice(&torn[..torn.len() - 3]);
    fs::write(&journal_path, bytes).unwrap();
    let packs_dir = dir.path().join(pack::DIR);
    let pack0 = packs_dir.join("00000000.pack");
    let mut data = fs::read(&pack0).unwrap();
    data.extend_from_slice(&[7u8; PAGE_SIZE + 5]);
    fs::write(&pack0, data).unwrap();
    fs::write(packs_dir.join("00000009.pack"), [1u8; PAGE_SIZE]).unwrap();
    fs::write(roots::path(dir.path(), "orphan"), b"x").unwrap();
    fs::write(dir.path().join("index.tmp"), b"x").unwrap();

    let mut store = Store::open_with(dir.path(), SMALL).unwrap();
    assert_eq!(fs::metadata(&journal_path).unwrap().len(), good_len);
    assert_eq!(fs::metadata(&pack0).unwrap().len(), 10 * PAGE_SIZE as u64);
    assert!(!packs_dir.join("00000009.pack").exists());
    assert!(!roots::path(dir.path(), "orphan").exists());
    assert!(!dir.path().join("index.tmp").exists());
    assert!(store.verify().unwrap().is_clean());
    // Appending continues where the committed pages end.
    store.put_many(&refs(&pages(10..12))).unwrap();
    assert_eq!(store.state.packs[&0], 12);
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn checkpoints_happen_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        pack_pages: 64,
        checkpoint_bytes: 2000,
    };
    let mut store = Store::open_with(dir.path(), opts).unwrap();
    for i in 0..20 {
        store.put_many(&refs(&pages(i * 10..i * 10 + 10))).unwrap();
        store.incref(&ids(&pages([i * 10]))).unwrap();
    }
    assert!(store.state.generation > 2, "journal was checkpointed");
    // The threshold is the larger of the option and half the index's size.
    assert!(store.stats().journal_bytes < 200 * 24 + 1000);
    let expected = store.state.clone();
    drop(store);
    let store = Store::open_with(dir.path(), opts).unwrap();
    assert_eq!(store.state, expected);
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open(dir.path()).unwrap();
    assert!(matches!(Store::open(dir.path()), Err(StoreError::Busy(_))));
}

#[test]
fn reports_serialize_to_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.put_many(&refs(&pages(0..3))).unwrap();
    let stats = serde_json::to_value(store.stats()).unwrap();
    assert_eq!(stats["pages"], 3);
    let verify = serde_json::to_value(store.verify().unwrap()).unwrap();
    assert_eq!(verify["pages_checked"], 3);
    let gc = serde_json::to_value(store.gc().unwrap()).unwrap();
    assert_eq!(gc["pages_removed"], 3);
    let back: GcReport = serde_json::from_value(gc).unwrap();
    assert_eq!(back.pages_removed, 3);
}

#[test]
fn missing_index_with_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.put_many(&refs(&pages(0..3))).unwrap();
    drop(store);
    fs::remove_file(dir.path().join(INDEX)).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Corrupt(_))
    ));
}

#[test]
fn fingerprint_moves_with_committed_changes_only() {
    let dir = tempfile::tempdir().unwrap();
    let before = fingerprint(dir.path());
    let mut store = Store::open_with(dir.path(), SMALL).unwrap();
    let p = pages(1..=3);
    store.put_many(&refs(&p)).unwrap();
    let put = fingerprint(dir.path());
    assert_ne!(before, put);
    assert_eq!(put, fingerprint(dir.path()), "reading it changes nothing");
    assert_eq!(store.ids().len(), 3);
    store.add_root("r", &ids(&p)).unwrap();
    assert_ne!(put, fingerprint(dir.path()));
}
