//! `Pages`: page contents (raw, lz4, zero or known), their bodies outside the frame MAC.

use crate::codec::Reader;
use crate::identity::{Page, PageId, PAGE_SIZE};

use super::{
    bad, malformed, put_u16, put_u32, too_large, MsgType, COMPRESS_BUF, LZ4_MAX, PAGES_PER_MESSAGE,
};
use crate::migration::MigrationError;

/// How a page entry's content is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// The 4096 bytes.
    Raw(&'a Page),
    /// An lz4 block that decompresses to exactly 4096 bytes.
    Lz4(&'a [u8]),
    /// The page is (now) zero.
    Zero,
    /// A page with this identity was sent earlier in this round.
    Known,
}

/// One page of a `Pages` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry<'a> {
    /// The page's identity when it changed since it was offered.
    pub new_id: Option<PageId>,
    /// The content.
    pub body: Body<'a>,
}

const TAG_RAW: u8 = 0;
const TAG_LZ4: u8 = 1;
const TAG_ZERO: u8 = 2;
const TAG_KNOWN: u8 = 3;
const TAG_NEW_ID: u8 = 4;

/// Appends a `Pages` payload: the sealed part (header and entries), then the bodies.
pub fn encode_pages(out: &mut Vec<u8>, batch: u32, first: u32, entries: &[PageEntry<'_>]) {
    let at = out.len();
    put_u32(out, 0);
    put_u32(out, batch);
    put_u32(out, first);
    put_u32(out, entries.len() as u32);
    put_entries(out, entries);
    seal_at(out, at);
    put_bodies(out, entries);
}

/// Appends each entry's tag, new identity and lz4 length.
pub(super) fn put_entries(out: &mut Vec<u8>, entries: &[PageEntry<'_>]) {
    for entry in entries {
        let kind = match entry.body {
            Body::Raw(_) => TAG_RAW,
            Body::Lz4(_) => TAG_LZ4,
            Body::Zero => TAG_ZERO,
            Body::Known => TAG_KNOWN,
        };
        out.push(
            kind | if entry.new_id.is_some() {
                TAG_NEW_ID
            } else {
                0
            },
        );
        if let Some(id) = entry.new_id {
            out.extend_from_slice(&id.0);
        }
        if let Body::Lz4(block) = entry.body {
            put_u16(out, block.len() as u16);
        }
    }
}

/// Writes the sealed length (bytes from `at` to here) into the u32 at `at`.
pub(super) fn seal_at(out: &mut [u8], at: usize) {
    let sealed = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&sealed.to_le_bytes());
}

/// Appends the entries' bodies, in order.
pub(super) fn put_bodies(out: &mut Vec<u8>, entries: &[PageEntry<'_>]) {
    for entry in entries {
        match entry.body {
            Body::Raw(page) => out.extend_from_slice(page),
            Body::Lz4(block) => out.extend_from_slice(block),
            Body::Zero | Body::Known => {}
        }
    }
}

/// How many leading bytes of a `kind` payload the frame MAC covers: all of them, except
/// for `Pages` and `Push`, whose bodies follow the sealed length their first four bytes
/// give.
pub fn sealed_len(kind: MsgType, payload: &[u8]) -> Result<usize, MigrationError> {
    if !matches!(kind, MsgType::Pages | MsgType::Push) {
        return Ok(payload.len());
    }
    let sealed = payload
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or(bad(kind.name(), "truncated"))?;
    if !(16..=payload.len()).contains(&sealed) {
        return Err(bad(kind.name(), "sealed length out of range"));
    }
    Ok(sealed)
}

/// A decoded `Pages` header; the entries go into the caller's vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesHeader {
    /// The batch the pages answer.
    pub batch: u32,
    /// Index of the first entry among the batch's needed ids.
    pub first: u32,
}

/// Decodes a `Pages` payload into `entries` (cleared first).
pub fn decode_pages<'a>(
    payload: &'a [u8],
    entries: &mut Vec<PageEntry<'a>>,
) -> Result<PagesHeader, MigrationError> {
    const WHAT: &str = "Pages";
    let m = malformed(WHAT);
    let sealed = sealed_len(MsgType::Pages, payload)?;
    let (meta, bodies) = payload.split_at(sealed);
    let mut r = Reader::new(&meta[4..]);
    let mut b = Reader::new(bodies);
    let batch = r.u32(WHAT).map_err(&m)?;
    let first = r.u32(WHAT).map_err(&m)?;
    let count = r.u32(WHAT).map_err(&m)?;
    too_large("pages per message", count.into(), PAGES_PER_MESSAGE as u64)?;
    if count == 0 {
        return Err(bad(WHAT, "no pages"));
    }
    read_entries(WHAT, count, &mut r, &mut b, entries)?;
    r.finish().map_err(&m)?;
    b.finish().map_err(&m)?;
    Ok(PagesHeader { batch, first })
}

/// Decodes a raw or lz4 body into `out` (exactly one page). Zero and known bodies are the
/// receiver's to resolve.
pub fn decode_page(body: &Body<'_>, out: &mut Page) -> Result<(), MigrationError> {
    match body {
        Body::Raw(page) => out.copy_from_slice(&page[..]),
        Body::Lz4(block) => match lz4_flex::block::decompress_into(block, out) {
            Ok(PAGE_SIZE) => {}
            _ => return Err(bad("Pages", "bad lz4 block")),
        },
        Body::Zero => out.fill(0),
        Body::Known => return Err(bad("Pages", "known page has no content")),
    }
    Ok(())
}

/// Compresses `page` into `buf` with lz4; returns the block's length when it saves at
/// least [`super::MIN_SAVING`] bytes.
pub fn compress_page(page: &Page, buf: &mut [u8; COMPRESS_BUF]) -> Option<usize> {
    lz4_flex::block::compress_into(page, buf)
        .ok()
        .filter(|&len| len <= LZ4_MAX)
}

/// Reads `count` entries (tags from `r`, bodies from `b`) into `entries` (cleared first).
pub(super) fn read_entries<'a>(
    what: &'static str,
    count: u32,
    r: &mut Reader<'a>,
    b: &mut Reader<'a>,
    entries: &mut Vec<PageEntry<'a>>,
) -> Result<(), MigrationError> {
    let m = malformed(what);
    entries.clear();
    for _ in 0..count {
        let tag = r.u8(what).map_err(&m)?;
        if tag & !(TAG_NEW_ID | 3) != 0 {
            return Err(bad(what, "unknown entry flags"));
        }
        let new_id = if tag & TAG_NEW_ID != 0 {
            Some(r.id(what).map_err(&m)?)
        } else {
            None
        };
        let body = match tag & 3 {
            TAG_RAW => {
                let bytes = b.take(PAGE_SIZE, what).map_err(&m)?;
                Body::Raw(bytes.try_into().expect("PAGE_SIZE bytes"))
            }
            TAG_LZ4 => {
                let len = r.u16(what).map_err(&m)? as usize;
                if len == 0 || len > LZ4_MAX {
                    return Err(bad(what, "compressed length out of range"));
                }
                Body::Lz4(b.take(len, what).map_err(&m)?)
            }
            TAG_ZERO if new_id.is_some() => return Err(bad(what, "zero page with an id")),
            TAG_ZERO => Body::Zero,
            _ => Body::Known,
        };
        entries.push(PageEntry { new_id, body });
    }
    Ok(())
}
