//! The published identity table reader (`fabric::live::TableReader`) over a file of fuzz
//! bytes: the whole file (first byte even), or (odd) a genuine table of fuzzed regions that
//! its owner then writes entries into, with raw patches over its bytes after. The reader
//! must refuse what does not fit and never read outside the mapping; with no patch it must
//! see exactly what the owner wrote. The owner trusts its own mapping, so once the bytes are
//! patched (another party writing the file) it writes no more.
//!
//! ```text
//! odd input: region count u8 | per region: guest frame u32, pages u16, host address u64
//!            | ops: 0-2 set (page u16, identity byte; state Stale/Zero/Current)
//!                   3 mark stale (page u16) | 4 patch (offset u32, length u8, bytes)
//! ```
#![no_main]

use std::os::unix::fs::FileExt;

use fabric::live::{IdentityTable, PageState, TableReader, TableRegion, CHUNK_PAGES};
use fabric::PageId;
use libfuzzer_sys::fuzz_target;

/// Pages per region at most (three chunks).
const MAX_REGION_PAGES: u16 = 3 * CHUNK_PAGES as u16;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.ids");
    if mode & 1 == 0 {
        std::fs::write(&path, rest).unwrap();
        if let Ok(reader) = TableReader::open(&path) {
            read_all(&reader);
        }
        return;
    }
    let mut input = Input(rest);
    let Some([n]) = input.take::<1>() else {
        return;
    };
    let mut regions = Vec::new();
    for _ in 0..(n % 4).max(1) {
        let (Some(gfn), Some(pages), Some(host)) =
            (input.take::<4>(), input.take::<2>(), input.take::<8>())
        else {
            return;
        };
        regions.push(TableRegion {
            guest_addr: u64::from(u32::from_le_bytes(gfn)) << 12,
            pages: u64::from(u16::from_le_bytes(pages) % MAX_REGION_PAGES) + 1,
            host_addr: u64::from_le_bytes(host),
        });
    }
    let Ok(mut table) = IdentityTable::create(Some(&path), &regions) else {
        return;
    };
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let mut patched = false;
    while let Some([op]) = input.take::<1>() {
        match op % 5 {
            kind @ 0..=2 => {
                let (Some(page), Some([b])) = (input.take::<2>(), input.take::<1>()) else {
                    break;
                };
                let page = usize::from(u16::from_le_bytes(page)) % table.pages();
                let state = [PageState::Stale, PageState::Zero, PageState::Current][kind as usize];
                let id = (b != 0).then_some(PageId([b; 32]));
                if !patched {
                    table.set(page, state, id);
                }
            }
            3 => {
                let Some(page) = input.take::<2>() else { break };
                let page = usize::from(u16::from_le_bytes(page)) % table.pages();
                if !patched {
                    table.update_chunk(page / CHUNK_PAGES, |w| w.mark_stale(page));
                }
            }
            _ => {
                let (Some(at), Some([n])) = (input.take::<4>(), input.take::<1>()) else {
                    break;
                };
                let at = u64::from(u32::from_le_bytes(at)) % len;
                let n = usize::from(n).min(input.0.len());
                file.write_all_at(&input.0[..n], at).unwrap();
                input.0 = &input.0[n..];
                patched = true;
            }
        }
    }
    let reader = match TableReader::open(&path) {
        Ok(reader) => reader,
        Err(e) if patched => {
            assert!(!e.to_string().contains('\n'));
            return;
        }
        Err(e) => panic!("a genuine table does not open: {e}"),
    };
    read_all(&reader);
    if !patched {
        assert_eq!(reader.pages(), table.pages());
        assert_eq!(reader.frames().regions(), &regions[..]);
        for page in 0..table.pages() {
            assert_eq!(reader.entry(page), Some(table.get(page)), "page {page}");
        }
    }
});

/// Reads every chunk and entry and walks the frame arithmetic.
fn read_all(reader: &TableReader) {
    let _ = reader.owner_alive();
    let _ = reader.generation();
    let mut entries = Vec::new();
    for chunk in 0..reader.chunks() {
        let _ = reader.chunk_generation(chunk);
        if reader.read_chunk(chunk, &mut entries).is_some() {
            assert!(entries.len() <= CHUNK_PAGES);
        }
    }
    let frames = reader.frames();
    for page in 0..reader.pages() {
        let _ = reader.entry(page);
        let _ = frames.host_addr(page);
        if let Some(gfn) = frames.gfn(page) {
            // Regions may overlap in a fuzzed table: the first that holds the frame wins.
            let index = frames.index(gfn);
            assert!(index.is_some_and(|i| i <= page), "page {page} gfn {gfn}");
        }
    }
}
