//! Harvest on request: how a reader that copied pages out of a running VM learns, without
//! hashing them, that none of them was written since its identity was computed.
//!
//! The owner marks a page stale at the first harvest of its dirty log after a write, and
//! every change to a chunk's entries moves the chunk's generation. So a reader that read a
//! page's entry as current with generation `g`, copied the page, then saw a harvest *that
//! started after its copy* finish with the chunk still at `g`, knows the page was not written
//! between the hash that gave its identity and that harvest: the copy holds that content.
//!
//! Two 32-bit words in the table header carry the request (futex words, so neither side
//! spins): a reader increments `harvest_requested` and wakes the owner; the owner reads the
//! count *before* it takes the dirty log and, after marking what the log held, stores it in
//! `harvest_done` and wakes the readers. Any harvest (periodic, a snapshot's or a
//! migration's sync) answers every request made before it started. An owner that does not
//! answer (its background thread is off or stuck) costs the reader a bounded wait, after
//! which it hashes the pages instead.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::table::Mapping;

/// The owner's side: answers readers' requests (one per table; cheap to clone).
#[derive(Debug, Clone)]
pub struct HarvestRequests {
    map: Arc<Mapping>,
}

impl HarvestRequests {
    pub(super) fn new(map: Arc<Mapping>) -> Self {
        HarvestRequests { map }
    }

    fn words(&self) -> (&AtomicU32, &AtomicU32) {
        let h = self.map.header();
        (&h.harvest_requested, &h.harvest_done)
    }

    /// Says whether requests are answered (readers do not wait on an owner that says no).
    pub fn set_serving(&self, serving: bool) {
        self.map
            .header()
            .harvester
            .store(serving as u32, Ordering::Release);
    }

    /// The request count now: read it before taking the dirty log, and pass it to
    /// [`HarvestRequests::answered`] once the harvest is marked in the table.
    pub fn pending_count(&self) -> u32 {
        self.words().0.load(Ordering::Acquire)
    }

    /// Whether a request waits for a harvest.
    pub fn pending(&self) -> bool {
        let (requested, done) = self.words();
        requested.load(Ordering::Acquire) != done.load(Ordering::Acquire)
    }

    /// A harvest that started when the request count was `count` is in the table.
    pub fn answered(&self, count: u32) {
        let done = self.words().1;
        if done.swap(count, Ordering::AcqRel) != count {
            futex_wake(done);
        }
    }

    /// Sleeps until a request arrives or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let (requested, done) = self.words();
        let seen = requested.load(Ordering::Acquire);
        if seen == done.load(Ordering::Acquire) {
            futex_wait(requested, seen, timeout);
        }
    }
}

/// The reader's side, over a writable mapping of the table's header.
#[derive(Debug)]
pub(super) struct HarvestClient {
    pub(super) header: Mapping,
}

impl HarvestClient {
    /// Asks for a harvest and waits up to `timeout` for one that started after the request.
    pub(super) fn request(&self, timeout: Duration) -> bool {
        let h = self.header.header();
        if h.harvester.load(Ordering::Acquire) == 0 {
            return false;
        }
        let ticket = h
            .harvest_requested
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        futex_wake(&h.harvest_requested);
        let until = Instant::now() + timeout;
        loop {
            let done = h.harvest_done.load(Ordering::Acquire);
            if done.wrapping_sub(ticket) as i32 >= 0 {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            futex_wait(&h.harvest_done, done, left);
        }
    }
}

/// Waits while `word` holds `expected`, at most `timeout` (shared futex: the word is in a
/// file mapping other processes share).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT reads the aligned u32 behind `word`, which stays mapped for the
    // call, and the timespec on this stack frame; it writes nothing of ours. Spurious and
    // early returns are fine: callers re-check the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Wakes every waiter on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it reads and writes no memory.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}
