use std::collections::{HashMap, HashSet};

use super::*;
use crate::bloom::DEFAULT_MAX_BYTES;

fn page(n: u32) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    p[..4].copy_from_slice(&n.to_le_bytes());
    p[4] = 1;
    p
}

fn ids(n: u32) -> Vec<PageId> {
    (0..n).map(|i| PageId::of(&page(i))).collect()
}

fn host(name: &str) -> HostRecord {
    HostRecord {
        addr: name.into(),
        mem_available: 1 << 30,
        mem_total: 1 << 30,
        cpus: 2,
        ..crate::record::test_host(name)
    }
}

/// A host whose summary claims `claims` (indices into `all`).
fn claiming(
    name: &str,
    all: &[PageId],
    claims: impl Iterator<Item = u32>,
) -> (HostRecord, Option<Bloom>) {
    let mut b = Bloom::with_capacity(10_000, DEFAULT_MAX_BYTES);
    claims.for_each(|i| b.insert_id(&all[i as usize]));
    (host(name), Some(b))
}

#[test]
fn plan_ranks_hosts_by_claims_and_lists_candidates_per_page() {
    let all = ids(10);
    let hosts = vec![
        claiming("c", &all, 6..10),
        (host("nosummary"), None),
        claiming("a", &all, 0..8),
        claiming("empty", &all, 100..100),
    ];
    let p = plan(&all, &hosts);
    let names: Vec<&str> = p.hosts.iter().map(|h| h.0.as_str()).collect();
    assert_eq!(names, ["a", "c"], "hosts claiming nothing are left out");
    assert_eq!(p.candidates[0], [0]);
    assert_eq!(p.candidates[7], [0, 1]);
    assert_eq!(p.candidates[9], [1]);
}

#[test]
fn assign_spreads_shared_pages_and_skips_dead_and_tried_hosts() {
    let all = ids(10);
    // a claims 0..8, c claims 4..10: 0..4 only a, 8..10 only c, 4..8 both.
    let p = plan(
        &all,
        &[claiming("a", &all, 0..8), claiming("c", &all, 4..10)],
    );
    let pending: Vec<usize> = (0..10).collect();
    let tried = vec![Vec::new(); 10];
    let r = assign(&p, &pending, &tried, &[false, false]);
    assert_eq!(r[0].len() + r[1].len(), 10);
    assert!((0..4).all(|i| r[0].contains(&i)) && r[1].contains(&8) && r[1].contains(&9));
    assert_eq!((r[0].len(), r[1].len()), (5, 5), "balanced: {r:?}");
    // c dead: pages only c claims go nowhere; the rest to a.
    let r = assign(&p, &pending, &tried, &[false, true]);
    assert_eq!(r[0], (0..8).collect::<Vec<_>>());
    assert!(r[1].is_empty());
    // Everything tried at a: only c's candidates are left.
    let tried = vec![vec![0]; 10];
    let r = assign(&p, &pending, &tried, &[false, false]);
    assert!(r[0].is_empty() && r[1] == (4..10).collect::<Vec<_>>());
}

/// A fake page service: the pages it holds; down (connect fails); or sends every page wrong.
#[derive(Clone)]
struct Fake {
    held: HashSet<PageId>,
    pages: HashMap<PageId, Box<Page>>,
    wrong: bool,
    mismatched: u64,
}

impl Fetch for Fake {
    fn fetch(&mut self, ids: &[PageId]) -> Result<Vec<Option<Box<Page>>>, ServiceError> {
        Ok(ids
            .iter()
            .map(|id| {
                let held = self.held.contains(id);
                if held && self.wrong {
                    self.mismatched += 1;
                }
                (held && !self.wrong).then(|| self.pages[id].clone())
            })
            .collect())
    }
    fn mismatched(&self) -> u64 {
        self.mismatched
    }
}

fn fakes(all: &[PageId], n: u32) -> impl Fn(&str) -> Result<Fake, ServiceError> + Sync {
    let pages: HashMap<PageId, Box<Page>> = (0..n).map(|i| (all[i as usize], page(i))).collect();
    let n = all.len();
    let holding = |r: std::ops::Range<usize>| {
        all[r.start.min(n)..r.end.min(n)]
            .iter()
            .copied()
            .collect::<HashSet<_>>()
    };
    let table: HashMap<&'static str, (HashSet<PageId>, bool)> = HashMap::from([
        ("a", (holding(0..60), false)),
        ("c", (holding(40..90), false)),
        ("liar", (holding(0..100), true)),
    ]);
    move |addr: &str| match table.get(addr) {
        Some((held, wrong)) => Ok(Fake {
            held: held.clone(),
            pages: pages.clone(),
            wrong: *wrong,
            mismatched: 0,
        }),
        None => Err(ServiceError::Malformed("host down")),
    }
}

#[test]
fn pull_fetches_from_several_hosts_and_survives_down_and_lying_ones() {
    let all = ids(100);
    // "down" and "liar" claim everything and rank first; a and c hold the truth except
    // 90..100, which nobody has.
    let hosts = vec![
        claiming("a", &all, 0..60),
        claiming("c", &all, 40..90),
        claiming("down", &all, 0..100),
        claiming("liar", &all, 0..100),
    ];
    let p = plan(&all, &hosts);
    let mut kept = Vec::new();
    let report = pull(&all, &p, fakes(&all, 100), |batch| {
        for (id, data) in batch {
            assert!(id.matches((*data).try_into().unwrap()));
            kept.push(*id);
        }
        Ok::<_, ()>(())
    })
    .unwrap();
    kept.sort_unstable();
    let mut want = all[..90].to_vec();
    want.sort_unstable();
    assert_eq!(kept, want);
    assert_eq!(
        (report.wanted, report.fetched, report.missing),
        (100, 90, 10)
    );
    let fig = |n: &str| report.hosts.iter().find(|h| h.name == n).unwrap().clone();
    let (a, c, down, liar) = (fig("a"), fig("c"), fig("down"), fig("liar"));
    assert!(a.pages > 0 && c.pages > 0, "{report:?}");
    assert_eq!(a.pages + c.pages, 90);
    assert_eq!(a.bytes, a.pages * PAGE_SIZE as u64);
    assert!(down.error.is_some() && down.pages == 0 && down.misses == down.asked);
    assert!(liar.pages == 0 && liar.wrong == liar.asked && liar.misses == liar.asked);
    assert!(liar.asked > 0 && down.asked > 0);
    // Every page was asked of each claiming host at most once.
    let asked: u64 = report.hosts.iter().map(|h| h.asked).sum();
    assert!(asked <= 60 + 50 + 100 + 100);
}

#[test]
fn nothing_to_fetch_or_nobody_claims_or_the_sink_fails() {
    let all = ids(20);
    let none = plan(&all, &[]);
    let r = pull(&all, &none, fakes(&all, 20), |_| Ok::<_, ()>(())).unwrap();
    assert_eq!((r.fetched, r.missing, r.rounds), (0, 20, 0));
    let r = pull(&[], &plan(&[], &[]), fakes(&all, 20), |_| Ok::<_, ()>(())).unwrap();
    assert_eq!((r.wanted, r.missing), (0, 0));
    let p = plan(&all, &[claiming("a", &all, 0..20)]);
    let e = pull(&all, &p, fakes(&all, 20), |_| Err("disk full"));
    assert_eq!(e.unwrap_err(), "disk full");
}
