//! Opening a store after a crash: the checkpoint read and the journal replayed onto it,
//! then pack and root files brought in line with the index that results.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use super::fsutil::{io_err, open_rw, sync_dir, write_atomic};
use super::state::State;
use super::{journal, pack, roots, Store, StoreError, INDEX, JOURNAL};

impl Store {
    /// Brings the pack files in line with the index after open.
    pub(super) fn recover_packs(&mut self) -> Result<(), StoreError> {
        let (present, other) = self.packs.scan()?;
        let mut removed = !other.is_empty();
        for path in other {
            let _ = fs::remove_file(path);
        }
        for pack in present {
            match self.state.packs.get(&pack) {
                // Written by a put or gc that never committed.
                None => {
                    self.packs.remove(pack)?;
                    removed = true;
                }
                Some(_) => {
                    self.packs.open(pack)?;
                }
            }
        }
        if removed {
            sync_dir(self.packs.dir())?;
        }
        // Cut uncommitted bytes off; a pack shorter than the index says is damage that
        // `verify` reports, and is never appended to.
        for (&pack, &len) in &self.state.packs {
            let Ok((slots, aligned)) = self.packs.slots_on_disk(pack) else {
                continue;
            };
            if slots > u64::from(len) || (slots == u64::from(len) && !aligned) {
                self.packs.truncate(pack, len)?;
            }
        }
        self.append = self.state.packs.last_key_value().and_then(|(&pack, &len)| {
            let whole = self.packs.slots_on_disk(pack).ok() == Some((u64::from(len), true));
            (whole && len < self.options.pack_pages).then_some(pack)
        });
        Ok(())
    }

    /// Deletes root files the index does not name (an interrupted add or remove).
    pub(super) fn recover_roots(&mut self) -> Result<(), StoreError> {
        let (names, other) = roots::scan(&self.dir)?;
        let mut removed = false;
        for name in names.iter().filter(|n| !self.state.roots.contains_key(*n)) {
            roots::remove(&self.dir, name)?;
            removed = true;
        }
        for path in other {
            let _ = fs::remove_file(path);
            removed = true;
        }
        if removed {
            sync_dir(&self.dir.join(roots::DIR))?;
        }
        Ok(())
    }
}

/// Reads the checkpoint and replays the journal on it, creating both for a new store.
pub(super) fn load_index(dir: &Path) -> Result<(State, File, journal::Replay), StoreError> {
    let index_path = dir.join(INDEX);
    let journal_path = dir.join(JOURNAL);
    let mut state = match fs::read(&index_path) {
        Ok(bytes) => State::decode(&bytes).map_err(StoreError::Corrupt)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_index(dir)?,
        Err(e) => return Err(io_err("read", &index_path)(e)),
    };
    let bytes = match fs::read(&journal_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::Corrupt("journal missing".into()))
        }
        Err(e) => return Err(io_err("read", &journal_path)(e)),
    };
    let mut replay = journal::replay(&bytes).map_err(StoreError::Corrupt)?;
    if replay.generation < state.generation {
        // A checkpoint was installed but the crash came before the journal was reset:
        // everything in this journal is in the checkpoint already.
        write_atomic(&journal_path, &journal::header(state.generation))?;
        replay =
            journal::replay(&journal::header(state.generation)).map_err(StoreError::Corrupt)?;
    } else if replay.generation > state.generation {
        return Err(StoreError::Corrupt(format!(
            "journal generation {} is ahead of index generation {}",
            replay.generation, state.generation
        )));
    }
    for (i, batch) in replay.batches.iter().enumerate() {
        for record in batch {
            state
                .apply(record)
                .map_err(|m| StoreError::Corrupt(format!("journal batch {i}: {m}")))?;
        }
    }
    let journal = open_rw(&journal_path)?;
    if replay.valid_len < bytes.len() as u64 {
        journal
            .set_len(replay.valid_len)
            .and_then(|_| journal.sync_all())
            .map_err(io_err("truncate", &journal_path))?;
    }
    Ok((state, journal, replay))
}

/// Creates the index of a new store: the journal first, then the checkpoint, so that a
/// crash in between leaves a directory that is still recognisably new.
fn create_index(dir: &Path) -> Result<State, StoreError> {
    let journal_path = dir.join(JOURNAL);
    let started = match fs::read(&journal_path) {
        Ok(bytes) => journal::replay(&bytes).map_or(true, |r| !r.batches.is_empty()),
        Err(_) => false,
    };
    let has_packs = fs::read_dir(dir.join(pack::DIR))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if started || has_packs {
        return Err(StoreError::Corrupt("index missing".into()));
    }
    let state = State {
        generation: 1,
        ..State::default()
    };
    write_atomic(&journal_path, &journal::header(state.generation))?;
    write_atomic(&dir.join(INDEX), &state.encode())?;
    Ok(state)
}
