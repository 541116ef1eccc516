//! Placement: rank live hosts for a VM (running, or a snapshot) by the share of its pages
//! each already holds (its identities tested against the host's summary), then by the memory
//! and CPU it has to spare.
//!
//! ```text
//! held  = (hits / pages - fp) / (1 - fp), clamped to 0..1   (fp: the summary's stated rate)
//! mem   = (available - needed) / total, clamped to 0..1
//! cpu   = 1 - vms / cpus, clamped to 0..1                   (one VM per CPU counts as full)
//! score = 0.7 held + 0.2 mem + 0.1 cpu ; hosts without room for the VM rank last, score 0
//! ```
//!
//! A host without a summary (none published yet, or one being replaced) counts as holding
//! nothing. The pages held decide first because every page held is a page not sent over the
//! network; among hosts holding about the same, the emptier one wins.

use serde::Serialize;

use crate::bloom::Bloom;
use crate::record::HostRecord;

/// Weights of the score (they sum to 1).
pub const W_HELD: f64 = 0.7;
pub const W_MEM: f64 = 0.2;
pub const W_CPU: f64 = 0.1;

/// One host's place in the ranking.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    pub name: String,
    pub addr: String,
    /// Estimated share of the VM's distinct non-zero pages the host holds.
    pub held: f64,
    /// Of the VM's pages, those its summary says it may hold.
    pub hits: u64,
    /// The VM's distinct non-zero pages tested.
    pub pages: u64,
    /// Whether the host published a summary.
    pub summary: bool,
    /// Whether its available memory covers the VM's.
    pub fits: bool,
    pub mem_available: u64,
    pub cpus: u32,
    pub vms: u32,
    pub score: f64,
}

/// Ranks `hosts` (each with its summary, if any) for a VM whose distinct non-zero page keys
/// are `keys` and whose memory is `mem` bytes: best first.
pub fn rank(hosts: &[(HostRecord, Option<Bloom>)], keys: &[u64], mem: u64) -> Vec<Placement> {
    let mut out: Vec<Placement> = hosts
        .iter()
        .map(|(h, bloom)| {
            let hits = bloom.as_ref().map_or(0, |b| {
                keys.iter().filter(|&&k| b.contains(k)).count() as u64
            });
            let held = match bloom {
                Some(b) if !keys.is_empty() => {
                    let fp = b.fp_rate().min(0.99);
                    ((hits as f64 / keys.len() as f64 - fp) / (1.0 - fp)).clamp(0.0, 1.0)
                }
                _ => 0.0,
            };
            let fits = h.mem_available >= mem;
            let mem_left = if h.mem_total == 0 {
                0.0
            } else {
                (h.mem_available.saturating_sub(mem) as f64 / h.mem_total as f64).clamp(0.0, 1.0)
            };
            let cpu = if h.cpus == 0 {
                0.0
            } else {
                (1.0 - f64::from(h.vms) / f64::from(h.cpus)).clamp(0.0, 1.0)
            };
            let score = if fits {
                W_HELD * held + W_MEM * mem_left + W_CPU * cpu
            } else {
                0.0
            };
            Placement {
                name: h.name.clone(),
                addr: h.addr.clone(),
                held,
                hits,
                pages: keys.len() as u64,
                summary: bloom.is_some(),
                fits,
                mem_available: h.mem_available,
                cpus: h.cpus,
                vms: h.vms,
                score,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.fits
            .cmp(&a.fits)
            .then(b.score.total_cmp(&a.score))
            .then(a.name.cmp(&b.name))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bloom::DEFAULT_MAX_BYTES;

    fn host(name: &str, avail_gib: u64, cpus: u32, vms: u32) -> HostRecord {
        HostRecord {
            mem_available: avail_gib << 30,
            mem_total: 24 << 30,
            cpus,
            vms,
            ..crate::record::test_host(name)
        }
    }

    fn bloom(keys: impl Iterator<Item = u64>) -> Bloom {
        let mut b = Bloom::with_capacity(100_000, DEFAULT_MAX_BYTES);
        keys.for_each(|k| b.insert(k));
        b
    }

    #[test]
    fn the_host_holding_the_pages_ranks_first() {
        let keys: Vec<u64> = (1..=10_000).collect();
        let hosts = vec![
            (host("empty", 20, 2, 0), Some(bloom(100_000..150_000))),
            (host("half", 8, 2, 1), Some(bloom(1..=5_000))),
            (host("all", 4, 2, 1), Some(bloom(1..=10_000))),
            (host("nosummary", 20, 2, 0), None),
        ];
        let r = rank(&hosts, &keys, 1 << 30);
        let names: Vec<&str> = r.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["all", "half", "empty", "nosummary"]);
        assert!(r[0].held > 0.99 && (r[1].held - 0.5).abs() < 0.02, "{r:?}");
        assert!(r[2].held < 0.01 && !r[3].summary);
    }

    #[test]
    fn memory_then_cpu_break_ties_and_hosts_without_room_go_last() {
        let keys: Vec<u64> = (1..=100).collect();
        let hosts = vec![
            (host("busy", 16, 2, 2), None),
            (host("idle", 16, 2, 0), None),
            (host("roomy", 20, 2, 2), None),
            (host("full", 1, 2, 0), Some(bloom(1..=100))),
        ];
        let r = rank(&hosts, &keys, 2 << 30);
        let names: Vec<&str> = r.iter().map(|p| p.name.as_str()).collect();
        // idle: 0.2 x 14/24 + 0.1 x 1 = 0.22; roomy: 0.2 x 18/24 = 0.15; busy: 0.2 x 14/24.
        assert_eq!(names, ["idle", "roomy", "busy", "full"]);
        assert!(!r[3].fits && r[3].score == 0.0);
    }

    #[test]
    fn no_hosts_or_no_pages() {
        assert!(rank(&[], &[1, 2], 0).is_empty());
        let r = rank(&[(host("a", 1, 1, 0), Some(bloom(0..0)))], &[], 0);
        assert_eq!((r[0].held, r[0].pages), (0.0, 0));
    }
}
