//! `Offer` (runs of guest frames and page identities) and its answer, `Need`.

use crate::codec::Reader;
use crate::identity::PageId;

use super::{bad, malformed, put_u32, put_u64, too_large};
use crate::migration::{Limits, MigrationError};

/// A run of guest frames in an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First frame.
    pub first: u64,
    /// Frames in the run (1 ..= 2^31 - 1).
    pub count: u32,
    /// Zero pages (no ids) rather than data pages (one id each).
    pub zero: bool,
}

/// Largest run count.
pub const MAX_RUN: u32 = (1 << 31) - 1;
const ZERO_RUN: u32 = 1 << 31;

/// Appends an `Offer` payload.
pub fn encode_offer(out: &mut Vec<u8>, batch: u32, round: u32, runs: &[Run], ids: &[PageId]) {
    out.reserve(16 + runs.len() * 12 + ids.len() * 32);
    put_u32(out, batch);
    put_u32(out, round);
    put_u32(out, runs.len() as u32);
    put_u32(out, ids.len() as u32);
    for run in runs {
        put_u64(out, run.first);
        put_u32(out, run.count | if run.zero { ZERO_RUN } else { 0 });
    }
    for id in ids {
        out.extend_from_slice(&id.0);
    }
}

/// A decoded `Offer`, borrowing its payload.
#[derive(Debug, Clone, Copy)]
pub struct OfferView<'a> {
    /// Batch number (counts offers over the whole migration).
    pub batch: u32,
    /// Round number, from 1.
    pub round: u32,
    runs: &'a [u8],
    ids: &'a [u8],
}

impl<'a> OfferView<'a> {
    /// Decodes an offer, checking counts against `limits` and that the data runs cover
    /// exactly the ids.
    pub fn decode(payload: &'a [u8], limits: &Limits) -> Result<Self, MigrationError> {
        const WHAT: &str = "Offer";
        let m = malformed(WHAT);
        let mut r = Reader::new(payload);
        let batch = r.u32(WHAT).map_err(&m)?;
        let round = r.u32(WHAT).map_err(&m)?;
        let run_count = r.u32(WHAT).map_err(&m)?;
        let id_count = r.u32(WHAT).map_err(&m)?;
        too_large("runs per offer", run_count.into(), limits.max_runs.into())?;
        too_large("ids per offer", id_count.into(), limits.max_batch.into())?;
        if r.remaining() as u64 != u64::from(run_count) * 12 + u64::from(id_count) * 32 {
            return Err(bad(WHAT, "length does not match its counts"));
        }
        let runs = r.take(run_count as usize * 12, WHAT).map_err(&m)?;
        let ids = r.take(id_count as usize * 32, WHAT).map_err(&m)?;
        let view = OfferView {
            batch,
            round,
            runs,
            ids,
        };
        let mut data: u64 = 0;
        for run in view.runs() {
            if run.count == 0 {
                return Err(bad(WHAT, "empty run"));
            }
            if !run.zero {
                data += u64::from(run.count);
            }
        }
        if data != u64::from(id_count) {
            return Err(bad(WHAT, "data runs do not match the ids"));
        }
        Ok(view)
    }

    /// The runs, in order.
    pub fn runs(&self) -> impl ExactSizeIterator<Item = Run> + 'a {
        self.runs.chunks_exact(12).map(|c| {
            let first = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
            let v = u32::from_le_bytes(c[8..].try_into().expect("4 bytes"));
            Run {
                first,
                count: v & MAX_RUN,
                zero: v & ZERO_RUN != 0,
            }
        })
    }

    /// Number of ids (data pages).
    pub fn id_count(&self) -> usize {
        self.ids.len() / 32
    }

    /// Id `i` (`i < id_count()`).
    pub fn id(&self, i: usize) -> PageId {
        PageId(self.ids[i * 32..i * 32 + 32].try_into().expect("32 bytes"))
    }
}

/// Appends a `Need` payload: `bitmap` has bit `i` set for each of the offer's `n` ids the
/// destination lacks.
pub fn encode_need(out: &mut Vec<u8>, batch: u32, n: usize, bitmap: &[u8]) {
    put_u32(out, batch);
    let set: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
    if set == 0 {
        out.push(0);
    } else if set == n {
        out.push(1);
    } else {
        out.push(2);
        out.extend_from_slice(bitmap);
    }
}

/// A decoded `Need`.
#[derive(Debug, Clone, Copy)]
pub struct NeedView<'a> {
    /// The batch answered.
    pub batch: u32,
    mode: u8,
    bitmap: &'a [u8],
}

impl<'a> NeedView<'a> {
    /// Decodes a need (its bitmap is checked against the offer by [`NeedView::needed`]).
    pub fn decode(payload: &'a [u8]) -> Result<Self, MigrationError> {
        const WHAT: &str = "Need";
        let m = malformed(WHAT);
        let mut r = Reader::new(payload);
        let batch = r.u32(WHAT).map_err(&m)?;
        let mode = r.u8(WHAT).map_err(&m)?;
        let bitmap = r.take(r.remaining(), WHAT).map_err(&m)?;
        match (mode, bitmap.len()) {
            (0 | 1, 0) | (2, _) => Ok(NeedView {
                batch,
                mode,
                bitmap,
            }),
            _ => Err(bad(WHAT, "bad mode")),
        }
    }

    /// Whether each of the offer's `n` ids is needed, checking the bitmap's length and
    /// that no bit past `n` is set.
    pub fn needed(&self, n: usize) -> Result<impl Iterator<Item = bool> + 'a, MigrationError> {
        let (mode, bitmap) = (self.mode, self.bitmap);
        if mode == 2 {
            if bitmap.len() != n.div_ceil(8) {
                return Err(bad("Need", "bitmap length does not match the offer"));
            }
            if !n.is_multiple_of(8) && bitmap[n / 8] >> (n % 8) != 0 {
                return Err(bad("Need", "bits set past the offer"));
            }
        }
        Ok((0..n).map(move |i| match mode {
            0 => false,
            1 => true,
            _ => bitmap[i / 8] & (1 << (i % 8)) != 0,
        }))
    }
}
