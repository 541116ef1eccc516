//! `Summary` (digests over ranges of pages, see [`crate::migration::ranges`]) and its
//! answer, `Answer`: per range held, descend, push, or push only the pages a bitmap names.

use crate::codec::Reader;

use super::{bad, malformed, put_u16, put_u32, put_u64, too_large};
use crate::migration::ranges::{Digest, RANGE_PAGES, SUB_RANGE_PAGES};
use crate::migration::MigrationError;

/// Most ranges in one `Summary`.
pub const MAX_RANGES: usize = 1024;
/// Bytes of one range in a `Summary`.
pub const RANGE_LEN: usize = 8 + 4 + 32;
/// `Answer` flag: push the pages of later rounds instead of offering their identities.
pub const ANSWER_PUSH_LATER: u8 = 1;

/// One range of a `Summary`: pages `first .. first + pages` in the VM's page order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeSummary {
    /// Index of its first page (regions one after the other).
    pub first: u64,
    /// Pages in it (1 ..= 512 at level 0, 1 ..= 32 at level 1).
    pub pages: u32,
    /// Digest of their identities.
    pub digest: Digest,
}

/// Appends a `Summary` payload.
pub fn encode_summary(
    out: &mut Vec<u8>,
    batch: u32,
    round: u32,
    level: u8,
    ranges: &[RangeSummary],
) {
    put_u32(out, batch);
    put_u32(out, round);
    out.push(level);
    out.push(0);
    put_u16(out, ranges.len() as u16);
    for r in ranges {
        put_u64(out, r.first);
        put_u32(out, r.pages);
        out.extend_from_slice(&r.digest);
    }
}

/// A decoded `Summary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Batch number (shared with offers).
    pub batch: u32,
    /// Round number, from 1.
    pub round: u32,
    /// 0: top-level ranges; 1: sub-ranges of ranges the destination asked to descend.
    pub level: u8,
    /// The ranges, in order.
    pub ranges: Vec<RangeSummary>,
}

impl Summary {
    /// Most pages a range of `level` may hold.
    pub fn max_pages(level: u8) -> u32 {
        if level == 0 {
            RANGE_PAGES as u32
        } else {
            SUB_RANGE_PAGES as u32
        }
    }

    /// Decodes a summary (ranges are checked against the guest by the receiver).
    pub fn decode(payload: &[u8]) -> Result<Summary, MigrationError> {
        const WHAT: &str = "Summary";
        let m = malformed(WHAT);
        let mut r = Reader::new(payload);
        let batch = r.u32(WHAT).map_err(&m)?;
        let round = r.u32(WHAT).map_err(&m)?;
        let level = r.u8(WHAT).map_err(&m)?;
        if r.u8(WHAT).map_err(&m)? != 0 || level > 1 {
            return Err(bad(WHAT, "bad level"));
        }
        let count = r.u16(WHAT).map_err(&m)? as usize;
        too_large("ranges per summary", count as u64, MAX_RANGES as u64)?;
        if count == 0 || r.remaining() != count * RANGE_LEN {
            return Err(bad(WHAT, "length does not match its count"));
        }
        let max = Self::max_pages(level);
        let mut ranges = Vec::with_capacity(count);
        for _ in 0..count {
            let first = r.u64(WHAT).map_err(&m)?;
            let pages = r.u32(WHAT).map_err(&m)?;
            if pages == 0 || pages > max {
                return Err(bad(WHAT, "range size out of bounds"));
            }
            let digest = r.array(WHAT).map_err(&m)?;
            ranges.push(RangeSummary {
                first,
                pages,
                digest,
            });
        }
        r.finish().map_err(&m)?;
        Ok(Summary {
            batch,
            round,
            level,
            ranges,
        })
    }
}

/// What the destination answers for one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer<'a> {
    /// Held and installed: nothing to send.
    Held,
    /// Send the sub-ranges' summaries (level 0) or the pages' identities (level 1).
    Descend,
    /// Send every page.
    Push,
    /// Held, but these pages (bit i = page i of the range) were not: send them.
    Want(&'a [u8]),
}

impl RangeAnswer<'_> {
    fn code(&self) -> u8 {
        match self {
            RangeAnswer::Held => 0,
            RangeAnswer::Descend => 1,
            RangeAnswer::Push => 2,
            RangeAnswer::Want(_) => 3,
        }
    }
}

/// Appends an `Answer` payload: one answer per range of the summary, in order.
pub fn encode_answer(out: &mut Vec<u8>, batch: u32, flags: u8, answers: &[RangeAnswer<'_>]) {
    put_u32(out, batch);
    out.push(flags);
    out.push(0);
    put_u16(out, answers.len() as u16);
    for four in answers.chunks(4) {
        let byte = four
            .iter()
            .enumerate()
            .fold(0u8, |b, (i, a)| b | a.code() << (2 * i));
        out.push(byte);
    }
    for a in answers {
        if let RangeAnswer::Want(bits) = a {
            out.extend_from_slice(bits);
        }
    }
}

/// A decoded `Answer` header; [`AnswerView::answers`] checks it against the summary.
#[derive(Debug, Clone, Copy)]
pub struct AnswerView<'a> {
    /// The batch answered.
    pub batch: u32,
    /// [`ANSWER_PUSH_LATER`] or 0.
    pub flags: u8,
    count: usize,
    codes: &'a [u8],
    wants: &'a [u8],
}

impl<'a> AnswerView<'a> {
    /// Decodes the header.
    pub fn decode(payload: &'a [u8]) -> Result<Self, MigrationError> {
        const WHAT: &str = "Answer";
        let m = malformed(WHAT);
        let mut r = Reader::new(payload);
        let batch = r.u32(WHAT).map_err(&m)?;
        let flags = r.u8(WHAT).map_err(&m)?;
        if flags & !ANSWER_PUSH_LATER != 0 || r.u8(WHAT).map_err(&m)? != 0 {
            return Err(bad(WHAT, "unknown flags"));
        }
        let count = r.u16(WHAT).map_err(&m)? as usize;
        let codes = r.take(count.div_ceil(4), WHAT).map_err(&m)?;
        let wants = r.take(r.remaining(), WHAT).map_err(&m)?;
        Ok(AnswerView {
            batch,
            flags,
            count,
            codes,
            wants,
        })
    }

    /// The answers for ranges of `sizes` pages (the summary's, in order): checks the count,
    /// that no code is set past it, and that the want bitmaps are exactly as long as their
    /// ranges need, with no bit past a range's end.
    pub fn answers(&self, sizes: &[u32]) -> Result<Vec<RangeAnswer<'a>>, MigrationError> {
        const WHAT: &str = "Answer";
        if sizes.len() != self.count {
            return Err(bad(WHAT, "answers another number of ranges"));
        }
        if !self.count.is_multiple_of(4)
            && self.codes[self.count / 4] >> (2 * (self.count % 4)) != 0
        {
            return Err(bad(WHAT, "codes set past the ranges"));
        }
        let mut wants = Reader::new(self.wants);
        let mut out = Vec::with_capacity(self.count);
        for (i, &pages) in sizes.iter().enumerate() {
            let code = (self.codes[i / 4] >> (2 * (i % 4))) & 3;
            out.push(match code {
                0 => RangeAnswer::Held,
                1 => RangeAnswer::Descend,
                2 => RangeAnswer::Push,
                _ => {
                    let n = pages as usize;
                    let bits = wants.take(n.div_ceil(8), WHAT).map_err(malformed(WHAT))?;
                    if !n.is_multiple_of(8) && bits[n / 8] >> (n % 8) != 0 {
                        return Err(bad(WHAT, "bits set past a range"));
                    }
                    if bits.iter().all(|&b| b == 0) {
                        return Err(bad(WHAT, "wants no page"));
                    }
                    RangeAnswer::Want(bits)
                }
            });
        }
        wants.finish().map_err(malformed(WHAT))?;
        Ok(out)
    }
}
