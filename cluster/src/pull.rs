//! Pulling the pages a host lacks from the live hosts whose summaries claim them (a restore
//! of a snapshot taken elsewhere): which host to ask for each page, and the fetch rounds.
//!
//! ```text
//! candidates(id) = live hosts whose summary may hold id, most claims (of all the ids) first
//! round:  each pending id → the least-loaded candidate not yet tried (ties: most claims),
//!         ids with fewest candidates placed first; one thread per host asked
//! reply:  page (verified by the client) → sink;  absent, wrong or host down → next round
//! end:    no pending id has an untried candidate left; what is still missing is reported
//! ```
//!
//! Summaries are hints (false positives, staleness): a wrong claim costs one miss, never a
//! wrong page, since every page is checked against its identity before it is kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use fabric::live::key_of;
use fabric::migration::wire::SERVICE_MAX_IDS;
use fabric::{Page, PageId, PAGE_SIZE};
use serde::Serialize;

use crate::bloom::Bloom;
use crate::record::HostRecord;
use crate::service::{PageClient, ServiceError};

/// Which hosts may hold each page, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// (name, page-service address) of every host that claims at least one id, most claims
    /// first, ties by name.
    pub hosts: Vec<(String, String)>,
    /// Of each id (same order as asked), indices into `hosts` of the hosts claiming it,
    /// in `hosts` order.
    pub candidates: Vec<Vec<usize>>,
}

/// Builds the plan for `ids` from the live hosts and their summaries (a host without one
/// claims nothing).
pub fn plan(ids: &[PageId], hosts: &[(HostRecord, Option<Bloom>)]) -> Plan {
    let keys: Vec<u64> = ids.iter().map(|id| key_of(Some(*id))).collect();
    let claims: Vec<Vec<bool>> = hosts
        .iter()
        .map(|(_, b)| {
            keys.iter()
                .map(|&k| b.as_ref().is_some_and(|b| b.contains(k)))
                .collect()
        })
        .collect();
    let mut order: Vec<usize> = (0..hosts.len())
        .filter(|&h| claims[h].iter().any(|&c| c))
        .collect();
    let count = |h: usize| claims[h].iter().filter(|&&c| c).count();
    order.sort_by(|&a, &b| {
        count(b)
            .cmp(&count(a))
            .then(hosts[a].0.name.cmp(&hosts[b].0.name))
    });
    let candidates = (0..ids.len())
        .map(|i| {
            (0..order.len())
                .filter(|&rank| claims[order[rank]][i])
                .collect()
        })
        .collect();
    Plan {
        hosts: order
            .iter()
            .map(|&h| (hosts[h].0.name.clone(), hosts[h].0.addr.clone()))
            .collect(),
        candidates,
    }
}

/// One round's requests: for each host of the plan, the indices of the ids to ask it for.
/// `tried[i]` are the hosts already asked for id `i`; `dead` hosts are asked nothing.
pub fn assign(
    plan: &Plan,
    pending: &[usize],
    tried: &[Vec<usize>],
    dead: &[bool],
) -> Vec<Vec<usize>> {
    let left = |i: usize| -> Vec<usize> {
        plan.candidates[i]
            .iter()
            .copied()
            .filter(|h| !dead[*h] && !tried[i].contains(h))
            .collect()
    };
    let mut todo: Vec<(usize, Vec<usize>)> = pending
        .iter()
        .map(|&i| (i, left(i)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    todo.sort_by_key(|(i, c)| (c.len(), *i));
    let mut out = vec![Vec::new(); plan.hosts.len()];
    for (i, cands) in todo {
        let best = cands
            .iter()
            .copied()
            .min_by_key(|&h| (out[h].len(), h))
            .expect("non-empty");
        out[best].push(i);
    }
    out.iter_mut().for_each(|ids| ids.sort_unstable());
    out
}

/// A page service connection as the pull uses it ([`PageClient`], or a fake in tests).
pub trait Fetch: Send {
    /// The pages of `ids`, in order; `None` for absent (or wrong: see `mismatched`).
    fn fetch(&mut self, ids: &[PageId]) -> Result<Vec<Option<Box<Page>>>, ServiceError>;
    /// Pages received that did not match their identity, so far.
    fn mismatched(&self) -> u64;
}

impl Fetch for PageClient {
    fn fetch(&mut self, ids: &[PageId]) -> Result<Vec<Option<Box<Page>>>, ServiceError> {
        PageClient::fetch(self, ids)
    }
    fn mismatched(&self) -> u64 {
        PageClient::mismatched(self)
    }
}

/// What one host gave.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HostFigures {
    pub name: String,
    pub addr: String,
    /// Pages asked for.
    pub asked: u64,
    /// Right pages received (kept).
    pub pages: u64,
    /// Pages asked for and not received right (absent, wrong, or the host failed).
    pub misses: u64,
    /// Pages received that did not match their identity (counted in `misses` too).
    pub wrong: u64,
    /// Page bytes received, right and wrong.
    pub bytes: u64,
    /// Time spent on this host (connecting and fetching), ms, summed over rounds.
    pub ms: f64,
    /// Why the host was given up on (connection or protocol failure), if it was.
    pub error: Option<String>,
}

/// What a pull did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PullReport {
    /// Distinct pages wanted.
    pub wanted: u64,
    /// Pages received and kept.
    pub fetched: u64,
    /// Pages no host gave.
    pub missing: u64,
    pub rounds: u32,
    pub ms: f64,
    pub hosts: Vec<HostFigures>,
}

enum Msg {
    Pages(usize, Vec<usize>, Vec<Option<Box<Page>>>),
    Done(usize, Option<String>, u64, f64),
}

/// Fetches `ids` following `plan`, handing every right page to `sink` (e.g. a store's
/// `put_many`) as batches arrive; `connect` opens a host's page service by address. A sink
/// error stops the pull and is returned; host failures only cost misses.
pub fn pull<F: Fetch, E>(
    ids: &[PageId],
    plan: &Plan,
    connect: impl Fn(&str) -> Result<F, ServiceError> + Sync,
    mut sink: impl FnMut(&[(PageId, &[u8])]) -> Result<(), E>,
) -> Result<PullReport, E> {
    let clock = Instant::now();
    let mut report = PullReport {
        wanted: ids.len() as u64,
        hosts: plan
            .hosts
            .iter()
            .map(|(name, addr)| HostFigures {
                name: name.clone(),
                addr: addr.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut pending: Vec<usize> = (0..ids.len()).collect();
    let mut tried = vec![Vec::new(); ids.len()];
    let mut dead = vec![false; plan.hosts.len()];
    loop {
        let round = assign(plan, &pending, &tried, &dead);
        if round.iter().all(Vec::is_empty) {
            break;
        }
        report.rounds += 1;
        let mut got = vec![false; ids.len()];
        for (h, asked) in round.iter().enumerate() {
            asked.iter().for_each(|&i| tried[i].push(h));
            report.hosts[h].asked += asked.len() as u64;
        }
        let stop = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            // Bounded: at most 16 batches (16 MiB) wait for the sink.
            let (tx, rx) = sync_channel::<Msg>(16);
            for (h, asked) in round.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
                let (tx, connect, stop) = (tx.clone(), &connect, &stop);
                let addr = plan.hosts[h].1.as_str();
                s.spawn(move || {
                    let start = Instant::now();
                    let (error, wrong) = fetch_host(addr, ids, asked, connect, stop, h, &tx);
                    let _ = tx.send(Msg::Done(
                        h,
                        error,
                        wrong,
                        start.elapsed().as_secs_f64() * 1e3,
                    ));
                });
            }
            drop(tx);
            let mut outcome = Ok(());
            for msg in rx.iter() {
                match msg {
                    Msg::Pages(h, idx, pages) => {
                        let fig = &mut report.hosts[h];
                        fig.bytes += pages.iter().flatten().count() as u64 * PAGE_SIZE as u64;
                        let batch: Vec<(PageId, &[u8])> = idx
                            .iter()
                            .zip(&pages)
                            .filter_map(|(&i, p)| p.as_ref().map(|p| (ids[i], &p[..])))
                            .collect();
                        fig.pages += batch.len() as u64;
                        idx.iter()
                            .zip(&pages)
                            .for_each(|(&i, p)| got[i] |= p.is_some());
                        if outcome.is_ok() && !batch.is_empty() {
                            outcome = sink(&batch);
                            if outcome.is_err() {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                    Msg::Done(h, error, wrong, ms) => {
                        let fig = &mut report.hosts[h];
                        fig.wrong += wrong;
                        fig.bytes += wrong * PAGE_SIZE as u64;
                        fig.ms += ms;
                        if let Some(e) = error {
                            dead[h] = true;
                            fig.error = Some(e);
                        }
                    }
                }
            }
            outcome
        });
        result?;
        for (h, asked) in round.iter().enumerate() {
            report.hosts[h].misses += asked.iter().filter(|&&i| !got[i]).count() as u64;
        }
        report.fetched += got.iter().filter(|&&g| g).count() as u64;
        pending.retain(|&i| !got[i]);
    }
    report.missing = pending.len() as u64;
    report.ms = clock.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// One host's share of a round: the error that ended it (if any) and its wrong pages.
fn fetch_host<F: Fetch>(
    addr: &str,
    ids: &[PageId],
    asked: &[usize],
    connect: &(impl Fn(&str) -> Result<F, ServiceError> + Sync),
    stop: &AtomicBool,
    h: usize,
    tx: &std::sync::mpsc::SyncSender<Msg>,
) -> (Option<String>, u64) {
    let mut client = match connect(addr) {
        Ok(c) => c,
        Err(e) => return (Some(e.to_string()), 0),
    };
    for batch in asked.chunks(SERVICE_MAX_IDS) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let want: Vec<PageId> = batch.iter().map(|&i| ids[i]).collect();
        match client.fetch(&want) {
            Ok(pages) if pages.len() == want.len() => {
                if tx.send(Msg::Pages(h, batch.to_vec(), pages)).is_err() {
                    break;
                }
            }
            Ok(_) => {
                return (
                    Some("reply of the wrong length".into()),
                    client.mismatched(),
                )
            }
            Err(e) => return (Some(e.to_string()), client.mismatched()),
        }
    }
    (None, client.mismatched())
}

#[cfg(test)]
#[path = "pull_tests.rs"]
mod tests;
