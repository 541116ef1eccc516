//! What the destination tracks while pages arrive, and how it installs them: offers answered
//! after taking what this migration and the host already hold, pages verified before they
//! are installed, rounds and the state blob checked, coverage checked at `Complete`.

use std::collections::{HashMap, VecDeque};

use rayon::prelude::*;

use super::layout::{Bitmap, Layout};
use super::ranges::EVIDENCE_PAGES;
use super::stats::ReceiverStats;
use super::wire::{self, Body, Complete, OfferView, PAGES_PER_MESSAGE};
use super::{FetchResult, GuestSink, Limits, MigrationError, PageSource};
use crate::identity::{Page, PageId, PAGE_SIZE};
use crate::manifest::Manifest;

/// Everything the receiver tracks while pages arrive.
#[derive(Debug)]
pub(super) struct RxState {
    /// Identity installed at each frame.
    pub(super) manifest: Manifest,
    /// Frames covered by any round (all must be before `Complete`).
    pub(super) covered: Bitmap,
    /// Frames offered in the current round.
    pub(super) seen: Bitmap,
    /// Per frame (dense index): what the destination asked the source to send for it in
    /// this round (an [`Expect`] as u8), and how many such frames are outstanding.
    pub(super) expect: Vec<u8>,
    pub(super) expected: u64,
    /// Pages this migration looked up one by one or by range, and of those found here:
    /// the evidence for pushing instead of offering.
    pub(super) examined: u64,
    pub(super) found: u64,
    /// Whether the host holds any page at all ([`PageSource::holds_any`]).
    pub(super) holds_any: bool,
    /// Frames whose last page arrived not matching its identity (changed at the source
    /// after it was offered, or damaged on the way): a later round must offer them again.
    pub(super) stale: Bitmap,
    /// A frame holding each identity received in this migration (the newest).
    pub(super) have: HashMap<PageId, u64>,
    /// Current round, from 1.
    pub(super) round: u32,
    /// An offer of the current round arrived and its `RoundEnd` has not.
    pub(super) round_open: bool,
    pub(super) next_batch: u32,
    pub(super) batches_in_round: u32,
    /// Answered offers whose pages have not all arrived, oldest first.
    pub(super) outstanding: VecDeque<Needed>,
    pub(super) state: Vec<u8>,
    pub(super) state_total: Option<u64>,
    /// Post-copy: a `Missing` list arrived (no more rounds); data pages it listed, and
    /// those of them not installed here (what the source must still send).
    pub(super) postcopy_started: bool,
    pub(super) listed: u64,
    pub(super) postcopy: Vec<(u64, PageId)>,
    pub(super) present: Vec<u64>,
    // Reused buffers.
    pub(super) actions: Vec<Action>,
    pub(super) fetch: Vec<(u64, PageId)>,
    /// Per fetched page: whether its frame may be written directly.
    pub(super) direct: Vec<bool>,
    pub(super) fetch_buf: Vec<u8>,
    pub(super) fetch_result: Vec<FetchResult>,
    pub(super) need_bits: Vec<u8>,
    pub(super) page_buf: Vec<u8>,
    pub(super) verified: Vec<bool>,
    pub(super) tmp: Box<Page>,
}

#[derive(Debug)]
pub(super) struct Needed {
    pub(super) batch: u32,
    /// (gfn, offered identity) asked for, in order.
    pub(super) entries: Vec<(u64, PageId)>,
    /// How many have arrived.
    pub(super) next: usize,
}

/// What the destination asked the source to send for a frame this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Expect {
    /// Nothing (the frame is not in this round yet, or is settled).
    Nothing = 0,
    /// A sub-range summary covering it.
    SubRange = 1,
    /// An offer of its identity.
    Offer = 2,
    /// Its content, in a push.
    Push = 3,
}

/// What to do for one page of an offer, in offer order.
#[derive(Debug, Clone, Copy)]
pub(super) enum Action {
    /// Zero the frames of a zero run that held data (one action per run, so a run over
    /// the whole guest costs no memory).
    Zero { first: u64, count: u64 },
    /// Copy a page received earlier in this migration.
    Copy { from: u64, to: u64, id: PageId },
    /// Install fetch slot `slot` if it verified, else ask for offer id `entry`.
    Fetch { slot: usize, entry: usize },
}

pub(super) fn bad(what: &'static str, why: &'static str) -> MigrationError {
    MigrationError::Malformed { what, why }
}

impl RxState {
    /// Handles an offer: takes every page it can without the source, in offer order, and
    /// returns `(batch, ids)` to answer with `need_bits`, or `None` when the offer had no
    /// ids (only zero runs; no answer is due).
    pub(super) fn offer(
        &mut self,
        offer: &OfferView<'_>,
        layout: &Layout,
        limits: &Limits,
        stats: &mut ReceiverStats,
        source: &dyn PageSource,
        sink: &mut dyn GuestSink,
    ) -> Result<Option<(u32, usize)>, MigrationError> {
        self.open_batch("Offer", offer.batch, offer.round)?;
        let n = offer.id_count();
        self.actions.clear();
        self.fetch.clear();
        self.direct.clear();
        self.need_bits.clear();
        self.need_bits.resize(n.div_ceil(8), 0);

        // Pass 1: decide, in offer order. A frame about to be overwritten stops being a
        // copy source at once, so later decisions never copy from it.
        let mut entry = 0;
        for run in offer.runs() {
            let count = u64::from(run.count);
            let base = layout.run(run.first, count).ok_or_else(|| {
                let gfn = match layout.index(run.first) {
                    None => run.first,
                    Some(_) => layout.region_end(run.first),
                };
                MigrationError::GfnOutOfRange { gfn }
            })?;
            if run.zero {
                self.actions.push(Action::Zero {
                    first: run.first,
                    count,
                });
            }
            for k in 0..count {
                let gfn = run.first + k;
                self.arrive(base + k, gfn, Expect::Offer)?;
                let current = self.manifest.get(gfn).flatten();
                if run.zero {
                    stats.pages_zero += 1;
                    if let Some(old) = current {
                        self.forget(old, gfn);
                    }
                    continue;
                }
                let id = offer.id(entry);
                stats.pages_offered += 1;
                if id.is_zero_page() {
                    return Err(bad("Offer", "zero page offered as data"));
                }
                self.plan(gfn, id, entry, stats);
                entry += 1;
            }
        }

        let mut needed = Vec::new();
        for (entry, gfn, id) in self.act(stats, source, sink) {
            stats.pages_needed += 1;
            self.need_bits[entry / 8] |= 1 << (entry % 8);
            needed.push((gfn, id));
        }
        self.evidence(n as u64, (n - needed.len()) as u64);
        if !needed.is_empty() {
            if self.outstanding.len() >= limits.max_window as usize {
                return Err(MigrationError::TooLarge {
                    what: "offers awaiting pages",
                    len: self.outstanding.len() as u64 + 1,
                    limit: limits.max_window.into(),
                });
            }
            self.outstanding.push_back(Needed {
                batch: offer.batch,
                entries: needed,
                next: 0,
            });
        }
        Ok((n > 0).then_some((offer.batch, n)))
    }

    /// Decides how `gfn` gets `id` without the source (pass 1): already there, a copy of a
    /// page received earlier, or a fetch from the host; `entry` names it in the answer.
    /// The frame stops being a copy source at once, so later decisions never copy from it.
    pub(super) fn plan(&mut self, gfn: u64, id: PageId, entry: usize, stats: &mut ReceiverStats) {
        let current = self.manifest.get(gfn).flatten();
        if current == Some(id) {
            stats.pages_unchanged += 1;
            return;
        }
        if let Some(old) = current {
            self.forget(old, gfn);
        }
        match self.have.get(&id) {
            Some(&from) => self.actions.push(Action::Copy { from, to: gfn, id }),
            None => {
                self.actions.push(Action::Fetch {
                    slot: self.fetch.len(),
                    entry,
                });
                self.fetch.push((gfn, id));
                // An empty frame is no copy's source: it may be filled directly.
                self.direct.push(current.is_none());
            }
        }
    }

    /// Carries out the planned actions (pass 2): fetches and verifies what the host holds,
    /// on all cores, then zeroes, copies and installs in plan order. Returns
    /// `(entry, gfn, id)` of each page the host could not give.
    pub(super) fn act(
        &mut self,
        stats: &mut ReceiverStats,
        source: &dyn PageSource,
        sink: &mut dyn GuestSink,
    ) -> Vec<(usize, u64, PageId)> {
        let m = self.fetch.len();
        if self.fetch_buf.len() < m * PAGE_SIZE {
            // A fresh zeroed allocation, not `resize`: the buffer only takes pages that
            // cannot go straight into guest frames, and writing zeros over all of it would
            // fault in up to 32 MiB for nothing (measured: 50 ms of a sibling's round 1).
            self.fetch_buf = vec![0; m * PAGE_SIZE];
        }
        self.fetch_result.clear();
        self.fetch_result.resize(m, FetchResult::Absent);
        if m > 0 {
            source.fetch_batch(
                &self.fetch,
                &self.direct,
                sink.frames(),
                &mut self.fetch_buf[..m * PAGE_SIZE],
                &mut self.fetch_result,
            );
        }
        let mut missing = Vec::new();
        let actions = std::mem::take(&mut self.actions);
        for action in &actions {
            match *action {
                Action::Zero { first, count } => {
                    // Frames of this round are untouched by the actions before this one.
                    for gfn in first..first + count {
                        if self.manifest.get(gfn).flatten().is_some() {
                            sink.zero_page(gfn);
                            self.manifest.set(gfn, None);
                        }
                    }
                }
                Action::Copy { from, to, id } => {
                    sink.read_page(from, &mut self.tmp);
                    sink.write_page(to, &self.tmp);
                    self.install(to, id);
                    stats.pages_copied += 1;
                }
                Action::Fetch { slot, entry } => {
                    let (gfn, id) = self.fetch[slot];
                    match self.fetch_result[slot] {
                        FetchResult::Verified => {
                            let page = &self.fetch_buf[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE];
                            sink.write_page(gfn, page.try_into().expect("a page"));
                            self.install(gfn, id);
                            stats.pages_fetched += 1;
                        }
                        FetchResult::Installed => {
                            self.install(gfn, id);
                            stats.pages_fetched += 1;
                        }
                        result => {
                            stats.fetch_mismatches += u64::from(result == FetchResult::Mismatch);
                            missing.push((entry, gfn, id));
                        }
                    }
                }
            }
        }
        self.actions = actions;
        self.actions.clear();
        self.fetch.clear();
        self.direct.clear();
        missing
    }

    /// Handles pages the source sent: decodes and verifies them all against their
    /// identities (on all cores) before installing any, in order. A page that does not
    /// match is not installed: its frame is zeroed and marked stale until a later round
    /// offers it again (the source sends pages as they read at sending time, and one
    /// written since its offer is dirty, so offered again; a damaged one never is, and
    /// [`RxState::complete`] refuses the migration).
    pub(super) fn pages(
        &mut self,
        payload: &[u8],
        layout: &Layout,
        stats: &mut ReceiverStats,
        sink: &mut dyn GuestSink,
    ) -> Result<(), MigrationError> {
        let mut entries = Vec::with_capacity(PAGES_PER_MESSAGE);
        let header = wire::decode_pages(payload, &mut entries)?;
        let front = self
            .outstanding
            .front_mut()
            .ok_or(MigrationError::Unexpected {
                got: "Pages",
                when: "with no pages asked for",
            })?;
        if header.batch != front.batch || header.first as usize != front.next {
            return Err(bad("Pages", "out of order"));
        }
        if entries.len() > front.entries.len() - front.next {
            return Err(bad("Pages", "more pages than asked for"));
        }
        let targets = front.entries[front.next..front.next + entries.len()].to_vec();
        front.next += entries.len();
        if front.next == front.entries.len() {
            self.outstanding.pop_front();
        }

        let n = entries.len();
        self.page_buf[..n * PAGE_SIZE]
            .par_chunks_mut(PAGE_SIZE)
            .zip(entries.par_iter())
            .zip(targets.par_iter())
            .zip(self.verified[..n].par_iter_mut())
            .with_min_len(16)
            .for_each(|(((buf, entry), &(_, offered)), ok)| {
                let id = entry.new_id.unwrap_or(offered);
                let page: &mut Page = buf.try_into().expect("a page");
                *ok = match entry.body {
                    Body::Zero | Body::Known => true,
                    Body::Raw(raw) => id.matches(raw),
                    Body::Lz4(_) => {
                        wire::decode_page(&entry.body, page).is_ok() && id.matches(page)
                    }
                };
            });

        for (i, (entry, &(gfn, offered))) in entries.iter().zip(&targets).enumerate() {
            let id = entry.new_id.unwrap_or(offered);
            if !self.verified[i] {
                self.spoil(gfn, layout, sink);
                stats.pages_mismatched += 1;
                continue;
            }
            match entry.body {
                Body::Raw(_) | Body::Lz4(_) => {
                    self.install_body(i, gfn, &entry.body, id, stats, sink)
                }
                Body::Zero => self.install_zero(gfn, sink),
                Body::Known => match self.have.get(&id) {
                    Some(&from) => {
                        sink.read_page(from, &mut self.tmp);
                        sink.write_page(gfn, &self.tmp);
                        self.install(gfn, id);
                        stats.pages_deduplicated += 1;
                    }
                    // The page it refers to did not match: neither does this one.
                    None => {
                        self.spoil(gfn, layout, sink);
                        stats.pages_mismatched += 1;
                    }
                },
            }
        }
        Ok(())
    }

    /// Checks an offer's or summary's batch and round numbers and counts it.
    pub(super) fn open_batch(
        &mut self,
        what: &'static str,
        batch: u32,
        round: u32,
    ) -> Result<(), MigrationError> {
        if batch != self.next_batch {
            return Err(bad(what, "batch out of order"));
        }
        if round != self.round {
            return Err(bad(what, "wrong round"));
        }
        self.round_open = true;
        self.next_batch += 1;
        self.batches_in_round += 1;
        Ok(())
    }

    /// Frame `gfn` (dense index `index`) arrives in a message of kind `kind`: either new in
    /// this round, or one the destination asked for in that form.
    pub(super) fn arrive(
        &mut self,
        index: u64,
        gfn: u64,
        kind: Expect,
    ) -> Result<(), MigrationError> {
        if self.seen.test_and_set(index) {
            if kind == Expect::Nothing || self.expect[index as usize] != kind as u8 {
                return Err(MigrationError::DuplicateGfn {
                    gfn,
                    round: self.round,
                });
            }
            self.expected -= 1;
        } else {
            self.covered.test_and_set(index);
        }
        self.expect[index as usize] = Expect::Nothing as u8;
        self.stale.unset(index);
        Ok(())
    }

    /// Asks for frame `index` in the form `kind` before the round ends.
    pub(super) fn ask(&mut self, index: u64, kind: Expect) {
        if self.expect[index as usize] == Expect::Nothing as u8 {
            self.expected += 1;
        }
        self.expect[index as usize] = kind as u8;
    }

    /// Records that of `examined` pages looked up, `found` were here.
    pub(super) fn evidence(&mut self, examined: u64, found: u64) {
        self.examined += examined;
        self.found += found;
    }

    /// Whether the source should push pages rather than describe them: the host holds
    /// nothing, or of the first [`EVIDENCE_PAGES`] or more looked up, under 2% were here.
    pub(super) fn push_mode(&self) -> bool {
        !self.holds_any || (self.examined >= EVIDENCE_PAGES && self.found * 50 < self.examined)
    }

    /// Installs the verified content of received entry `i` (raw, or lz4 decoded into the
    /// page buffer) at `gfn` as `id`.
    pub(super) fn install_body(
        &mut self,
        i: usize,
        gfn: u64,
        body: &Body<'_>,
        id: PageId,
        stats: &mut ReceiverStats,
        sink: &mut dyn GuestSink,
    ) {
        let page: &Page = match body {
            Body::Raw(raw) => raw,
            _ => {
                stats.pages_compressed += 1;
                self.page_buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .try_into()
                    .expect("a page")
            }
        };
        sink.write_page(gfn, page);
        self.install(gfn, id);
        stats.pages_received += 1;
    }

    /// `gfn` now holds a zero page.
    pub(super) fn install_zero(&mut self, gfn: u64, sink: &mut dyn GuestSink) {
        if self.manifest.get(gfn).flatten().is_some() {
            sink.zero_page(gfn);
        }
        self.manifest.set(gfn, None);
    }

    /// `gfn` got a page that did not match its identity: it holds zeros until offered again.
    pub(super) fn spoil(&mut self, gfn: u64, layout: &Layout, sink: &mut dyn GuestSink) {
        if let Some(old) = self.manifest.get(gfn).flatten() {
            self.forget(old, gfn);
            sink.zero_page(gfn);
            self.manifest.set(gfn, None);
        }
        if let Some(index) = layout.index(gfn) {
            self.stale.test_and_set(index);
        }
    }

    pub(super) fn round_end(
        &mut self,
        payload: &[u8],
        limits: &Limits,
        stats: &mut ReceiverStats,
    ) -> Result<(), MigrationError> {
        let (round, batches) = wire::decode_round_end(payload)?;
        if round != self.round || batches != self.batches_in_round {
            return Err(bad("RoundEnd", "does not match the offers received"));
        }
        if !self.outstanding.is_empty() || self.expected != 0 {
            return Err(bad("RoundEnd", "pages still outstanding"));
        }
        if round >= limits.max_rounds {
            return Err(MigrationError::TooLarge {
                what: "rounds",
                len: u64::from(round) + 1,
                limit: limits.max_rounds.into(),
            });
        }
        stats.rounds = round;
        self.round += 1;
        self.round_open = false;
        self.batches_in_round = 0;
        self.seen.clear();
        Ok(())
    }

    pub(super) fn state(&mut self, payload: &[u8], limits: &Limits) -> Result<(), MigrationError> {
        let (total, offset, bytes) = wire::decode_state(payload)?;
        if self.round_open {
            return Err(MigrationError::Unexpected {
                got: "State",
                when: "inside a round",
            });
        }
        if total > limits.max_state {
            return Err(MigrationError::TooLarge {
                what: "state",
                len: total,
                limit: limits.max_state,
            });
        }
        match self.state_total {
            None => {
                self.state_total = Some(total);
                self.state.reserve_exact(total as usize);
            }
            Some(t) if t != total => return Err(bad("State", "total length changed")),
            Some(_) => {}
        }
        if offset != self.state.len() as u64 {
            return Err(bad("State", "out of order"));
        }
        if offset + bytes.len() as u64 > total {
            return Err(bad("State", "past its total length"));
        }
        self.state.extend_from_slice(bytes);
        Ok(())
    }

    /// Checks the migration is whole and returns the manifest and state.
    pub(super) fn complete(
        self: Box<Self>,
        c: &Complete,
        layout: &Layout,
    ) -> Result<(Manifest, Vec<u8>), MigrationError> {
        if c.rounds == 0 {
            return Err(bad("Complete", "round count does not match"));
        }
        self.check_whole("Complete", c.rounds, layout, c.state_len, c.state_hash)?;
        Ok((self.manifest, self.state))
    }

    /// What `Complete` and `Switchover` (message `what`) both require: no round open,
    /// `rounds` rounds done, every page covered and checked, and the whole state in, of
    /// `state_len` bytes hashing to `state_hash`.
    pub(super) fn check_whole(
        &self,
        what: &'static str,
        rounds: u32,
        layout: &Layout,
        state_len: u64,
        state_hash: [u8; 32],
    ) -> Result<(), MigrationError> {
        if self.round_open || !self.outstanding.is_empty() || self.expected != 0 {
            return Err(MigrationError::Unexpected {
                got: what,
                when: "inside a round",
            });
        }
        if rounds != self.round - 1 {
            return Err(bad(what, "round count does not match"));
        }
        if let Some(index) = self.covered.first_clear() {
            return Err(MigrationError::Incomplete {
                gfn: layout.gfn(index),
            });
        }
        if let Some(index) = self.stale.first_set() {
            return Err(MigrationError::BadPage {
                gfn: layout.gfn(index),
            });
        }
        if self.state.len() as u64 != state_len || self.state_total.unwrap_or(0) != state_len {
            return Err(bad(what, "state length does not match"));
        }
        if blake3::hash(&self.state) != blake3::Hash::from_bytes(state_hash) {
            return Err(bad(what, "state hash does not match"));
        }
        Ok(())
    }

    /// `gfn` now holds `id`.
    pub(super) fn install(&mut self, gfn: u64, id: PageId) {
        self.manifest.set(gfn, Some(id));
        if !id.is_zero_page() {
            self.have.insert(id, gfn);
        }
    }

    /// `gfn` is about to stop holding `old`.
    pub(super) fn forget(&mut self, old: PageId, gfn: u64) {
        if self.have.get(&old) == Some(&gfn) {
            self.have.remove(&old);
        }
    }
}
