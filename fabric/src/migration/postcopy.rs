//! Post-copy (hybrid) migration: after zero or more pre-copy rounds the source stops the
//! guest, lists the pages the destination has not got (with their identities) and sends the
//! state; the destination resumes the guest at once and takes each missing page when it is
//! first touched (asking the source with a `Fault`) or from the source's background stream,
//! verifying every page against its listed identity before installing it.
//!
//! ```text
//!  source: PostcopySource                                   destination: PostcopyDest
//!  (after the pre-copy rounds, or none)
//!  guest paused
//!  Missing{runs, ids} × n   (pages the destination lacks)  ──►  checks frames, records them
//!  State{…} × n, Switchover{rounds, state, listed}          ──►  checks coverage and state;
//!                                                                VMM registers the missing
//!                                                                pages on userfaultfd, restores
//!                                                                and resumes the guest
//!                                                          ◄──  Ack  (switched: from here the
//!                                                                source never resumes)
//!  PostPages{(gfn, page)…}  (stream, hottest first)         ──►  verify, install
//!                                                          ◄──  Fault{wanted, gfns}  (a touch)
//!  PostPages{the faulted pages, ahead of the stream}        ──►  verify, install, wake
//!                                                          ◄──  Fault{held, gfns}  (taken
//!                                                                from this host: skip them)
//!                                                          ◄──  AllIn{figures}
//!  source VMM exits 0
//! ```
//!
//! Before the destination's `Ack` every failure leaves the guest on the source, as in
//! pre-copy (nothing ran at the destination). After it the guest runs only at the
//! destination: the source serves pages until `AllIn`, and a source that fails then takes
//! the VM down with it unless the destination finds the pages elsewhere (the cluster's
//! page service). A page is installed only if it hashes to the identity its MAC'd `Missing`
//! entry gave; one that does not is an attack or damage, and fails the migration.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::layout::{Bitmap, Layout};
use super::receiver::Receiver;
use super::rx_state::RxState;
use super::sender::{unexpected, Sender};
use super::wire::{
    self, AllIn, FaultKind, MsgType, OfferView, PostBody, PostPage, Switchover, COMPRESS_BUF,
    POSTCOPY_BATCH, STATE_CHUNK,
};
use super::{MigrationError, Transport};
use crate::identity::{is_zero, Page, PageId, PAGE_SIZE};
use crate::manifest::Manifest;

impl RxState {
    /// A `Missing` message: its zero runs are zeroed now where they held data; its data
    /// pages that differ from what is installed are recorded for post-copy.
    pub(super) fn missing(
        &mut self,
        offer: &OfferView<'_>,
        layout: &Layout,
        sink: &mut dyn super::GuestSink,
    ) -> Result<(), MigrationError> {
        if self.round_open || !self.outstanding.is_empty() || self.expected != 0 {
            return Err(MigrationError::Unexpected {
                got: "Missing",
                when: "inside a round",
            });
        }
        self.postcopy_started = true;
        let mut entry = 0;
        for run in offer.runs() {
            let count = u64::from(run.count);
            let base = layout
                .run(run.first, count)
                .ok_or(MigrationError::GfnOutOfRange { gfn: run.first })?;
            for k in 0..count {
                let gfn = run.first + k;
                let index = base + k;
                if self.seen.test_and_set(index) {
                    return Err(MigrationError::DuplicateGfn {
                        gfn,
                        round: self.round,
                    });
                }
                self.covered.test_and_set(index);
                self.stale.unset(index);
                let current = self.manifest.get(gfn).flatten();
                if run.zero {
                    if let Some(old) = current {
                        self.forget(old, gfn);
                        sink.zero_page(gfn);
                        self.manifest.set(gfn, None);
                    }
                    continue;
                }
                let id = offer.id(entry);
                entry += 1;
                if id.is_zero_page() {
                    return Err(super::rx_state::bad("Missing", "zero page listed as data"));
                }
                self.listed += 1;
                if current == Some(id) {
                    self.present.push(gfn);
                    continue;
                }
                if let Some(old) = current {
                    self.forget(old, gfn);
                }
                self.manifest.set(gfn, Some(id));
                self.postcopy.push((gfn, id));
            }
        }
        Ok(())
    }

    /// `Switchover`: checks the VM is whole (every frame covered by a round or the
    /// `Missing` list, the state complete) and returns the manifest (the final identities,
    /// missing pages included), the state and the pages still to come.
    #[allow(clippy::type_complexity)]
    pub(super) fn switchover(
        self: Box<Self>,
        s: &Switchover,
        layout: &Layout,
    ) -> Result<(Manifest, Vec<u8>, PostcopyPages), MigrationError> {
        if self.round_open || !self.outstanding.is_empty() || self.expected != 0 {
            return Err(MigrationError::Unexpected {
                got: "Switchover",
                when: "inside a round",
            });
        }
        if s.rounds != self.round - 1 {
            return Err(super::rx_state::bad(
                "Switchover",
                "round count does not match",
            ));
        }
        if s.listed != self.listed {
            return Err(super::rx_state::bad(
                "Switchover",
                "listed page count does not match",
            ));
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
        if self.state.len() as u64 != s.state_len || self.state_total.unwrap_or(0) != s.state_len {
            return Err(super::rx_state::bad(
                "Switchover",
                "state length does not match",
            ));
        }
        if blake3::hash(&self.state) != blake3::Hash::from_bytes(s.state_hash) {
            return Err(super::rx_state::bad(
                "Switchover",
                "state hash does not match",
            ));
        }
        let this = *self;
        let pages = PostcopyPages {
            missing: this.postcopy,
            present: this.present,
        };
        Ok((this.manifest, this.state, pages))
    }
}

/// The pages a post-copy switch listed, as the destination found them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostcopyPages {
    /// `(gfn, identity)` of the pages still to come.
    pub missing: Vec<(u64, PageId)>,
    /// Frames listed that already hold their listed content here (the source is told not
    /// to send them; they count as held).
    pub present: Vec<u64>,
}

impl<S: Transport> Sender<S> {
    /// Switches to post-copy, with the guest paused: lists `pages` (every frame the
    /// destination has not got in its current content: `None` or the zero identity for
    /// zero pages; after no pre-copy round, every frame of the guest), sends `state` and
    /// `Switchover`. The destination then resumes the guest; [`PostcopySource::serve`]
    /// streams the listed pages and answers its faults. Until the destination's `Ack`
    /// (see [`PostcopySource::switched`]) a failure leaves the guest to resume here.
    pub fn switchover(
        mut self,
        pages: &[(u64, Option<PageId>)],
        state: &[u8],
    ) -> Result<PostcopySource<S>, MigrationError> {
        let listed = self.guard(|s| s.send_switchover(pages, state))?;
        let layout = self.layout.take().expect("described");
        let mut order = Vec::with_capacity(listed as usize);
        let mut is_listed = Bitmap::new(layout.total());
        for &(gfn, id) in pages {
            if id.is_some_and(|id| !id.is_zero_page()) {
                order.push(gfn);
                is_listed.test_and_set(layout.index(gfn).expect("checked"));
            }
        }
        let sent = Bitmap::new(layout.total());
        Ok(PostcopySource {
            ch: self.ch,
            lz4: self.lz4,
            layout,
            listed: is_listed,
            sent,
            order,
            cursor: 0,
            urgent: VecDeque::new(),
            switched: false,
            stats: PostcopySourceStats {
                listed,
                ..Default::default()
            },
            comp: Box::new([0; COMPRESS_BUF]),
            gfns: Vec::new(),
        })
    }

    fn send_switchover(
        &mut self,
        pages: &[(u64, Option<PageId>)],
        state: &[u8],
    ) -> Result<u64, MigrationError> {
        if state.len() as u64 > self.config.limits.max_state {
            return Err(MigrationError::Misuse("state blob over the limit"));
        }
        self.accepted()?;
        self.seen.clear();
        let mut listed = 0u64;
        let mut batch = 0u32;
        for &(gfn, id) in pages {
            self.check_frame(gfn)?;
            let id = id.filter(|id| !id.is_zero_page());
            listed += u64::from(id.is_some());
            self.push_entry(gfn, id);
            if self.ids.len() >= self.batch || self.runs.len() >= self.max_runs {
                self.flush_missing(&mut batch)?;
            }
        }
        if !self.runs.is_empty() {
            self.flush_missing(&mut batch)?;
        }
        let total = state.len() as u64;
        for (i, chunk) in state.chunks(STATE_CHUNK).enumerate() {
            wire::encode_state(self.ch.begin(), total, (i * STATE_CHUNK) as u64, chunk);
            self.ch.commit(MsgType::State)?;
        }
        self.stats.state_bytes = total;
        Switchover {
            rounds: self.round,
            state_len: total,
            state_hash: *blake3::hash(state).as_bytes(),
            listed,
        }
        .encode(self.ch.begin());
        self.ch.commit(MsgType::Switchover)?;
        Ok(listed)
    }

    fn flush_missing(&mut self, batch: &mut u32) -> Result<(), MigrationError> {
        wire::encode_offer(self.ch.begin(), *batch, 0, &self.runs, &self.ids);
        self.ch.commit(MsgType::Missing)?;
        *batch += 1;
        self.runs.clear();
        self.ids.clear();
        self.gfns.clear();
        Ok(())
    }
}

/// Most bytes of background stream left in the connection's send queue before more is
/// written (128 KiB: 10 ms at 100 Mbit/s), and pages per streamed message (128 KiB): a
/// faulted page waits behind at most about twice that, not the whole socket buffer.
const STREAM_QUEUE: u64 = 128 << 10;
const STREAM_BATCH: u64 = 32;

/// What the source did in post-copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PostcopySourceStats {
    /// Data pages listed as missing.
    pub listed: u64,
    /// Pages sent because the destination faulted on them.
    pub sent_on_fault: u64,
    /// Pages sent by the background stream.
    pub sent_streamed: u64,
    /// Pages the destination said it took from its own host (not sent).
    pub held_at_destination: u64,
    /// Of the pages sent, sent lz4-compressed.
    pub compressed: u64,
    /// Bytes written on the migration connection, the whole migration (pre-copy rounds,
    /// list, state and post-copy), frames included.
    pub bytes_sent: u64,
    /// Bytes read.
    pub bytes_received: u64,
}

/// The source in post-copy: the guest is stopped for good here; it serves the listed pages
/// until the destination has every one.
#[derive(Debug)]
pub struct PostcopySource<S: Transport> {
    ch: Channel<S>,
    lz4: bool,
    layout: Layout,
    listed: Bitmap,
    sent: Bitmap,
    /// The background stream's order, and how far it got.
    order: Vec<u64>,
    cursor: usize,
    /// Faulted frames, sent before the stream goes on.
    urgent: VecDeque<u64>,
    switched: bool,
    stats: PostcopySourceStats,
    comp: Box<[u8; COMPRESS_BUF]>,
    gfns: Vec<u64>,
}

/// How the source paces its background stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pace {
    /// Most streamed pages a second (`None`: as fast as the link takes them). Faulted
    /// pages are never held back.
    pub pages_per_s: Option<u64>,
}

impl<S: Transport> PostcopySource<S> {
    /// Reorders the background stream: `hot` frames first (e.g. the last pages the guest
    /// dirtied), then the rest in the listed order. Frames not listed are ignored.
    pub fn prefer(&mut self, hot: &[u64]) {
        let mut first = Vec::with_capacity(self.order.len());
        let mut taken = Bitmap::new(self.layout.total());
        for &gfn in hot {
            if let Some(i) = self.layout.index(gfn) {
                if self.is_listed(i) && !taken.test_and_set(i) {
                    first.push(gfn);
                }
            }
        }
        for &gfn in &self.order {
            let i = self
                .layout
                .index(gfn)
                .expect("listed frames are in the guest");
            if !taken.test_and_set(i) {
                first.push(gfn);
            }
        }
        self.order = first;
    }

    /// Whether the destination acknowledged resuming the guest (from then on the guest
    /// must never resume here).
    pub fn switched(&self) -> bool {
        self.switched
    }

    /// Serves until the destination reports every page in: sends faulted pages first,
    /// streams the rest paced by `pace`, reading `read_page` (the stopped guest's memory).
    /// `on_switched` is called once when the destination's `Ack` arrives. Returns the
    /// destination's figures.
    pub fn serve<F>(
        &mut self,
        read_page: &F,
        pace: Pace,
        mut on_switched: impl FnMut(),
    ) -> Result<AllIn, MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        let result = self.serve_inner(read_page, pace, &mut on_switched);
        if let Err(e) = &result {
            if !e.is_peer_or_link() {
                self.ch.send_abort(&e.to_string());
            }
        }
        self.stats.bytes_sent = self.ch.counters.wire_sent;
        self.stats.bytes_received = self.ch.counters.wire_received;
        result
    }

    /// Figures so far.
    pub fn stats(&self) -> PostcopySourceStats {
        self.stats
    }

    fn serve_inner<F>(
        &mut self,
        read_page: &F,
        pace: Pace,
        on_switched: &mut dyn FnMut(),
    ) -> Result<AllIn, MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        let started = Instant::now();
        loop {
            while self.ch.input_ready() {
                if let Some(all) = self.handle_message(on_switched)? {
                    return Ok(all);
                }
            }
            if !self.urgent.is_empty() {
                self.send_urgent(read_page)?;
                continue;
            }
            let allowed = match pace.pages_per_s {
                None => u64::MAX,
                Some(rate) => (started.elapsed().as_secs_f64() * rate as f64) as u64 + 1,
            };
            // The stream is written only while little of it waits in the send queue, so a
            // faulted page queues behind at most STREAM_QUEUE bytes, not the whole buffer.
            let queued = self.ch.unsent().is_some_and(|n| n > STREAM_QUEUE);
            if self.cursor < self.order.len() && self.stats.sent_streamed < allowed && !queued {
                self.send_stream(read_page, allowed - self.stats.sent_streamed)?;
                continue;
            }
            if self.cursor < self.order.len() {
                // Paced or queued: wait a little, answering faults meanwhile.
                std::thread::sleep(if queued {
                    Duration::from_micros(200)
                } else {
                    Duration::from_millis(2)
                });
                continue;
            }
            // Everything streamed: wait for faults of pages in flight, or AllIn.
            if let Some(all) = self.handle_message(on_switched)? {
                return Ok(all);
            }
        }
    }

    fn handle_message(
        &mut self,
        on_switched: &mut dyn FnMut(),
    ) -> Result<Option<AllIn>, MigrationError> {
        match self.ch.recv()? {
            (MsgType::Ack, payload) => {
                wire::expect_empty(payload, "Ack")?;
                if !self.switched {
                    self.switched = true;
                    on_switched();
                }
            }
            (MsgType::Fault, payload) => {
                let kind = wire::decode_fault(payload, &mut self.gfns)?;
                for i in 0..self.gfns.len() {
                    let gfn = self.gfns[i];
                    let index = self
                        .layout
                        .index(gfn)
                        .filter(|&i| self.is_listed(i))
                        .ok_or(MigrationError::GfnOutOfRange { gfn })?;
                    match kind {
                        FaultKind::Wanted => self.urgent.push_back(gfn),
                        FaultKind::Held => {
                            if !self.sent.test_and_set(index) {
                                self.stats.held_at_destination += 1;
                            }
                        }
                    }
                }
            }
            (MsgType::AllIn, payload) => {
                let all = AllIn::decode(payload)?;
                if !self.switched {
                    return Err(MigrationError::Unexpected {
                        got: "AllIn",
                        when: "before Ack",
                    });
                }
                return Ok(Some(all));
            }
            other => return Err(unexpected(other, "while serving post-copy pages")),
        }
        Ok(None)
    }

    fn is_listed(&self, index: u64) -> bool {
        self.listed.test(index)
    }

    /// Sends the faulted pages queued (already sent ones again: the destination may have
    /// faulted before they arrived, and drops a duplicate).
    fn send_urgent<F>(&mut self, read_page: &F) -> Result<(), MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        let mut batch = Vec::with_capacity(POSTCOPY_BATCH);
        while batch.len() < POSTCOPY_BATCH {
            let Some(gfn) = self.urgent.pop_front() else {
                break;
            };
            let index = self.layout.index(gfn).expect("checked when queued");
            if self.sent.test_and_set(index) {
                continue;
            }
            batch.push(gfn);
        }
        self.stats.sent_on_fault += batch.len() as u64;
        self.send_pages(&batch, read_page)
    }

    fn send_stream<F>(&mut self, read_page: &F, most: u64) -> Result<(), MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        let most = most.min(STREAM_BATCH) as usize;
        let mut batch = Vec::with_capacity(most);
        while batch.len() < most && self.cursor < self.order.len() {
            let gfn = self.order[self.cursor];
            self.cursor += 1;
            let index = self
                .layout
                .index(gfn)
                .expect("listed frames are in the guest");
            if !self.sent.test_and_set(index) {
                batch.push(gfn);
            }
        }
        self.stats.sent_streamed += batch.len() as u64;
        self.send_pages(&batch, read_page)
    }

    fn send_pages<F>(&mut self, gfns: &[u64], read_page: &F) -> Result<(), MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        if gfns.is_empty() {
            return Ok(());
        }
        let mut page = [0u8; PAGE_SIZE];
        let out = self.ch.begin();
        wire::begin_post_pages(out, gfns.len() as u32);
        for &gfn in gfns {
            read_page(gfn, &mut page);
            let compressed = if self.lz4 && !is_zero(&page) {
                wire::compress_page(&page, &mut self.comp)
            } else {
                None
            };
            match compressed {
                Some(len) => {
                    self.stats.compressed += 1;
                    wire::put_post_page(out, gfn, PostBody::Lz4(&self.comp[..len]));
                }
                None => wire::put_post_page(out, gfn, PostBody::Raw(&page)),
            }
        }
        self.ch.commit(MsgType::PostPages)
    }
}

/// Where a listed page stands at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Not listed: installed before the switch, or zero.
    NotListed,
    /// Listed, not yet in, not asked for.
    Missing,
    /// Listed and asked for (a fault), not yet in.
    Requested,
    /// Installed.
    In,
}

/// The destination's table of listed pages (no I/O: unit-tested alone).
#[derive(Debug, Clone)]
pub struct PostcopyTable {
    pages: HashMap<u64, (PageId, PageState)>,
    remaining: u64,
    /// Figures for `AllIn`.
    pub figures: AllIn,
}

impl PostcopyTable {
    /// A table of the listed pages: `missing` ones to come, and `present` frames that hold
    /// their listed content already (in, and counted as held).
    pub fn new(missing: &[(u64, PageId)], present: &[u64]) -> Self {
        let mut pages: HashMap<u64, (PageId, PageState)> = missing
            .iter()
            .map(|&(gfn, id)| (gfn, (id, PageState::Missing)))
            .collect();
        let remaining = pages.len() as u64;
        for &gfn in present {
            pages.insert(gfn, (PageId([0; 32]), PageState::In));
        }
        PostcopyTable {
            remaining,
            pages,
            figures: AllIn {
                held: present.len() as u64,
                ..AllIn::default()
            },
        }
    }

    /// Pages not yet in.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Where `gfn` stands.
    pub fn state(&self, gfn: u64) -> PageState {
        self.pages
            .get(&gfn)
            .map_or(PageState::NotListed, |&(_, s)| s)
    }

    /// The identity listed for `gfn`.
    pub fn id(&self, gfn: u64) -> Option<PageId> {
        self.pages.get(&gfn).map(|&(id, _)| id)
    }

    /// Marks a missing page asked for; returns whether it was missing (else nothing to ask).
    pub fn request(&mut self, gfn: u64) -> bool {
        match self.pages.get_mut(&gfn) {
            Some((_, s)) if *s == PageState::Missing => {
                *s = PageState::Requested;
                true
            }
            _ => false,
        }
    }

    /// Checks `page` against `gfn`'s identity: `Ok(true)` when it should be installed now
    /// (then call [`PostcopyTable::installed`]), `Ok(false)` when the page is already in
    /// (a duplicate), an error when `gfn` is not listed or the page does not match.
    pub fn check(&mut self, gfn: u64, page: &Page) -> Result<bool, MigrationError> {
        let &(id, state) = self
            .pages
            .get(&gfn)
            .ok_or(MigrationError::GfnOutOfRange { gfn })?;
        if state == PageState::In {
            self.figures.duplicates += 1;
            return Ok(false);
        }
        if !id.matches(page) {
            return Err(MigrationError::BadPage { gfn });
        }
        Ok(true)
    }

    /// `gfn`'s page is installed; `from_host` when it came from this host (store, VMs,
    /// cluster) rather than the source.
    pub fn installed(&mut self, gfn: u64, from_host: bool) {
        let Some((_, state)) = self.pages.get_mut(&gfn) else {
            return;
        };
        let before = *state;
        if before == PageState::In {
            return;
        }
        *state = PageState::In;
        self.remaining -= 1;
        if from_host {
            self.figures.held += 1;
        } else if before == PageState::Requested {
            self.figures.faulted += 1;
        } else {
            self.figures.streamed += 1;
        }
    }

    /// The pages not yet in, in frame order.
    pub fn missing(&self) -> Vec<(u64, PageId)> {
        let mut v: Vec<(u64, PageId)> = self
            .pages
            .iter()
            .filter(|(_, (_, s))| *s != PageState::In)
            .map(|(&gfn, &(id, _))| (gfn, id))
            .collect();
        v.sort_unstable_by_key(|&(gfn, _)| gfn);
        v
    }
}

impl<S: Transport> Receiver<S> {
    /// After a `Switchover` ([`super::ReceivedVm::postcopy`]): the destination's end of
    /// post-copy, to take the missing pages from the source (told at once not to send the
    /// listed pages present here).
    pub fn into_postcopy(self, pages: &PostcopyPages) -> Result<PostcopyDest<S>, MigrationError> {
        let ch = self.into_channel()?;
        let mut dest = PostcopyDest {
            ch,
            table: PostcopyTable::new(&pages.missing, &pages.present),
            started: Instant::now(),
            buf: Box::new([0; PAGE_SIZE]),
        };
        dest.held(&pages.present)?;
        Ok(dest)
    }
}

/// The destination in post-copy: asks for faulted pages, takes streamed ones, verifies each
/// against its listed identity, and reports `AllIn` when every one is in.
#[derive(Debug)]
pub struct PostcopyDest<S: Transport> {
    ch: Channel<S>,
    table: PostcopyTable,
    started: Instant,
    buf: Box<Page>,
}

impl<S: Transport> PostcopyDest<S> {
    /// The listed pages and where each stands.
    pub fn table(&self) -> &PostcopyTable {
        &self.table
    }

    /// Mutable access, for pages taken from this host ([`PostcopyTable::check`] then
    /// [`PostcopyTable::installed`] with `from_host`).
    pub fn table_mut(&mut self) -> &mut PostcopyTable {
        &mut self.table
    }

    /// Tells the source the guest runs here now (it must never resume its copy).
    pub fn confirm_resumed(&mut self) -> Result<(), MigrationError> {
        self.ch.send(MsgType::Ack, &[])
    }

    /// Asks for the missing pages of `gfns` (those not yet asked for), ahead of the stream.
    pub fn want(&mut self, gfns: &[u64]) -> Result<(), MigrationError> {
        let wanted: Vec<u64> = gfns
            .iter()
            .copied()
            .filter(|&g| self.table.request(g))
            .collect();
        self.send_fault(FaultKind::Wanted, &wanted)
    }

    /// Tells the source these pages came from this host: it need not send them.
    pub fn held(&mut self, gfns: &[u64]) -> Result<(), MigrationError> {
        self.send_fault(FaultKind::Held, gfns)
    }

    fn send_fault(&mut self, kind: FaultKind, gfns: &[u64]) -> Result<(), MigrationError> {
        for chunk in gfns.chunks(POSTCOPY_BATCH) {
            wire::encode_fault(self.ch.begin(), kind, chunk);
            self.ch.commit(MsgType::Fault)?;
        }
        Ok(())
    }

    /// Whether a message is waiting (buffered or on the stream).
    pub fn input_ready(&self) -> bool {
        self.ch.input_ready()
    }

    /// Reads one message from the source (blocking) and installs its pages through
    /// `install(gfn, page)` after checking each against its identity. Returns the frames
    /// installed.
    pub fn recv(
        &mut self,
        install: &mut dyn FnMut(u64, &Page) -> std::io::Result<()>,
    ) -> Result<usize, MigrationError> {
        let (kind, payload) = self.ch.recv()?;
        if kind != MsgType::PostPages {
            return Err(unexpected(
                (kind, payload),
                "while receiving post-copy pages",
            ));
        }
        let mut pages: Vec<PostPage<'_>> = Vec::new();
        wire::decode_post_pages(payload, &mut pages)?;
        let mut n = 0;
        for p in &pages {
            p.body.expand(&mut self.buf)?;
            if self.table.check(p.gfn, &self.buf)? {
                install(p.gfn, &self.buf).map_err(MigrationError::Io)?;
                self.table.installed(p.gfn, false);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every page is in: sends `AllIn` with the figures.
    pub fn finish(&mut self) -> Result<AllIn, MigrationError> {
        if self.table.remaining() != 0 {
            return Err(MigrationError::Misuse(
                "post-copy finished with pages missing",
            ));
        }
        self.table.figures.complete_us = self.started.elapsed().as_micros() as u64;
        let all = self.table.figures;
        all.encode(self.ch.begin());
        self.ch.commit(MsgType::AllIn)?;
        Ok(all)
    }

    /// Figures so far.
    pub fn figures(&self) -> AllIn {
        let mut f = self.table.figures;
        f.complete_us = self.started.elapsed().as_micros() as u64;
        f
    }
}
