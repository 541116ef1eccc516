//! The bytes of the migration protocol, version 2: the hello, the frame header and every
//! message's payload, encoded and decoded without I/O. Decoders check every count against
//! the limits and the bytes present before allocating, and reject anything not exactly as
//! specified (unknown flags, trailing bytes).
//!
//! Payloads, little endian (`id` = 32-byte page identity):
//!
//! ```text
//! Auth      proof [32]
//! Abort     reason, UTF-8, ≤ 512 bytes
//! Describe  vcpus u32 | region count u32 | config length u32 | 0 u32
//!           | (guest address u64 | pages u64) × regions | config bytes
//! Accept, Ready, Commit, Ack: empty
//! Offer     batch u32 | round u32 | run count u32 | id count u32
//!           | (first gfn u64 | count u32, bit 31 = zero run) × runs | id × id count
//!           (a data run of n pages takes the next n ids, in order)
//! Need      batch u32 | 0 = none, 1 = all, 2 = bitmap u8 | bitmap over the offer's ids
//! Pages     sealed length u32 | batch u32 | first u32 | count u32 | entry × count (≤ 256)
//!           | body × count, for the needed ids of the batch in order, starting at needed
//!           index `first`; the frame MAC covers the first `sealed length` bytes (up to
//!           the bodies), and each body is checked against its authenticated identity
//!   entry   tag u8 (bits 0-1: 0 raw, 1 lz4, 2 zero, 3 known; bit 2: new id follows)
//!           | [id, when the page changed since it was offered] | [lz4: length u16]
//!   body    raw: 4096 bytes | lz4: a block of its length (1..=3968) | zero, known: none
//! RoundEnd  round u32 | offers in the round u32
//! State     total length u64 | offset u64 | bytes (≤ 1 MiB)
//! Complete  rounds u32 | 0 u32 | state length u64 | blake3 of the state [32]
//! ```
//!
//! `known` means "a page with this identity that I sent you earlier in this round".
//!
//! Version 2 leaves page bodies out of the frame MAC: a body is worth nothing unless it
//! hashes to the identity the MAC'd offer (or entry) gave, so MAC'ing it too would be a
//! second blake3 pass over every page on each end (see [`super`]).

use crate::codec::{CodecError, Reader};
use crate::identity::{Page, PageId, PAGE_SIZE};
use crate::manifest::Region;

use super::{Limits, MigrationError, VmDescription};

/// First bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"FABVMMIG";
/// Oldest protocol version spoken.
pub const VERSION_MIN: u16 = 2;
/// Newest protocol version spoken.
pub const VERSION_MAX: u16 = 2;
/// Bytes of a hello.
pub const HELLO_LEN: usize = 64;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 16;
/// Bytes of a frame's MAC.
pub const MAC_LEN: usize = 32;
/// Most page entries in one `Pages` message.
pub const PAGES_PER_MESSAGE: usize = 256;
/// Most state bytes in one `State` message.
pub const STATE_CHUNK: usize = 1 << 20;
/// Most bytes of an abort reason.
pub const MAX_REASON: usize = 512;
/// Feature bit: lz4-compressed page entries.
pub const FEATURE_LZ4: u16 = 1;
/// Least a compressed page must save to be sent compressed.
pub const MIN_SAVING: usize = 128;
/// Longest lz4 block accepted for a page.
pub const LZ4_MAX: usize = PAGE_SIZE - MIN_SAVING;
/// Scratch space [`compress_page`] needs.
pub const COMPRESS_BUF: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);

/// Which end of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The sender.
    Source = 1,
    /// The receiver.
    Destination = 2,
}

impl Role {
    /// The other end.
    pub fn peer(self) -> Role {
        match self {
            Role::Source => Role::Destination,
            Role::Destination => Role::Source,
        }
    }
}

/// The first message in both directions, unauthenticated (but bound into the key proofs).
///
/// ```text
/// magic [8] | version min u16 | version max u16 | role u8 | 0 u8 | features u16
/// | max batch u32 | max runs u32 | max window u32 | 0 u32 | nonce [32]
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest version spoken.
    pub version_min: u16,
    /// Newest version spoken.
    pub version_max: u16,
    /// The sender's role.
    pub role: Role,
    /// Feature bits ([`FEATURE_LZ4`]); the intersection is used.
    pub features: u16,
    /// Most ids per offer the sender of this hello accepts (a destination's limit).
    pub max_batch: u32,
    /// Most runs per offer accepted.
    pub max_runs: u32,
    /// Most offers in flight accepted.
    pub max_window: u32,
    /// Fresh random bytes.
    pub nonce: [u8; 32],
}

impl Hello {
    /// The 64 bytes of the hello.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version_min.to_le_bytes());
        b[10..12].copy_from_slice(&self.version_max.to_le_bytes());
        b[12] = self.role as u8;
        b[14..16].copy_from_slice(&self.features.to_le_bytes());
        b[16..20].copy_from_slice(&self.max_batch.to_le_bytes());
        b[20..24].copy_from_slice(&self.max_runs.to_le_bytes());
        b[24..28].copy_from_slice(&self.max_window.to_le_bytes());
        b[32..].copy_from_slice(&self.nonce);
        b
    }

    /// Decodes a hello. Reserved bytes are ignored: a later version may use them, and
    /// versions are negotiated before anything else is interpreted.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, MigrationError> {
        if b[..8] != MAGIC {
            return Err(MigrationError::NotAPeer("endpoint (bad magic)"));
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let role = match b[12] {
            1 => Role::Source,
            2 => Role::Destination,
            _ => return Err(MigrationError::NotAPeer("endpoint (unknown role)")),
        };
        Ok(Hello {
            version_min: u16_at(8),
            version_max: u16_at(10),
            role,
            features: u16_at(14),
            max_batch: u32_at(16),
            max_runs: u32_at(20),
            max_window: u32_at(24),
            nonce: b[32..].try_into().expect("32 bytes"),
        })
    }
}

/// Message types. Values 1-15 go both ways, 16-31 from the source, 32-47 from the
/// destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    /// Key proof.
    Auth = 1,
    /// Giving up, with a reason.
    Abort = 2,
    /// The VM's shape.
    Describe = 16,
    /// Page identities and zero runs of one batch.
    Offer = 17,
    /// Page contents a `Need` asked for.
    Pages = 18,
    /// End of a round.
    RoundEnd = 19,
    /// A piece of the vCPU and device state.
    State = 20,
    /// Everything sent.
    Complete = 21,
    /// Resume the guest.
    Commit = 22,
    /// The destination prepared memory.
    Accept = 32,
    /// The ids of a batch the destination lacks.
    Need = 33,
    /// Pages and state installed.
    Ready = 34,
    /// Guest resumed on the destination.
    Ack = 35,
}

impl MsgType {
    /// The type with this value.
    pub fn from_u8(v: u8) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            1 => Auth,
            2 => Abort,
            16 => Describe,
            17 => Offer,
            18 => Pages,
            19 => RoundEnd,
            20 => State,
            21 => Complete,
            22 => Commit,
            32 => Accept,
            33 => Need,
            34 => Ready,
            35 => Ack,
            _ => return None,
        })
    }

    /// Name for error messages.
    pub fn name(self) -> &'static str {
        use MsgType::*;
        match self {
            Auth => "Auth",
            Abort => "Abort",
            Describe => "Describe",
            Offer => "Offer",
            Pages => "Pages",
            RoundEnd => "RoundEnd",
            State => "State",
            Complete => "Complete",
            Commit => "Commit",
            Accept => "Accept",
            Need => "Need",
            Ready => "Ready",
            Ack => "Ack",
        }
    }

    /// Whether an end in `role` may send this type.
    pub fn sent_by(self, role: Role) -> bool {
        match self as u8 {
            1..=15 => true,
            16..=31 => role == Role::Source,
            _ => role == Role::Destination,
        }
    }

    /// Most payload bytes this type may carry under `limits`: the bound checked before a
    /// payload is read.
    pub fn max_payload(self, limits: &Limits) -> u64 {
        use MsgType::*;
        let page_entry = (1 + 32 + PAGE_SIZE) as u64;
        match self {
            Auth => 32,
            Abort => MAX_REASON as u64,
            Describe => 16 + u64::from(limits.max_regions) * 16 + u64::from(limits.max_config),
            Offer => 16 + u64::from(limits.max_runs) * 12 + u64::from(limits.max_batch) * 32,
            Pages => 16 + PAGES_PER_MESSAGE as u64 * page_entry,
            RoundEnd => 8,
            State => 16 + STATE_CHUNK as u64,
            Complete => 48,
            Need => 5 + u64::from(limits.max_batch).div_ceil(8),
            Commit | Accept | Ready | Ack => 0,
        }
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type value (checked by the receiver).
    pub kind: u8,
    /// Must be zero.
    pub flags: u8,
    /// Must be zero.
    pub reserved: u16,
    /// Payload bytes.
    pub len: u32,
    /// Frame number in this direction, from 0.
    pub seq: u64,
}

impl Header {
    /// The 16 bytes of the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.reserved.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// The header in 16 bytes (any bytes decode; the receiver checks the fields).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            kind: b[0],
            flags: b[1],
            reserved: u16::from_le_bytes([b[2], b[3]]),
            len: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            seq: u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        }
    }
}

fn malformed(what: &'static str) -> impl Fn(CodecError) -> MigrationError {
    move |e| MigrationError::Malformed {
        what,
        why: match e {
            CodecError::Trailing(_) => "trailing bytes",
            _ => "truncated",
        },
    }
}

fn bad(what: &'static str, why: &'static str) -> MigrationError {
    MigrationError::Malformed { what, why }
}

fn too_large(what: &'static str, len: u64, limit: u64) -> Result<(), MigrationError> {
    if len > limit {
        return Err(MigrationError::TooLarge { what, len, limit });
    }
    Ok(())
}

/// Appends a `Describe` payload.
pub fn encode_describe(out: &mut Vec<u8>, desc: &VmDescription) {
    put_u32(out, desc.vcpus);
    put_u32(out, desc.regions.len() as u32);
    put_u32(out, desc.config.len() as u32);
    put_u32(out, 0);
    for r in &desc.regions {
        put_u64(out, r.guest_addr);
        put_u64(out, r.pages);
    }
    out.extend_from_slice(&desc.config);
}

/// Decodes and validates a `Describe` payload.
pub fn decode_describe(payload: &[u8], limits: &Limits) -> Result<VmDescription, MigrationError> {
    const WHAT: &str = "Describe";
    let mut r = Reader::new(payload);
    let m = malformed(WHAT);
    let vcpus = r.u32(WHAT).map_err(&m)?;
    let count = r.u32(WHAT).map_err(&m)?;
    let config_len = r.u32(WHAT).map_err(&m)?;
    if r.u32(WHAT).map_err(&m)? != 0 {
        return Err(bad(WHAT, "reserved field set"));
    }
    if vcpus == 0 {
        return Err(bad(WHAT, "no vCPUs"));
    }
    too_large("vCPU count", vcpus.into(), limits.max_vcpus.into())?;
    too_large("region count", count.into(), limits.max_regions.into())?;
    too_large("config length", config_len.into(), limits.max_config.into())?;
    if r.remaining() as u64 != u64::from(count) * 16 + u64::from(config_len) {
        return Err(bad(WHAT, "length does not match its counts"));
    }
    let mut regions = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let guest_addr = r.u64(WHAT).map_err(&m)?;
        let pages = r.u64(WHAT).map_err(&m)?;
        regions.push(Region { guest_addr, pages });
    }
    let config = r.take(config_len as usize, WHAT).map_err(&m)?.to_vec();
    r.finish().map_err(&m)?;
    check_regions(&regions, limits)?;
    Ok(VmDescription {
        vcpus,
        regions,
        config,
    })
}

/// Regions must be non-empty, page aligned, sorted, disjoint, inside the address space
/// and under `limits.max_pages` in total.
pub(crate) fn check_regions(regions: &[Region], limits: &Limits) -> Result<(), MigrationError> {
    const WHAT: &str = "regions";
    if regions.is_empty() {
        return Err(bad(WHAT, "no memory"));
    }
    let mut total: u64 = 0;
    let mut prev_end = 0u64;
    for (i, r) in regions.iter().enumerate() {
        let end = r
            .pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|b| r.guest_addr.checked_add(b));
        let Some(end) = end else {
            return Err(bad(WHAT, "region past the end of the address space"));
        };
        if r.pages == 0 || !r.guest_addr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad(WHAT, "empty or unaligned region"));
        }
        if i > 0 && r.guest_addr < prev_end {
            return Err(bad(WHAT, "regions unsorted or overlapping"));
        }
        prev_end = end;
        total = total.saturating_add(r.pages);
    }
    too_large("guest pages", total, limits.max_pages)
}

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
    let sealed = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&sealed.to_le_bytes());
    for entry in entries {
        match entry.body {
            Body::Raw(page) => out.extend_from_slice(page),
            Body::Lz4(block) => out.extend_from_slice(block),
            Body::Zero | Body::Known => {}
        }
    }
}

/// How many leading bytes of a `kind` payload the frame MAC covers: all of them, except
/// for `Pages`, whose bodies follow the sealed length its first four bytes give.
pub fn sealed_len(kind: MsgType, payload: &[u8]) -> Result<usize, MigrationError> {
    if kind != MsgType::Pages {
        return Ok(payload.len());
    }
    let sealed = payload
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or(bad("Pages", "truncated"))?;
    if !(16..=payload.len()).contains(&sealed) {
        return Err(bad("Pages", "sealed length out of range"));
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
    entries.clear();
    for _ in 0..count {
        let tag = r.u8(WHAT).map_err(&m)?;
        if tag & !(TAG_NEW_ID | 3) != 0 {
            return Err(bad(WHAT, "unknown entry flags"));
        }
        let new_id = if tag & TAG_NEW_ID != 0 {
            Some(r.id(WHAT).map_err(&m)?)
        } else {
            None
        };
        let body = match tag & 3 {
            TAG_RAW => {
                let bytes = b.take(PAGE_SIZE, WHAT).map_err(&m)?;
                Body::Raw(bytes.try_into().expect("PAGE_SIZE bytes"))
            }
            TAG_LZ4 => {
                let len = r.u16(WHAT).map_err(&m)? as usize;
                if len == 0 || len > LZ4_MAX {
                    return Err(bad(WHAT, "compressed length out of range"));
                }
                Body::Lz4(b.take(len, WHAT).map_err(&m)?)
            }
            TAG_ZERO if new_id.is_some() => return Err(bad(WHAT, "zero page with an id")),
            TAG_ZERO => Body::Zero,
            _ => Body::Known,
        };
        entries.push(PageEntry { new_id, body });
    }
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
/// least [`MIN_SAVING`] bytes.
pub fn compress_page(page: &Page, buf: &mut [u8; COMPRESS_BUF]) -> Option<usize> {
    lz4_flex::block::compress_into(page, buf)
        .ok()
        .filter(|&len| len <= LZ4_MAX)
}

/// Appends a `State` payload.
pub fn encode_state(out: &mut Vec<u8>, total: u64, offset: u64, bytes: &[u8]) {
    put_u64(out, total);
    put_u64(out, offset);
    out.extend_from_slice(bytes);
}

/// Decodes a `State` payload: (total length, offset, bytes).
pub fn decode_state(payload: &[u8]) -> Result<(u64, u64, &[u8]), MigrationError> {
    const WHAT: &str = "State";
    let m = malformed(WHAT);
    let mut r = Reader::new(payload);
    let total = r.u64(WHAT).map_err(&m)?;
    let offset = r.u64(WHAT).map_err(&m)?;
    let bytes = r.take(r.remaining(), WHAT).map_err(&m)?;
    Ok((total, offset, bytes))
}

/// The `Complete` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// Rounds sent, the final one included.
    pub rounds: u32,
    /// Bytes of the state blob.
    pub state_len: u64,
    /// blake3 of the state blob.
    pub state_hash: [u8; 32],
}

impl Complete {
    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.rounds);
        put_u32(out, 0);
        put_u64(out, self.state_len);
        out.extend_from_slice(&self.state_hash);
    }

    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Complete, MigrationError> {
        const WHAT: &str = "Complete";
        let m = malformed(WHAT);
        let mut r = Reader::new(payload);
        let rounds = r.u32(WHAT).map_err(&m)?;
        if r.u32(WHAT).map_err(&m)? != 0 {
            return Err(bad(WHAT, "reserved field set"));
        }
        let state_len = r.u64(WHAT).map_err(&m)?;
        let state_hash = r.array(WHAT).map_err(&m)?;
        r.finish().map_err(&m)?;
        Ok(Complete {
            rounds,
            state_len,
            state_hash,
        })
    }
}

/// Appends a `RoundEnd` payload.
pub fn encode_round_end(out: &mut Vec<u8>, round: u32, batches: u32) {
    put_u32(out, round);
    put_u32(out, batches);
}

/// Decodes a `RoundEnd` payload: (round, offers in the round).
pub fn decode_round_end(payload: &[u8]) -> Result<(u32, u32), MigrationError> {
    const WHAT: &str = "RoundEnd";
    let m = malformed(WHAT);
    let mut r = Reader::new(payload);
    let round = r.u32(WHAT).map_err(&m)?;
    let batches = r.u32(WHAT).map_err(&m)?;
    r.finish().map_err(&m)?;
    Ok((round, batches))
}

/// Appends an `Abort` payload: `reason`, cut to [`MAX_REASON`] bytes at a character
/// boundary.
pub fn encode_abort(out: &mut Vec<u8>, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

/// The reason of an `Abort` (invalid UTF-8 replaced).
pub fn decode_abort(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// Checks that a payload is empty (`Accept`, `Ready`, `Commit`, `Ack`).
pub fn expect_empty(payload: &[u8], what: &'static str) -> Result<(), MigrationError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(bad(what, "trailing bytes"))
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::page;

    #[test]
    fn hello_round_trip_and_magic() {
        let h = Hello {
            version_min: 1,
            version_max: 3,
            role: Role::Destination,
            features: FEATURE_LZ4,
            max_batch: 4096,
            max_runs: 100,
            max_window: 8,
            nonce: [7; 32],
        };
        let b = h.encode();
        assert_eq!(Hello::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            Hello::decode(&bad),
            Err(MigrationError::NotAPeer(_))
        ));
        let mut bad = b;
        bad[12] = 9;
        assert!(matches!(
            Hello::decode(&bad),
            Err(MigrationError::NotAPeer(_))
        ));
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            kind: 17,
            flags: 0,
            reserved: 0,
            len: 12345,
            seq: 1 << 40,
        };
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn message_types_and_directions() {
        for v in 0..=255u8 {
            if let Some(t) = MsgType::from_u8(v) {
                assert_eq!(t as u8, v);
                assert!(t.sent_by(Role::Source) || t.sent_by(Role::Destination));
            }
        }
        assert!(MsgType::Offer.sent_by(Role::Source));
        assert!(!MsgType::Offer.sent_by(Role::Destination));
        assert!(MsgType::Need.sent_by(Role::Destination));
        assert!(MsgType::Abort.sent_by(Role::Source) && MsgType::Abort.sent_by(Role::Destination));
    }

    #[test]
    fn describe_round_trip_and_limits() {
        let limits = Limits::default();
        let desc = VmDescription {
            vcpus: 2,
            regions: vec![
                Region {
                    guest_addr: 0,
                    pages: 256,
                },
                Region {
                    guest_addr: 1 << 32,
                    pages: 16,
                },
            ],
            config: b"{}".to_vec(),
        };
        let mut out = Vec::new();
        encode_describe(&mut out, &desc);
        assert_eq!(decode_describe(&out, &limits).unwrap(), desc);
        assert!(out.len() as u64 <= MsgType::Describe.max_payload(&limits));

        // Truncated, trailing, and each limit.
        assert!(decode_describe(&out[..out.len() - 1], &limits).is_err());
        let mut long = out.clone();
        long.push(0);
        assert!(decode_describe(&long, &limits).is_err());
        let small = Limits {
            max_pages: 100,
            ..limits
        };
        assert!(matches!(
            decode_describe(&out, &small),
            Err(MigrationError::TooLarge { .. })
        ));
        let mut huge = out.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_describe(&huge, &limits),
            Err(MigrationError::TooLarge { .. })
        ));
        // Overlapping and unaligned regions.
        for regions in [
            vec![(0, 10), (4096 * 5, 10)],
            vec![(100, 1)],
            vec![(0, 0)],
            vec![(!4095u64, 2)],
            vec![],
        ] {
            let d = VmDescription {
                vcpus: 1,
                regions: regions
                    .into_iter()
                    .map(|(guest_addr, pages)| Region { guest_addr, pages })
                    .collect(),
                config: vec![],
            };
            let mut out = Vec::new();
            encode_describe(&mut out, &d);
            assert!(decode_describe(&out, &limits).is_err(), "{d:?}");
        }
    }

    #[test]
    fn offer_round_trip_and_checks() {
        let limits = Limits::default();
        let ids = [PageId([1; 32]), PageId([2; 32]), PageId([3; 32])];
        let runs = [
            Run {
                first: 10,
                count: 2,
                zero: false,
            },
            Run {
                first: 12,
                count: 1000,
                zero: true,
            },
            Run {
                first: 5000,
                count: 1,
                zero: false,
            },
        ];
        let mut out = Vec::new();
        encode_offer(&mut out, 7, 2, &runs, &ids);
        let v = OfferView::decode(&out, &limits).unwrap();
        assert_eq!((v.batch, v.round, v.id_count()), (7, 2, 3));
        assert_eq!(v.runs().collect::<Vec<_>>(), runs);
        assert_eq!((0..3).map(|i| v.id(i)).collect::<Vec<_>>(), ids);

        // Data runs must cover exactly the ids.
        let mut out = Vec::new();
        encode_offer(&mut out, 0, 1, &runs[..2], &ids);
        assert!(OfferView::decode(&out, &limits).is_err());
        // Empty run.
        let mut out = Vec::new();
        let empty = Run {
            first: 1,
            count: 0,
            zero: true,
        };
        encode_offer(&mut out, 0, 1, &[empty], &[]);
        assert!(OfferView::decode(&out, &limits).is_err());
        // Counts over the limits are refused before the length is looked at.
        let mut out = Vec::new();
        encode_offer(&mut out, 0, 1, &runs, &ids);
        out[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            OfferView::decode(&out, &limits),
            Err(MigrationError::TooLarge { .. })
        ));
    }

    #[test]
    fn need_modes() {
        for (n, bits, mode) in [
            (10usize, vec![0u8, 0], 0u8),
            (10, vec![0xff, 0x03], 1),
            (10, vec![0x05, 0x02], 2),
        ] {
            let mut out = Vec::new();
            encode_need(&mut out, 3, n, &bits);
            assert_eq!(out[4], mode);
            let v = NeedView::decode(&out).unwrap();
            assert_eq!(v.batch, 3);
            let got: Vec<bool> = v.needed(n).unwrap().collect();
            let want: Vec<bool> = (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
            assert_eq!(got, want);
        }
        // Bits past the offer, wrong bitmap length, bad mode.
        let v = NeedView::decode(&[0, 0, 0, 0, 2, 0x00, 0x04]).unwrap();
        assert!(v.needed(10).is_err());
        let v = NeedView::decode(&[0, 0, 0, 0, 2, 0x01]).unwrap();
        assert!(v.needed(10).is_err());
        assert!(NeedView::decode(&[0, 0, 0, 0, 3]).is_err());
        assert!(NeedView::decode(&[0, 0, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn pages_round_trip() {
        let raw = page(1);
        let mut text = [b'a'; PAGE_SIZE];
        text[100] = b'b';
        let mut buf = [0u8; COMPRESS_BUF];
        assert_eq!(
            compress_page(&raw, &mut buf),
            None,
            "random data does not compress"
        );
        let len = compress_page(&text, &mut buf).unwrap();
        let block = buf[..len].to_vec();
        let entries = [
            PageEntry {
                new_id: None,
                body: Body::Raw(&raw),
            },
            PageEntry {
                new_id: Some(PageId([9; 32])),
                body: Body::Lz4(&block),
            },
            PageEntry {
                new_id: None,
                body: Body::Zero,
            },
            PageEntry {
                new_id: Some(PageId([8; 32])),
                body: Body::Known,
            },
        ];
        let mut out = Vec::new();
        encode_pages(&mut out, 5, 256, &entries);
        assert!(out.len() as u64 <= MsgType::Pages.max_payload(&Limits::default()));
        let mut got = Vec::new();
        let h = decode_pages(&out, &mut got).unwrap();
        assert_eq!(
            h,
            PagesHeader {
                batch: 5,
                first: 256
            }
        );
        assert_eq!(got, entries);
        let mut p = [0u8; PAGE_SIZE];
        decode_page(&got[1].body, &mut p).unwrap();
        assert_eq!(p, text);
        decode_page(&got[0].body, &mut p).unwrap();
        assert_eq!(p, *raw);

        // A damaged block, a bad tag, a zero page with an id, truncation.
        let mut bad_block = block.clone();
        bad_block[0] ^= 0xff;
        bad_block.truncate(3);
        assert!(decode_page(&Body::Lz4(&bad_block), &mut p).is_err());
        for (offset, value) in [(16usize, 0x80u8), (16, 6)] {
            let mut bad = out.clone();
            bad[offset] = value;
            assert!(decode_pages(&bad, &mut Vec::new()).is_err());
        }
        assert!(decode_pages(&out[..out.len() - 1], &mut Vec::new()).is_err());

        // The sealed part ends where the entries do: not before, not after, not past
        // the payload.
        let sealed = sealed_len(MsgType::Pages, &out).unwrap();
        assert_eq!(sealed, 16 + 1 + (1 + 32 + 2) + 1 + (1 + 32));
        for wrong in [
            0u32,
            15,
            sealed as u32 - 1,
            sealed as u32 + 1,
            out.len() as u32 + 1,
        ] {
            let mut bad = out.clone();
            bad[..4].copy_from_slice(&wrong.to_le_bytes());
            assert!(decode_pages(&bad, &mut Vec::new()).is_err(), "{wrong}");
        }
        assert_eq!(sealed_len(MsgType::State, &out).unwrap(), out.len());
    }

    #[test]
    fn small_messages() {
        let c = Complete {
            rounds: 3,
            state_len: 10,
            state_hash: [4; 32],
        };
        let mut out = Vec::new();
        c.encode(&mut out);
        assert_eq!(out.len(), 48);
        assert_eq!(Complete::decode(&out).unwrap(), c);
        let mut out = Vec::new();
        encode_round_end(&mut out, 2, 9);
        assert_eq!(decode_round_end(&out).unwrap(), (2, 9));
        let mut out = Vec::new();
        encode_state(&mut out, 100, 50, b"xyz");
        assert_eq!(decode_state(&out).unwrap(), (100, 50, &b"xyz"[..]));
        let mut out = Vec::new();
        let long = "é".repeat(400);
        encode_abort(&mut out, &long);
        assert!(out.len() <= MAX_REASON);
        assert!(decode_abort(&out).starts_with("éé"));
    }
}
