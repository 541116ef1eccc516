//! The dirty log, owned once per VM: KVM's log of guest writes ORed with vm-memory's bitmap
//! of the VMM's own writes (virtio DMA, device emulation), harvested in one place and
//! handed to every consumer (live identities, a migration) as its own view, so no consumer
//! takes pages from under another.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{GuestMemory, MemoryError};

/// The VM's dirty log. KVM logging is on from the moment the slots are registered
/// ([`super::register`]); a harvest reads and resets both logs and ORs the result into
/// every open view.
#[derive(Debug)]
pub struct DirtyLog {
    vm: Arc<VmFd>,
    memory: GuestMemory,
    views: Mutex<Views>,
}

#[derive(Debug, Default)]
struct Views {
    next_id: u64,
    /// Per view: one bitmap per region (bit i = page i of the region).
    open: Vec<(u64, Vec<Vec<u64>>)>,
}

/// One consumer's view of the dirty log: the pages written since it last took them.
#[derive(Debug)]
pub struct DirtyView {
    log: Arc<DirtyLog>,
    id: u64,
}

impl DirtyLog {
    /// The log of `memory`, registered with KVM logging on in `vm`.
    pub fn new(vm: Arc<VmFd>, memory: GuestMemory) -> Arc<Self> {
        Arc::new(DirtyLog {
            vm,
            memory,
            views: Mutex::new(Views::default()),
        })
    }

    /// Opens a view; it sees every write from the next harvest on (writes not yet harvested
    /// included).
    pub fn view(self: &Arc<Self>) -> DirtyView {
        let mut views = self.lock();
        let id = views.next_id;
        views.next_id += 1;
        let empty = self
            .memory
            .iter()
            .map(|r| vec![0u64; (r.len() as usize / fabric::PAGE_SIZE).div_ceil(64)])
            .collect();
        views.open.push((id, empty));
        DirtyView {
            log: self.clone(),
            id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Views> {
        self.views.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads and resets both logs, ORing them into every open view.
    fn harvest(&self, views: &mut Views) -> Result<(), MemoryError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let mut words = self
                .vm
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| MemoryError::DirtyLog { slot, source })?;
            let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
            for (word, vmm) in words.iter_mut().zip(mapping.bitmap().get_and_reset()) {
                *word |= vmm;
            }
            for (_, bitmaps) in &mut views.open {
                for (dst, src) in bitmaps[slot as usize].iter_mut().zip(&words) {
                    *dst |= src;
                }
            }
        }
        Ok(())
    }
}

impl DirtyView {
    /// Harvests, then returns this view's pages written since its last `take` (one bitmap
    /// per region) and clears them.
    pub fn take(&self) -> Result<Vec<Vec<u64>>, MemoryError> {
        self.take_resetting(None)
    }

    /// [`DirtyView::take`], forgetting in the same step (under the log's lock, so no other
    /// harvest comes between) everything `other` has gathered up to and including this
    /// harvest: for a consumer that learns the state of those pages from this view's owner
    /// after it (a migration whose first round takes every page's identity from a sync).
    pub fn take_resetting(&self, other: Option<&DirtyView>) -> Result<Vec<Vec<u64>>, MemoryError> {
        let mut views = self.log.lock();
        self.log.harvest(&mut views)?;
        if let Some(other) = other {
            for (_, bitmaps) in views.open.iter_mut().filter(|(id, _)| *id == other.id) {
                bitmaps.iter_mut().for_each(|b| b.fill(0));
            }
        }
        let (_, bitmaps) = views
            .open
            .iter_mut()
            .find(|(id, _)| *id == self.id)
            .expect("an open view is registered");
        Ok(bitmaps
            .iter_mut()
            .map(|b| {
                let fresh = vec![0u64; b.len()];
                std::mem::replace(b, fresh)
            })
            .collect())
    }

    /// [`DirtyView::take`] as guest frame numbers, in address order.
    pub fn take_frames(&self) -> Result<Vec<u64>, MemoryError> {
        let bitmaps = self.take()?;
        let mut frames = Vec::new();
        for (region, words) in self.log.memory.iter().zip(bitmaps) {
            let first = region.start_addr().0 / fabric::PAGE_SIZE as u64;
            for_each_bit(&words, |page| frames.push(first + page as u64));
        }
        Ok(frames)
    }
}

impl Drop for DirtyView {
    fn drop(&mut self) {
        self.log.lock().open.retain(|(id, _)| *id != self.id);
    }
}

/// Calls `f` with the index of every set bit of `words`, in order.
pub fn for_each_bit(words: &[u64], mut f: impl FnMut(usize)) {
    for (w, word) in words.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            f(w * 64 + bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
    }
}
