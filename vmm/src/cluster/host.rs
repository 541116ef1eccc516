//! What this host holds and has to spare: its running VMs' pages (through their published
//! identity tables, read with [`HostPages`]; nothing is hashed to learn them), its store's
//! pages, memory from /proc/meminfo and CPUs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::Bloom;
use fabric::live::{key_of, Key, ZERO_KEY};
use fabric::{Page, PageId, Store};

use crate::host_pages::HostPages;

/// Memory figures from /proc/meminfo, bytes: (available, total).
pub fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemAvailable:"), field("MemTotal:"))
}

/// Online CPUs.
pub fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// A summary is rebuilt from scratch at least this often (between rebuilds keys are only
/// added, so pages a VM no longer holds linger as false positives until then).
const REBUILD_EVERY: Duration = Duration::from_secs(60);

/// The pages this host holds, and the summary of them, kept up to date incrementally.
#[derive(Debug)]
pub struct Holdings {
    pages: HostPages,
    store_dir: Option<PathBuf>,
    /// Keys of the store's pages as last read (kept when the store is busy), their count
    /// and sum, and the store files' fingerprint then.
    store_keys: Vec<Key>,
    store_figures: (u64, u64),
    store_print: [u128; 6],
    /// Each indexed VM's keys as last summarised (by index in the host index).
    vm_keys: HashMap<usize, Vec<Key>>,
    bloom: Option<Bloom>,
    /// Keys the filter was sized for, and when it was built.
    capacity: u64,
    built: Instant,
    /// Pages held and of those in the store, as of the last change.
    held: (u64, u64),
}

/// A summary and its figures.
#[derive(Debug)]
pub struct Summary {
    /// The encoded filter.
    pub bytes: Vec<u8>,
    pub fp_rate: f64,
    /// Non-zero pages of running VMs plus the store's pages.
    pub pages_held: u64,
    pub store_pages: u64,
}

/// What a refresh did to the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// Keys were added (guests wrote new contents).
    Added,
    /// It was built anew (VMs came or went, the store changed, or it was due).
    Rebuilt,
}

impl Holdings {
    /// The VMs running here and the store at `store_dir`.
    pub fn open(store_dir: Option<&Path>) -> Holdings {
        Holdings {
            pages: HostPages::open(None, None).without_ranges(),
            store_dir: store_dir.map(Path::to_path_buf),
            store_keys: Vec::new(),
            store_figures: (0, 0),
            store_print: [0; 6],
            vm_keys: HashMap::new(),
            bloom: None,
            capacity: 0,
            built: Instant::now(),
            held: (0, 0),
        }
    }

    /// Re-reads what changed (VMs started or gone, the chunks of their tables that moved,
    /// the store) and updates the filter (at most `max_bytes`): keys new since the last look
    /// are added; it is rebuilt when a VM came or went, the store changed, more keys arrived
    /// than it was sized for, or every [`REBUILD_EVERY`]. [`Holdings::summary`] has the
    /// result.
    pub fn refresh(&mut self, max_bytes: usize) -> Change {
        self.pages.refresh(None);
        let store_changed = self.read_store();
        let index = self.pages.index();
        let live: Vec<usize> = index.vms().map(|(vm, _)| vm).collect();
        let held = live
            .iter()
            .filter_map(|&vm| index.keys(vm))
            .map(|k| k.iter().filter(|&&k| k != ZERO_KEY).count() as u64)
            .sum::<u64>()
            + self.store_keys.len() as u64;
        let gone = self.vm_keys.keys().any(|vm| !live.contains(vm));
        let came = live.iter().any(|vm| !self.vm_keys.contains_key(vm));
        let rebuild = gone
            || came
            || store_changed
            || held > self.capacity
            || self.built.elapsed() >= REBUILD_EVERY;
        let change = match self.bloom.as_mut() {
            Some(bloom) if !rebuild => {
                let mut added = false;
                for &vm in &live {
                    let keys = index.keys(vm).unwrap_or_default();
                    let last = self.vm_keys.get(&vm).map_or(&[][..], Vec::as_slice);
                    for (i, &key) in keys.iter().enumerate() {
                        if key != ZERO_KEY && last.get(i) != Some(&key) {
                            bloom.insert(key);
                            added = true;
                        }
                    }
                }
                if added {
                    Change::Added
                } else {
                    Change::None
                }
            }
            _ => {
                // Room for a quarter more keys before the next rebuild.
                self.capacity = held + held / 4;
                let mut bloom = Bloom::with_capacity(self.capacity, max_bytes);
                let mut seen = HashSet::with_capacity(held as usize);
                let vm_keys = live.iter().filter_map(|&vm| index.keys(vm)).flatten();
                for &key in vm_keys.chain(&self.store_keys) {
                    if key != ZERO_KEY && seen.insert(key) {
                        bloom.insert(key);
                    }
                }
                self.bloom = Some(bloom);
                self.built = Instant::now();
                self.held = (held, self.store_keys.len() as u64);
                Change::Rebuilt
            }
        };
        self.vm_keys.retain(|vm, _| live.contains(vm));
        for &vm in &live {
            let last = self.vm_keys.entry(vm).or_default();
            last.clear();
            last.extend_from_slice(index.keys(vm).unwrap_or_default());
        }
        if change == Change::Added {
            self.held = (held, self.store_keys.len() as u64);
        }
        change
    }

    /// The filter as it stands, encoded, with its figures.
    pub fn summary(&self) -> Option<Summary> {
        let bloom = self.bloom.as_ref()?;
        Some(Summary {
            bytes: bloom.encode(),
            fp_rate: bloom.fp_rate(),
            pages_held: self.held.0,
            store_pages: self.held.1,
        })
    }

    /// Reads the store's keys when its files moved ([`fabric::fingerprint`]: the store is
    /// not opened, so not locked, otherwise); true when the set of pages changed. A store
    /// busy now keeps the keys read last time and is read at a later refresh.
    fn read_store(&mut self) -> bool {
        let Some(dir) = self.store_dir.as_ref().filter(|d| d.exists()) else {
            return false;
        };
        let print = fabric::fingerprint(dir);
        if print == self.store_print {
            return false;
        }
        let Ok(store) = Store::open(dir) else {
            log::debug!("store {} busy: its summary keys are kept", dir.display());
            return false;
        };
        self.store_print = print;
        let keys: Vec<Key> = store.ids().map(|id| key_of(Some(*id))).collect();
        let figures = (
            keys.len() as u64,
            keys.iter().fold(0u64, |a, &k| a.wrapping_add(k)),
        );
        if figures == self.store_figures {
            return false;
        }
        self.store_figures = figures;
        self.store_keys = keys;
        true
    }

    /// Fills `out[i]` with page `ids[i]` where this host holds it: copied from a running VM
    /// (re-hashed by [`HostPages`]) or read from the store (checked on read).
    pub fn fetch(&self, ids: &[PageId], out: &mut [Page]) -> Vec<bool> {
        use fabric::migration::PageSource;
        let mut held: Vec<bool> = ids
            .iter()
            .zip(out.iter_mut())
            .map(|(id, page)| self.pages.fetch(id, page))
            .collect();
        if held.iter().all(|&h| h) {
            return held;
        }
        let store = self
            .store_dir
            .as_ref()
            .filter(|d| d.exists())
            .and_then(|d| Store::open(d).ok());
        if let Some(store) = store {
            for ((id, page), held) in ids.iter().zip(out.iter_mut()).zip(held.iter_mut()) {
                if !*held {
                    *held = store.get(id, page).is_ok();
                }
            }
        }
        held
    }
}
