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

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::layout::{Bitmap, Layout};
use super::sender::{unexpected, Sender};
use super::wire::{
    self, AllIn, FaultKind, MsgType, PostBody, Switchover, COMPRESS_BUF, POSTCOPY_BATCH,
    STATE_CHUNK,
};
use super::{MigrationError, Transport};
use crate::identity::{is_zero, Page, PageId, PAGE_SIZE};

pub use super::postcopy_rx::{PageState, PostcopyDest, PostcopyPages, PostcopyTable};

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
