//! Crash safety: a child process (this test binary, re-executed) writes to a store in a
//! loop and is SIGKILLed at varying points; the store must then open, verify clean and
//! hold everything the child acknowledged.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Store, StoreOptions};
use crate::identity::{PageId, PAGE_SIZE};
use crate::testutil::pages;

/// Set in the child's environment to the store directory.
const CHILD_DIR: &str = "FABRIC_CRASH_CHILD_DIR";
/// Set in the child's environment to its first batch number.
const CHILD_START: &str = "FABRIC_CRASH_CHILD_START";

/// Small packs and frequent checkpoints, so kills land in every kind of operation.
const OPTIONS: StoreOptions = StoreOptions {
    pack_pages: 256,
    checkpoint_bytes: 32 << 10,
};
const PAGES_PER_BATCH: u64 = 100;
/// Kill rounds; `FABRIC_CRASH_ROUNDS` overrides (e.g. a few hundred for a soak run).
const ROUNDS: u64 = 12;

/// Seeds of batch `b`: 100 new pages, plus 20 shared with the batch before (dedup path).
fn batch_seeds(b: u64) -> std::ops::Range<u64> {
    (b * PAGES_PER_BATCH).saturating_sub(20)..(b + 1) * PAGES_PER_BATCH
}

fn root_name(b: u64) -> String {
    format!("r{b}")
}

/// The child's work loop: put a batch, root it, drop an older root, now and then gc;
/// print an acknowledgement line after each operation returns.
fn child_loop(dir: &Path, start: u64) {
    let mut store = Store::open_with(dir, OPTIONS).expect("child opens the store");
    for b in start..start + 10_000 {
        let batch = pages(batch_seeds(b));
        let refs: Vec<(PageId, &[u8])> = batch.iter().map(|(id, p)| (*id, &p[..])).collect();
        store.put_many(&refs).unwrap();
        println!("ack put {b}");
        let ids: Vec<PageId> = batch.iter().map(|(id, _)| *id).collect();
        store.add_root(&root_name(b), &ids).unwrap();
        println!("ack root {b}");
        if b >= start + 2 && b % 2 == 0 {
            store.remove_root(&root_name(b - 2)).unwrap();
            println!("ack unroot {}", b - 2);
        }
        if b % 3 == 2 {
            store.gc().unwrap();
            println!("ack gc {b}");
        }
    }
}

/// Entry point of the child process; a no-op in a normal test run.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let start = std::env::var(CHILD_START).unwrap().parse().unwrap();
    child_loop(Path::new(&dir), start);
}

/// What the parent knows from the acknowledgements it has read.
#[derive(Default)]
struct Acked {
    /// Roots acknowledged and not acknowledged as removed.
    live_roots: BTreeSet<u64>,
    /// Roots acknowledged as removed.
    removed_roots: BTreeSet<u64>,
    /// The last batch put in the latest round, if its root was not acknowledged.
    unrooted_put: Option<u64>,
    /// A root whose removal had started (the child's next step) but was not acknowledged.
    pending_unroot: Option<u64>,
    /// First batch number of the current round.
    start: u64,
    acks: u64,
}

impl Acked {
    fn record(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        if words.next() != Some("ack") {
            return; // libtest's own output
        }
        let (op, b) = (
            words.next().unwrap(),
            words.next().unwrap().parse().unwrap(),
        );
        self.acks += 1;
        match op {
            "put" => self.unrooted_put = Some(b),
            "root" => {
                self.live_roots.insert(b);
                self.unrooted_put = None;
                if b >= self.start + 2 && b % 2 == 0 {
                    self.pending_unroot = Some(b - 2);
                }
            }
            "unroot" => {
                self.live_roots.remove(&b);
                self.removed_roots.insert(b);
                self.pending_unroot = None;
            }
            _ => {}
        }
    }
}

/// A tiny deterministic generator for kill points.
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn store_survives_sigkill_at_any_point() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked = Acked::default();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;

    let rounds = std::env::var("FABRIC_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    for round in 0..rounds {
        // Kill after 1 to 12 acknowledgements, then 0 to 3 ms more.
        let after = 1 + next_rand(&mut rng) % 12;
        let delay = Duration::from_micros(next_rand(&mut rng) % 3000);
        acked.start = round * 1000;
        acked.unrooted_put = None;
        let mut child = Command::new(&exe)
            .args(["--exact", "store::crash_tests::crash_child", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_START, acked.start.to_string())
            .env("RAYON_NUM_THREADS", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        let first = acked.acks;
        while acked.acks < first + after {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("child of round {round} ended early"))
                .unwrap();
            acked.record(&line);
            assert!(Instant::now() < deadline, "child too slow");
        }
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Acknowledgements printed before the kill count too.
        let mut last = String::new();
        for line in lines {
            last = line.unwrap();
            acked.record(&last);
        }
        eprintln!(
            "round {round}: killed {delay:?} after ack {after}, {} acks in all, last {last:?}",
            acked.acks - first
        );
        check_store(dir.path(), &mut acked, round);
    }
}

/// The store opens, verifies clean, and holds everything acknowledged.
fn check_store(dir: &Path, acked: &mut Acked, round: u64) {
    let store = Store::open_with(dir, OPTIONS)
        .unwrap_or_else(|e| panic!("round {round}: store does not open: {e}"));
    let report = store.verify().unwrap();
    assert!(report.is_clean(), "round {round}: {report:?}");

    let roots: BTreeSet<String> = store.roots().into_iter().map(|r| r.name).collect();
    let mut buf = vec![0u8; PAGE_SIZE];
    // A removal caught in flight may or may not have happened.
    if let Some(b) = acked.pending_unroot.take() {
        if !roots.contains(&root_name(b)) {
            acked.live_roots.remove(&b);
            acked.removed_roots.insert(b);
        }
    }
    for &b in &acked.live_roots {
        assert!(
            roots.contains(&root_name(b)),
            "round {round}: root {b} lost"
        );
    }
    for &b in &acked.removed_roots {
        assert!(
            !roots.contains(&root_name(b)),
            "round {round}: root {b} back"
        );
    }
    // Every root present (acknowledged or caught in flight) holds readable pages.
    for name in &roots {
        for id in store.root_ids(name).unwrap() {
            store.get(&id, &mut buf).unwrap();
            assert!(store.refs(&id).unwrap() >= 1);
        }
    }
    if let Some(b) = acked.unrooted_put {
        for (id, page) in pages(batch_seeds(b)) {
            store.get(&id, &mut buf).unwrap();
            assert_eq!(buf, page[..], "round {round}: page of batch {b}");
        }
    }
}
