//! The host page store: every distinct page once on disk under a directory, an index with
//! reference counts, integrity checked on every read, and safe against a kill at any point.
//!
//! # Format, and why not an embedded database
//!
//! ```text
//! <dir>/LOCK              flock'd by the one process that has the store open
//!       packs/NNNNNNNN.pack  page contents in 4 KiB slots, only appended to
//!       journal           checksummed batches of index changes since the checkpoint
//!       index             checkpoint of the whole index, replaced by atomic rename
//!       roots/<name>.root page lists of named holders (snapshots, templates)
//! ```
//!
//! A hand-rolled pack + journal rather than an embedded store such as redb, because:
//! - **Throughput**: a snapshot's pages go to disk as one sequential append plus a
//!   41-byte journal record per page, with two syncs per `put_many`, so a batch runs near
//!   disk bandwidth; a B-tree store copies and rebalances pages for every 4 KiB value.
//! - **Page-aligned data**: slot `s` of a pack is at `s * 4096`, so a later restore path
//!   can map store pages straight into guests (`MAP_PRIVATE`) and share the page cache.
//! - **Crash safety that fits in a paragraph** and is tested by killing a writer: page
//!   data is written and synced before the journal batch that names it, a batch is synced
//!   before it is acknowledged, and a checkpoint is written to a temporary file and renamed.
//!   On open the journal is replayed (a torn last batch is cut off; damage anywhere else is
//!   an error), pack bytes past the committed length and files no index entry names are
//!   deleted. Every record is checked against the state it applies to while replaying.
//! - **Space**: `gc` drops pages with no references and compacts the packs that held them
//!   (live pages copied and verified into new packs, then one checkpoint, then the old packs
//!   deleted).
//!
//! Costs: the index lives in memory (about 100 bytes per distinct page), opening replays
//! the journal, and one process at a time has a store open (others get [`StoreError::Busy`]).

mod fsutil;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod gc;
mod journal;
mod pack;
mod read;
mod recover;
mod roots;
mod state;
mod verify;

#[cfg(test)]
mod crash_tests;

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::identity::{Page, PageId, PAGE_SIZE};
use fsutil::{io_err, open_rw, sync_dir, write_atomic};
use journal::Record;
use pack::{PackWriter, Packs};
use state::State;

pub use fsutil::default_dir;
pub use gc::GcReport;
pub use verify::VerifyReport;

const INDEX: &str = "index";
const JOURNAL: &str = "journal";

/// Pages written to a pack per write call in `put_many` and `gc` (8 MiB).
const WRITE_CHUNK: usize = 2048;

/// Errors of the page store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process has the store open.
    #[error("store {0} is in use by another process")]
    Busy(PathBuf),
    /// The index (checkpoint or journal) is damaged or inconsistent.
    #[error("store index is damaged: {0}")]
    Corrupt(String),
    /// No page with this identity is stored.
    #[error("page {0} is not in the store")]
    NotFound(PageId),
    /// A stored page no longer hashes to its identity.
    #[error("page {0} on disk does not match its identity")]
    PageCorrupt(PageId),
    /// A stored page cannot be read (its pack is shorter than the index says, or gone).
    #[error("page {0} is missing from its pack")]
    PageMissing(PageId),
    /// Data handed to `put_many` does not hash to the identity given with it.
    #[error("data given for page {0} does not hash to it")]
    PageMismatch(PageId),
    /// A page buffer is not 4096 bytes.
    #[error("page buffer of {0} bytes, expected 4096")]
    PageSize(usize),
    /// A `decref` would take a reference count below zero.
    #[error("reference count of page {0} would drop below zero")]
    RefUnderflow(PageId),
    /// A root name is empty, too long, or has characters other than `[A-Za-z0-9._-]`.
    #[error("invalid root name {0:?}")]
    BadRootName(String),
    /// A root of this name is already registered.
    #[error("root {0} already exists")]
    RootExists(String),
    /// No root of this name is registered.
    #[error("no root {0}")]
    NoSuchRoot(String),
    /// A root's page list is missing or does not match the index.
    #[error("root {name} is damaged: {reason}")]
    RootDamaged { name: String, reason: String },
    /// An earlier write failed; the on-disk store is intact but this handle must be reopened.
    #[error("store is unusable after a failed write; reopen it")]
    Poisoned,
}

/// The error of a checkpoint past generation u64::MAX (a damaged index).
fn generation_exhausted() -> StoreError {
    StoreError::Corrupt("index generation out of range".into())
}

/// Tuning of a store; the defaults suit production, tests use small values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Slots per pack file before a new one is started (default 262144: 1 GiB).
    pub pack_pages: u32,
    /// Journal size that triggers a checkpoint (default 64 MiB, or half the index if larger).
    pub checkpoint_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            pack_pages: 1 << 18,
            checkpoint_bytes: 64 << 20,
        }
    }
}

/// Sizes and counts of a store (for `fabvm store stats`; serializes to JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Distinct pages stored.
    pub pages: u64,
    /// Bytes of those pages (`pages * 4096`).
    pub page_bytes: u64,
    /// Pages with at least one reference.
    pub referenced_pages: u64,
    /// Bytes of the referenced pages.
    pub referenced_bytes: u64,
    /// Pages with no reference, reclaimed by the next `gc`.
    pub unreferenced_pages: u64,
    /// Bytes the references stand for: each page counted once per reference. The ratio
    /// `logical_bytes / referenced_bytes` is the sharing the store achieves.
    pub logical_bytes: u64,
    /// Bytes of every file of the store.
    pub bytes_on_disk: u64,
    /// Pack files.
    pub packs: u64,
    /// Registered roots.
    pub roots: u64,
    /// Bytes of journal since the last checkpoint.
    pub journal_bytes: u64,
}

/// A registered root: a named holder of one reference on each of its pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSummary {
    pub name: String,
    /// Distinct non-zero pages it holds.
    pub pages: u64,
}

/// An open page store. One process at a time; reads take `&self` and may run in parallel.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
    state: State,
    packs: Packs,
    journal: File,
    journal_len: u64,
    next_seq: u64,
    /// The pack new pages are appended to, when there is one with room.
    append: Option<u32>,
    options: StoreOptions,
    poisoned: bool,
}

/// A cheap fingerprint of the store under `dir` (inode, length and modification time of its
/// index and journal: a checkpoint renames a new index into place, a commit appends to the
/// journal) that moves whenever a committed change does: for a process that polls a store
/// others write (the host agent) and opens it, taking its lock, only when this moved.
pub fn fingerprint(dir: &Path) -> [u128; 6] {
    use std::os::unix::fs::MetadataExt;
    let stat = |name: &str| {
        fs::metadata(dir.join(name)).map_or([0; 3], |m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            [u128::from(m.ino()), u128::from(m.len()), mtime]
        })
    };
    let (index, journal) = (stat(INDEX), stat(JOURNAL));
    [
        index[0], index[1], index[2], journal[0], journal[1], journal[2],
    ]
}

impl Store {
    /// Opens (creating if needed) the store under `dir`, recovering from any crash.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreOptions::default())
    }

    /// [`Store::open`] with explicit options.
    pub fn open_with(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let lock = fsutil::lock(&dir)?;
        for sub in [pack::DIR, roots::DIR] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io_err("create", &path))?;
        }
        sync_dir(&dir)?;
        for name in [INDEX, JOURNAL] {
            let _ = fs::remove_file(fsutil::tmp_path(&dir.join(name)));
        }

        let (state, journal, replay) = recover::load_index(&dir)?;
        let mut store = Store {
            packs: Packs::new(&dir),
            journal_len: replay.valid_len,
            next_seq: replay.next_seq,
            dir,
            _lock: lock,
            state,
            journal,
            append: None,
            options,
            poisoned: false,
        };
        store.recover_packs()?;
        store.recover_roots()?;
        Ok(store)
    }

    /// The directory of the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores the pages not already present and returns how many that was. Each page's
    /// data is checked against its identity first (in parallel); zero pages are skipped.
    /// The batch is durable (one journal commit) when this returns. New pages have no
    /// references: take one ([`Store::add_root`], [`Store::incref`]) before the next `gc`.
    pub fn put_many(&mut self, pages: &[(PageId, &[u8])]) -> Result<u64, StoreError> {
        self.mutate(|s| s.put_many_inner(pages))
    }

    /// Reads page `id` into `out` (4096 bytes) and checks it against its identity.
    /// The zero page reads as zeros.
    pub fn get(&self, id: &PageId, out: &mut [u8]) -> Result<(), StoreError> {
        let len = out.len();
        let out: &mut Page = out.try_into().map_err(|_| StoreError::PageSize(len))?;
        if id.is_zero_page() {
            out.fill(0);
            return Ok(());
        }
        let entry = self
            .state
            .entries
            .get(id)
            .ok_or(StoreError::NotFound(*id))?;
        match self.packs.read(entry.pack, entry.slot, out) {
            Ok(()) => {}
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(StoreError::PageMissing(*id))
            }
            Err(StoreError::Corrupt(_)) => return Err(StoreError::PageMissing(*id)),
            Err(e) => return Err(e),
        }
        if !id.matches(out) {
            return Err(StoreError::PageCorrupt(*id));
        }
        Ok(())
    }

    /// Reads many pages into consecutive 4 KiB pieces of `out`, in parallel.
    pub fn get_many(&self, ids: &[PageId], out: &mut [u8]) -> Result<(), StoreError> {
        if out.len() != ids.len() * PAGE_SIZE {
            return Err(StoreError::PageSize(out.len()));
        }
        out.par_chunks_mut(PAGE_SIZE)
            .zip(ids.par_iter())
            .with_min_len(16)
            .try_for_each(|(buf, id)| self.get(id, buf))
    }

    /// Whether page `id` is stored (the zero page always is).
    pub fn contains(&self, id: &PageId) -> bool {
        id.is_zero_page() || self.state.entries.contains_key(id)
    }

    /// The identities of `ids` that are not stored (what a migration source must send).
    pub fn missing(&self, ids: &[PageId]) -> Vec<PageId> {
        ids.iter()
            .filter(|id| !self.contains(id))
            .copied()
            .collect()
    }

    /// Reference count of page `id`, if stored.
    pub fn refs(&self, id: &PageId) -> Option<u64> {
        self.state.entries.get(id).map(|e| e.refs)
    }

    /// Adds one reference per occurrence in `ids`, all or none, in one commit.
    pub fn incref(&mut self, ids: &[PageId]) -> Result<(), StoreError> {
        self.mutate(|s| s.adjust_refs(ids, 1))
    }

    /// Drops one reference per occurrence in `ids`, all or none, in one commit.
    pub fn decref(&mut self, ids: &[PageId]) -> Result<(), StoreError> {
        self.mutate(|s| s.adjust_refs(ids, -1))
    }

    /// Registers root `name` holding one reference on each distinct non-zero page of
    /// `ids` (all must be stored), e.g. a snapshot and its manifest's pages.
    pub fn add_root(&mut self, name: &str, ids: &[PageId]) -> Result<RootSummary, StoreError> {
        self.mutate(|s| s.add_root_inner(name, ids))
    }

    /// Removes root `name`, dropping its references; returns how many pages it held.
    pub fn remove_root(&mut self, name: &str) -> Result<u64, StoreError> {
        self.mutate(|s| s.remove_root_inner(name))
    }

    /// The identities of every page stored, in no particular order (what a host agent
    /// summarises for the cluster).
    pub fn ids(&self) -> impl ExactSizeIterator<Item = &PageId> + '_ {
        self.state.entries.keys()
    }

    /// The registered roots, by name.
    pub fn roots(&self) -> Vec<RootSummary> {
        self.state
            .roots
            .iter()
            .map(|(name, r)| RootSummary {
                name: name.clone(),
                pages: r.pages,
            })
            .collect()
    }

    /// The pages root `name` holds, sorted.
    pub fn root_ids(&self, name: &str) -> Result<Vec<PageId>, StoreError> {
        let info = self
            .state
            .roots
            .get(name)
            .ok_or_else(|| StoreError::NoSuchRoot(name.to_string()))?;
        roots::read(&self.dir, name, &info.digest)
    }

    /// Counts and sizes.
    pub fn stats(&self) -> StoreStats {
        let mut s = StoreStats {
            pages: self.state.entries.len() as u64,
            packs: self.state.packs.len() as u64,
            roots: self.state.roots.len() as u64,
            journal_bytes: self.journal_len,
            ..StoreStats::default()
        };
        for e in self.state.entries.values() {
            if e.refs > 0 {
                s.referenced_pages += 1;
            }
            // Saturating: the counts come from files (a damaged journal can say anything).
            s.logical_bytes = s
                .logical_bytes
                .saturating_add(e.refs.saturating_mul(PAGE_SIZE as u64));
        }
        s.unreferenced_pages = s.pages - s.referenced_pages;
        s.page_bytes = s.pages * PAGE_SIZE as u64;
        s.referenced_bytes = s.referenced_pages * PAGE_SIZE as u64;
        let roots_bytes: u64 = self
            .state
            .roots
            .keys()
            .map(|n| fsutil::file_len(&roots::path(&self.dir, n)))
            .sum();
        s.bytes_on_disk = self.packs.bytes_on_disk()
            + fsutil::file_len(&self.dir.join(INDEX))
            + self.journal_len
            + roots_bytes;
        s
    }

    /// Writes a checkpoint of the index and starts an empty journal. Done automatically
    /// when the journal grows large and by `gc`.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.mutate(|s| {
            let next = s.state.successor().ok_or_else(generation_exhausted)?;
            s.install_checkpoint(next)
        })
    }

    /// Runs a mutation; an I/O error while mutating poisons the handle, since what
    /// reached the disk is then unknown (the next open recovers from the files).
    fn mutate<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let result = f(self);
        if matches!(result, Err(StoreError::Io { .. })) {
            self.poisoned = true;
        }
        result
    }

    fn put_many_inner(&mut self, pages: &[(PageId, &[u8])]) -> Result<u64, StoreError> {
        let mut seen = HashSet::new();
        let mut fresh: Vec<(PageId, &Page)> = Vec::new();
        for (id, data) in pages {
            let page: &Page = (*data)
                .try_into()
                .map_err(|_| StoreError::PageSize(data.len()))?;
            if !self.contains(id) && seen.insert(*id) {
                fresh.push((*id, page));
            }
        }
        if fresh.is_empty() {
            return Ok(0);
        }
        if let Some((id, _)) = fresh.par_iter().find_any(|(id, page)| !id.matches(page)) {
            return Err(StoreError::PageMismatch(*id));
        }

        let mut records = Vec::with_capacity(fresh.len());
        let mut writer = PackWriter::new(self.append, &self.state, self.options.pack_pages);
        let mut buf = Vec::with_capacity(fresh.len().min(WRITE_CHUNK) * PAGE_SIZE);
        let mut rest = fresh.as_slice();
        while !rest.is_empty() {
            let (pack, first, room) = writer.target(&mut self.packs)?;
            let (run, tail) = rest.split_at(rest.len().min(room).min(WRITE_CHUNK));
            buf.clear();
            for (i, (id, page)) in run.iter().enumerate() {
                buf.extend_from_slice(&page[..]);
                records.push(Record::Put {
                    id: *id,
                    pack,
                    slot: first + i as u32,
                });
            }
            self.packs.write(pack, first, &buf)?;
            writer.advance(run.len() as u32);
            rest = tail;
        }
        writer.sync(&self.packs)?;
        self.commit(&records)?;
        self.append = writer.append_after();
        Ok(fresh.len() as u64)
    }

    fn adjust_refs(&mut self, ids: &[PageId], sign: i64) -> Result<(), StoreError> {
        let mut deltas: BTreeMap<PageId, i64> = BTreeMap::new();
        for id in ids.iter().filter(|id| !id.is_zero_page()) {
            *deltas.entry(*id).or_default() += sign;
        }
        let mut records = Vec::with_capacity(deltas.len());
        for (id, delta) in deltas {
            let entry = self
                .state
                .entries
                .get(&id)
                .ok_or(StoreError::NotFound(id))?;
            if entry.refs.checked_add_signed(delta).is_none() {
                return Err(StoreError::RefUnderflow(id));
            }
            records.push(Record::Ref { id, delta });
        }
        if records.is_empty() {
            return Ok(());
        }
        self.commit(&records)
    }

    fn add_root_inner(&mut self, name: &str, ids: &[PageId]) -> Result<RootSummary, StoreError> {
        roots::check_name(name)?;
        if self.state.roots.contains_key(name) {
            return Err(StoreError::RootExists(name.to_string()));
        }
        let mut ids: Vec<PageId> = ids.iter().filter(|i| !i.is_zero_page()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        if let Some(id) = ids.iter().find(|id| !self.state.entries.contains_key(id)) {
            return Err(StoreError::NotFound(*id));
        }
        // The list is durable before the journal names it; a crash in between leaves a
        // file no record names, which the next open deletes.
        let digest = roots::write(&self.dir, name, &ids)?;
        let mut records = Vec::with_capacity(ids.len() + 1);
        records.push(Record::AddRoot {
            name: name.to_string(),
            digest,
            pages: ids.len() as u64,
        });
        records.extend(ids.iter().map(|&id| Record::Ref { id, delta: 1 }));
        self.commit(&records)?;
        Ok(RootSummary {
            name: name.to_string(),
            pages: ids.len() as u64,
        })
    }

    fn remove_root_inner(&mut self, name: &str) -> Result<u64, StoreError> {
        let ids = self.root_ids(name)?;
        for id in &ids {
            if self.state.entries.get(id).is_none_or(|e| e.refs == 0) {
                return Err(StoreError::RootDamaged {
                    name: name.to_string(),
                    reason: format!("page {id} it holds has no reference"),
                });
            }
        }
        let mut records = Vec::with_capacity(ids.len() + 1);
        records.push(Record::DelRoot {
            name: name.to_string(),
        });
        records.extend(ids.iter().map(|&id| Record::Ref { id, delta: -1 }));
        self.commit(&records)?;
        // The root is gone from the index; a file left behind is deleted at the next open.
        if roots::remove(&self.dir, name).is_ok() {
            let _ = sync_dir(&self.dir.join(roots::DIR));
        }
        Ok(ids.len() as u64)
    }

    /// Appends `records` as one journal batch, syncs it, then applies it.
    fn commit(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let bytes = journal::batch(self.next_seq, records);
        let path = self.dir.join(JOURNAL);
        self.journal
            .write_all_at(&bytes, self.journal_len)
            .map_err(io_err("write", &path))?;
        self.journal.sync_data().map_err(io_err("sync", &path))?;
        self.journal_len += bytes.len() as u64;
        self.next_seq += 1;
        for record in records {
            if let Err(m) = self.state.apply(record) {
                // Callers check records first, so this is a bug; the journal on disk
                // would not replay either, and reopening reports it.
                self.poisoned = true;
                return Err(StoreError::Corrupt(m));
            }
        }
        let threshold = self
            .options
            .checkpoint_bytes
            .max(self.state.entries.len() as u64 * 24);
        // The batch is committed whatever happens here, so a failed checkpoint does not
        // fail this call; it leaves the handle poisoned, and the files as they were before
        // it or with a stale journal, both of which open recovers. Past the last generation
        // (a damaged index) the journal just grows.
        if self.journal_len >= threshold {
            if let Some(next) = self.state.successor() {
                if self.install_checkpoint(next).is_err() {
                    self.poisoned = true;
                }
            }
        }
        Ok(())
    }

    /// Makes `next` (whose generation is one more than the current) the durable index:
    /// checkpoint renamed into place, then a fresh journal of the new generation.
    fn install_checkpoint(&mut self, next: State) -> Result<(), StoreError> {
        write_atomic(&self.dir.join(INDEX), &next.encode())?;
        // A crash here leaves an index newer than the journal; open then starts a fresh
        // journal, since the old one's batches are all in the checkpoint.
        let path = self.dir.join(JOURNAL);
        write_atomic(&path, &journal::header(next.generation))?;
        self.journal = open_rw(&path)?;
        self.journal_len = journal::HEADER_LEN as u64;
        self.next_seq = 0;
        self.state = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
