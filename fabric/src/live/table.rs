//! A VM's page identities in one mapping that other processes on the host can map read-only:
//! the owner (the VM's memory manager) writes, readers (migration destinations, the sharing
//! leader, host figures) read, with a generation per chunk of pages so a reader knows what
//! changed and never sees a half-written entry.
//!
//! File layout (little endian, native to the host; never crosses hosts):
//!
//! ```text
//! 0      header (4 KiB): magic "FABVMIDS", version, pid, process start time, pages,
//!        chunk size, table generation, the request words (see [`super::requests`]),
//!        up to 32 regions (guest address, pages, host address)
//! 4096   chunk generations: one u64 per CHUNK_PAGES pages (odd while the owner writes it)
//! ...    states: one byte per page (0 stale, 1 zero, 2 current), padded to 4 KiB
//! ...    identities: 32 bytes per page (the last identity computed; zero page: all zero)
//! ```
//!
//! A stale page keeps its last identity: a hint, never a promise. A page copied on a table's
//! word is trusted only once it is confirmed: hashed again, or shown unwritten by a harvest
//! the reader asked for after its copy ([`super::requests`]).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use super::requests::{OwnerRequests, Words};
use crate::identity::PageId;

/// Pages per chunk: the unit of the generation counters (2 MiB of guest memory).
pub const CHUNK_PAGES: usize = 512;

/// Most RAM regions a table describes.
pub const MAX_REGIONS: usize = 32;

/// Largest table a reader maps: a 64 GiB guest's.
pub const MAX_PAGES: u64 = 16 << 20;

pub(super) const MAGIC: [u8; 8] = *b"FABVMIDS";
pub(super) const VERSION: u32 = 2;
pub(super) const HEADER_LEN: usize = 4096;

/// Errors of creating or opening a table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The file cannot be created, opened, sized or mapped.
    #[error("identity table {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a table this version reads.
    #[error("identity table {path}: {why}")]
    Invalid { path: PathBuf, why: &'static str },
    /// The regions cannot be described.
    #[error("identity table: {0}")]
    Regions(&'static str),
}

/// The state of one page's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Written since it was last hashed: its identity is a hint only.
    Stale,
    /// A zero page.
    Zero,
    /// Hashed since it was last written (as far as the last harvest knows).
    Current,
}

impl PageState {
    fn from_byte(b: u8) -> Self {
        match b {
            1 => PageState::Zero,
            2 => PageState::Current,
            _ => PageState::Stale,
        }
    }

    fn byte(self) -> u8 {
        match self {
            PageState::Stale => 0,
            PageState::Zero => 1,
            PageState::Current => 2,
        }
    }
}

/// One RAM region as a table records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRegion {
    /// Guest physical address of its first byte.
    pub guest_addr: u64,
    /// Length in pages.
    pub pages: u64,
    /// Where it is mapped in the owner's address space (for `/proc/PID/mem` readers).
    pub host_addr: u64,
}

/// One page as read from a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Its state.
    pub state: PageState,
    /// Its last identity (`None`: zero page).
    pub id: Option<PageId>,
}

#[repr(C)]
pub(super) struct Header {
    pub(super) magic: [u8; 8],
    pub(super) version: u32,
    pub(super) header_len: u32,
    pub(super) pid: u32,
    pub(super) n_regions: u32,
    pub(super) start_time: u64,
    pub(super) pages: u64,
    pub(super) chunk_pages: u64,
    pub(super) generation: AtomicU64,
    /// Readers' requests to the owner (see [`super::requests`]).
    pub(super) requests: Words,
    pub(super) regions: [[u64; 3]; MAX_REGIONS],
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_LEN);

/// Offsets of the parts of a table of `pages` pages.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    pub(super) pages: usize,
    pub(super) chunks: usize,
    pub(super) gens: usize,
    pub(super) states: usize,
    pub(super) ids: usize,
    pub(super) len: usize,
}

impl Layout {
    pub(super) fn new(pages: usize) -> Self {
        let chunks = pages.div_ceil(CHUNK_PAGES);
        let gens = HEADER_LEN;
        let states = round_up(gens + chunks * 8);
        let ids = round_up(states + pages);
        Layout {
            pages,
            chunks,
            gens,
            states,
            ids,
            len: round_up(ids + pages * 32),
        }
    }
}

fn round_up(n: usize) -> usize {
    n.next_multiple_of(4096)
}

/// A shared mapping, unmapped when dropped.
#[derive(Debug)]
pub(super) struct Mapping {
    pub(super) ptr: *mut u8,
    pub(super) layout: Layout,
}

// SAFETY: the mapping is plain shared memory; all access goes through the seqlock protocol
// below (atomics for generations, whole-entry copies checked against them).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(super) fn map(
        fd: Option<&File>,
        layout: Layout,
        writable: bool,
    ) -> std::io::Result<Mapping> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let (flags, raw) = match fd {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping of `layout.len` bytes at an address the kernel picks;
        // the result is checked before use.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), layout.len, prot, flags, raw, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            layout,
        })
    }

    pub(super) fn header(&self) -> &Header {
        // SAFETY: the mapping starts with HEADER_LEN >= size_of::<Header>() bytes, page
        // aligned; every field is plain data or an atomic.
        unsafe { &*(self.ptr as *const Header) }
    }

    pub(super) fn gen(&self, chunk: usize) -> &AtomicU64 {
        assert!(chunk < self.layout.chunks);
        let ptr = self.ptr.wrapping_add(self.layout.gens + chunk * 8) as *const AtomicU64;
        // SAFETY: in bounds (checked), 8-byte aligned (gens start page aligned), and the
        // mapping lives as long as `self`.
        unsafe { &*ptr }
    }

    pub(super) fn state_ptr(&self, page: usize) -> *mut u8 {
        assert!(page < self.layout.pages);
        self.ptr.wrapping_add(self.layout.states + page)
    }

    pub(super) fn id_ptr(&self, page: usize) -> *mut u8 {
        assert!(page < self.layout.pages);
        self.ptr.wrapping_add(self.layout.ids + page * 32)
    }

    /// Reads one entry without regard to concurrent writers (the caller checks).
    pub(super) fn raw_entry(&self, page: usize) -> Entry {
        // SAFETY: both pointers are in bounds; volatile because another process may write
        // them concurrently (the seqlock tells the caller whether to trust the copy).
        let state = unsafe { std::ptr::read_volatile(self.state_ptr(page)) };
        // SAFETY: as above; 32 bytes at an in-bounds entry.
        let bytes: [u8; 32] = unsafe { std::ptr::read_volatile(self.id_ptr(page).cast()) };
        let state = PageState::from_byte(state);
        let id = (bytes != [0u8; 32]).then_some(PageId(bytes));
        Entry { state, id }
    }

    pub(super) fn regions(&self) -> Vec<TableRegion> {
        let h = self.header();
        h.regions[..(h.n_regions as usize).min(MAX_REGIONS)]
            .iter()
            .map(|r| TableRegion {
                guest_addr: r[0],
                pages: r[1],
                host_addr: r[2],
            })
            .collect()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing borrows it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.layout.len) };
    }
}

/// Frame arithmetic over a table's regions.
#[derive(Debug, Clone)]
pub struct Frames {
    regions: Vec<TableRegion>,
}

impl Frames {
    /// Over `regions`, in the table's order.
    pub fn new(regions: Vec<TableRegion>) -> Self {
        Frames { regions }
    }

    /// The regions.
    pub fn regions(&self) -> &[TableRegion] {
        &self.regions
    }

    /// The table index of guest frame `gfn`.
    pub fn index(&self, gfn: u64) -> Option<usize> {
        let mut base = 0u64;
        for r in &self.regions {
            let first = r.guest_addr / crate::PAGE_SIZE as u64;
            if gfn >= first && gfn - first < r.pages {
                return Some((base + gfn - first) as usize);
            }
            base += r.pages;
        }
        None
    }

    /// The guest frame of table index `page`.
    pub fn gfn(&self, mut page: usize) -> Option<u64> {
        for r in &self.regions {
            if (page as u64) < r.pages {
                return Some(r.guest_addr / crate::PAGE_SIZE as u64 + page as u64);
            }
            page -= r.pages as usize;
        }
        None
    }

    /// The owner's host address of table index `page` (`None` past the address space: a
    /// table read from another process may say anything).
    pub fn host_addr(&self, mut page: usize) -> Option<u64> {
        for r in &self.regions {
            if (page as u64) < r.pages {
                return r
                    .host_addr
                    .checked_add(page as u64 * crate::PAGE_SIZE as u64);
            }
            page -= r.pages as usize;
        }
        None
    }
}

/// The owner's side: one writer (the caller serialises writes, e.g. behind a mutex).
#[derive(Debug)]
pub struct IdentityTable {
    map: Arc<Mapping>,
    path: Option<PathBuf>,
    frames: Frames,
}

impl IdentityTable {
    /// Creates a table for `regions`, every page zero and current: fresh guest memory.
    /// With a `path` the table is a file there (replaced if it exists) that other processes
    /// can map; without, it is private to this process.
    pub fn create(path: Option<&Path>, regions: &[TableRegion]) -> Result<Self, TableError> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(TableError::Regions("between 1 and 32 regions"));
        }
        let pages: u64 = regions.iter().map(|r| r.pages).sum();
        if pages == 0 || pages > MAX_PAGES {
            return Err(TableError::Regions("guest too large for an identity table"));
        }
        let layout = Layout::new(pages as usize);
        let io = |source| TableError::Io {
            path: path.map(Path::to_path_buf).unwrap_or_default(),
            source,
        };
        let file = match path {
            Some(path) => {
                let tmp = path.with_extension("tmp");
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io)?;
                file.set_len(layout.len as u64).map_err(io)?;
                Some((file, tmp))
            }
            None => None,
        };
        let map = Mapping::map(file.as_ref().map(|(f, _)| f), layout, true).map_err(io)?;
        // SAFETY: the mapping is fresh, writable and zero filled; nobody else has it yet
        // (the file is still under its temporary name).
        let header = unsafe { &mut *(map.ptr as *mut Header) };
        header.magic = MAGIC;
        header.version = VERSION;
        header.header_len = HEADER_LEN as u32;
        header.pid = std::process::id();
        header.n_regions = regions.len() as u32;
        header.start_time = process_start_time(std::process::id()).unwrap_or(0);
        header.pages = pages;
        header.chunk_pages = CHUNK_PAGES as u64;
        for (slot, r) in header.regions.iter_mut().zip(regions) {
            *slot = [r.guest_addr, r.pages, r.host_addr];
        }
        for page in 0..layout.pages {
            // SAFETY: in bounds; no reader exists yet.
            unsafe { *map.state_ptr(page) = PageState::Zero.byte() };
        }
        if let Some((_, tmp)) = &file {
            let path = path.expect("file made for a path");
            std::fs::rename(tmp, path).map_err(io)?;
        }
        Ok(IdentityTable {
            map: Arc::new(map),
            path: path.map(Path::to_path_buf),
            frames: Frames::new(regions.to_vec()),
        })
    }

    /// The owner's side of readers' requests (see [`super::requests`]).
    pub fn requests(&self) -> OwnerRequests {
        OwnerRequests::new(self.map.clone())
    }

    /// Where the table is published (`None`: private to this process).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Pages in the table.
    pub fn pages(&self) -> usize {
        self.map.layout.pages
    }

    /// Frame arithmetic.
    pub fn frames(&self) -> &Frames {
        &self.frames
    }

    /// Page `page`'s entry (the owner is the only writer: no retry needed).
    pub fn get(&self, page: usize) -> Entry {
        self.map.raw_entry(page)
    }

    /// Changes entries of chunk `chunk` through `f`, under the chunk's generation, so a
    /// reader sees either all of the change or none of it.
    pub fn update_chunk<R>(
        &mut self,
        chunk: usize,
        f: impl FnOnce(&mut ChunkWriter<'_>) -> R,
    ) -> R {
        let gen = self.map.gen(chunk);
        let start = gen.load(Ordering::Relaxed);
        gen.store(start | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let first = chunk * CHUNK_PAGES;
        let end = (first + CHUNK_PAGES).min(self.pages());
        let mut writer = ChunkWriter {
            map: &self.map,
            range: first..end,
        };
        let result = f(&mut writer);
        gen.store((start | 1) + 1, Ordering::Release);
        self.map.header().generation.fetch_add(1, Ordering::Release);
        result
    }

    /// Sets page `page` (one-entry [`IdentityTable::update_chunk`]).
    pub fn set(&mut self, page: usize, state: PageState, id: Option<PageId>) {
        self.update_chunk(page / CHUNK_PAGES, |w| w.set(page, state, id));
    }
}

impl Drop for IdentityTable {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes entries of one chunk (see [`IdentityTable::update_chunk`]).
#[derive(Debug)]
pub struct ChunkWriter<'a> {
    map: &'a Mapping,
    range: std::ops::Range<usize>,
}

impl ChunkWriter<'_> {
    /// Sets page `page` (which must be in this chunk) to `state` with identity `id`.
    pub fn set(&mut self, page: usize, state: PageState, id: Option<PageId>) {
        assert!(self.range.contains(&page), "page outside the chunk");
        let bytes = id.map_or([0u8; 32], |id| id.0);
        // SAFETY: in bounds; the chunk's generation is odd, so readers discard what they
        // copy meanwhile; we are the only writer.
        unsafe {
            std::ptr::write_volatile(self.map.id_ptr(page).cast::<[u8; 32]>(), bytes);
        }
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.map.state_ptr(page), state.byte()) };
    }

    /// Marks page `page` stale, keeping its last identity as a hint.
    pub fn mark_stale(&mut self, page: usize) {
        assert!(self.range.contains(&page), "page outside the chunk");
        // SAFETY: as in `set`.
        unsafe { std::ptr::write_volatile(self.map.state_ptr(page), PageState::Stale.byte()) };
    }

    /// Page `page`'s entry as it is now.
    pub fn get(&self, page: usize) -> Entry {
        self.map.raw_entry(page)
    }
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat` field 22), which
/// tells a live owner from a later process that got its pid.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
