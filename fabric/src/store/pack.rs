//! Pack files: page contents, one 4 KiB slot after another, only ever appended to
//! (and rewritten whole by gc). Slot `s` of a pack is at byte `s * 4096`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::fsutil::{io_err, sync_dir};
use super::state::State;
use super::StoreError;
use crate::identity::PAGE_SIZE;

/// Subdirectory of the store holding the packs.
pub(crate) const DIR: &str = "packs";
const EXT: &str = "pack";

/// The open pack files of a store.
#[derive(Debug)]
pub(crate) struct Packs {
    dir: PathBuf,
    files: HashMap<u32, File>,
}

impl Packs {
    pub(crate) fn new(store_dir: &Path) -> Self {
        Packs {
            dir: store_dir.join(DIR),
            files: HashMap::new(),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn path(&self, pack: u32) -> PathBuf {
        self.dir.join(format!("{pack:08}.{EXT}"))
    }

    /// Numbers of the pack files present, and any other files in the directory.
    pub(crate) fn scan(&self) -> Result<(Vec<u32>, Vec<PathBuf>), StoreError> {
        let mut packs = Vec::new();
        let mut other = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let path = entry.map_err(io_err("list", &self.dir))?.path();
            let number = path
                .extension()
                .filter(|e| *e == EXT)
                .and_then(|_| path.file_stem()?.to_str()?.parse::<u32>().ok());
            match number {
                Some(n) if path == self.path(n) => packs.push(n),
                _ => other.push(path),
            }
        }
        packs.sort_unstable();
        Ok((packs, other))
    }

    /// Opens an existing pack for reading and appending.
    pub(crate) fn open(&mut self, pack: u32) -> Result<&File, StoreError> {
        let path = self.path(pack);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        Ok(self.files.entry(pack).or_insert(file))
    }

    /// Creates a new, empty pack (its directory entry is synced by the caller).
    pub(crate) fn create(&mut self, pack: u32) -> Result<(), StoreError> {
        let path = self.path(pack);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        self.files.insert(pack, file);
        Ok(())
    }

    /// Length of a pack file in whole slots, and whether it ends on a slot boundary.
    pub(crate) fn slots_on_disk(&self, pack: u32) -> Result<(u64, bool), StoreError> {
        let len = self
            .file(pack)?
            .metadata()
            .map_err(io_err("stat", &self.path(pack)))?
            .len();
        Ok((len / PAGE_SIZE as u64, len % PAGE_SIZE as u64 == 0))
    }

    /// Cuts a pack back to `slots` slots (dropping pages written but never committed).
    pub(crate) fn truncate(&self, pack: u32, slots: u32) -> Result<(), StoreError> {
        let path = self.path(pack);
        let file = self.file(pack)?;
        file.set_len(u64::from(slots) * PAGE_SIZE as u64)
            .and_then(|_| file.sync_all())
            .map_err(io_err("truncate", &path))
    }

    /// Reads `buf.len() / PAGE_SIZE` consecutive slots from `first`.
    pub(crate) fn read(&self, pack: u32, first: u32, buf: &mut [u8]) -> Result<(), StoreError> {
        self.file(pack)?
            .read_exact_at(buf, u64::from(first) * PAGE_SIZE as u64)
            .map_err(io_err("read", &self.path(pack)))
    }

    /// Writes pages into consecutive slots from `first` (not synced).
    pub(crate) fn write(&self, pack: u32, first: u32, data: &[u8]) -> Result<(), StoreError> {
        self.file(pack)?
            .write_all_at(data, u64::from(first) * PAGE_SIZE as u64)
            .map_err(io_err("write", &self.path(pack)))
    }

    /// Makes a pack's written pages durable.
    pub(crate) fn sync(&self, pack: u32) -> Result<(), StoreError> {
        self.file(pack)?
            .sync_data()
            .map_err(io_err("sync", &self.path(pack)))
    }

    /// Closes and deletes a pack file (the directory is synced by the caller).
    pub(crate) fn remove(&mut self, pack: u32) -> Result<(), StoreError> {
        self.files.remove(&pack);
        let path = self.path(pack);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Bytes of all open packs on disk.
    pub(crate) fn bytes_on_disk(&self) -> u64 {
        self.files
            .values()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    fn file(&self, pack: u32) -> Result<&File, StoreError> {
        self.files
            .get(&pack)
            .ok_or_else(|| StoreError::Corrupt(format!("pack {pack} is not open")))
    }
}

/// Places pages into packs for one batch: appends to the current pack while it has room,
/// then starts new ones, and remembers which packs to sync.
pub(crate) struct PackWriter {
    current: Option<(u32, u32)>,
    /// Smallest pack number not yet used, after the packs this writer created.
    pub(crate) next_pack: u32,
    pack_pages: u32,
    /// Packs written to, in order.
    pub(crate) touched: Vec<u32>,
    created: bool,
}

impl PackWriter {
    pub(crate) fn new(append: Option<u32>, state: &State, pack_pages: u32) -> Self {
        PackWriter {
            current: append.map(|p| (p, state.packs[&p])),
            next_pack: state.next_pack,
            pack_pages,
            touched: Vec::new(),
            created: false,
        }
    }

    /// The pack and first slot to write to, and how many slots it has left.
    pub(crate) fn target(&mut self, packs: &mut Packs) -> Result<(u32, u32, usize), StoreError> {
        match self.current {
            Some((pack, len)) if len < self.pack_pages => {
                if !self.touched.contains(&pack) {
                    self.touched.push(pack);
                }
                Ok((pack, len, (self.pack_pages - len) as usize))
            }
            _ => {
                // Pack u32::MAX is never used, so `next_pack` always fits (the journal
                // refuses a put into it); only a damaged index gets here.
                let pack = self.next_pack;
                self.next_pack = pack
                    .checked_add(1)
                    .ok_or_else(|| StoreError::Corrupt("no pack number left".into()))?;
                packs.create(pack)?;
                self.created = true;
                self.current = Some((pack, 0));
                self.touched.push(pack);
                Ok((pack, 0, self.pack_pages as usize))
            }
        }
    }

    pub(crate) fn advance(&mut self, n: u32) {
        if let Some((_, len)) = &mut self.current {
            *len += n;
        }
    }

    /// Syncs every pack written to, and the pack directory if a pack was created.
    pub(crate) fn sync(&self, packs: &Packs) -> Result<(), StoreError> {
        for &pack in &self.touched {
            packs.sync(pack)?;
        }
        if self.created {
            sync_dir(packs.dir())?;
        }
        Ok(())
    }

    pub(crate) fn append_after(&self) -> Option<u32> {
        self.current
            .filter(|&(_, len)| len < self.pack_pages)
            .map(|(p, _)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_truncate_scan() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(DIR)).unwrap();
        let mut packs = Packs::new(dir.path());
        packs.create(3).unwrap();
        let data: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        packs.write(3, 0, &data).unwrap();
        packs.sync(3).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        packs.read(3, 2, &mut buf).unwrap();
        assert_eq!(buf, data[2 * PAGE_SIZE..]);
        assert_eq!(packs.slots_on_disk(3).unwrap(), (3, true));
        packs.truncate(3, 1).unwrap();
        assert!(packs.read(3, 2, &mut buf).is_err());
        fs::write(packs.dir().join("junk.tmp"), b"x").unwrap();
        let (found, other) = packs.scan().unwrap();
        assert_eq!(found, vec![3]);
        assert_eq!(other.len(), 1);
        packs.remove(3).unwrap();
        assert!(packs.scan().unwrap().0.is_empty());
    }
}
