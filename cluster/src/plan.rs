//! Planning `fabvm cluster drain` and `pack` (pure functions over host records, summaries
//! and the VMs' page keys; the agents and migrations are the caller's business).
//!
//! - **drain HOST**: VMs largest first, each to the best-ranked other host
//!   ([`crate::place::rank`]: pages held, then free memory and CPU) where it fits, counting
//!   memory and VMs already promised to earlier VMs of the plan, and counting the pages of a
//!   VM planned onto a host as held there (so VMs that share pages follow each other). Or,
//!   for comparison, a uniformly random host among those where it fits.
//! - **pack**: hosts in order of load (memory of their VMs, least first); a host is emptied
//!   when every one of its VMs (largest first) fits on hosts that stay on, each to the one
//!   holding most of its pages, then the fullest that fits (best fit); hosts that received
//!   VMs stay on. The hosts emptied (and those that had no VM) can be switched off.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::bloom::Bloom;
use crate::place::{rank, Placement, W_HELD};
use crate::record::HostRecord;

/// A VM to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// The host it runs on.
    pub host: String,
    pub pid: u32,
    /// Guest memory, bytes.
    pub mem: u64,
    /// Distinct non-zero pages.
    pub pages: u64,
    /// Its page keys (all, or a sample: see `control::sample_keys`).
    pub keys: Vec<u64>,
}

/// How a destination is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The best-ranked host (pages held, then memory and CPU).
    Overlap,
    /// A random host where the VM fits (seeded), for comparison.
    Random(u64),
}

/// One VM's planned move.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Move {
    pub from: String,
    pub pid: u32,
    pub mem: u64,
    pub pages: u64,
    /// Where it goes; `None`: no host has room.
    pub to: Option<String>,
    pub to_addr: Option<String>,
    /// Share of its pages the destination holds (estimated from its summary).
    pub held: f64,
    pub score: f64,
}

/// What `pack` would do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PackPlan {
    pub moves: Vec<Move>,
    /// Hosts left without VMs: these can be switched off.
    pub switch_off: Vec<String>,
    /// Hosts that stay on.
    pub keep: Vec<String>,
}

/// The cluster as the plan goes: memory and VMs promised, pages planned in.
#[derive(Debug, Clone)]
struct Cluster {
    hosts: Vec<(HostRecord, Option<Bloom>)>,
}

impl Cluster {
    /// Places `vm` on one of the hosts `allowed` accepts and books it there.
    fn place(
        &mut self,
        vm: &Vm,
        allowed: impl Fn(&str) -> bool,
        choose: &mut dyn FnMut(&[Placement]) -> Option<usize>,
    ) -> Move {
        let candidates: Vec<(HostRecord, Option<Bloom>)> = self
            .hosts
            .iter()
            .filter(|(h, _)| allowed(&h.name))
            .cloned()
            .collect();
        let ranked = rank(&candidates, &vm.keys, vm.mem);
        let fitting: Vec<Placement> = ranked.into_iter().filter(|p| p.fits).collect();
        let chosen = choose(&fitting).and_then(|i| fitting.get(i));
        let mut mv = Move {
            from: vm.host.clone(),
            pid: vm.pid,
            mem: vm.mem,
            pages: vm.pages,
            to: None,
            to_addr: None,
            held: 0.0,
            score: 0.0,
        };
        if let Some(p) = chosen {
            let (host, bloom) = self
                .hosts
                .iter_mut()
                .find(|(h, _)| h.name == p.name)
                .expect("a candidate");
            host.mem_available = host.mem_available.saturating_sub(vm.mem);
            host.vms += 1;
            if let Some(bloom) = bloom {
                vm.keys.iter().for_each(|&k| bloom.insert(k));
            }
            mv.to = Some(p.name.clone());
            mv.to_addr = Some(p.addr.clone());
            mv.held = p.held;
            mv.score = p.score;
        }
        mv
    }
}

/// VMs largest first (ties by host and pid): the big ones find room while there is most.
fn largest_first<'a>(vms: impl Iterator<Item = &'a Vm>) -> Vec<&'a Vm> {
    let mut v: Vec<&Vm> = vms.collect();
    v.sort_by(|a, b| {
        b.mem
            .cmp(&a.mem)
            .then(a.host.cmp(&b.host))
            .then(a.pid.cmp(&b.pid))
    });
    v
}

/// Plans moving every VM of `source` (those of `vms` on it) to other `hosts`.
pub fn plan_drain(
    source: &str,
    vms: &[Vm],
    hosts: &[(HostRecord, Option<Bloom>)],
    strategy: Strategy,
) -> Vec<Move> {
    let mut cluster = Cluster {
        hosts: hosts.to_vec(),
    };
    let mut rng = match strategy {
        Strategy::Random(seed) => Some(fastrand::Rng::with_seed(seed)),
        Strategy::Overlap => None,
    };
    let mut choose = |fitting: &[Placement]| match rng.as_mut() {
        _ if fitting.is_empty() => None,
        Some(rng) => Some(rng.usize(..fitting.len())),
        None => Some(0),
    };
    largest_first(vms.iter().filter(|v| v.host == source))
        .into_iter()
        .map(|vm| cluster.place(vm, |h| h != source, &mut choose))
        .collect()
}

/// Plans consolidating `vms` onto as few of `hosts` as memory allows. A host whose record
/// counts VMs that `vms` does not list (its agent did not answer) stays on.
pub fn plan_pack(vms: &[Vm], hosts: &[(HostRecord, Option<Bloom>)]) -> PackPlan {
    let load = |name: &str| -> u64 { vms.iter().filter(|v| v.host == name).map(|v| v.mem).sum() };
    let mut order: Vec<&HostRecord> = hosts.iter().map(|(h, _)| h).collect();
    order.sort_by(|a, b| load(&a.name).cmp(&load(&b.name)).then(a.name.cmp(&b.name)));
    let mut cluster = Cluster {
        hosts: hosts.to_vec(),
    };
    let mut off: BTreeSet<String> = BTreeSet::new();
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut moves = Vec::new();
    // Most pages held first, then the fullest host the VM fits on (best fit).
    let mut best_fit = |fitting: &[Placement]| {
        let total = |p: &Placement| {
            hosts
                .iter()
                .find(|(h, _)| h.name == p.name)
                .map_or(1, |(h, _)| h.mem_total.max(1))
        };
        (0..fitting.len()).max_by(|&a, &b| {
            let score = |p: &Placement| {
                W_HELD * p.held + (1.0 - W_HELD) * (1.0 - p.mem_available as f64 / total(p) as f64)
            };
            score(&fitting[a])
                .total_cmp(&score(&fitting[b]))
                .then(fitting[b].name.cmp(&fitting[a].name))
        })
    };
    for host in order {
        if keep.contains(&host.name) {
            continue;
        }
        let own = largest_first(vms.iter().filter(|v| v.host == host.name));
        if own.len() < host.vms as usize {
            keep.insert(host.name.clone());
            continue;
        }
        let mut trial = cluster.clone();
        let planned: Vec<Move> = own
            .iter()
            .map(|vm| trial.place(vm, |h| h != host.name && !off.contains(h), &mut best_fit))
            .collect();
        if planned.iter().all(|m| m.to.is_some()) {
            cluster = trial;
            off.insert(host.name.clone());
            keep.extend(planned.iter().filter_map(|m| m.to.clone()));
            moves.extend(planned);
        } else {
            keep.insert(host.name.clone());
        }
    }
    PackPlan {
        moves,
        switch_off: off.into_iter().collect(),
        keep: keep.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bloom::DEFAULT_MAX_BYTES;

    const GIB: u64 = 1 << 30;

    fn host(name: &str, avail_gib: u64, vms: u32) -> (HostRecord, Option<Bloom>) {
        host_with(name, avail_gib, vms, 0..0)
    }

    fn host_with(
        name: &str,
        avail_gib: u64,
        vms: u32,
        keys: std::ops::Range<u64>,
    ) -> (HostRecord, Option<Bloom>) {
        let mut b = Bloom::with_capacity(100_000, DEFAULT_MAX_BYTES);
        keys.for_each(|k| b.insert(k));
        let r = HostRecord {
            mem_available: avail_gib * GIB,
            mem_total: 16 * GIB,
            cpus: 4,
            vms,
            ..crate::record::test_host(name)
        };
        (r, Some(b))
    }

    fn vm(host: &str, pid: u32, mem_gib: u64, keys: std::ops::Range<u64>) -> Vm {
        let keys: Vec<u64> = keys.collect();
        Vm {
            host: host.into(),
            pid,
            mem: mem_gib * GIB,
            pages: keys.len() as u64,
            keys,
        }
    }

    fn dests(moves: &[Move]) -> Vec<(u32, Option<&str>)> {
        moves.iter().map(|m| (m.pid, m.to.as_deref())).collect()
    }

    #[test]
    fn drain_follows_the_pages_and_never_the_source() {
        let hosts = [
            host_with("src", 10, 2, 1..20_000),
            host_with("b", 8, 1, 1..10_000),
            host_with("c", 8, 1, 10_000..20_000),
            host("d", 14, 0),
        ];
        let vms = [vm("src", 1, 1, 1..10_000), vm("src", 2, 1, 10_000..20_000)];
        let plan = plan_drain("src", &vms, &hosts, Strategy::Overlap);
        assert_eq!(dests(&plan), [(1, Some("b")), (2, Some("c"))]);
        assert!(plan.iter().all(|m| m.held > 0.95 && m.from == "src"));
        // VMs of other hosts are not moved.
        let other = [vm("b", 9, 1, 1..10)];
        assert!(plan_drain("src", &other, &hosts, Strategy::Overlap).is_empty());
    }

    #[test]
    fn drain_counts_memory_promised_and_pages_planned_in() {
        // Nobody holds the pages: the first VM goes to the roomiest host; d can take one
        // 5 GiB VM only, so the second goes elsewhere; the third shares the first's pages and
        // follows it.
        let hosts = [
            host("src", 1, 3),
            host("b", 6, 0),
            host("c", 6, 0),
            host("d", 7, 0),
        ];
        let vms = [
            vm("src", 1, 5, 1..5_000),
            vm("src", 2, 5, 5_000..10_000),
            vm("src", 3, 1, 1..5_000),
        ];
        let plan = plan_drain("src", &vms, &hosts, Strategy::Overlap);
        assert_eq!(
            dests(&plan),
            [(1, Some("d")), (2, Some("b")), (3, Some("d"))]
        );
        // Too big for anyone: planned nowhere, the others still placed.
        let vms = [vm("src", 1, 9, 1..10), vm("src", 2, 1, 1..10)];
        let plan = plan_drain("src", &vms, &hosts, Strategy::Overlap);
        assert_eq!(plan[0].to, None);
        assert!(plan[1].to.is_some());
    }

    #[test]
    fn random_placement_only_picks_hosts_with_room_and_varies() {
        let hosts = [
            host("src", 10, 1),
            host("b", 8, 0),
            host("c", 8, 0),
            host("full", 0, 0),
        ];
        let vms = [vm("src", 1, 1, 1..100)];
        let mut seen = BTreeSet::new();
        for seed in 0..40 {
            let plan = plan_drain("src", &vms, &hosts, Strategy::Random(seed));
            let to = plan[0].to.clone().unwrap();
            assert!(to == "b" || to == "c", "{to}");
            seen.insert(to);
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn pack_empties_the_least_loaded_hosts() {
        // a: two VMs, b: one, c: none. c goes off at once, b's VM moves to a (which holds
        // its pages), a stays.
        let hosts = [
            host_with("a", 10, 2, 1..3_000),
            host_with("b", 10, 1, 2_000..3_000),
            host("c", 10, 0),
        ];
        let vms = [
            vm("a", 1, 1, 1..1_000),
            vm("a", 2, 1, 1_000..2_000),
            vm("b", 3, 1, 2_000..3_000),
        ];
        let plan = plan_pack(&vms, &hosts);
        assert_eq!(plan.switch_off, ["b", "c"]);
        assert_eq!(plan.keep, ["a"]);
        assert_eq!(dests(&plan.moves), [(3, Some("a"))]);
    }

    #[test]
    fn pack_keeps_hosts_whose_vms_do_not_fit_or_are_unknown() {
        let hosts = [host("a", 2, 1), host("b", 2, 1), host("c", 10, 3)];
        // a's 3 GiB VM fits nowhere but c, b's VM is unlisted: a empties into c, b stays.
        let vms = [vm("a", 1, 3, 1..10), vm("c", 2, 1, 1..10)];
        let plan = plan_pack(&vms, &hosts);
        assert_eq!(plan.switch_off, ["a"]);
        assert_eq!(plan.keep, ["b", "c"]);
        assert_eq!(dests(&plan.moves), [(1, Some("c"))]);
        // Nothing fits anywhere: nothing moves.
        let hosts = [host("a", 0, 1), host("b", 0, 1)];
        let vms = [vm("a", 1, 1, 1..10), vm("b", 2, 1, 1..10)];
        let plan = plan_pack(&vms, &hosts);
        assert!(plan.moves.is_empty() && plan.switch_off.is_empty());
    }
}
