//! The bytes of the migration protocol, version 3: the hello, the frame header and every
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
//! Accept, Ack: empty
//! Summary   batch u32 | round u32 | level u8 (0: ranges ≤ 512 pages, 1: ≤ 32) | 0 u8
//!           | count u16 (1..=1024) | (first page u64 | pages u32 | digest [32]) × count
//!           (pages in the VM's page order: its regions one after the other)
//! Answer    batch u32 | flags u8 (bit 0: push later rounds) | 0 u8 | count u16
//!           | code u2 × count, four a byte (0 held, 1 descend, 2 push, 3 want)
//!           | for each want, in order: a bitmap over its range's pages
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
//! Push      sealed length u32 | round u32 | run count u32 | count u32 (≤ 256)
//!           | (first gfn u64 | count u32) × runs | entry × count | digest [32] | body × count
//!           entries as in Pages; raw and lz4 carry no id, known must (a page pushed earlier
//!           in this migration); digest = keyed blake3 over the raw and lz4 pages' ids
//! RoundEnd  round u32 | offers and summaries in the round u32
//! State     total length u64 | offset u64 | bytes (≤ 1 MiB)
//! Complete  rounds u32 | 0 u32 | state length u64 | blake3 of the state [32]
//!           (commits: the destination resumes the guest if everything checks, then Ack)
//! ```
//!
//! Post-copy (`Missing`, `Switchover`, `PostPages`, `Fault`, `AllIn`): see [`postcopy`].
//!
//! `known` means "a page with this identity that I sent you earlier in this round".
//!
//! Page bodies stay out of the frame MAC (since version 2): a body is worth nothing unless
//! it hashes to the identity the MAC'd offer (or entry) gave, or, in a push, unless the
//! pages' identities match the MAC'd digest, so MAC'ing it too would be a second blake3
//! pass over every page on each end (see [`super`]).

mod control;
mod describe;
mod offer;
mod pages;
mod postcopy;
mod push;
mod ranges;
#[cfg(test)]
mod tests;

pub use control::*;
pub use describe::*;
pub use offer::*;
pub use pages::*;
pub use postcopy::*;
pub use push::*;
pub use ranges::*;

use crate::codec::CodecError;
use crate::identity::PAGE_SIZE;

use super::{Limits, MigrationError};

/// First bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"FABVMMIG";
/// First bytes of every page-service stream (the same channel, another protocol).
pub const SERVICE_MAGIC: [u8; 8] = *b"FABVMPGS";
/// Most page identities in one page-service request (and pages in its reply).
pub const SERVICE_MAX_IDS: usize = 256;

/// Which protocol a channel speaks: its hello's magic, its session keys' labels and the
/// message types it accepts differ, so neither can be mistaken for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Live migration (everything but the page-service messages).
    Migration,
    /// The host agent's page service (`PageRequest`, `PageReply`, and `Auth`/`Abort`).
    PageService,
}

impl Protocol {
    /// The first eight bytes of its hello.
    pub fn magic(self) -> [u8; 8] {
        match self {
            Protocol::Migration => MAGIC,
            Protocol::PageService => SERVICE_MAGIC,
        }
    }
}
/// Oldest protocol version spoken.
pub const VERSION_MIN: u16 = 3;
/// Newest protocol version spoken.
pub const VERSION_MAX: u16 = 3;
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
        self.encode_for(Protocol::Migration)
    }

    /// The 64 bytes of the hello of `protocol`.
    pub fn encode_for(&self, protocol: Protocol) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&protocol.magic());
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
        Self::decode_for(b, Protocol::Migration)
    }

    /// [`Hello::decode`] for `protocol`.
    pub fn decode_for(b: &[u8; HELLO_LEN], protocol: Protocol) -> Result<Hello, MigrationError> {
        if b[..8] != protocol.magic() {
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
    /// Digests over ranges of pages.
    Summary = 23,
    /// Pages sent without an offer.
    Push = 24,
    /// The destination prepared memory.
    Accept = 32,
    /// The ids of a batch the destination lacks.
    Need = 33,
    /// Per range of a summary: held, descend, push or want.
    Answer = 36,
    /// Guest resumed on the destination.
    Ack = 35,
    /// Page service: identities a client asks for (the client is the source role).
    PageRequest = 25,
    /// Page service: the pages held, in the request's order.
    PageReply = 37,
    /// Post-copy: identities of the pages the destination has not got (an offer's layout).
    Missing = 26,
    /// Post-copy: the guest stopped here; state sent; the destination may resume it.
    Switchover = 27,
    /// Post-copy: page contents by guest frame.
    PostPages = 28,
    /// Post-copy: frames the destination wants now (or holds itself).
    Fault = 38,
    /// Post-copy: every page is in; the source may exit.
    AllIn = 39,
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
            23 => Summary,
            24 => Push,
            32 => Accept,
            33 => Need,
            36 => Answer,
            35 => Ack,
            25 => PageRequest,
            37 => PageReply,
            26 => Missing,
            27 => Switchover,
            28 => PostPages,
            38 => Fault,
            39 => AllIn,
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
            Summary => "Summary",
            Push => "Push",
            Accept => "Accept",
            Need => "Need",
            Answer => "Answer",
            Ack => "Ack",
            PageRequest => "PageRequest",
            PageReply => "PageReply",
            Missing => "Missing",
            Switchover => "Switchover",
            PostPages => "PostPages",
            Fault => "Fault",
            AllIn => "AllIn",
        }
    }

    /// Whether a channel of `protocol` carries this type.
    pub fn in_protocol(self, protocol: Protocol) -> bool {
        match self {
            MsgType::Auth | MsgType::Abort => true,
            MsgType::PageRequest | MsgType::PageReply => protocol == Protocol::PageService,
            _ => protocol == Protocol::Migration,
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
            Summary => 12 + (MAX_RANGES * RANGE_LEN) as u64,
            Answer => 8 + MAX_RANGES.div_ceil(4) as u64 + MAX_RANGES as u64 * 64,
            Push => {
                let n = PAGES_PER_MESSAGE as u64;
                48 + n * 12 + n * (3 + 32) + n * PAGE_SIZE as u64
            }
            Accept | Ack => 0,
            PageRequest => 8 + SERVICE_MAX_IDS as u64 * 32,
            PageReply => 8 + SERVICE_MAX_IDS as u64 * (1 + PAGE_SIZE as u64),
            Missing => Offer.max_payload(limits),
            Switchover => SWITCHOVER_LEN as u64,
            PostPages => POST_PAGES_MAX,
            Fault => FAULT_MAX,
            AllIn => ALL_IN_LEN as u64,
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

pub(super) fn malformed(what: &'static str) -> impl Fn(CodecError) -> MigrationError {
    move |e| MigrationError::Malformed {
        what,
        why: match e {
            CodecError::Trailing(_) => "trailing bytes",
            _ => "truncated",
        },
    }
}

pub(super) fn bad(what: &'static str, why: &'static str) -> MigrationError {
    MigrationError::Malformed { what, why }
}

pub(super) fn too_large(what: &'static str, len: u64, limit: u64) -> Result<(), MigrationError> {
    if len > limit {
        return Err(MigrationError::TooLarge { what, len, limit });
    }
    Ok(())
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

/// Checks that a payload is empty (`Accept`, `Ack`).
pub fn expect_empty(payload: &[u8], what: &'static str) -> Result<(), MigrationError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(bad(what, "trailing bytes"))
    }
}

pub(super) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
