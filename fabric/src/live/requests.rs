//! Requests from readers to a table's owner, through futex words in the table header: a
//! **harvest** (take the dirty log now) and a **sync** (harvest, then rehash every stale
//! page now, beyond the background budget).
//!
//! A harvest lets a reader that copied pages out of a running VM learn, without hashing
//! them, that none was written since its identity was computed. The owner marks a page
//! stale at the first harvest after a write, and every change to a chunk's entries moves
//! the chunk's generation. So a reader that read a page's entry as current at generation
//! `g`, copied the page, then saw a harvest *that started after its copy* finish with the
//! chunk still at `g`, knows the copy holds the content that identity names.
//!
//! A sync lets a reader that needs a VM's identities complete (the sharing leader, before it
//! plans) have them computed at once instead of waiting for the background thread's budget.
//!
//! Per kind, a reader increments `requested[kind]`, then the doorbell, and wakes the owner;
//! the owner reads `requested[kind]` *before* it starts, and when done stores that count in
//! `done[kind]` and wakes the readers. Any harvest (periodic, or a snapshot's, a migration's
//! or a sync's) answers every harvest request made before it started. An owner that does
//! not serve requests (its background thread is off) says so, and readers do not wait; one
//! that serves them but does not answer in time costs a reader its bounded wait.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::table::Mapping;

/// What a reader asks of a table's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Take the dirty log into the table now.
    Harvest = 0,
    /// Harvest, then rehash every stale page now.
    Sync = 1,
}

/// The request words of a table header.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct Words {
    /// Requests made, per kind (counters).
    requested: [AtomicU32; 2],
    /// The request count the owner's last answer covered, per kind (futex words).
    done: [AtomicU32; 2],
    /// Moves on every request (the futex word the owner sleeps on).
    bell: AtomicU32,
    /// 1 while the owner serves requests.
    serving: AtomicU32,
}

/// The owner's side: serves readers' requests (one per table; cheap to clone).
#[derive(Debug, Clone)]
pub struct OwnerRequests {
    map: Arc<Mapping>,
}

impl OwnerRequests {
    pub(super) fn new(map: Arc<Mapping>) -> Self {
        OwnerRequests { map }
    }

    fn words(&self) -> &Words {
        &self.map.header().requests
    }

    /// Says whether requests are served (readers do not wait on an owner that says no).
    pub fn set_serving(&self, serving: bool) {
        self.words()
            .serving
            .store(serving as u32, Ordering::Release);
    }

    /// The count of `kind` requests now: read it before starting, and pass it to
    /// [`OwnerRequests::answered`] when done.
    pub fn count(&self, kind: Request) -> u32 {
        self.words().requested[kind as usize].load(Ordering::Acquire)
    }

    /// Whether a `kind` request waits for an answer.
    pub fn pending(&self, kind: Request) -> bool {
        let w = self.words();
        w.requested[kind as usize].load(Ordering::Acquire)
            != w.done[kind as usize].load(Ordering::Acquire)
    }

    /// Whether any request waits.
    pub fn any_pending(&self) -> bool {
        self.pending(Request::Harvest) || self.pending(Request::Sync)
    }

    /// The `kind` work that started when the count was `count` is done (and in the table).
    pub fn answered(&self, kind: Request, count: u32) {
        let done = &self.words().done[kind as usize];
        if done.swap(count, Ordering::AcqRel) != count {
            futex_wake(done);
        }
    }

    /// Sleeps until a request arrives or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let bell = self.words().bell.load(Ordering::Acquire);
        if !self.any_pending() {
            futex_wait(&self.words().bell, bell, timeout);
        }
    }
}

/// The reader's side, over a writable mapping of the table's header.
#[derive(Debug)]
pub(super) struct Requester {
    pub(super) header: Mapping,
}

impl Requester {
    /// Asks for `kind` and waits up to `wait` for an answer to this request. With a zero
    /// `wait` the request is left for the owner to answer (true only if it already has).
    pub(super) fn request(&self, kind: Request, wait: Duration) -> bool {
        let w = &self.header.header().requests;
        if w.serving.load(Ordering::Acquire) == 0 {
            return false;
        }
        let k = kind as usize;
        let ticket = w.requested[k]
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        w.bell.fetch_add(1, Ordering::AcqRel);
        futex_wake(&w.bell);
        let until = Instant::now() + wait;
        loop {
            let done = w.done[k].load(Ordering::Acquire);
            if done.wrapping_sub(ticket) as i32 >= 0 {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            futex_wait(&w.done[k], done, left);
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
