//! How fast ksmd scans while the leader has pages to merge: the rate (a pure [`Tuner`] over
//! ksmd's progress) and applying it ([`Ksmd`]), with the host's own settings saved in the
//! registry first and given back once merging is done.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ksm;
use super::leader::write_json;

/// Merged pages within this fraction of the target count as converged.
const CONVERGED: f64 = 0.99;
/// Passes over the marked pages without progress after which the fast scan stops.
const PLATEAU_PASSES: u64 = 4;
/// Fast scan: ksmd's batch is this fraction of the marked pages (clamped below)...
const FAST_BATCH_DIVISOR: u64 = 20;
const FAST_BATCH_MIN: u64 = 1_000;
const FAST_BATCH_MAX: u64 = 50_000;
/// ...with this sleep between batches...
const FAST_SLEEP_MS: u64 = 10;
/// ...and ksmd at this nice value at most (the kernel starts it at 5). With the scheduler's
/// autogroups, every process of a session counts as one nice-0 task against ksmd, however
/// niced its members are: at 5, ksmd got 10-40% of a core against ten busy guests.
const FAST_NICE: i32 = 0;

/// KSM settings saved before the leader raised them (`ksm.tuning` in the registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The host's `pages_to_scan`.
    pub pages_to_scan: u64,
    /// The host's `sleep_millisecs`.
    pub sleep_millisecs: u64,
    /// ksmd's nice value, when the leader changed it.
    #[serde(default)]
    pub ksmd_nice: Option<i32>,
}

/// How far ksmd has scanned: its `full_scans` and `pages_scanned` counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scans {
    /// Full scans of every mergeable area.
    pub full: u64,
    /// Pages scanned (0 where the kernel does not count them).
    pub pages: u64,
}

impl Scans {
    /// The counters now.
    pub fn of(global: &ksm::Global) -> Self {
        Self {
            full: global.full_scans,
            pages: global.pages_scanned,
        }
    }

    /// Complete passes over `marked` pages since `since`: full scans that ended, but no more
    /// than the pages scanned allow (a scan that was half done when the pages were marked
    /// ends without having seen them all).
    pub fn passes_since(&self, since: Scans, marked: u64) -> u64 {
        let full = self.full.saturating_sub(since.full);
        if self.pages == 0 {
            return full.saturating_sub(1);
        }
        full.min(self.pages.saturating_sub(since.pages) / marked.max(1))
    }
}

/// What the ksmd tuning wants now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Scan fast: `(pages_to_scan, sleep_millisecs)`.
    Fast(u64, u64),
    /// The host's own settings.
    Normal,
}

/// Decides the scan rate from the target and progress; pure, so it is tested alone.
#[derive(Debug, Default)]
pub struct Tuner {
    best_merged: u64,
    at_best: Scans,
}

impl Tuner {
    /// Starts over (pages newly marked): progress is measured from here.
    pub fn reset(&mut self, scans: Scans) {
        self.best_merged = 0;
        self.at_best = scans;
    }

    /// The rate for `merged` of `target` pages merged, ksmd at `scans`, with `marked` pages
    /// mergeable in the planned VMs.
    pub fn want(&mut self, target: u64, merged: u64, scans: Scans, marked: u64) -> Want {
        if merged > self.best_merged + target / 1000 {
            self.best_merged = merged;
            self.at_best = scans;
        }
        let converged = merged as f64 >= CONVERGED * target as f64;
        let plateau = scans.passes_since(self.at_best, marked) >= PLATEAU_PASSES;
        if target == 0 || converged || plateau {
            return Want::Normal;
        }
        let batch = (marked / FAST_BATCH_DIVISOR).clamp(FAST_BATCH_MIN, FAST_BATCH_MAX);
        Want::Fast(batch, FAST_SLEEP_MS)
    }
}

/// Applies a [`Want`] to the host's ksmd, saving its settings (in the registry, so a leader
/// that takes over from one that died can give them back) before raising them.
#[derive(Debug)]
pub struct Ksmd {
    path: PathBuf,
    saved: Option<Saved>,
    failed: bool,
}

impl Ksmd {
    /// The tuning state of the registry `dir`: settings a leader that died with ksmd raised
    /// left there are picked up, to be given back.
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("ksm.tuning");
        let saved = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        Self {
            path,
            saved,
            failed: false,
        }
    }

    /// Applies `want` (`global`: the knobs now); returns whether ksmd runs fast. After a
    /// failure to set a knob (not root), leaves ksmd alone from then on.
    pub fn apply(&mut self, want: Want, global: &ksm::Global) -> bool {
        if self.failed {
            return false;
        }
        let result = match (want, self.saved) {
            (Want::Fast(batch, sleep), _) => self.fast(batch, sleep, global),
            (Want::Normal, Some(saved)) => self.restore(saved),
            (Want::Normal, None) => Ok(()),
        };
        if let Err(e) = result {
            log::warn!("sharing: cannot tune ksmd, leaving its settings alone: {e}");
            self.failed = true;
            return false;
        }
        self.saved.is_some()
    }

    fn fast(&mut self, batch: u64, sleep: u64, global: &ksm::Global) -> Result<(), ksm::KsmError> {
        let saved = *self.saved.get_or_insert_with(|| {
            let nice = ksm::ksmd_nice().filter(|&n| n > FAST_NICE);
            let saved = Saved {
                pages_to_scan: global.pages_to_scan,
                sleep_millisecs: global.sleep_millisecs,
                ksmd_nice: nice,
            };
            write_json(&self.path, &saved);
            if nice.is_some() {
                // Best effort: the rate matters more than the priority.
                if let Err(e) = ksm::set_ksmd_nice(FAST_NICE) {
                    log::warn!("sharing: {e}");
                }
            }
            saved
        });
        let sleep = sleep.min(saved.sleep_millisecs);
        if global.pages_to_scan != batch {
            ksm::write("pages_to_scan", batch)?;
        }
        if global.sleep_millisecs != sleep {
            ksm::write("sleep_millisecs", sleep)?;
        }
        Ok(())
    }

    fn restore(&mut self, saved: Saved) -> Result<(), ksm::KsmError> {
        ksm::write("pages_to_scan", saved.pages_to_scan)?;
        ksm::write("sleep_millisecs", saved.sleep_millisecs)?;
        if let Some(nice) = saved.ksmd_nice {
            if let Err(e) = ksm::set_ksmd_nice(nice) {
                log::warn!("sharing: {e}");
            }
        }
        self.saved = None;
        let _ = fs::remove_file(&self.path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scans(full: u64, pages: u64) -> Scans {
        Scans { full, pages }
    }

    #[test]
    fn fast_until_converged() {
        let mut tuner = Tuner::default();
        tuner.reset(scans(10, 0));
        assert_eq!(
            tuner.want(0, 0, scans(10, 0), 0),
            Want::Normal,
            "nothing to merge"
        );
        assert_eq!(
            tuner.want(100_000, 0, scans(10, 0), 200_000),
            Want::Fast(10_000, FAST_SLEEP_MS)
        );
        assert_eq!(
            tuner.want(100_000, 50_000, scans(11, 0), 4_000),
            Want::Fast(FAST_BATCH_MIN, FAST_SLEEP_MS)
        );
        assert_eq!(
            tuner.want(100_000, 99_500, scans(12, 0), 4_000),
            Want::Normal
        );
    }

    #[test]
    fn a_plateau_stops_the_fast_scan_until_pages_are_marked_again() {
        let mut tuner = Tuner::default();
        tuner.reset(scans(0, 0));
        let fast = |tuner: &mut Tuner, full, pages| {
            matches!(
                tuner.want(1000, 500, scans(full, pages), 2000),
                Want::Fast(..)
            )
        };
        assert!(fast(&mut tuner, 1, 2000), "progress");
        // Quick full scans that cannot have seen the marked pages are not passes.
        assert!(fast(&mut tuner, 30, 2100));
        assert!(fast(&mut tuner, 31, 9000));
        assert!(
            !fast(&mut tuner, 32, 10_000),
            "four passes without progress"
        );
        tuner.reset(scans(32, 10_000));
        assert!(fast(&mut tuner, 33, 11_000));
    }

    #[test]
    fn passes_need_whole_scans_and_enough_pages() {
        let since = scans(5, 1000);
        assert_eq!(scans(9, 1000 + 2 * 500).passes_since(since, 500), 2);
        assert_eq!(scans(6, 1000 + 10 * 500).passes_since(since, 500), 1);
        // Without a pages counter the scan under way when pages were marked does not count.
        assert_eq!(scans(8, 0).passes_since(scans(5, 0), 500), 2);
    }

    #[test]
    fn saved_settings_from_before_the_nice_field_still_read() {
        let old: Saved =
            serde_json::from_str(r#"{"pages_to_scan":100,"sleep_millisecs":20}"#).unwrap();
        assert_eq!(old.ksmd_nice, None);
        let new = Saved {
            ksmd_nice: Some(5),
            ..old
        };
        let text = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<Saved>(&text).unwrap(), new);
    }
}
