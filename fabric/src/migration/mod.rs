//! Live migration wire protocol: a [`Sender`] on the source and a [`Receiver`] on the
//! destination, state machines over any byte stream, that ship only the pages the
//! destination does not already hold and leave the guest on the source until the
//! destination has resumed it.
//!
//! # Sequence (version 3)
//!
//! ```text
//!  source: Sender                                            destination: Receiver
//!  ──────────────                                            ─────────────────────
//!  Hello{magic, versions, role, features, limits, nonce}  ──►
//!                                                         ◄──  Hello{… nonce}       both at once,
//!  Auth{proof}                                            ──►                       unauthenticated
//!                                                         ◄──  Auth{proof}          (MAC'd from here on)
//!  Describe{vCPUs, regions, config}                       ──►
//!  (syncs its live identities meanwhile)                       VMM allocates guest memory
//!                                                         ◄──  Accept  (or Abort{reason}),
//!                                                              read with round 1's start
//!  ┌ round 1: every page, described by range ─────────────────────────────────────────┐
//!  │ Summary{b, level 0, ranges of 512 pages: digest}     ──►  looks each digest up in │
//!  │ … up to `window` unanswered …                             its range index, installs
//!  │                                                      ◄──  Answer{b, per range:    │
//!  │                                                              held | descend | push | want bitmap}
//!  │ Summary{b', level 1, the 16 sub-ranges of a descend} ──►  (held | descend | push | want)
//!  │ Offer{b'', runs, ids of a descended sub-range}        ──►  takes pages it holds    │
//!  │                                                      ◄──  Need{b'', bitmap}        │
//!  │ Pages{b'', entries}                                  ──►  verifies, installs      │
//!  │ Push{runs, entries, digest of their ids}             ──►  for push and want answers:
//!  │                                                           hashes, checks, installs │
//!  │ RoundEnd{r, batches}                                 ──►                          │
//!  └──────────────────────────────────────────────────────────────────────────────────┘
//!  ┌ rounds 2.. (pre-copy, guest running): the dirty pages ─────────────────────────────┐
//!  │ Offer / Need / Pages as above, or Push when the destination asked for pushes       │
//!  │ RoundEnd{r, batches}                                 ──►                          │
//!  └───────────────────────────────────────────────────────────────────────────────────┘
//!  guest paused
//!  Push{…} × n  (the last dirty pages: no answer awaited) ──►
//!  RoundEnd, State{total, offset, bytes} × n              ──►
//!  Complete{rounds, state length, state hash}             ──►  checks every page covered,
//!                                                              VMM restores the state and
//!                                                              resumes the guest
//!                                                         ◄──  Ack
//!  source VMM exits; before Ack it resumes its guest on any error
//! ```
//!
//! Every `Summary` gets one `Answer` and every offer that carries identities one `Need`
//! (offers of zero runs only get none); a batch whose `Need` asks for nothing gets no
//! `Pages`. Either side may send `Abort{reason}` instead of its next message; the other
//! side's call then fails with [`MigrationError::PeerAborted`].
//!
//! ## Range summaries
//!
//! A VM's pages in page order (its regions one after the other) are cut into ranges of 512
//! pages (2 MiB) and sub-ranges of 32; a range's digest is keyed blake3 over its page count
//! and its pages' identities (32 zero bytes for a zero page), see [`ranges`]. The
//! destination keeps a [`RangeIndex`] of the ranges it holds (the published identity tables
//! of the VMs running there, same cut), and answers each range:
//!
//! - **held**: its digest is in the index, so the destination knows all 512 identities; it
//!   copies the pages from where it holds them and checks each against its identity before
//!   the answer goes out. Nothing more crosses the wire: 44 bytes for 2 MiB.
//! - **want** + bitmap: held, but these pages did not check out (the VM holding them
//!   rewrote them since it published, or the index lied): the source pushes them.
//! - **descend**: not held whole. For a range, the source sends its 16 sub-range digests;
//!   for a sub-range, it offers the 32 identities page by page (the v2 offer, which finds
//!   pages held anywhere on the host, in any order).
//! - **push**: the destination evidently holds little of this VM; the source pushes the
//!   pages. The destination decides: it holds nothing at all (no VM, empty store), or of
//!   the first [`ranges::EVIDENCE_PAGES`] identities it looked up one by one under 2% were
//!   there. Until it has that evidence the source descends one range at a time, so a host
//!   that holds nothing costs at most a few thousand identities. The answer's flag then
//!   asks for later rounds to be pushed too.
//!
//! A VM the destination holds whole (a sibling started from the same image, a VM migrated
//! back while its earlier copy runs) thus costs about 1/50,000 of its memory in round 1,
//! and a destination that holds nothing costs its pages plus about 1.4 bytes each.
//!
//! ## One round trip at the stop
//!
//! The final round pushes the last dirty pages without waiting for an answer, and
//! `Complete` commits: a destination that finds every page covered and every check passed
//! restores the state, resumes the guest and answers `Ack`. The guest's pause is the time
//! to send the last pages and the state, one trip there and back, and the restore.
//! Version 2 waited twice more (the final offer's `Need`, then `Ready` before `Commit`).
//!
//! # Wire format (version 3)
//!
//! Little endian throughout. Both sides first send a fixed 64-byte [`wire::Hello`]:
//! magic `FABVMMIG`, the range of versions spoken, the role, feature bits (lz4), the
//! receiver's limits and a random 32-byte nonce. Every message after it is a frame:
//!
//! ```text
//!  0      1       2         4            8                16          16+len      48+len
//!  │ type │ flags │ reserved│ length u32 │ sequence u64   │ payload    │ MAC (32)  │
//! ```
//!
//! The header is fixed size, `flags` and `reserved` must be zero, `length` is checked
//! against the most that message type may carry under the receiver's [`Limits`] before a
//! byte of payload is read or allocated, and the sequence number counts frames per
//! direction from 0. Payload layouts are in [`wire`]. A peer that speaks only another
//! version is refused before anything else, with one line naming both
//! ([`MigrationError::VersionMismatch`]).
//!
//! # Security
//!
//! The channel is **authenticated, not encrypted**: an observer of the link sees guest
//! memory. Across untrusted networks run it inside WireGuard or IPsec; an encrypted mode
//! can be added later behind a feature bit of the hello without changing the framing.
//!
//! - Both sides hold a pre-shared [`MigrationKey`]. After the hellos each sends
//!   `Auth{keyed_blake3(k, role label ‖ blake3(hello_source ‖ hello_destination))}` and
//!   checks the peer's; a wrong key fails both sides with [`MigrationError::AuthFailed`]
//!   and nothing else (the proofs are MACs over fresh random nonces). The source sends
//!   nothing about the VM before the destination has proven the key, so a fake
//!   destination cannot steal a VM. The hellos are in the transcript, so neither a version
//!   nor a feature can be downgraded unnoticed.
//! - Every frame carries a MAC: keyed blake3 with a per-direction key derived from the
//!   pre-shared key and the transcript, over header (including the sequence number) and
//!   payload, page bodies excepted. Nothing can be injected or changed
//!   ([`MigrationError::BadMac`]), replayed or reordered ([`MigrationError::OutOfSequence`]),
//!   or carried over from another session.
//! - Page bodies are authenticated by their identities instead: an identity comes in a
//!   MAC'd offer, and the receiver installs a page only if it hashes to that identity
//!   (blake3, so no one can make one that does). A page that does not match (the guest
//!   wrote it after its offer, or it was damaged) is held back until a later round offers
//!   it again, and a migration that completes with one still held back is refused
//!   ([`MigrationError::BadPage`]). Version 1 MAC'd the bodies too: each page was then
//!   hashed three times at the source (offer, re-identify on send, MAC) and twice at the
//!   destination (MAC, verify); now once on each side, which on a loopback link doubled
//!   the throughput of a guest with nothing to share.
//! - A push carries no identity per page but one digest over its pages' identities in its
//!   MAC'd part: the source hashes each page as it reads it, the destination hashes each
//!   page it receives (it needs the identities anyway) and refuses the whole message if the
//!   digest differs ([`MigrationError::BadPage`]): damage or forgery, never a race.
//! - A range answered held is installed from pages checked against identities the
//!   destination knows from its own index: equal digests mean (blake3) equal identities.
//!   A destination whose index is stale or lies checks the pages it copies and wants the
//!   ones that fail; a wrong page is never installed.
//! - The receiver bounds every length before allocating, checks every guest frame against
//!   the announced regions, rejects a frame offered twice in one round, and refuses to
//!   complete until every page of every region has been covered.
//!
//! # Pipelining and concurrency
//!
//! The sender keeps up to `window` offers and summaries unanswered. It is one thread over one stream,
//! writing offers while the destination answers them: after each offer it takes every
//! answer that has already arrived (a zero-timeout `poll` through [`Transport`]) and
//! writes the pages it asks for, so pages flow while later batches are still being
//! hashed; it blocks for an answer only when the window is full or the round is draining.
//! This cannot deadlock on a blocking stream: the destination writes one small `Need` or
//! `Answer` per offer or summary, so at most `window` of them (≤ 64 × 66 KiB at the
//! largest, a few hundred bytes in practice) are ever unread, within the socket buffers,
//! and the destination never stops reading for longer than one message takes. (A reader thread would need the stream split in two; the socket buffers already
//! give the overlap that matters, and one thread keeps the state machine a plain loop.)
//!
//! CPU work is spread by rayon inside each step: the sender reads and compresses each
//! `Pages` message's pages in parallel; the receiver fetches and
//! verifies an offer's held pages, and decompresses and verifies arriving pages, in
//! parallel; MACs over large frames use blake3's multithreaded mode. The first round
//! needs every page's identity before its first summary: the VMM keeps them current in
//! the background ([`crate::live`]); [`identities`] hashes memory one parallel chunk at a
//! time where nothing does.
//!
//! Rounds are barriers: a round's pages are all sent before the next round's offers, so
//! a page can never be overwritten by an older copy of itself. Within a round a frame
//! appears once.
//!
//! # Commit and failure
//!
//! The source keeps its guest (paused from the final round on) until it receives `Ack`;
//! every error before that returns from [`Sender::finish`] and the VMM resumes the guest
//! on the source. `Complete` commits: the destination resumes the guest only once every
//! page is covered and checked and the state restored, and discards everything on any
//! error before that (its calls return errors; nothing it installed is used). One window
//! cannot be closed by any protocol (two generals): if the link dies after the destination
//! resumed but before `Ack` arrives, both sides may run the guest. To narrow it, the
//! destination VMM stops its guest when [`Receiver::confirm_resumed`] fails to send `Ack`.
//! (Version 2 spent a round trip on `Ready` and `Commit` before resuming; that closed no
//! window the `Ack` leaves open.)
//!
//! Timeouts are the transport's: the VMM sets socket timeouts, and a read or write that
//! times out surfaces as [`MigrationError::TimedOut`].
//!
//! # What the VMM does
//!
//! Source: connect, set read and write timeouts and `TCP_NODELAY` (answers are small
//! writes), [`Sender::connect`], [`Sender::describe`] (it does not wait for `Accept`: the
//! first round reads it, so the source's preparation overlaps the destination's); open its
//! own view of the dirty log, then [`Sender::round`] over every page's live identity; then, round after round,
//! [`Sender::round_frames`] over the dirty set (KVM's log OR the VMM's own write bitmap)
//! until the set fits the downtime budget at the link rate the last [`RoundStats`] show;
//! pause the vCPUs and devices, take the last dirty set, save the state and
//! [`Sender::finish`]. `Ok` means the destination runs the guest: exit. `Err` means resume
//! the guest here.
//!
//! Post-copy (hybrid): instead of [`Sender::finish`], [`Sender::switchover`] lists the pages
//! the destination lacks and sends the state; the destination resumes the guest and takes
//! those pages on demand ([`PostcopySource`], [`PostcopyDest`]; sequence and failure rules in
//! `postcopy.rs`).
//!
//! Destination: accept, set timeouts and `TCP_NODELAY`, [`Receiver::accept`]; check the
//! description and allocate zero-filled guest memory (or [`Receiver::abort`] with the
//! reason); [`Receiver::receive`] with a [`PageSource`] over what the host holds (its
//! store, and the VMs running there with their [`RangeIndex`]) and a [`GuestSink`] over
//! guest memory; restore the returned state (or abort); resume the vCPUs;
//! [`Receiver::confirm_resumed`] (on failure, stop the guest). The returned manifest can
//! seed the store.

mod channel;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod layout;
mod postcopy;
mod postcopy_rx;
pub mod ranges;
mod receiver;
mod rx_ranges;
mod rx_state;
mod sender;
mod service;
mod stats;
mod tx_push;
mod tx_ranges;
pub mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::hashing::hash_region;
use crate::identity::{Page, PageId, PAGE_SIZE};
use crate::manifest::Region;
use crate::store::Store;

pub use error::{KeyError, MigrationError};
pub use postcopy::{
    Pace, PageState, PostcopyDest, PostcopyPages, PostcopySource, PostcopySourceStats,
    PostcopyTable,
};
pub use ranges::{Holder as RangeHolder, RangeIndex};
pub use receiver::{ReceivedVm, Receiver};
pub use sender::Sender;
pub use service::ServiceChannel;
pub use stats::{MigrationStats, ReceiverStats, RoundStats};

/// The byte stream a [`Sender`] runs over: any `Read + Write` (implement this trait with
/// its default for other streams). A stream that can tell whether input is waiting lets
/// the sender take each answer as soon as it arrives instead of when its window is full,
/// so pages start flowing while later batches are still being hashed.
pub trait Transport: Read + Write {
    /// Whether a read would return at once (data, end of stream or an error). The default
    /// says no: answers are then read when the window is full.
    fn has_input(&self) -> bool {
        false
    }

    /// Bytes written but not yet sent on the link, when the stream can tell (a TCP
    /// socket's send queue): the source lets them drain before it pauses the guest.
    fn unsent(&self) -> Option<u64> {
        None
    }
}

/// Whether `fd` is readable now (poll with a zero timeout).
fn fd_readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes exactly the one pollfd passed, which lives on this
    // stack frame for the call; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

impl Transport for TcpStream {
    fn has_input(&self) -> bool {
        fd_readable(self.as_raw_fd())
    }

    fn unsent(&self) -> Option<u64> {
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ on a socket) writes one int, to `n`, which lives on
        // this stack frame for the call; the descriptor is this stream's.
        let r = unsafe { libc::ioctl(self.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        (r == 0).then_some(n.max(0) as u64)
    }
}

impl Transport for UnixStream {
    fn has_input(&self) -> bool {
        fd_readable(self.as_raw_fd())
    }
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn has_input(&self) -> bool {
        (**self).has_input()
    }

    fn unsent(&self) -> Option<u64> {
        (**self).unsent()
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn has_input(&self) -> bool {
        (**self).has_input()
    }

    fn unsent(&self) -> Option<u64> {
        (**self).unsent()
    }
}

/// Where the destination takes pages it already holds: its host store, or VMs running on
/// the host. Called from several threads at once.
pub trait PageSource: Sync {
    /// Copies the page with identity `id` into `out` and returns true, or returns false
    /// when this host does not hold it. Need not verify: the receiver hashes every page it
    /// is given and asks the source for it when the content does not match.
    fn fetch(&self, id: &PageId, out: &mut Page) -> bool;

    /// Like [`PageSource::fetch`], for the page offered at guest frame `gfn` (a source
    /// may look there first: a VM started from the same image often holds the same page
    /// at the same frame).
    fn fetch_at(&self, gfn: u64, id: &PageId, out: &mut Page) -> bool {
        let _ = gfn;
        self.fetch(id, out)
    }

    /// The digests of the ranges of pages this host holds, with their identities, for
    /// answering range summaries; `None` (the default) answers none from here.
    fn ranges(&self) -> Option<&RangeIndex> {
        None
    }

    /// Whether this host may hold any page the source has. `false` makes the receiver
    /// ask the source to push every page at once instead of describing them.
    fn holds_any(&self) -> bool {
        true
    }

    /// True when every page this source returns has been checked against its identity
    /// as it was copied: the receiver then does not hash it a second time.
    fn verifies(&self) -> bool {
        false
    }

    /// Fetches many pages at once: `wanted[i]` (guest frame, identity) into page `i` of
    /// `out`, its outcome in `results[i]` (all have one slot per page). Where `direct[i]`
    /// is true and `frames` is given, the source may instead copy the page straight into
    /// its guest frame (which is empty and no copy's source) and answer
    /// [`FetchResult::Installed`]; it leaves such a frame zeroed when the page is not
    /// installed. The default fetches page by page into `out` on all cores; a source that
    /// can copy many pages per system call overrides it. Every `Verified` or `Installed`
    /// page must match its identity.
    fn fetch_batch(
        &self,
        wanted: &[(u64, PageId)],
        direct: &[bool],
        frames: Option<&dyn GuestFrames>,
        out: &mut [u8],
        results: &mut [FetchResult],
    ) {
        use rayon::prelude::*;
        let _ = (direct, frames);
        let verified_by_source = self.verifies();
        out.par_chunks_mut(PAGE_SIZE)
            .zip(wanted.par_iter())
            .zip(results.par_iter_mut())
            .with_min_len(4)
            .for_each(|((buf, (gfn, id)), result)| {
                let page: &mut Page = buf.try_into().expect("a page");
                *result = if !self.fetch_at(*gfn, id, page) {
                    FetchResult::Absent
                } else if verified_by_source || id.matches(page) {
                    FetchResult::Verified
                } else {
                    FetchResult::Mismatch
                };
            });
    }
}

/// What became of one page a [`PageSource`] was asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FetchResult {
    /// Not held here.
    #[default]
    Absent,
    /// Copied and matching its identity.
    Verified,
    /// Copied, but its content no longer matches (rewritten since it was indexed).
    Mismatch,
    /// Copied straight into its guest frame and matching its identity.
    Installed,
}

/// The host store holds the pages in it (and checks each as it reads it).
impl PageSource for Store {
    fn fetch(&self, id: &PageId, out: &mut Page) -> bool {
        self.get(id, out).is_ok()
    }

    fn verifies(&self) -> bool {
        true
    }
}

/// A destination that holds nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPages;

impl PageSource for NoPages {
    fn fetch(&self, _id: &PageId, _out: &mut Page) -> bool {
        false
    }

    fn holds_any(&self) -> bool {
        false
    }
}

/// The destination guest's memory, as the receiver sees it. Memory starts zero filled
/// (fresh anonymous memory), so the receiver zeroes only pages it wrote before.
/// Every `gfn` passed has been checked against the described regions.
pub trait GuestSink {
    /// Writes a verified page.
    fn write_page(&mut self, gfn: u64, data: &Page);
    /// Zeroes a page.
    fn zero_page(&mut self, gfn: u64);
    /// Reads back a page written earlier in this migration (to copy it to another frame
    /// that has the same content).
    fn read_page(&self, gfn: u64, out: &mut Page);
    /// Direct access to guest frames, for page sources that copy straight into guest
    /// memory; `None` (the default) when the sink offers none.
    fn frames(&self) -> Option<&dyn GuestFrames> {
        None
    }
}

/// Guest frames a page source may write directly (see [`PageSource::fetch_batch`]).
pub trait GuestFrames: Sync {
    /// The host address of guest frame `gfn`'s page, valid while the sink lives, or `None`
    /// outside guest RAM.
    fn frame_addr(&self, gfn: u64) -> Option<usize>;
}

/// What the source announces before any page: the VM's shape.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmDescription {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM regions, sorted by address, page aligned and disjoint.
    pub regions: Vec<Region>,
    /// Opaque machine configuration for the destination VMM (at most
    /// [`Limits::max_config`] bytes), e.g. JSON of the devices to create.
    pub config: Vec<u8>,
}

impl VmDescription {
    /// Total pages over all regions.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.pages).sum()
    }
}

/// Bounds on what a peer may send, applied before allocating. The destination announces
/// its batch, run and window limits in its hello and the source stays within them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most page identities in one offer.
    pub max_batch: u32,
    /// Most runs (of data or zero pages) in one offer.
    pub max_runs: u32,
    /// Most offers answered but whose pages have not all arrived (the sender's window).
    pub max_window: u32,
    /// Most guest RAM regions.
    pub max_regions: u32,
    /// Most guest pages over all regions.
    pub max_pages: u64,
    /// Most vCPUs.
    pub max_vcpus: u32,
    /// Most bytes of [`VmDescription::config`].
    pub max_config: u32,
    /// Most bytes of the vCPU and device state blob.
    pub max_state: u64,
    /// Most pre-copy rounds, the final one included.
    pub max_rounds: u32,
}

impl Default for Limits {
    /// 4096 identities and runs per offer, 64 unanswered offers, 64 regions, 64 GiB of
    /// guest memory, 1024 vCPUs, 1 MiB of configuration, 64 MiB of state, 1000 rounds.
    fn default() -> Self {
        Limits {
            max_batch: 4096,
            max_runs: 4096,
            max_window: 64,
            max_regions: 64,
            max_pages: (64u64 << 30) / PAGE_SIZE as u64,
            max_vcpus: 1024,
            max_config: 1 << 20,
            max_state: 64 << 20,
            max_rounds: 1000,
        }
    }
}

/// How sent pages are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Never: every sent page goes raw.
    None,
    /// lz4 per page, kept only when it saves at least [`wire::MIN_SAVING`] bytes; when few
    /// pages compress, only every 16th is tried until compressible data shows up again.
    #[default]
    Lz4,
}

/// Settings of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderConfig {
    /// Page identities per offer (capped by the destination's `max_batch`).
    pub batch: u32,
    /// Offers in flight before the sender waits for an answer (capped by the
    /// destination's `max_window`).
    pub window: u32,
    /// Compression of sent pages (used when the destination supports it).
    pub compression: Compression,
    /// Bounds on what the destination may send back.
    pub limits: Limits,
}

impl Default for SenderConfig {
    /// 2048 identities per offer and 32 offers in flight: 64 Ki pages (256 MiB of guest
    /// memory) under way, enough to cover a 1 Gbit/s, 20 ms round trip with identities.
    fn default() -> Self {
        SenderConfig {
            batch: 2048,
            window: 32,
            compression: Compression::Lz4,
            limits: Limits::default(),
        }
    }
}

/// The pre-shared key both ends of a migration hold.
///
/// Made from at least 16 secret bytes (32 random bytes recommended, e.g. a key file made
/// by [`MigrationKey::random_hex`]); the bytes are hashed into the 32-byte key used.
#[derive(Clone)]
pub struct MigrationKey([u8; 32]);

impl MigrationKey {
    /// Fewest secret bytes accepted.
    pub const MIN_LEN: usize = 16;

    /// A key from secret bytes.
    pub fn new(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < Self::MIN_LEN {
            return Err(KeyError::TooShort(secret.len()));
        }
        Ok(MigrationKey(blake3::derive_key(
            "fabvm 2026 migration pre-shared key v1",
            secret,
        )))
    }

    /// A key from the contents of a key file: hex digits (surrounding whitespace ignored)
    /// when the file is hex text, otherwise the raw bytes.
    pub fn from_file_contents(contents: &[u8]) -> Result<Self, KeyError> {
        let text = contents.trim_ascii();
        if !text.is_empty() && text.iter().all(u8::is_ascii_hexdigit) {
            if !text.len().is_multiple_of(2) {
                return Err(KeyError::BadHex);
            }
            let bytes: Vec<u8> = text
                .chunks_exact(2)
                .map(|p| (hex_value(p[0]) << 4) | hex_value(p[1]))
                .collect();
            return Self::new(&bytes);
        }
        Self::new(contents)
    }

    /// 32 random bytes as 64 hex digits and a newline: the contents of a new key file.
    pub fn random_hex() -> Result<String, KeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|_| KeyError::NoRandomness)?;
        let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.push('\n');
        Ok(s)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MigrationKey(..)")
    }
}

fn hex_value(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// Pages hashed per step by [`identities`] (4 MiB: enough to spread over all cores).
const LAZY_CHUNK_PAGES: usize = 1024;

/// `(gfn, identity)` of every page of `mem` (a region starting at frame `first_gfn`),
/// `None` for zero pages, hashed lazily: one chunk of 1024 pages (4 MiB) at a
/// time, on all cores, as the iterator is drawn. Feeding it to [`Sender::round`] starts
/// the first round before the region is hashed. A trailing partial page is ignored.
pub fn identities(first_gfn: u64, mem: &[u8]) -> impl Iterator<Item = (u64, Option<PageId>)> + '_ {
    let whole = mem.len() / PAGE_SIZE * PAGE_SIZE;
    mem[..whole]
        .chunks(LAZY_CHUNK_PAGES * PAGE_SIZE)
        .enumerate()
        .flat_map(move |(chunk, bytes)| {
            let ids = hash_region(bytes).expect("chunks are whole pages");
            let base = first_gfn + (chunk * LAZY_CHUNK_PAGES) as u64;
            ids.into_iter()
                .enumerate()
                .map(move |(i, id)| (base + i as u64, id))
        })
}
