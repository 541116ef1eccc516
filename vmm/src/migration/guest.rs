//! Guest memory as the migration protocol sees it: page reads for the source (while the
//! guest runs), page writes for the destination (before the guest exists).

use fabric::migration::{GuestFrames, GuestSink};
use fabric::{Page, Region, PAGE_SIZE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Raw views of guest RAM by guest frame number.
#[derive(Debug, Clone)]
pub struct GuestPages {
    spans: Vec<Span>,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    first_gfn: u64,
    pages: u64,
    host: usize,
}

// SAFETY: `GuestPages` only holds addresses of mappings owned by a `GuestMemory` that the
// holder keeps alive; page copies through them are plain memory reads and writes.
unsafe impl Send for GuestPages {}
// SAFETY: as above; concurrent copies of distinct or even the same page race only with the
// guest, which the protocol tolerates (pages are identified when read and verified on arrival).
unsafe impl Sync for GuestPages {}

impl GuestPages {
    /// Views of `memory`'s regions. The caller keeps `memory` alive while this is used.
    pub fn new(memory: &GuestMemory) -> Self {
        let spans = memory
            .iter()
            .map(|r| Span {
                first_gfn: r.start_addr().0 / PAGE_SIZE as u64,
                pages: r.len() / PAGE_SIZE as u64,
                host: r.as_ptr() as usize,
            })
            .collect();
        Self { spans }
    }

    /// The regions, for the protocol's description.
    pub fn regions(&self) -> Vec<Region> {
        self.spans
            .iter()
            .map(|s| Region {
                guest_addr: s.first_gfn * PAGE_SIZE as u64,
                pages: s.pages,
            })
            .collect()
    }

    /// Each region's frames and host bytes.
    pub fn slices(&self) -> Vec<(u64, &[u8])> {
        self.spans
            .iter()
            .map(|s| {
                // SAFETY: the region is mapped for `pages * 4096` bytes while the memory lives;
                // the guest may write it concurrently, which only makes the bytes stale.
                let bytes = unsafe {
                    std::slice::from_raw_parts(s.host as *const u8, s.pages as usize * PAGE_SIZE)
                };
                (s.first_gfn, bytes)
            })
            .collect()
    }

    /// The guest frame whose page holds host address `addr`, if any.
    pub fn gfn_of(&self, addr: usize) -> Option<u64> {
        self.spans.iter().find_map(|s| {
            let index = (addr.checked_sub(s.host)? / PAGE_SIZE) as u64;
            (index < s.pages).then_some(s.first_gfn + index)
        })
    }

    /// Each region's host address and length in bytes.
    pub fn host_ranges(&self) -> Vec<(usize, usize)> {
        self.spans
            .iter()
            .map(|s| (s.host, s.pages as usize * PAGE_SIZE))
            .collect()
    }

    fn host(&self, gfn: u64) -> Option<*mut u8> {
        self.spans.iter().find_map(|s| {
            let index = gfn.checked_sub(s.first_gfn).filter(|&i| i < s.pages)?;
            Some((s.host + index as usize * PAGE_SIZE) as *mut u8)
        })
    }

    /// Copies guest frame `gfn` into `out` (zeros for a frame outside RAM).
    pub fn read(&self, gfn: u64, out: &mut Page) {
        match self.host(gfn) {
            // SAFETY: `src` points at a whole mapped guest page; `out` is a distinct buffer.
            Some(src) => unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), PAGE_SIZE) },
            None => out.fill(0),
        }
    }

    /// Writes `data` to guest frame `gfn` (ignored outside RAM; the protocol checks frames).
    pub fn write(&self, gfn: u64, data: &Page) {
        if let Some(dst) = self.host(gfn) {
            // SAFETY: `dst` points at a whole mapped guest page no vCPU runs on yet.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) };
        }
    }

    /// Zeroes guest frame `gfn`.
    pub fn zero(&self, gfn: u64) {
        if let Some(dst) = self.host(gfn) {
            // SAFETY: as for `write`.
            unsafe { std::ptr::write_bytes(dst, 0, PAGE_SIZE) };
        }
    }
}

impl GuestFrames for GuestPages {
    fn frame_addr(&self, gfn: u64) -> Option<usize> {
        self.host(gfn).map(|p| p as usize)
    }
}

impl GuestSink for GuestPages {
    fn write_page(&mut self, gfn: u64, data: &Page) {
        self.write(gfn, data);
    }

    fn zero_page(&mut self, gfn: u64) {
        self.zero(gfn);
    }

    fn read_page(&self, gfn: u64, out: &mut Page) {
        self.read(gfn, out);
    }

    fn frames(&self) -> Option<&dyn GuestFrames> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn frames_map_to_the_right_region() {
        let memory = GuestMemory::from_ranges(&[
            (GuestAddress(0), 4 * PAGE_SIZE),
            (GuestAddress(1 << 32), 2 * PAGE_SIZE),
        ])
        .unwrap();
        let mut pages = GuestPages::new(&memory);
        let page = [9u8; PAGE_SIZE];
        let high = (1u64 << 32) / PAGE_SIZE as u64 + 1;
        pages.write_page(high, &page);
        pages.write_page(2, &page);
        let mut out = [0u8; PAGE_SIZE];
        pages.read_page(high, &mut out);
        assert_eq!(out, page);
        pages.zero_page(2);
        pages.read_page(2, &mut out);
        assert_eq!(out, [0u8; PAGE_SIZE]);
        pages.read_page(1000, &mut out);
        assert_eq!(out, [0u8; PAGE_SIZE], "outside RAM reads as zero");
        assert_eq!(pages.regions().len(), 2);
        assert_eq!(pages.regions()[1].pages, 2);
    }
}
