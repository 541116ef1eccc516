//! What this host holds and has to spare: its running VMs' pages (through their published
//! identity tables, read with [`HostPages`]; nothing is hashed to learn them), its store's
//! pages, memory from /proc/meminfo and CPUs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

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

/// The pages this host holds, and what changed since the last look.
#[derive(Debug)]
pub struct Holdings {
    pages: HostPages,
    store_dir: Option<PathBuf>,
    /// Keys of the store's pages as last read (kept when the store is busy).
    store_keys: Vec<Key>,
    /// What the last summary was built from: table generations and the store's figures.
    built_from: Option<(Vec<u64>, (u64, u64))>,
}

/// A summary and its figures.
#[derive(Debug)]
pub struct Summary {
    pub bloom: Bloom,
    /// Non-zero pages of running VMs plus the store's pages.
    pub pages_held: u64,
    pub store_pages: u64,
}

impl Holdings {
    /// The VMs running here and the store at `store_dir`.
    pub fn open(store_dir: Option<&Path>) -> Holdings {
        Holdings {
            pages: HostPages::open(None, None),
            store_dir: store_dir.map(Path::to_path_buf),
            store_keys: Vec::new(),
            built_from: None,
        }
    }

    /// Re-reads what changed (VMs started or gone, chunks of tables that moved, the store)
    /// and, when anything did, builds a new summary of at most `max_bytes`.
    pub fn refresh(&mut self, max_bytes: usize) -> Option<Summary> {
        self.pages.refresh(None);
        let store_figures = self.read_store();
        let gens: Vec<u64> = self
            .pages
            .index()
            .vms()
            .map(|(_, t)| t.generation())
            .collect();
        let now = (gens, store_figures);
        if self.built_from.as_ref() == Some(&now) {
            return None;
        }
        let index = self.pages.index();
        let vm_keys: Vec<&[Key]> = index.vms().filter_map(|(vm, _)| index.keys(vm)).collect();
        let vm_pages: u64 = vm_keys
            .iter()
            .map(|k| k.iter().filter(|&&k| k != ZERO_KEY).count() as u64)
            .sum();
        let held = vm_pages + self.store_keys.len() as u64;
        let mut bloom = Bloom::with_capacity(held, max_bytes);
        let mut seen = HashSet::with_capacity(held as usize);
        let keys = vm_keys
            .iter()
            .flat_map(|k| k.iter())
            .chain(&self.store_keys);
        for &key in keys.filter(|&&k| k != ZERO_KEY) {
            if seen.insert(key) {
                bloom.insert(key);
            }
        }
        self.built_from = Some(now);
        Some(Summary {
            bloom,
            pages_held: held,
            store_pages: self.store_keys.len() as u64,
        })
    }

    /// Reads the store's keys when it changed; returns its figures (pages, journal bytes
    /// and packs folded): a store busy now keeps the keys read last time.
    fn read_store(&mut self) -> (u64, u64) {
        let Some(dir) = self.store_dir.as_ref().filter(|d| d.exists()) else {
            return (0, 0);
        };
        let Ok(store) = Store::open(dir) else {
            log::debug!("store {} busy: its summary keys are kept", dir.display());
            return self.built_from.as_ref().map_or((0, 0), |b| b.1);
        };
        let stats = store.stats();
        let figures = (stats.pages, stats.journal_bytes ^ (stats.packs << 48));
        if self.built_from.as_ref().is_none_or(|b| b.1 != figures) {
            self.store_keys = store.ids().map(|id| key_of(Some(*id))).collect();
        }
        figures
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
