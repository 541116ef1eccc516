//! `Push`: pages sent without an offer (the destination holds few, or asked for them, or the
//! guest is paused for the last round). No identity crosses the wire for a page with
//! content: the sealed part carries one digest over the identities of the message's pages
//! in order, and the destination, which hashes every page anyway, checks it.

use crate::codec::Reader;
use crate::identity::PageId;

use super::pages::{put_bodies, put_entries, read_entries, seal_at};
use super::{bad, malformed, put_u32, put_u64, sealed_len, too_large, Body, MsgType, PageEntry};
use super::{MAX_RUN, PAGES_PER_MESSAGE};
use crate::migration::MigrationError;

const CONTEXT: &str = "fabvm 2026 migration push digest v3";

/// The digest over the identities of a push's raw and lz4 pages, in order.
pub fn push_digest<'a>(ids: impl IntoIterator<Item = &'a PageId>) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT);
    for id in ids {
        h.update(&id.0);
    }
    *h.finalize().as_bytes()
}

/// Appends a `Push` payload: pages of `runs` (data runs only, `(first gfn, count)`), one
/// entry each. Raw and lz4 entries carry no identity; known entries must.
pub fn encode_push(
    out: &mut Vec<u8>,
    round: u32,
    runs: &[(u64, u32)],
    entries: &[PageEntry<'_>],
    digest: &[u8; 32],
) {
    let at = out.len();
    put_u32(out, 0);
    put_u32(out, round);
    put_u32(out, runs.len() as u32);
    put_u32(out, entries.len() as u32);
    for &(first, count) in runs {
        put_u64(out, first);
        put_u32(out, count);
    }
    put_entries(out, entries);
    out.extend_from_slice(digest);
    seal_at(out, at);
    put_bodies(out, entries);
}

/// A decoded `Push`; its entries go into the caller's vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushHeader {
    /// Round number.
    pub round: u32,
    /// `(first gfn, count)` of each run, covering the entries in order.
    pub runs: Vec<(u64, u32)>,
    /// [`push_digest`] over the raw and lz4 pages' identities.
    pub digest: [u8; 32],
}

impl PushHeader {
    /// The guest frames of the entries, in order.
    pub fn gfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs
            .iter()
            .flat_map(|&(first, count)| first..first + u64::from(count))
    }
}

/// Decodes a `Push` payload into `entries` (cleared first).
pub fn decode_push<'a>(
    payload: &'a [u8],
    entries: &mut Vec<PageEntry<'a>>,
) -> Result<PushHeader, MigrationError> {
    const WHAT: &str = "Push";
    let m = malformed(WHAT);
    let sealed = sealed_len(MsgType::Push, payload)?;
    let (meta, bodies) = payload.split_at(sealed);
    let mut r = Reader::new(&meta[4..]);
    let mut b = Reader::new(bodies);
    let round = r.u32(WHAT).map_err(&m)?;
    let run_count = r.u32(WHAT).map_err(&m)?;
    let count = r.u32(WHAT).map_err(&m)?;
    too_large("pages per message", count.into(), PAGES_PER_MESSAGE as u64)?;
    too_large("runs per push", run_count.into(), PAGES_PER_MESSAGE as u64)?;
    if count == 0 {
        return Err(bad(WHAT, "no pages"));
    }
    let mut runs = Vec::with_capacity(run_count as usize);
    let mut pages = 0u64;
    for _ in 0..run_count {
        let first = r.u64(WHAT).map_err(&m)?;
        let n = r.u32(WHAT).map_err(&m)?;
        if n == 0 || n > MAX_RUN {
            return Err(bad(WHAT, "empty run"));
        }
        pages += u64::from(n);
        runs.push((first, n));
    }
    if pages != u64::from(count) {
        return Err(bad(WHAT, "runs do not match the entries"));
    }
    read_entries(WHAT, count, &mut r, &mut b, entries)?;
    let digest = r.array(WHAT).map_err(&m)?;
    r.finish().map_err(&m)?;
    b.finish().map_err(&m)?;
    for e in entries.iter() {
        let has_content = matches!(e.body, Body::Raw(_) | Body::Lz4(_));
        if has_content == e.new_id.is_some() && !matches!(e.body, Body::Zero) {
            return Err(bad(WHAT, "identity where none belongs, or missing"));
        }
    }
    Ok(PushHeader {
        round,
        runs,
        digest,
    })
}
