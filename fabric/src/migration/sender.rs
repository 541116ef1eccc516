//! The source end: offers page identities in pipelined batches, sends the pages the
//! destination asks for (read and, when it pays, compressed, in parallel), then
//! the state, and returns only once the destination has acknowledged resuming the guest.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use rayon::prelude::*;

use super::channel::{Channel, HelloParams};
use super::layout::{Bitmap, Layout};
use super::ranges::EVIDENCE_PAGES;
use super::stats::{MigrationStats, RoundStats};
use super::wire::{
    self, Body, Complete, MsgType, NeedView, PageEntry, Protocol, RangeSummary, Role, Run,
    COMPRESS_BUF, FEATURE_LZ4, MAX_RUN, PAGES_PER_MESSAGE, STATE_CHUNK, VERSION_MAX, VERSION_MIN,
};
use super::{Compression, MigrationError, MigrationKey, SenderConfig, Transport, VmDescription};
use crate::identity::{is_zero, Page, PageId, PAGE_SIZE};

/// When compression is sparse, one page in this many is tried.
const SPARSE_PROBE: usize = 16;

/// The source end of a migration over `S`.
///
/// Call [`Sender::connect`], [`Sender::describe`], [`Sender::round`] as often as the VMM
/// wants pre-copy rounds, then — with the guest paused — [`Sender::finish`]. Any error
/// leaves the sender unusable and means the guest must resume on the source.
#[derive(Debug)]
pub struct Sender<S: Transport> {
    pub(super) ch: Channel<S>,
    pub(super) config: SenderConfig,
    /// Ids per offer, offers in flight and runs per offer, as negotiated.
    pub(super) batch: usize,
    pub(super) window: usize,
    pub(super) max_runs: usize,
    pub(super) lz4: bool,
    phase: Phase,
    pub(super) layout: Option<Layout>,
    /// Frames offered in the current round.
    pub(super) seen: Bitmap,
    /// Rounds started.
    pub(super) round: u32,
    pub(super) next_batch: u32,
    pub(super) stats: MigrationStats,
    /// Offers and summaries sent and not yet answered, oldest first.
    pub(super) pending: VecDeque<Pending>,
    /// The destination asked for later rounds' pages to be pushed, not offered.
    pub(super) push_later: bool,
    /// The first round's identities by dense index (what summaries were made of).
    pub(super) round_ids: Vec<Option<PageId>>,
    /// Sub-ranges to summarize, and `(first index, pages)` ranges to offer page by page,
    /// as the destination asked.
    pub(super) subs: VecDeque<RangeSummary>,
    pub(super) to_offer: VecDeque<(u64, u32)>,
    /// The destination has looked pages up one by one (so it can judge whether to ask for
    /// the rest by push).
    pub(super) evidence: bool,
    /// Identities the destination answered one by one.
    looked_up: u64,
    /// In the first round's summaries (whose pages were counted when summarized).
    pub(super) describing: bool,
    /// Identities pushed in this round (later copies go as references).
    pub(super) pushed: HashSet<PageId>,
    /// The offer being built.
    pub(super) runs: Vec<Run>,
    pub(super) ids: Vec<PageId>,
    pub(super) gfns: Vec<u64>,
    /// The end (exclusive) of the region holding the last run.
    pub(super) run_end: u64,
    /// Identities whose content was sent in this round (later copies go as references).
    pub(super) sent: HashSet<PageId>,
    pub(super) scratch: Scratch,
    /// Few pages compressed lately: try only one in [`SPARSE_PROBE`].
    pub(super) lz4_sparse: bool,
    pub(super) free: Vec<Vec<(u64, PageId)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connected,
    /// `Describe` sent, `Accept` not yet read.
    Describing,
    Described,
    Done,
    Failed,
}

/// An offer or a summary awaiting its answer.
#[derive(Debug)]
pub(super) enum Pending {
    /// An offer: `(gfn, identity)` of its data pages.
    Offer {
        id: u32,
        entries: Vec<(u64, PageId)>,
    },
    /// A summary: `(first index, pages)` of its ranges, and its level.
    Summary {
        id: u32,
        level: u8,
        ranges: Vec<(u64, u32)>,
    },
}

/// Buffers for one `Pages` message's pages, reused.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    pub(super) pages: Vec<u8>,
    pub(super) comp: Vec<[u8; COMPRESS_BUF]>,
    pub(super) slots: Vec<Slot>,
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Slot {
    /// The page read is zero (now).
    pub(super) zero: bool,
    /// Length of the lz4 block in `comp`, when compression paid.
    pub(super) compressed: Option<usize>,
    tried: bool,
    /// Its identity as read, when asked for (pushes).
    pub(super) id: Option<PageId>,
}

impl<S: Transport> Sender<S> {
    /// Exchanges hellos with the destination at the other end of `stream` and proves the
    /// key both ways. Nothing about the VM is sent before the destination has proven it.
    pub fn connect(
        stream: S,
        key: &MigrationKey,
        config: SenderConfig,
    ) -> Result<Sender<S>, MigrationError> {
        Self::connect_versions(stream, key, config, (VERSION_MIN, VERSION_MAX))
    }

    pub(crate) fn connect_versions(
        stream: S,
        key: &MigrationKey,
        config: SenderConfig,
        versions: (u16, u16),
    ) -> Result<Sender<S>, MigrationError> {
        let want_lz4 = config.compression == Compression::Lz4;
        let own = HelloParams {
            protocol: Protocol::Migration,
            role: Role::Source,
            versions,
            features: if want_lz4 { FEATURE_LZ4 } else { 0 },
            max_batch: config.batch,
            max_runs: config.limits.max_runs,
            max_window: config.window,
        };
        let (ch, peer, _version) = Channel::establish(stream, key, own, config.limits)?;
        let batch = config
            .batch
            .min(peer.max_batch)
            .min(config.limits.max_batch)
            .max(1);
        Ok(Sender {
            ch,
            config,
            batch: batch as usize,
            window: config.window.min(peer.max_window).clamp(1, 64) as usize,
            max_runs: config.limits.max_runs.min(peer.max_runs).max(1) as usize,
            lz4: want_lz4 && peer.features & FEATURE_LZ4 != 0,
            phase: Phase::Connected,
            layout: None,
            seen: Bitmap::new(0),
            round: 0,
            next_batch: 0,
            stats: MigrationStats::default(),
            pending: VecDeque::new(),
            push_later: false,
            round_ids: Vec::new(),
            subs: VecDeque::new(),
            to_offer: VecDeque::new(),
            describing: false,
            evidence: false,
            looked_up: 0,
            pushed: HashSet::new(),
            runs: Vec::new(),
            ids: Vec::new(),
            gfns: Vec::new(),
            run_end: 0,
            sent: HashSet::new(),
            scratch: Scratch::default(),
            lz4_sparse: false,
            free: Vec::new(),
        })
    }

    /// Announces the VM. The destination's `Accept` (it has prepared its memory) or refusal
    /// (`PeerAborted` with its reason) is read when the first round starts, so the caller
    /// prepares that round while the destination prepares.
    pub fn describe(&mut self, desc: &VmDescription) -> Result<(), MigrationError> {
        self.guard(|s| {
            if s.phase != Phase::Connected {
                return Err(MigrationError::Misuse("describe called twice"));
            }
            wire::check_regions(&desc.regions, &s.config.limits)?;
            if desc.vcpus == 0 || desc.config.len() > s.config.limits.max_config as usize {
                return Err(MigrationError::Misuse(
                    "no vCPUs or configuration too large",
                ));
            }
            wire::encode_describe(s.ch.begin(), desc);
            s.ch.commit(MsgType::Describe)?;
            let layout = Layout::new(&desc.regions);
            s.seen = Bitmap::new(layout.total());
            s.layout = Some(layout);
            s.phase = Phase::Describing;
            Ok(())
        })
    }

    /// One pre-copy round: offers every `(gfn, identity)` of `pages` (`None` or the zero
    /// identity for zero pages) in pipelined batches and sends the pages the destination
    /// lacks, reading them with `read_page`. The first round must cover every page of
    /// every region; later rounds the pages dirtied since. Identities may be computed
    /// lazily as the iterator is drawn (see [`super::identities`]). Returns when all the
    /// round's pages are sent.
    pub fn round<I, F>(&mut self, pages: I, read_page: &F) -> Result<RoundStats, MigrationError>
    where
        I: IntoIterator<Item = (u64, Option<PageId>)>,
        F: Fn(u64, &mut Page) + Sync,
    {
        self.guard(|s| s.round_inner(pages, read_page, false))
    }

    /// A later pre-copy round over the frames dirtied since the last: pushed when the
    /// destination asked for pushes, otherwise offered with identities hashed here, on all
    /// cores.
    pub fn round_frames<F>(
        &mut self,
        frames: &[u64],
        read_page: &F,
    ) -> Result<RoundStats, MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        if self.push_later {
            return self.round(frames.iter().map(|&gfn| (gfn, None)), read_page);
        }
        let pages: Vec<(u64, Option<PageId>)> = frames
            .par_iter()
            .map(|&gfn| {
                let mut page = [0u8; PAGE_SIZE];
                read_page(gfn, &mut page);
                (gfn, crate::identity::identify(&page))
            })
            .collect();
        self.round(pages, read_page)
    }

    /// Stop-and-copy, with the guest paused: pushes the pages of `last_dirty` (their
    /// identities are not needed: pushed pages are hashed as they are read) without waiting
    /// for any answer, then `state` (the vCPU and device state blob), then `Complete`,
    /// which commits: the destination checks everything, restores and resumes the guest,
    /// and answers `Ack`. Returns only after `Ack`: on any error the guest must resume on
    /// the source.
    pub fn finish<F>(
        &mut self,
        last_dirty: &[u64],
        read_page: &F,
        state: &[u8],
    ) -> Result<MigrationStats, MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        self.guard(|s| {
            if state.len() as u64 > s.config.limits.max_state {
                return Err(MigrationError::Misuse("state blob over the limit"));
            }
            let start = Instant::now();
            s.round_inner(last_dirty.iter().map(|&gfn| (gfn, None)), read_page, true)?;
            let total = state.len() as u64;
            for (i, chunk) in state.chunks(STATE_CHUNK).enumerate() {
                wire::encode_state(s.ch.begin(), total, (i * STATE_CHUNK) as u64, chunk);
                s.ch.commit(MsgType::State)?;
            }
            s.stats.state_bytes = total;
            let complete = Complete {
                rounds: s.round,
                state_len: total,
                state_hash: *blake3::hash(state).as_bytes(),
            };
            complete.encode(s.ch.begin());
            s.ch.commit(MsgType::Complete)?;
            let sent = Instant::now();
            match s.ch.recv()? {
                (MsgType::Ack, payload) => wire::expect_empty(payload, "Ack")?,
                other => return Err(unexpected(other, "while waiting for Ack")),
            }
            s.stats.stop_copy_us = (sent - start).as_micros() as u64;
            s.stats.commit_us = sent.elapsed().as_micros() as u64;
            s.stats.set_counters(&s.ch.counters);
            s.phase = Phase::Done;
            Ok(s.stats.clone())
        })
    }

    /// Gives up: tells the destination why (best effort). The sender is unusable after.
    pub fn abort(&mut self, reason: &str) {
        if !matches!(self.phase, Phase::Done | Phase::Failed) {
            self.ch.send_abort(reason);
            self.phase = Phase::Failed;
        }
    }

    /// Bytes written that the connection has not sent yet (its send queue), when it can
    /// tell: what the final round would queue behind.
    pub fn unsent_bytes(&self) -> Option<u64> {
        self.ch.unsent()
    }

    /// The stream underneath (to change its timeouts).
    pub fn stream(&self) -> &S {
        self.ch.stream()
    }

    /// Figures so far (for progress reports).
    pub fn stats(&self) -> MigrationStats {
        let mut stats = self.stats.clone();
        stats.set_counters(&self.ch.counters);
        stats
    }

    /// Runs `op` unless the sender already failed or finished; on error marks it failed
    /// and, when the error is ours rather than the peer's or the link's, tells the peer.
    pub(super) fn guard<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, MigrationError>,
    ) -> Result<T, MigrationError> {
        if matches!(self.phase, Phase::Done | Phase::Failed) {
            return Err(MigrationError::Unusable);
        }
        op(self).inspect_err(|e| {
            self.phase = Phase::Failed;
            if !e.is_peer_or_link() {
                self.ch.send_abort(&e.to_string());
            }
        })
    }

    fn round_inner<I, F>(
        &mut self,
        pages: I,
        read_page: &F,
        last: bool,
    ) -> Result<RoundStats, MigrationError>
    where
        I: IntoIterator<Item = (u64, Option<PageId>)>,
        F: Fn(u64, &mut Page) + Sync,
    {
        self.accepted()?;
        self.round += 1;
        let round = self.round;
        let start = Instant::now();
        let before = (
            self.ch.counters.wire_sent,
            self.stats.pages_offered,
            self.stats.pages_zero,
            self.stats.pages_found,
            self.stats.pages_sent,
        );
        self.seen.clear();
        self.sent.clear();
        self.pushed.clear();
        let first_batch = self.next_batch;
        if round == 1 && !last {
            self.summary_round(pages, read_page)?;
        } else if last || self.push_later {
            let frames = self.frames_of(pages.into_iter().map(|(gfn, _)| gfn))?;
            self.push_pages(&frames, read_page)?;
        } else {
            for (gfn, id) in pages {
                self.check_frame(gfn)?;
                self.push_entry(gfn, id.filter(|id| !id.is_zero_page()));
                if self.ids.len() >= self.batch || self.runs.len() >= self.max_runs {
                    self.flush_offer(round, read_page)?;
                }
            }
            if !self.runs.is_empty() {
                self.flush_offer(round, read_page)?;
            }
            while !self.pending.is_empty() {
                self.answer(read_page)?;
            }
        }
        let batches = self.next_batch - first_batch;
        wire::encode_round_end(self.ch.begin(), round, batches);
        self.ch.commit(MsgType::RoundEnd)?;
        let stats = RoundStats {
            round,
            last,
            duration_us: start.elapsed().as_micros() as u64,
            pages_offered: self.stats.pages_offered - before.1,
            pages_zero: self.stats.pages_zero - before.2,
            pages_found: self.stats.pages_found - before.3,
            pages_sent: self.stats.pages_sent - before.4,
            bytes_sent: self.ch.counters.wire_sent - before.0,
        };
        self.stats.rounds.push(stats);
        Ok(stats)
    }

    /// Reads the destination's `Accept` if not yet read (the destination prepares while
    /// the caller gets its first round ready); fails before `describe`.
    pub(super) fn accepted(&mut self) -> Result<(), MigrationError> {
        if self.phase == Phase::Describing {
            match self.ch.recv()? {
                (MsgType::Accept, payload) => wire::expect_empty(payload, "Accept")?,
                other => return Err(unexpected(other, "while waiting for Accept")),
            }
            self.phase = Phase::Described;
        }
        if self.phase != Phase::Described {
            return Err(MigrationError::Misuse("round before describe"));
        }
        Ok(())
    }

    /// Adds a page to the offer being built, extending the last run when it can.
    pub(super) fn push_entry(&mut self, gfn: u64, id: Option<PageId>) {
        let zero = id.is_none();
        match self.runs.last_mut() {
            Some(run)
                if run.zero == zero
                    && run.first + u64::from(run.count) == gfn
                    && gfn < self.run_end
                    && run.count < MAX_RUN =>
            {
                run.count += 1;
            }
            _ => {
                self.run_end = self.layout.as_ref().expect("described").region_end(gfn);
                self.runs.push(Run {
                    first: gfn,
                    count: 1,
                    zero,
                });
            }
        }
        if let Some(id) = id {
            self.ids.push(id);
            self.gfns.push(gfn);
        }
    }

    /// Sends the offer built so far; then, while the window is full, handles answers.
    pub(super) fn flush_offer<F>(&mut self, round: u32, read_page: &F) -> Result<(), MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        let batch = self.next_batch;
        self.next_batch += 1;
        wire::encode_offer(self.ch.begin(), batch, round, &self.runs, &self.ids);
        self.ch.commit(MsgType::Offer)?;
        if !self.describing {
            self.stats.pages_offered += self.ids.len() as u64;
            self.stats.pages_zero += self
                .runs
                .iter()
                .filter(|r| r.zero)
                .map(|r| u64::from(r.count))
                .sum::<u64>();
        }
        if !self.ids.is_empty() {
            let mut entries = self.free.pop().unwrap_or_default();
            entries.clear();
            entries.extend(self.gfns.iter().copied().zip(self.ids.iter().copied()));
            self.pending
                .push_back(Pending::Offer { id: batch, entries });
        }
        self.runs.clear();
        self.ids.clear();
        self.gfns.clear();
        // Answers that have arrived are taken at once (pages then flow while later
        // batches are hashed); with the window full, the oldest is waited for.
        while !self.pending.is_empty()
            && (self.pending.len() >= self.window || self.ch.input_ready())
        {
            self.answer(read_page)?;
        }
        Ok(())
    }

    /// Reads the answer to the oldest pending offer or summary and sends the pages it asks
    /// for (or queues the summaries and offers it asks for).
    pub(super) fn answer<F>(&mut self, read_page: &F) -> Result<(), MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        let (id, entries) = match self.pending.pop_front().expect("an offer is pending") {
            Pending::Offer { id, entries } => (id, entries),
            Pending::Summary { id, level, ranges } => {
                return self.summary_answered(id, level, &ranges, read_page)
            }
        };
        let needed: Vec<(u64, PageId)> = match self.ch.recv()? {
            (MsgType::Need, payload) => {
                let need = NeedView::decode(payload)?;
                if need.batch != id {
                    return Err(MigrationError::Malformed {
                        what: "Need",
                        why: "answers another batch",
                    });
                }
                entries
                    .iter()
                    .zip(need.needed(entries.len())?)
                    .filter_map(|(e, needed)| needed.then_some(*e))
                    .collect()
            }
            other => return Err(unexpected(other, "while waiting for a Need")),
        };
        self.stats.pages_found += (entries.len() - needed.len()) as u64;
        self.looked_up += entries.len() as u64;
        self.evidence |= self.looked_up >= EVIDENCE_PAGES;
        for (i, chunk) in needed.chunks(PAGES_PER_MESSAGE).enumerate() {
            self.send_pages(id, (i * PAGES_PER_MESSAGE) as u32, chunk, read_page)?;
        }
        self.free.push(entries);
        Ok(())
    }

    /// Checks `gfn` is in the guest and not yet in this round.
    pub(super) fn check_frame(&mut self, gfn: u64) -> Result<u64, MigrationError> {
        let layout = self.layout.as_ref().expect("described");
        let idx = layout
            .index(gfn)
            .ok_or(MigrationError::GfnOutOfRange { gfn })?;
        if self.seen.test_and_set(idx) {
            return Err(MigrationError::DuplicateGfn {
                gfn,
                round: self.round,
            });
        }
        Ok(idx)
    }

    /// `frames` checked (in the guest, each once this round) and collected.
    fn frames_of(&mut self, frames: impl Iterator<Item = u64>) -> Result<Vec<u64>, MigrationError> {
        frames
            .map(|gfn| self.check_frame(gfn).map(|_| gfn))
            .collect()
    }

    /// Sends one `Pages` message for `chunk`, needed entries `first..` of `batch`.
    ///
    /// Pages go as they read now, under the identity they were offered with: one changed
    /// since will not match it, and the destination drops it and waits for the next round,
    /// which offers it again (every write after the dirty log was taken is in that round;
    /// the last round runs paused). So no page is hashed twice here.
    fn send_pages<F>(
        &mut self,
        batch: u32,
        first: u32,
        chunk: &[(u64, PageId)],
        read_page: &F,
    ) -> Result<(), MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        let gfns: Vec<u64> = chunk.iter().map(|&(gfn, _)| gfn).collect();
        self.prepare(&gfns, read_page, false);
        let mut entries = Vec::with_capacity(chunk.len());
        for (i, &(_, offered)) in chunk.iter().enumerate() {
            let slot = self.scratch.slots[i];
            let body = if slot.zero {
                self.stats.pages_changed += 1;
                Body::Zero
            } else if !self.sent.insert(offered) {
                self.stats.pages_deduplicated += 1;
                Body::Known
            } else if let Some(len) = slot.compressed {
                self.stats.pages_sent += 1;
                self.stats.pages_compressed += 1;
                self.stats.compression_saved_bytes += (PAGE_SIZE - len - 2) as u64;
                Body::Lz4(&self.scratch.comp[i][..len])
            } else {
                self.stats.pages_sent += 1;
                Body::Raw(
                    self.scratch.pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                        .try_into()
                        .expect("a page"),
                )
            };
            entries.push(PageEntry { new_id: None, body });
        }
        wire::encode_pages(self.ch.begin(), batch, first, &entries);
        self.ch.commit(MsgType::Pages)
    }

    /// Reads and (when enabled) compresses the pages of `chunk` on all cores, into the
    /// scratch buffers, hashing each when `identify`; adapts how many pages compression is
    /// tried on.
    pub(super) fn prepare<F>(&mut self, chunk: &[u64], read_page: &F, identify: bool)
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        let n = chunk.len();
        let sc = &mut self.scratch;
        if sc.pages.len() < n * PAGE_SIZE {
            sc.pages.resize(n * PAGE_SIZE, 0);
        }
        if sc.comp.len() < n {
            sc.comp.resize(n, [0; COMPRESS_BUF]);
            sc.slots.resize(n, Slot::default());
        }
        let every = match (self.lz4, self.lz4_sparse) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => SPARSE_PROBE,
        };
        sc.pages[..n * PAGE_SIZE]
            .par_chunks_mut(PAGE_SIZE)
            .zip(sc.comp[..n].par_iter_mut())
            .zip(sc.slots[..n].par_iter_mut())
            .zip(chunk.par_iter())
            .enumerate()
            .with_min_len(16)
            .for_each(|(i, (((page, comp), slot), &gfn))| {
                let page: &mut Page = page.try_into().expect("a page");
                read_page(gfn, page);
                let zero = is_zero(page);
                let tried = every != 0 && i % every == 0 && !zero;
                *slot = Slot {
                    zero,
                    compressed: if tried {
                        wire::compress_page(page, comp)
                    } else {
                        None
                    },
                    tried,
                    id: (identify && !zero).then(|| PageId::of(page)),
                };
            });
        if self.lz4 {
            let tried = sc.slots[..n].iter().filter(|s| s.tried).count();
            let paid = sc.slots[..n]
                .iter()
                .filter(|s| s.compressed.is_some())
                .count();
            if tried > 0 {
                self.lz4_sparse = paid * 8 < tried;
            }
        }
    }
}

/// The error for a message that is not the one awaited (an `Abort` carries its reason).
pub(crate) fn unexpected((kind, payload): (MsgType, &[u8]), when: &'static str) -> MigrationError {
    match kind {
        MsgType::Abort => MigrationError::PeerAborted(wire::decode_abort(payload)),
        _ => MigrationError::Unexpected {
            got: kind.name(),
            when,
        },
    }
}
