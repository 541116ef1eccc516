//! The sharing leader: one fabvm per host (whichever guided VM holds the registry's lock)
//! keeps the identity index of the guided VMs, writes each one's plan of ranges to mark
//! mergeable (see [`super::plan`]), and tunes ksmd: a fast scan while known potential is
//! not merged yet, back to the host's own settings once it is (or once merging stops
//! making progress). The leader runs on the agent thread of its VM; when that VM exits,
//! another guided VM takes the lock and carries on from the files in the registry.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fabric::live::Request;
use fabric::PAGE_SIZE;
use serde::{Deserialize, Serialize};

use super::index::{self, Key, VmPages};
use super::ksm::{self, ProcessStat};
use super::plan::{self, VmPlan};
use super::tuning::{Ksmd, Scans, Tuner, Want};
use super::{Registered, ShareMode};
use crate::host_index::RegisteredVm;

/// A VM is sampled (every [`SAMPLE_STRIDE`]th page of its published identities) until its
/// memory holds still: two samples taken [`SAMPLE_CPU_MS`] of the VM's own CPU time apart
/// differ in at most [`SETTLED_CHANGE`] of their pages, and at most that many of its pages
/// are stale. Counting the VM's CPU time rather than wall time keeps a VM the host hardly
/// ran (a loaded host, a niced VM) from looking settled. A sample that finds stale pages
/// asks the VM for a sync, so the next one sees its memory as it is rather than as far as
/// its background budget has got.
const SAMPLE_STRIDE: usize = 64;
/// CPU time a VM must have used between two samples.
const SAMPLE_CPU_MS: u64 = 100;
/// Sampled pages that may change between two samples of a VM that holds still.
const SETTLED_CHANGE: f64 = 0.001;
/// A VM that never holds still is planned anyway after this many samples...
const MAX_SAMPLES: u32 = 20;
/// ...or this long.
const MAX_SETTLE: Duration = Duration::from_secs(60);
/// When KSM has merged more than this much beyond the target, the index is behind the
/// guests: every VM is hashed again (at most every [`FIRST_REFRESH`]).
const STALE: f64 = 1.01;
/// Full hashes per tick stop after this many bytes (at least one VM is hashed), so the
/// leader keeps releasing stages and tuning while a host full of VMs is indexed.
const HASH_PER_TICK: u64 = 512 << 20;
/// Settled VMs are hashed again this often (guests change what they hold)...
const REFRESH: Duration = Duration::from_secs(120);
/// ...and once soon after the first hash, in case they were still filling (refreshes wait
/// while ksmd runs fast).
const FIRST_REFRESH: Duration = Duration::from_secs(10);
/// A refresh that finds more than this fraction of pages changed re-plans.
const REPLAN_CHANGE: f64 = 0.02;
/// Plans are rewritten at most this often while VMs keep arriving.
const REPLAN_EVERY: Duration = Duration::from_secs(1);
/// Stage 2 starts when the anchors have merged this fraction of their stage-1 pages...
const STAGE1_DONE: f64 = 0.9;
/// ...or after this many passes over the marked pages since stage 1 was marked.
const STAGE1_PASSES: u64 = 3;
/// The leader's published state (`sharing.status` in the registry), for `fabvm host stats`
/// and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The leader's pid.
    pub leader: u32,
    /// Plan generation.
    pub epoch: u64,
    /// Guided VMs known.
    pub vms: usize,
    /// Of those, settled and planned.
    pub planned_vms: usize,
    /// Pages the plan expects KSM to merge (pages with a twin, zero pages included).
    pub target_pages: u64,
    /// Pages of the planned VMs KSM has merged (`ksm_merging_pages` + `ksm_zero_pages`).
    pub merged_pages: u64,
    /// Pages marked mergeable in the planned VMs, as written in their plans.
    pub marked_pages: u64,
    /// Stage-1 pages.
    pub stage1_pages: u64,
    /// Whether stage 2 has been released.
    pub stage2: bool,
    /// Whether ksmd runs at the fast rate now.
    pub fast: bool,
    /// Bytes read and hashed so far by this leader (samples included).
    pub hashed_bytes: u64,
    /// Time spent hashing so far.
    pub hash_ms: u64,
}

/// A plan file (`PID.plan`): frame ranges to mark mergeable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanFile {
    /// Plan generation.
    pub epoch: u64,
    /// `(first guest frame, frames)`.
    pub ranges: Vec<(u64, u64)>,
}

/// The file names in the registry directory.
pub fn plan_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.plan"))
}
fn status_path(dir: &Path) -> PathBuf {
    dir.join("sharing.status")
}
/// Reads the leader's last published status.
pub fn read_status(dir: &Path) -> Option<Status> {
    serde_json::from_slice(&fs::read(status_path(dir)).ok()?).ok()
}

/// One guided VM as the leader follows it.
#[derive(Debug)]
struct Tracked {
    vm: RegisteredVm,
    started_ms: u64,
    sample: Option<Vec<Key>>,
    samples: u32,
    /// The VM's CPU time at the last sample.
    cpu_ms: u64,
    first_seen: Instant,
    hashes: u32,
    next_look: Instant,
    /// Its memory held still between two samples (or it was sampled often enough).
    ready: bool,
    pages: Option<VmPages>,
    plan: VmPlan,
    released: bool,
    /// The ranges last written to its plan file.
    written: Vec<(u64, u64)>,
}

impl Tracked {
    fn settled(&self) -> bool {
        self.pages.is_some()
    }
}

/// The leader's state.
#[derive(Debug)]
pub struct Leader {
    dir: PathBuf,
    tracked: HashMap<u32, Tracked>,
    replan: bool,
    planned_at: Instant,
    stage1_at: Scans,
    stage1_marked: u64,
    tuner: Tuner,
    ksmd: Ksmd,
    status: Status,
}

impl Leader {
    /// Becomes the leader for the registry `dir` (the caller holds its lock).
    pub fn new(dir: PathBuf) -> Self {
        let ksmd = Ksmd::new(&dir);
        let status = Status {
            leader: std::process::id(),
            epoch: read_status(&dir).map_or(0, |s| s.epoch),
            ..Status::default()
        };
        Self {
            dir,
            tracked: HashMap::new(),
            replan: false,
            planned_at: Instant::now(),
            stage1_at: Scans::default(),
            stage1_marked: 0,
            tuner: Tuner::default(),
            ksmd,
            status,
        }
    }

    /// One round: follow the guided VMs, hash what is due, plan, release stage 2, tune.
    pub fn tick(&mut self) {
        let now = Instant::now();
        self.follow(now);
        self.look(now);
        let global = ksm::Global::read().unwrap_or_default();
        let scans = Scans::of(&global);
        if self.replan && now.duration_since(self.planned_at) >= REPLAN_EVERY {
            self.plan(scans);
            self.planned_at = now;
        }
        let merged: HashMap<u32, u64> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.settled())
            .map(|(&pid, _)| (pid, ProcessStat::read(pid).merged()))
            .collect();
        self.release_stage2(&merged, scans);
        self.status.merged_pages = merged.values().sum();
        let target = self.status.target_pages as f64;
        if target > 0.0
            && self.status.merged_pages as f64 > STALE * target
            && now.duration_since(self.planned_at) >= FIRST_REFRESH
        {
            log::debug!("sharing: KSM merged beyond the plan's target: hashing every VM again");
            for t in self.tracked.values_mut().filter(|t| t.settled()) {
                t.next_look = now;
            }
            self.planned_at = now;
        }
        let want = self.tuner.want(
            self.status.target_pages,
            self.status.merged_pages,
            scans,
            self.status.marked_pages,
        );
        log::debug!(
            "sharing: epoch {} target {} merged {} scans {scans:?} -> {want:?}",
            self.status.epoch,
            self.status.target_pages,
            self.status.merged_pages,
        );
        self.status.fast = self.ksmd.apply(want, &global);
        self.status.vms = self.tracked.len();
        self.status.planned_vms = self.tracked.values().filter(|t| t.settled()).count();
        write_json(&status_path(&self.dir), &self.status);
    }

    /// Gives the host its ksmd settings back (the leader's VM is exiting).
    pub fn step_down(&mut self) {
        let global = ksm::Global::read().unwrap_or_default();
        self.status.fast = self.ksmd.apply(Want::Normal, &global);
    }

    /// Adds new guided VMs, forgets the ones that are gone.
    fn follow(&mut self, now: Instant) {
        let registered = super::registered(&self.dir);
        let guided: HashMap<u32, (&RegisteredVm, &Registered)> = registered
            .iter()
            .filter(|(_, r)| r.mode == ShareMode::Guided)
            .map(|(vm, r)| (vm.pid, (vm, r)))
            .collect();
        let before = self.tracked.len();
        self.tracked.retain(|pid, t| {
            let keep = guided.contains_key(pid);
            if !keep && t.settled() {
                let _ = fs::remove_file(plan_path(&self.dir, *pid));
            }
            keep
        });
        if self.tracked.len() != before {
            self.replan = true;
        }
        for (pid, (vm, registered)) in guided {
            self.tracked.entry(pid).or_insert_with(|| Tracked {
                vm: vm.clone(),
                started_ms: registered.started_ms,
                sample: None,
                samples: 0,
                cpu_ms: 0,
                hashes: 0,
                first_seen: now,
                next_look: now,
                ready: false,
                pages: None,
                plan: VmPlan::default(),
                released: false,
                written: Vec::new(),
            });
        }
    }

    /// Samples VMs that are settling; hashes those that hold still (all cores: planning
    /// waits for it) and those due a refresh (one core), [`HASH_PER_TICK`] at a time.
    fn look(&mut self, now: Instant) {
        let started = Instant::now();
        let mut gone = Vec::new();
        for (&pid, t) in self.tracked.iter_mut() {
            if t.ready {
                continue;
            }
            let Some(cpu_ms) = ksm::cpu_ms(pid) else {
                gone.push(pid);
                continue;
            };
            let overdue = now.duration_since(t.first_seen) >= MAX_SETTLE;
            if t.sample.is_some() && cpu_ms < t.cpu_ms + SAMPLE_CPU_MS && !overdue {
                continue;
            }
            let Some((sample, stale)) = sample(&t.vm) else {
                gone.push(pid);
                continue;
            };
            self.status.hashed_bytes += (sample.len() * PAGE_SIZE) as u64;
            let still = stale <= SETTLED_CHANGE
                && t.sample
                    .as_ref()
                    .is_some_and(|old| changed(old, &sample) <= SETTLED_CHANGE);
            t.cpu_ms = cpu_ms;
            t.samples += 1;
            t.sample = Some(sample);
            t.ready = still || t.samples >= MAX_SAMPLES || overdue;
            if t.ready {
                log::debug!("sharing: VM {pid} settled after {} samples", t.samples);
                t.next_look = now;
            }
        }
        // VMs never hashed first, oldest first (they anchor the plan); then refreshes, but not
        // while ksmd runs fast for the plan: on a small host they would take its CPU.
        let merging = self.status.fast;
        let mut due: Vec<u32> = self
            .tracked
            .iter()
            .filter(|(_, t)| {
                (t.ready && !t.settled()) || (t.settled() && t.next_look <= now && !merging)
            })
            .map(|(&pid, _)| pid)
            .collect();
        due.sort_by_key(|pid| (self.tracked[pid].settled(), self.tracked[pid].started_ms));
        let mut budget = 0;
        due.retain(|pid| {
            let take = budget < HASH_PER_TICK;
            budget += index::vm_bytes(&self.tracked[pid].vm);
            take
        });
        let vms: Vec<RegisteredVm> = due.iter().map(|pid| self.tracked[pid].vm.clone()).collect();
        // Their live identities, as they publish them (nothing is hashed here).
        let hashed = index::published(&vms);
        for (pid, pages) in due.into_iter().zip(hashed) {
            let Some(pages) = pages else {
                gone.push(pid);
                continue;
            };
            self.status.hashed_bytes += (pages.keys.len() * PAGE_SIZE) as u64;
            let t = self.tracked.get_mut(&pid).expect("tracked");
            let moved = t
                .pages
                .as_ref()
                .is_none_or(|old| changed(&old.keys, &pages.keys) > REPLAN_CHANGE);
            log::debug!(
                "sharing: hashed VM {pid} (hash {}), {}",
                t.hashes + 1,
                if moved { "changed" } else { "unchanged" }
            );
            if moved {
                self.replan = true;
            }
            t.pages = Some(pages);
            t.hashes += 1;
            t.next_look = now
                + if t.hashes == 1 {
                    FIRST_REFRESH
                } else {
                    REFRESH
                };
        }
        for pid in gone {
            self.tracked.remove(&pid);
            self.replan = true;
        }
        self.status.hash_ms += started.elapsed().as_millis() as u64;
    }

    /// Splits the settled VMs' pages into stages (oldest VMs anchor) and writes the plans.
    fn plan(&mut self, scans: Scans) {
        let mut order: Vec<u32> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.settled())
            .map(|(&pid, _)| pid)
            .collect();
        order.sort_by_key(|pid| (self.tracked[pid].started_ms, *pid));
        let keys: Vec<&[Key]> = order
            .iter()
            .map(|pid| {
                self.tracked[pid]
                    .pages
                    .as_ref()
                    .expect("settled")
                    .keys
                    .as_slice()
            })
            .collect();
        let plans = plan::stages(&keys);
        self.status.epoch += 1;
        self.status.target_pages = plans.iter().map(VmPlan::twins).sum();
        self.status.stage1_pages = plans.iter().map(|p| p.stage1.len() as u64).sum();
        for (pid, plan) in order.iter().zip(plans) {
            self.tracked.get_mut(pid).expect("tracked").plan = plan;
        }
        self.replan = false;
        self.write_plans();
        log::debug!(
            "sharing: plan {} for {} VMs: target {}, stage 1 {}, marked {}",
            self.status.epoch,
            order.len(),
            self.status.target_pages,
            self.status.stage1_pages,
            self.status.marked_pages
        );
        self.stage1_at = scans;
        self.stage1_marked = self.status.marked_pages;
        self.tuner.reset(scans);
    }

    /// Releases stage 2 once the anchors have merged (or enough scans went by).
    fn release_stage2(&mut self, merged: &HashMap<u32, u64>, scans: Scans) {
        let anchors: Vec<(&u32, &Tracked)> = self
            .tracked
            .iter()
            .filter(|(_, t)| !t.plan.stage1.is_empty())
            .collect();
        let stage1: u64 = anchors
            .iter()
            .map(|(_, t)| t.plan.stage1.len() as u64)
            .sum();
        let anchors_merged: u64 = anchors
            .iter()
            .map(|(pid, _)| merged.get(pid).copied().unwrap_or(0))
            .sum();
        let done = anchors_merged as f64 >= STAGE1_DONE * stage1 as f64
            || scans.passes_since(self.stage1_at, self.stage1_marked) >= STAGE1_PASSES;
        let pending = self
            .tracked
            .values()
            .any(|t| !t.released && !t.plan.stage2.is_empty());
        if done && pending {
            for t in self.tracked.values_mut() {
                t.released = true;
            }
            self.status.stage2 = true;
            self.write_plans();
            self.tuner.reset(scans);
        }
    }

    /// Writes every planned VM's plan file: stage 1, plus stage 2 once released.
    fn write_plans(&mut self) {
        let mut marked = 0;
        for (pid, t) in self.tracked.iter_mut() {
            let Some(pages) = &t.pages else { continue };
            let stage1 = t.plan.stage1.iter().chain(&t.plan.zero);
            let mut gfns: Vec<u64> = stage1.map(|&i| pages.gfn(i)).collect();
            if t.released {
                gfns.extend(t.plan.stage2.iter().map(|&i| pages.gfn(i)));
            }
            gfns.sort_unstable();
            let ranges = plan::ranges(&gfns, plan::MAX_RANGES);
            marked += ranges.iter().map(|r| r.1).sum::<u64>();
            if ranges == t.written {
                continue;
            }
            let file = PlanFile {
                epoch: self.status.epoch,
                ranges,
            };
            write_json(&plan_path(&self.dir, *pid), &file);
            t.written = file.ranges;
        }
        self.status.marked_pages = marked;
    }
}

/// Keys of every [`SAMPLE_STRIDE`]th page of `vm`, from its published identities, and the
/// fraction of its pages that are stale (None when it publishes none). A VM with stale pages
/// is asked for a sync (through the same table, without waiting for it).
fn sample(vm: &RegisteredVm) -> Option<(Vec<Key>, f64)> {
    let table = index::open_table(vm)?;
    let pages = index::read_pages(vm, &table);
    let stale = pages.stale as f64 / pages.keys.len().max(1) as f64;
    if pages.stale > 0 {
        table.request(Request::Sync, Duration::ZERO);
    }
    Some((
        pages.keys.into_iter().step_by(SAMPLE_STRIDE).collect(),
        stale,
    ))
}

/// Fraction of positions where two key lists differ.
fn changed(old: &[Key], new: &[Key]) -> f64 {
    if old.len() != new.len() || new.is_empty() {
        return 1.0;
    }
    let differ = old.iter().zip(new).filter(|(a, b)| a != b).count();
    differ as f64 / new.len() as f64
}

/// Writes a small JSON file atomically (temp file, rename); failures are logged.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = serde_json::to_vec(value)
        .map_err(std::io::Error::other)
        .and_then(|bytes| fs::write(&tmp, bytes))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        log::warn!("sharing: cannot write {}: {e}", path.display());
        let _ = fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_fraction() {
        assert_eq!(changed(&[1, 2, 3, 4], &[1, 2, 3, 4]), 0.0);
        assert_eq!(changed(&[1, 2, 3, 4], &[1, 0, 3, 4]), 0.25);
        assert_eq!(changed(&[1], &[1, 2]), 1.0);
    }
}
