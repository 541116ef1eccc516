//! What each guided VM should hand to KSM, and when: only pages that have a twin somewhere
//! (marked `MADV_MERGEABLE`), in two stages.
//!
//! KSM merges two equal pages only after it has seen both, twice (a page goes into its
//! "unstable" tree only once its checksum held still for a whole scan), but a page equal to
//! one that is already merged (in the "stable" tree) is merged the first time it is seen.
//! So stage 1 marks, for every identity with copies, only its first two copies (in VM start
//! order, so the anchors are the oldest VMs): KSM's two slow passes run over that small set.
//! Stage 2 then marks every other copy, each merged on first sight. With N VMs sharing a
//! page, KSM reads 2·2 + (N-2) copies instead of 2·N.
//!
//! Zero pages are marked in stage 1 everywhere (KSM merges those the guest has touched with
//! each other; untouched ones hold no memory and cost the scan next to nothing) but are not
//! part of the target: the fabric cannot tell which of them are backed by memory at all.

use std::collections::HashMap;

use super::index::{Key, ZERO_KEY};

/// Most ranges a VM marks: each splits its mapping (two VMAs per range, about 200 bytes of
/// kernel memory each), and a process may have about 65,000 (`vm.max_map_count`). Pages
/// shared at random, one in two, make about a range per four pages: 16,384 ranges cover a
/// 256 MiB guest exactly (beyond that, nearby runs are joined and some unique pages marked).
pub const MAX_RANGES: usize = 16_384;

/// One VM's part of the plan, as page indices (into its [`super::index::VmPages`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmPlan {
    /// Pages among the first two copies of their identity.
    pub stage1: Vec<usize>,
    /// Every other page that has a copy.
    pub stage2: Vec<usize>,
    /// Zero pages (marked with stage 1).
    pub zero: Vec<usize>,
}

impl VmPlan {
    /// Pages with a copy somewhere (what KSM can merge).
    pub fn twins(&self) -> u64 {
        (self.stage1.len() + self.stage2.len()) as u64
    }
}

/// Splits the pages of `vms` (keys per VM, oldest VM first) into the two stages.
pub fn stages(vms: &[&[Key]]) -> Vec<VmPlan> {
    // For each identity: copies seen, and how many of the first two are placed.
    let mut copies: HashMap<Key, u32> = HashMap::new();
    for keys in vms {
        for key in keys.iter() {
            *copies.entry(*key).or_default() += 1;
        }
    }
    let mut placed: HashMap<Key, u8> = HashMap::new();
    vms.iter()
        .map(|keys| {
            let mut plan = VmPlan::default();
            for (index, key) in keys.iter().enumerate() {
                if *key == ZERO_KEY {
                    plan.zero.push(index);
                    continue;
                }
                if copies[key] < 2 {
                    continue;
                }
                let seen = placed.entry(*key).or_default();
                if *seen < 2 {
                    *seen += 1;
                    plan.stage1.push(index);
                } else {
                    plan.stage2.push(index);
                }
            }
            plan
        })
        .collect()
}

/// Sorted, disjoint frame ranges `(first gfn, pages)` covering `gfns` (sorted), at most `max`
/// of them: when exact runs are too many, runs separated by small gaps are joined (the
/// gap's pages are marked too, and KSM just finds nothing to merge there).
pub fn ranges(gfns: &[u64], max: usize) -> Vec<(u64, u64)> {
    let mut gap = 1u64;
    loop {
        let joined = join(gfns, gap);
        if joined.len() <= max.max(1) {
            return joined;
        }
        gap *= 2;
    }
}

/// Runs of `gfns`, joining runs whose gap is under `gap` frames.
fn join(gfns: &[u64], gap: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &gfn in gfns {
        match out.last_mut() {
            Some((start, len)) if gfn >= *start + *len && gfn - (*start + *len) < gap => {
                *len = gfn - *start + 1;
            }
            _ => out.push((gfn, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_two_copies_go_first() {
        // key 5 is in all three VMs, 7 in the last two, 9 twice in the first, 1 once.
        let a: &[Key] = &[5, 9, 1, 9];
        let b: &[Key] = &[7, 5];
        let c: &[Key] = &[5, 7, 0, 0];
        let plans = stages(&[a, b, c]);
        assert_eq!(plans[0].stage1, vec![0, 1, 3]);
        assert!(plans[0].stage2.is_empty());
        assert_eq!(plans[1].stage1, vec![0, 1]);
        assert_eq!(plans[2].stage1, vec![1]);
        assert_eq!(plans[2].stage2, vec![0]);
        assert_eq!(plans[2].zero, vec![2, 3]);
        assert_eq!(plans.iter().map(VmPlan::twins).sum::<u64>(), 7);
    }

    #[test]
    fn ranges_are_exact_when_few_and_joined_when_many() {
        assert_eq!(ranges(&[], 4), vec![]);
        assert_eq!(ranges(&[3, 4, 5, 9, 10], 4), vec![(3, 3), (9, 2)]);
        // Alternate pages: 50 runs; at most 10 allowed, so gaps of one page are joined.
        let odd: Vec<u64> = (0..50).map(|i| 2 * i + 1).collect();
        assert_eq!(ranges(&odd, 10), vec![(1, 99)]);
        let sparse = [0, 2, 3, 10, 11, 40];
        assert_eq!(ranges(&sparse, 3), vec![(0, 4), (10, 2), (40, 1)]);
        let r = ranges(&sparse, 2);
        assert!(r.len() <= 2);
        for gfn in sparse {
            assert!(r.iter().any(|&(s, l)| gfn >= s && gfn < s + l), "{gfn}");
        }
    }
}
