//! Another process's identity table, mapped read-only: its header and size checked (it is
//! input from another process), each chunk read whole under the owner's seqlock. Its header
//! is also mapped writable, where the file allows, to ask the owner for harvests and syncs.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use super::requests::{Request, Requester};
use super::table::{
    process_start_time, Entry, Frames, Layout, Mapping, TableError, CHUNK_PAGES, HEADER_LEN, MAGIC,
    MAX_PAGES, MAX_REGIONS, VERSION,
};

/// A chunk the owner is writing is retried this many times before the reader gives up on it.
const READ_RETRIES: usize = 64;

/// Another process's table, mapped read-only. Its contents are hints: a reader verifies
/// every page it copies on their word.
#[derive(Debug)]
pub struct TableReader {
    map: Mapping,
    frames: Frames,
    pid: u32,
    start_time: u64,
    /// The header mapped writable (`None`: the file is not writable by this process).
    requests: Option<Requester>,
}

impl TableReader {
    /// Maps the table at `path` read-only and checks its header and size.
    pub fn open(path: &Path) -> Result<Self, TableError> {
        let io = |source| TableError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |why| TableError::Invalid {
            path: path.to_path_buf(),
            why,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER_LEN as u64 || len > Layout::new(MAX_PAGES as usize).len as u64 {
            return Err(invalid("size out of range"));
        }
        let header_only = Layout {
            pages: 0,
            chunks: 0,
            gens: HEADER_LEN,
            states: HEADER_LEN,
            ids: HEADER_LEN,
            len: HEADER_LEN,
        };
        let head = Mapping::map(Some(&file), header_only, false).map_err(io)?;
        let h = head.header();
        if h.magic != MAGIC || h.version != VERSION || h.header_len != HEADER_LEN as u32 {
            return Err(invalid("not an identity table of this version"));
        }
        if h.chunk_pages != CHUNK_PAGES as u64 || h.pages == 0 || h.pages > MAX_PAGES {
            return Err(invalid("bad page count"));
        }
        if h.n_regions == 0 || h.n_regions as usize > MAX_REGIONS {
            return Err(invalid("bad region count"));
        }
        let layout = Layout::new(h.pages as usize);
        if layout.len as u64 != len {
            return Err(invalid("size does not match its page count"));
        }
        let regions = head.regions();
        if regions
            .iter()
            .map(|r| r.pages)
            .try_fold(0u64, u64::checked_add)
            != Some(h.pages)
        {
            return Err(invalid("regions do not add up to its pages"));
        }
        let (pid, start_time) = (h.pid, h.start_time);
        drop(head);
        let map = Mapping::map(Some(&file), layout, false).map_err(io)?;
        let requests = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .and_then(|rw| Mapping::map(Some(&rw), header_only, true))
            .ok()
            .map(|header| Requester { header });
        Ok(TableReader {
            map,
            frames: Frames::new(regions),
            pid,
            start_time,
            requests,
        })
    }

    /// The owner's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the owner still runs (same pid, same start time: not a reused pid).
    pub fn owner_alive(&self) -> bool {
        process_start_time(self.pid).is_some_and(|t| self.start_time == 0 || t == self.start_time)
    }

    /// Pages in the table.
    pub fn pages(&self) -> usize {
        self.map.layout.pages
    }

    /// Chunks in the table.
    pub fn chunks(&self) -> usize {
        self.map.layout.chunks
    }

    /// Frame arithmetic.
    pub fn frames(&self) -> &Frames {
        &self.frames
    }

    /// The table's generation: changes whenever any entry changes.
    pub fn generation(&self) -> u64 {
        self.map.header().generation.load(Ordering::Acquire)
    }

    /// Chunk `chunk`'s generation (even when not being written).
    pub fn chunk_generation(&self, chunk: usize) -> u64 {
        self.map.gen(chunk).load(Ordering::Acquire)
    }

    /// A consistent copy of chunk `chunk`'s entries into `out` (cleared first), with the
    /// generation it was read at; `None` when the owner kept writing it.
    pub fn read_chunk(&self, chunk: usize, out: &mut Vec<Entry>) -> Option<u64> {
        let first = chunk * CHUNK_PAGES;
        let end = (first + CHUNK_PAGES).min(self.pages());
        self.consistent(chunk, || {
            out.clear();
            out.extend((first..end).map(|p| self.map.raw_entry(p)));
        })
    }

    /// Asks the owner for `kind` and waits, at most `wait`, for work that started after the
    /// request to be done (a zero `wait` leaves the request to be served later). `false`: not
    /// answered in time, the owner does not serve requests (its background thread is off),
    /// or the table is not writable here.
    pub fn request(&self, kind: Request, wait: Duration) -> bool {
        self.requests
            .as_ref()
            .is_some_and(|r| r.request(kind, wait))
    }

    /// A consistent copy of one page's entry with the chunk generation it was read at.
    pub fn entry_at_generation(&self, page: usize) -> Option<(Entry, u64)> {
        let mut entry = None;
        let gen = self.consistent(page / CHUNK_PAGES, || {
            entry = Some(self.map.raw_entry(page))
        })?;
        Some((entry?, gen))
    }

    /// A consistent copy of one page's entry.
    pub fn entry(&self, page: usize) -> Option<Entry> {
        let mut entry = None;
        self.consistent(page / CHUNK_PAGES, || {
            entry = Some(self.map.raw_entry(page))
        })?;
        entry
    }

    fn consistent(&self, chunk: usize, mut copy: impl FnMut()) -> Option<u64> {
        let gen = self.map.gen(chunk);
        for _ in 0..READ_RETRIES {
            let before = gen.load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            copy();
            fence(Ordering::Acquire);
            if gen.load(Ordering::Relaxed) == before {
                return Some(before);
            }
        }
        None
    }
}
