//! The destination's side of range summaries and pushes: a range whose digest this host
//! holds is installed from here (every page verified), the rest is asked for by descending
//! or pushing; pushed pages are hashed, checked against their message's digest, installed.

use rayon::prelude::*;

use super::layout::Layout;
use super::ranges::{zero_digest, RANGE_PAGES};
use super::rx_state::{bad, Action, Expect, RxState};
use super::stats::ReceiverStats;
use super::wire::{self, Body, PageEntry, RangeAnswer, Summary, ANSWER_PUSH_LATER};
use super::{GuestSink, MigrationError, PageSource};
use crate::identity::{Page, PageId, PAGE_SIZE};

/// How the destination answers one range, before the bitmaps are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answered {
    Held,
    Descend,
    Push,
    Want(Vec<u8>),
}

impl Answered {
    pub(super) fn wire(&self) -> RangeAnswer<'_> {
        match self {
            Answered::Held => RangeAnswer::Held,
            Answered::Descend => RangeAnswer::Descend,
            Answered::Push => RangeAnswer::Push,
            Answered::Want(bits) => RangeAnswer::Want(bits),
        }
    }
}

impl RxState {
    /// Handles a summary: installs each range this host holds (pages that fail their check
    /// are wanted from the source), and asks for the rest: descend while the host may hold
    /// parts, push once it evidently does not. Returns the answer's flags and answers.
    pub(super) fn summary(
        &mut self,
        summary: &Summary,
        layout: &Layout,
        stats: &mut ReceiverStats,
        source: &dyn PageSource,
        sink: &mut dyn GuestSink,
    ) -> Result<(u8, Vec<Answered>), MigrationError> {
        self.open_batch("Summary", summary.batch, summary.round)?;
        let total = layout.total();
        let index = source.ranges();
        let mut held = vec![false; summary.ranges.len()];
        // Data pages found through the index: the evidence (zero ranges say nothing).
        let mut looked_up = 0u64;
        for (k, range) in summary.ranges.iter().enumerate() {
            let end = range
                .first
                .checked_add(u64::from(range.pages))
                .filter(|&end| end <= total)
                .ok_or(bad("Summary", "range past the guest's memory"))?;
            for i in range.first..end {
                if summary.level == 0 {
                    self.arrive(i, layout.gfn(i), Expect::Nothing)?;
                } else if self.expect[i as usize] == Expect::SubRange as u8 {
                    self.expect[i as usize] = Expect::Nothing as u8;
                    self.expected -= 1;
                } else {
                    return Err(bad("Summary", "sub-range not asked for"));
                }
            }
            stats.ranges_summarized += 1;
            let pages = range.pages as usize;
            let ids: Option<Vec<Option<PageId>>> = if range.digest == zero_digest(pages) {
                Some(vec![None; pages])
            } else {
                index
                    .and_then(|ix| ix.get(&range.digest, pages))
                    .map(<[_]>::to_vec)
            };
            let Some(ids) = ids else { continue };
            held[k] = true;
            for (j, id) in ids.into_iter().enumerate() {
                let gfn = layout.gfn(range.first + j as u64);
                match id {
                    Some(id) => {
                        looked_up += 1;
                        self.plan(gfn, id, k * RANGE_PAGES + j, stats);
                    }
                    None => {
                        stats.pages_zero += 1;
                        if let Some(old) = self.manifest.get(gfn).flatten() {
                            self.forget(old, gfn);
                            self.actions.push(Action::Zero {
                                first: gfn,
                                count: 1,
                            });
                        }
                    }
                }
            }
        }
        let missing = self.act(stats, source, sink);
        let mut answers: Vec<Answered> = held
            .iter()
            .map(|&h| if h { Answered::Held } else { Answered::Descend })
            .collect();
        for &(entry, _, _) in &missing {
            let (k, j) = (entry / RANGE_PAGES, entry % RANGE_PAGES);
            let pages = summary.ranges[k].pages as usize;
            if answers[k] == Answered::Held {
                answers[k] = Answered::Want(vec![0; pages.div_ceil(8)]);
            }
            if let Answered::Want(bits) = &mut answers[k] {
                bits[j / 8] |= 1 << (j % 8);
            }
        }
        self.evidence(looked_up, looked_up - missing.len() as u64);
        let push = self.push_mode();
        for (range, answer) in summary.ranges.iter().zip(answers.iter_mut()) {
            match answer {
                Answered::Held => {
                    stats.ranges_held += 1;
                    stats.pages_held += u64::from(range.pages);
                }
                Answered::Want(bits) => {
                    stats.ranges_held += 1;
                    for j in 0..range.pages as usize {
                        if bits[j / 8] & (1 << (j % 8)) != 0 {
                            self.ask(range.first + j as u64, Expect::Push);
                            stats.pages_needed += 1;
                        } else {
                            stats.pages_held += 1;
                        }
                    }
                }
                _ => {
                    let kind = if push {
                        *answer = Answered::Push;
                        Expect::Push
                    } else if summary.level == 0 {
                        Expect::SubRange
                    } else {
                        Expect::Offer
                    };
                    for i in range.first..range.first + u64::from(range.pages) {
                        self.ask(i, kind);
                    }
                }
            }
        }
        Ok((if push { ANSWER_PUSH_LATER } else { 0 }, answers))
    }

    /// Handles a push: every page is hashed (on all cores) and the identities must match
    /// the message's digest before any is installed; a known entry must name a page pushed
    /// earlier in this migration. A push that fails its digest is damage or forgery: the
    /// migration stops.
    pub(super) fn push(
        &mut self,
        payload: &[u8],
        layout: &Layout,
        stats: &mut ReceiverStats,
        sink: &mut dyn GuestSink,
    ) -> Result<(), MigrationError> {
        let mut entries: Vec<PageEntry<'_>> = Vec::with_capacity(wire::PAGES_PER_MESSAGE);
        let header = wire::decode_push(payload, &mut entries)?;
        if header.round != self.round {
            return Err(bad("Push", "wrong round"));
        }
        let gfns: Vec<u64> = header.gfns().collect();
        for &gfn in &gfns {
            let index = layout
                .index(gfn)
                .ok_or(MigrationError::GfnOutOfRange { gfn })?;
            self.arrive(index, gfn, Expect::Push)?;
        }
        self.round_open = true;
        let n = entries.len();
        let mut ids: Vec<Option<PageId>> = vec![None; n];
        let decoded: Result<(), MigrationError> = self.page_buf[..n * PAGE_SIZE]
            .par_chunks_mut(PAGE_SIZE)
            .zip(entries.par_iter())
            .zip(ids.par_iter_mut())
            .with_min_len(16)
            .try_for_each(|((buf, entry), id)| {
                let page: &mut Page = buf.try_into().expect("a page");
                match entry.body {
                    Body::Raw(raw) => *id = Some(PageId::of(raw)),
                    Body::Lz4(_) => {
                        wire::decode_page(&entry.body, page)?;
                        *id = Some(PageId::of(page));
                    }
                    Body::Zero | Body::Known => {}
                }
                Ok(())
            });
        decoded?;
        if wire::push_digest(ids.iter().flatten()) != header.digest {
            return Err(MigrationError::BadPage { gfn: gfns[0] });
        }
        for (i, (entry, &gfn)) in entries.iter().zip(&gfns).enumerate() {
            if let Some(old) = self.manifest.get(gfn).flatten() {
                self.forget(old, gfn);
            }
            let id = ids[i].filter(|id| !id.is_zero_page());
            match (entry.body, id) {
                (Body::Raw(_) | Body::Lz4(_), Some(id)) => {
                    self.install_body(i, gfn, &entry.body, id, stats, sink);
                }
                // Content that is all zeros is a zero page.
                (Body::Raw(_) | Body::Lz4(_) | Body::Zero, _) => {
                    self.install_zero(gfn, sink);
                    stats.pages_zero += 1;
                }
                (Body::Known, _) => {
                    let id = entry.new_id.expect("decoded with an id");
                    let from = *self
                        .have
                        .get(&id)
                        .ok_or(bad("Push", "known page never sent"))?;
                    sink.read_page(from, &mut self.tmp);
                    sink.write_page(gfn, &self.tmp);
                    self.install(gfn, id);
                    stats.pages_deduplicated += 1;
                }
            }
        }
        stats.pages_pushed += n as u64;
        Ok(())
    }
}
