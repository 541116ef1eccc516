//! Store recovery over fuzzed files, for the `store_open` fuzz target and the tests: the
//! fuzz input describes the files of a store directory (index, journal, packs, root files),
//! written raw or with their checksums and frames made valid here so the fuzzer reaches
//! the decoders and the replay rules behind them. The store is opened, read, changed and
//! reopened; it must never panic, and a store that opened and took changes must open again
//! with the same contents. Compiled for tests and with the `fuzzing` feature only.
//!
//! ```text
//! input:   section*           (a section cut short by the end of the input is dropped)
//! section: kind u8 | length u16 LE | body
//! kind 0   index file, raw
//!      1   index file without its checksum (appended here)
//!      2   journal file, raw (replaces the journal built so far)
//!      3   journal header: generation u64 LE; starts a new journal
//!      4   journal batch payload (records), framed with the next sequence number
//!      5   pack: number u8 | extra bytes u8 | one fill byte per 4 KiB slot
//!      6   root: name length u8 | name | pages u64 LE | root file body (checksum appended
//!          here); a batch adding the root with the file's digest goes into the journal
//!      7   root file, raw: name length u8 | name | file bytes
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::journal::{self, Record};
use super::{pack, roots, Store, StoreOptions, StoreStats, INDEX, JOURNAL};
use crate::identity::{PageId, PAGE_SIZE};

/// Small packs and frequent checkpoints, so a few pages reach every path.
pub const OPTIONS: StoreOptions = StoreOptions {
    pack_pages: 4,
    checkpoint_bytes: 2048,
};

const INDEX_RAW: u8 = 0;
const INDEX_SEALED: u8 = 1;
const JOURNAL_RAW: u8 = 2;
const JOURNAL_HEADER: u8 = 3;
const JOURNAL_BATCH: u8 = 4;
const PACK: u8 = 5;
const ROOT: u8 = 6;
const ROOT_RAW: u8 = 7;

/// The files of a store directory, as the input describes them.
#[derive(Debug, Default)]
struct Files {
    index: Option<Vec<u8>>,
    journal: Vec<u8>,
    batches: u64,
    packs: BTreeMap<u8, Vec<u8>>,
    roots: Vec<(String, Vec<u8>)>,
}

impl Files {
    fn parse(mut input: &[u8]) -> Files {
        let mut files = Files::default();
        while input.len() >= 3 {
            let kind = input[0];
            let len = usize::from(u16::from_le_bytes([input[1], input[2]]));
            let Some(body) = input.get(3..3 + len) else {
                break;
            };
            input = &input[3 + len..];
            files.section(kind, body);
        }
        files
    }

    fn section(&mut self, kind: u8, body: &[u8]) {
        match kind {
            INDEX_RAW => self.index = Some(body.to_vec()),
            INDEX_SEALED => self.index = Some(seal(body)),
            JOURNAL_RAW => {
                self.journal = body.to_vec();
                self.batches = journal::payloads(body).len() as u64;
            }
            JOURNAL_HEADER => {
                let mut gen = [0u8; 8];
                let n = body.len().min(8);
                gen[..n].copy_from_slice(&body[..n]);
                self.journal = journal::header(u64::from_le_bytes(gen));
                self.batches = 0;
            }
            JOURNAL_BATCH => self.batch(body),
            PACK => {
                if let [number, extra, fills @ ..] = body {
                    let mut data = Vec::with_capacity(fills.len() * PAGE_SIZE + 255);
                    for &fill in fills {
                        data.extend_from_slice(&[fill; PAGE_SIZE]);
                    }
                    data.extend(std::iter::repeat_n(0x5a, usize::from(*extra)));
                    self.packs.insert(*number, data);
                }
            }
            ROOT => {
                if let Some((name, rest)) = name(body) {
                    let mut pages = [0u8; 8];
                    let n = rest.len().min(8);
                    pages[..n].copy_from_slice(&rest[..n]);
                    let file = seal(&rest[n..]);
                    let record = Record::AddRoot {
                        name: name.clone(),
                        digest: *blake3::hash(&file).as_bytes(),
                        pages: u64::from_le_bytes(pages),
                    };
                    self.roots.push((name, file));
                    self.batch_records(&[record]);
                }
            }
            ROOT_RAW => {
                if let Some((name, rest)) = name(body) {
                    self.roots.push((name, rest.to_vec()));
                }
            }
            _ => {}
        }
    }

    fn batch(&mut self, payload: &[u8]) {
        self.append(journal::frame(self.batches, payload));
    }

    fn batch_records(&mut self, records: &[Record]) {
        self.append(journal::batch(self.batches, records));
    }

    /// Appends a framed batch to the journal (started with its header if empty).
    fn append(&mut self, frame: Vec<u8>) {
        if self.journal.is_empty() {
            self.journal = journal::header(1);
        }
        self.journal.extend_from_slice(&frame);
        self.batches += 1;
    }

    fn write(&self, dir: &Path) -> std::io::Result<()> {
        fs::create_dir_all(dir.join(pack::DIR))?;
        fs::create_dir_all(dir.join(roots::DIR))?;
        if let Some(index) = &self.index {
            fs::write(dir.join(INDEX), index)?;
        }
        if !self.journal.is_empty() || self.index.is_some() {
            fs::write(dir.join(JOURNAL), &self.journal)?;
        }
        let packs = super::pack::Packs::new(dir);
        for (&number, data) in &self.packs {
            fs::write(packs.path(number.into()), data)?;
        }
        for (name, data) in &self.roots {
            fs::write(roots::path(dir, name), data)?;
        }
        Ok(())
    }
}

/// A root name from `length u8 | name`, if it is one the store could have written (so
/// nothing is written outside the directory), and the bytes after it.
fn name(body: &[u8]) -> Option<(String, &[u8])> {
    let (&len, rest) = body.split_first()?;
    let name = rest.get(..usize::from(len))?;
    let name = std::str::from_utf8(name).ok()?.to_string();
    roots::check_name(&name).ok()?;
    Some((name, &rest[usize::from(len)..]))
}

fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    out.extend_from_slice(blake3::hash(body).as_bytes());
    out
}

/// Writes the files `input` describes into `dir` (an empty directory).
pub fn write_store(dir: &Path, input: &[u8]) -> std::io::Result<()> {
    Files::parse(input).write(dir)
}

/// Writes the store `input` describes into `dir` (an empty directory), opens it, reads
/// it, changes it and reopens it. Panics only when the store breaks its own promises.
pub fn run_open(dir: &Path, input: &[u8]) {
    if write_store(dir, input).is_err() {
        return;
    }
    let Ok(mut store) = Store::open_with(dir, OPTIONS) else {
        return;
    };
    let _ = store.stats();
    for root in store.roots() {
        let _ = store.root_ids(&root.name);
    }
    let before = store.verify().ok();
    let first_root = store.roots().first().map(|r| r.name.clone());
    let Ok(()) = change(&mut store, first_root.as_deref()) else {
        return;
    };
    let expected = contents(&store);
    drop(store);
    let store = Store::open_with(dir, OPTIONS)
        .unwrap_or_else(|e| panic!("a store that opened and took changes fails to reopen: {e}"));
    assert_eq!(contents(&store), expected, "reopened store differs");
    if before.is_some_and(|r| r.is_clean()) {
        let after = store.verify().expect("verify after reopening");
        assert!(after.is_clean(), "changes damaged a clean store: {after:?}");
    }
}

/// Puts pages, adds a root, drops another, checkpoints and collects garbage.
fn change(store: &mut Store, old_root: Option<&str>) -> Result<(), super::StoreError> {
    let pages: Vec<[u8; PAGE_SIZE]> = [0xa5u8, 0x3c, 0x01].map(|b| [b; PAGE_SIZE]).to_vec();
    let ids: Vec<PageId> = pages.iter().map(PageId::of).collect();
    let batch: Vec<(PageId, &[u8])> = ids
        .iter()
        .copied()
        .zip(pages.iter().map(|p| &p[..]))
        .collect();
    store.put_many(&batch)?;
    let _ = store.get(&ids[0], &mut [0u8; PAGE_SIZE]);
    if store.roots().iter().all(|r| r.name != "fuzz-new") {
        store.add_root("fuzz-new", &ids[..2])?;
    }
    store.incref(&ids[2..])?;
    if let Some(name) = old_root.filter(|n| *n != "fuzz-new") {
        store.remove_root(name)?;
    }
    store.checkpoint()?;
    store.gc()?;
    Ok(())
}

/// What must survive a reopen: the figures and the roots.
fn contents(store: &Store) -> (StoreStats, Vec<super::RootSummary>) {
    let mut stats = store.stats();
    // Bytes on disk include files a reopen tidies (torn tails, stray packs).
    stats.bytes_on_disk = 0;
    (stats, store.roots())
}

/// The input that describes the store in `dir` (for seed corpora): its checkpoint without
/// checksum, journal header and batch payloads, packs by fill byte (seed pages must be
/// uniform) and root files raw.
pub fn describe(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut section = |kind: u8, body: &[u8]| {
        let len = u16::try_from(body.len()).expect("seed sections under 64 KiB");
        out.push(kind);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(body);
    };
    let index = fs::read(dir.join(INDEX))?;
    section(INDEX_SEALED, &index[..index.len().saturating_sub(32)]);
    let journal = fs::read(dir.join(JOURNAL))?;
    section(JOURNAL_HEADER, journal.get(16..24).unwrap_or_default());
    for payload in journal::payloads(&journal) {
        section(JOURNAL_BATCH, payload);
    }
    let packs = super::pack::Packs::new(dir);
    let (numbers, _) = packs.scan().map_err(std::io::Error::other)?;
    for number in numbers {
        let data = fs::read(packs.path(number))?;
        let mut body = vec![u8::try_from(number).expect("seed packs under 256"), 0];
        body.extend(data.chunks(PAGE_SIZE).map(|page| page[0]));
        section(PACK, &body);
    }
    let (names, _) = roots::scan(dir).map_err(std::io::Error::other)?;
    for name in names {
        let mut body = vec![name.len() as u8];
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&fs::read(roots::path(dir, &name))?);
        section(ROOT_RAW, &body);
    }
    Ok(out)
}

/// A small real store at `dir`, for tests and seeds: six pages in two packs, root `snap-1`
/// over the first two, a checkpoint, then journal batches (three more pages, references to
/// the last two). Returns it open, with the pages' identities.
pub fn sample_store(dir: &Path) -> Result<(Store, Vec<PageId>), super::StoreError> {
    let mut store = Store::open_with(dir, OPTIONS)?;
    let pages: Vec<[u8; PAGE_SIZE]> = (1..=6u8).map(|b| [b; PAGE_SIZE]).collect();
    let ids: Vec<PageId> = pages.iter().map(PageId::of).collect();
    let batch: Vec<(PageId, &[u8])> = ids
        .iter()
        .copied()
        .zip(pages.iter().map(|p| &p[..]))
        .collect();
    store.put_many(&batch[..3])?;
    store.add_root("snap-1", &ids[..2])?;
    store.checkpoint()?;
    store.put_many(&batch[3..])?;
    store.incref(&ids[4..])?;
    Ok((store, ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_described_store_is_written_back_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let original = tmp.path().join("a");
        sample_store(&original).unwrap();
        let input = describe(&original).unwrap();
        let copy = tmp.path().join("b");
        write_store(&copy, &input).unwrap();
        for name in [
            INDEX,
            JOURNAL,
            "packs/00000000.pack",
            "packs/00000001.pack",
            "roots/snap-1.root",
        ] {
            assert_eq!(
                fs::read(original.join(name)).unwrap(),
                fs::read(copy.join(name)).unwrap(),
                "{name}"
            );
        }
        let a = Store::open_with(&original, OPTIONS).unwrap();
        let b = Store::open_with(&copy, OPTIONS).unwrap();
        assert_eq!(contents(&a), contents(&b));
        assert!(b.verify().unwrap().is_clean());
    }

    #[test]
    fn the_harness_runs_a_real_store_through_its_checks() {
        let tmp = tempfile::tempdir().unwrap();
        sample_store(&tmp.path().join("a")).unwrap();
        let input = describe(&tmp.path().join("a")).unwrap();
        run_open(&tmp.path().join("b"), &input);
        let store = Store::open_with(tmp.path().join("b"), OPTIONS).unwrap();
        // The harness's changes are there: its root, and snap-1 removed.
        let roots: Vec<String> = store.roots().into_iter().map(|r| r.name).collect();
        assert_eq!(roots, vec!["fuzz-new".to_string()]);
        assert!(store.verify().unwrap().is_clean());
    }

    #[test]
    fn raw_and_cut_sections_are_taken_as_they_are() {
        let tmp = tempfile::tempdir().unwrap();
        // A raw journal of garbage and a section cut short: the store refuses, no panic.
        let mut input = vec![JOURNAL_RAW, 3, 0, b'x', b'y', b'z', INDEX_RAW, 9, 0, 1];
        run_open(&tmp.path().join("s"), &input);
        input.truncate(6);
        run_open(&tmp.path().join("t"), &input);
        assert!(Store::open_with(tmp.path().join("t"), OPTIONS).is_err());
    }
}
