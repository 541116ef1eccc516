//! Post-copy messages: `Missing` (an `Offer`'s layout: the pages the destination has not
//! got, with their identities), `Switchover` (commits), `PostPages` (page contents by
//! frame), `Fault` (frames the destination wants now, or holds itself) and `AllIn`
//! (every page is in, with the destination's figures).
//!
//! ```text
//! Switchover rounds u32 | 0 u32 | state length u64 | blake3 of the state [32]
//!            | data pages listed u64
//! PostPages  count u32 (1..=256) | (gfn u64 | tag u8 (0 raw, 1 lz4) | [lz4: length u16]
//!            | body) × count       (body: 4096 bytes raw, or a block of 1..=3968)
//! Fault      kind u8 (0 wanted now, 1 held here: do not send) | 0 u8 | count u16
//!            (1..=256) | gfn u64 × count
//! AllIn      faulted u64 | streamed u64 | held u64 | duplicates u64 | complete µs u64
//! ```

use crate::codec::Reader;
use crate::identity::{Page, PAGE_SIZE};

use super::{bad, malformed, put_u16, put_u32, put_u64, LZ4_MAX};
use crate::migration::MigrationError;

/// Most pages in one `PostPages` message and frames in one `Fault`.
pub const POSTCOPY_BATCH: usize = 256;

/// Most payload bytes of a `PostPages`.
pub const POST_PAGES_MAX: u64 = 4 + POSTCOPY_BATCH as u64 * (8 + 1 + 2 + PAGE_SIZE as u64);
/// Most payload bytes of a `Fault`.
pub const FAULT_MAX: u64 = 4 + POSTCOPY_BATCH as u64 * 8;

/// `Switchover`: the source stopped the guest; what follows commits it to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switchover {
    /// Pre-copy rounds before the switch (0: post-copy at once).
    pub rounds: u32,
    /// Bytes of the state blob sent in `State` messages.
    pub state_len: u64,
    /// blake3 of the state blob.
    pub state_hash: [u8; 32],
    /// Data pages listed in `Missing` messages.
    pub listed: u64,
}

/// Bytes of a `Switchover`.
pub const SWITCHOVER_LEN: usize = 56;

impl Switchover {
    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.rounds);
        put_u32(out, 0);
        put_u64(out, self.state_len);
        out.extend_from_slice(&self.state_hash);
        put_u64(out, self.listed);
    }

    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, MigrationError> {
        const WHAT: &str = "Switchover";
        let m = malformed(WHAT);
        let mut r = Reader::new(payload);
        let rounds = r.u32(WHAT).map_err(&m)?;
        if r.u32(WHAT).map_err(&m)? != 0 {
            return Err(bad(WHAT, "reserved field set"));
        }
        let state_len = r.u64(WHAT).map_err(&m)?;
        let state_hash = r.take(32, WHAT).map_err(&m)?.try_into().expect("32 bytes");
        let listed = r.u64(WHAT).map_err(&m)?;
        r.finish().map_err(&m)?;
        Ok(Switchover {
            rounds,
            state_len,
            state_hash,
            listed,
        })
    }
}

/// One page of a `PostPages`, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostPage<'a> {
    /// Its guest frame.
    pub gfn: u64,
    /// The raw page, or an lz4 block.
    pub body: PostBody<'a>,
}

/// A page body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostBody<'a> {
    /// 4096 bytes.
    Raw(&'a Page),
    /// An lz4 block of 1..=[`LZ4_MAX`] bytes.
    Lz4(&'a [u8]),
}

impl PostBody<'_> {
    /// The page's 4096 bytes in `out`.
    pub fn expand(&self, out: &mut Page) -> Result<(), MigrationError> {
        match self {
            PostBody::Raw(page) => out.copy_from_slice(&page[..]),
            PostBody::Lz4(block) => match lz4_flex::block::decompress_into(block, out) {
                Ok(PAGE_SIZE) => {}
                _ => return Err(bad("PostPages", "bad lz4 block")),
            },
        }
        Ok(())
    }
}

/// Starts a `PostPages` payload of `count` pages; add each with [`put_post_page`].
pub fn begin_post_pages(out: &mut Vec<u8>, count: u32) {
    put_u32(out, count);
}

/// Appends one page to a `PostPages` payload.
pub fn put_post_page(out: &mut Vec<u8>, gfn: u64, body: PostBody<'_>) {
    put_u64(out, gfn);
    match body {
        PostBody::Raw(page) => {
            out.push(0);
            out.extend_from_slice(page);
        }
        PostBody::Lz4(block) => {
            out.push(1);
            put_u16(out, block.len() as u16);
            out.extend_from_slice(block);
        }
    }
}

/// Decodes a `PostPages` payload into `out` (cleared first).
pub fn decode_post_pages<'a>(
    payload: &'a [u8],
    out: &mut Vec<PostPage<'a>>,
) -> Result<(), MigrationError> {
    const WHAT: &str = "PostPages";
    let m = malformed(WHAT);
    out.clear();
    let mut r = Reader::new(payload);
    let count = r.u32(WHAT).map_err(&m)? as usize;
    if count == 0 || count > POSTCOPY_BATCH {
        return Err(bad(WHAT, "page count out of range"));
    }
    for _ in 0..count {
        let gfn = r.u64(WHAT).map_err(&m)?;
        let body = match r.u8(WHAT).map_err(&m)? {
            0 => PostBody::Raw(
                r.take(PAGE_SIZE, WHAT)
                    .map_err(&m)?
                    .try_into()
                    .expect("a page"),
            ),
            1 => {
                let len = r.u16(WHAT).map_err(&m)? as usize;
                if len == 0 || len > LZ4_MAX {
                    return Err(bad(WHAT, "lz4 length out of range"));
                }
                PostBody::Lz4(r.take(len, WHAT).map_err(&m)?)
            }
            _ => return Err(bad(WHAT, "unknown page tag")),
        };
        out.push(PostPage { gfn, body });
    }
    r.finish().map_err(&m)?;
    Ok(())
}

/// What a `Fault` says of its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Something touched them: send them next.
    Wanted = 0,
    /// The destination took them from what its host holds: do not send them.
    Held = 1,
}

/// Appends a `Fault` payload (1..=[`POSTCOPY_BATCH`] frames).
pub fn encode_fault(out: &mut Vec<u8>, kind: FaultKind, gfns: &[u64]) {
    out.push(kind as u8);
    out.push(0);
    put_u16(out, gfns.len() as u16);
    for &gfn in gfns {
        put_u64(out, gfn);
    }
}

/// Decodes a `Fault` payload into its kind and frames (`out`, cleared first).
pub fn decode_fault(payload: &[u8], out: &mut Vec<u64>) -> Result<FaultKind, MigrationError> {
    const WHAT: &str = "Fault";
    let m = malformed(WHAT);
    out.clear();
    let mut r = Reader::new(payload);
    let kind = match r.u8(WHAT).map_err(&m)? {
        0 => FaultKind::Wanted,
        1 => FaultKind::Held,
        _ => return Err(bad(WHAT, "unknown kind")),
    };
    if r.u8(WHAT).map_err(&m)? != 0 {
        return Err(bad(WHAT, "reserved field set"));
    }
    let count = r.u16(WHAT).map_err(&m)? as usize;
    if count == 0 || count > POSTCOPY_BATCH {
        return Err(bad(WHAT, "frame count out of range"));
    }
    for _ in 0..count {
        out.push(r.u64(WHAT).map_err(&m)?);
    }
    r.finish().map_err(&m)?;
    Ok(kind)
}

/// `AllIn`: the destination's figures once every page is in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AllIn {
    /// Pages installed after the guest (or the VMM) touched them and the source sent them.
    pub faulted: u64,
    /// Pages installed from the source's background stream.
    pub streamed: u64,
    /// Pages taken from what the destination's host holds (store, VMs, cluster).
    pub held: u64,
    /// Pages that arrived again after they were in (dropped).
    pub duplicates: u64,
    /// Time from the switchover until every page was in, µs.
    pub complete_us: u64,
}

/// Bytes of an `AllIn`.
pub const ALL_IN_LEN: usize = 40;

impl AllIn {
    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.faulted,
            self.streamed,
            self.held,
            self.duplicates,
            self.complete_us,
        ] {
            put_u64(out, v);
        }
    }

    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, MigrationError> {
        const WHAT: &str = "AllIn";
        let m = malformed(WHAT);
        let mut r = Reader::new(payload);
        let mut v = [0u64; 5];
        for x in &mut v {
            *x = r.u64(WHAT).map_err(&m)?;
        }
        r.finish().map_err(&m)?;
        Ok(AllIn {
            faulted: v[0],
            streamed: v[1],
            held: v[2],
            duplicates: v[3],
            complete_us: v[4],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let s = Switchover {
            rounds: 1,
            state_len: 77,
            state_hash: [5; 32],
            listed: 9,
        };
        let mut b = Vec::new();
        s.encode(&mut b);
        assert_eq!(b.len(), SWITCHOVER_LEN);
        assert_eq!(Switchover::decode(&b).unwrap(), s);
        assert!(Switchover::decode(&b[..50]).is_err());

        let page = [3u8; PAGE_SIZE];
        let mut comp = [0u8; super::super::COMPRESS_BUF];
        let len = super::super::compress_page(&page, &mut comp).unwrap();
        let mut b = Vec::new();
        begin_post_pages(&mut b, 2);
        put_post_page(&mut b, 7, PostBody::Raw(&page));
        put_post_page(&mut b, 9, PostBody::Lz4(&comp[..len]));
        assert!(b.len() as u64 <= POST_PAGES_MAX);
        let mut pages = Vec::new();
        decode_post_pages(&b, &mut pages).unwrap();
        assert_eq!(pages.len(), 2);
        let mut out = [0u8; PAGE_SIZE];
        pages[1].body.expand(&mut out).unwrap();
        assert_eq!((pages[0].gfn, pages[1].gfn, out), (7, 9, page));
        let mut long = b.clone();
        long.push(0);
        assert!(
            decode_post_pages(&long, &mut pages).is_err(),
            "trailing byte"
        );

        let mut b = Vec::new();
        encode_fault(&mut b, FaultKind::Held, &[1, 2, 3]);
        let mut gfns = Vec::new();
        assert_eq!(decode_fault(&b, &mut gfns).unwrap(), FaultKind::Held);
        assert_eq!(gfns, [1, 2, 3]);
        b[0] = 9;
        assert!(decode_fault(&b, &mut gfns).is_err());

        let a = AllIn {
            faulted: 1,
            streamed: 2,
            held: 3,
            duplicates: 4,
            complete_us: 5,
        };
        let mut b = Vec::new();
        a.encode(&mut b);
        assert_eq!(b.len(), ALL_IN_LEN);
        assert_eq!(AllIn::decode(&b).unwrap(), a);
    }
}
