//! The source's first round: range summaries over the live identities, pipelined like
//! offers; the destination's answers say per range what it still needs (nothing, the
//! sub-ranges, the pages' identities, or the pages themselves).

use rayon::prelude::*;

use super::ranges::{digest, RANGE_PAGES, SUB_RANGE_PAGES};
use super::sender::{unexpected, Pending, Sender};
use super::wire::{self, AnswerView, MsgType, RangeAnswer, RangeSummary, ANSWER_PUSH_LATER};
use super::{MigrationError, Transport};
use crate::identity::{Page, PageId};

/// Top-level ranges per summary (32 MiB of guest memory).
const SUMMARY_RANGES: usize = 16;
/// Sub-ranges per summary.
const SUB_SUMMARY_RANGES: usize = 64;

impl<S: Transport> Sender<S> {
    /// Round 1: `pages` must name every page once. Summarizes them range by range and
    /// follows the destination's answers until every page is held there, sent, or offered.
    pub(super) fn summary_round<I, F>(
        &mut self,
        pages: I,
        read_page: &F,
    ) -> Result<(), MigrationError>
    where
        I: IntoIterator<Item = (u64, Option<PageId>)>,
        F: Fn(u64, &mut Page) + Sync,
    {
        let total = self.layout.as_ref().expect("described").total() as usize;
        let mut ids = vec![None; total];
        for (gfn, id) in pages {
            let idx = self.check_frame(gfn)?;
            ids[idx as usize] = id.filter(|id| !id.is_zero_page());
        }
        if self.seen.first_clear().is_some() {
            return Err(MigrationError::Misuse(
                "the first round must name every page",
            ));
        }
        self.round_ids = ids;
        self.describing = true;
        let tops = total.div_ceil(RANGE_PAGES);
        let mut next = 0;
        loop {
            while !self.pending.is_empty() && self.ch.input_ready() {
                self.answer(read_page)?;
            }
            // Depth first, and before the destination has judged what it holds (from the
            // first identities it looked up) one descent at a time: it then knows whether
            // to ask for the rest by identity or by push.
            let probing = !self.evidence
                && self.pending.iter().any(|p| {
                    matches!(p, Pending::Offer { .. } | Pending::Summary { level: 1, .. })
                });
            if self.pending.len() >= self.window {
                self.answer(read_page)?;
            } else if let Some((first, pages)) = self.to_offer.pop_front() {
                for idx in first..first + u64::from(pages) {
                    let gfn = self.layout.as_ref().expect("described").gfn(idx);
                    self.push_entry(gfn, self.round_ids[idx as usize]);
                    if self.ids.len() >= self.batch || self.runs.len() >= self.max_runs {
                        self.flush_offer(self.round, read_page)?;
                    }
                }
            } else if !self.runs.is_empty() {
                self.flush_offer(self.round, read_page)?;
            } else if !self.subs.is_empty() && !probing {
                let n = self.subs.len().min(SUB_SUMMARY_RANGES);
                let ranges: Vec<RangeSummary> = self.subs.drain(..n).collect();
                self.send_summary(1, &ranges)?;
            } else if next < tops {
                let end = (next + SUMMARY_RANGES).min(tops);
                let ids = &self.round_ids;
                let ranges: Vec<RangeSummary> = (next..end)
                    .into_par_iter()
                    .map(|k| summarize(ids, (k * RANGE_PAGES) as u64, RANGE_PAGES))
                    .collect();
                next = end;
                self.send_summary(0, &ranges)?;
            } else if !self.pending.is_empty() {
                self.answer(read_page)?;
            } else {
                break;
            }
        }
        self.describing = false;
        self.round_ids = Vec::new();
        Ok(())
    }

    fn send_summary(&mut self, level: u8, ranges: &[RangeSummary]) -> Result<(), MigrationError> {
        let id = self.next_batch;
        self.next_batch += 1;
        wire::encode_summary(self.ch.begin(), id, self.round, level, ranges);
        self.ch.commit(MsgType::Summary)?;
        self.stats.ranges_summarized += ranges.len() as u64;
        if level == 0 {
            for r in ranges {
                let held = self.data_pages(r.first, r.pages);
                self.stats.pages_offered += held;
                self.stats.pages_zero += u64::from(r.pages) - held;
            }
        }
        self.pending.push_back(Pending::Summary {
            id,
            level,
            ranges: ranges.iter().map(|r| (r.first, r.pages)).collect(),
        });
        Ok(())
    }

    /// Reads the answer to summary `id` of `ranges` and does what it asks: pushes the pages
    /// wanted, queues sub-range summaries or per-page offers.
    pub(super) fn summary_answered<F>(
        &mut self,
        id: u32,
        level: u8,
        ranges: &[(u64, u32)],
        read_page: &F,
    ) -> Result<(), MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        let payload = match self.ch.recv()? {
            (MsgType::Answer, payload) => payload.to_vec(),
            other => return Err(unexpected(other, "while waiting for an Answer")),
        };
        let view = AnswerView::decode(&payload)?;
        if view.batch != id {
            return Err(MigrationError::Malformed {
                what: "Answer",
                why: "answers another batch",
            });
        }
        self.push_later = view.flags & ANSWER_PUSH_LATER != 0;
        self.evidence |= self.push_later;
        let sizes: Vec<u32> = ranges.iter().map(|&(_, pages)| pages).collect();
        let layout = self.layout.as_ref().expect("described");
        let mut push = Vec::new();
        for (&(first, pages), answer) in ranges.iter().zip(view.answers(&sizes)?) {
            let data = self.data_pages(first, pages);
            match answer {
                RangeAnswer::Held => {
                    self.stats.ranges_held += 1;
                    self.stats.pages_found += data;
                }
                RangeAnswer::Descend if level == 0 => {
                    let ids = &self.round_ids;
                    let end = first + u64::from(pages);
                    self.subs
                        .extend((first..end).step_by(SUB_RANGE_PAGES).map(|s| {
                            summarize(ids, s, (end - s).min(SUB_RANGE_PAGES as u64) as usize)
                        }));
                }
                RangeAnswer::Descend => self.to_offer.push_back((first, pages)),
                RangeAnswer::Push => {
                    push.extend((first..first + u64::from(pages)).map(|i| layout.gfn(i)));
                }
                RangeAnswer::Want(bits) => {
                    self.stats.ranges_held += 1;
                    let mut wanted = 0;
                    for j in 0..u64::from(pages) {
                        if bits[(j / 8) as usize] & (1 << (j % 8)) != 0 {
                            push.push(layout.gfn(first + j));
                            wanted += u64::from(self.round_ids[(first + j) as usize].is_some());
                        }
                    }
                    self.stats.pages_found += data.saturating_sub(wanted);
                }
            }
        }
        self.push_pages(&push, read_page)
    }

    /// Non-zero pages among the first round's `pages` from dense index `first`.
    fn data_pages(&self, first: u64, pages: u32) -> u64 {
        let start = first as usize;
        self.round_ids[start..start + pages as usize]
            .iter()
            .filter(|id| id.is_some())
            .count() as u64
    }
}

/// The summary of `pages` pages of `ids` from dense index `first` (cut at the end).
fn summarize(ids: &[Option<PageId>], first: u64, pages: usize) -> RangeSummary {
    let start = first as usize;
    let end = (start + pages).min(ids.len());
    RangeSummary {
        first,
        pages: (end - start) as u32,
        digest: digest(&ids[start..end]),
    }
}
