//! The VMM's own counters (vCPU exits by kind, snapshots, migrations) as cheap process-wide
//! atomics, and their rendering, with the rest of `stats`, as a Prometheus text page.
//!
//! One fabvm process runs one VM, so the counters are statics: the vCPU threads bump them
//! without any handle passed around. `stats` (JSON) carries them; [`prometheus::render`] turns
//! a `stats` object into the `/metrics` page, so the two never disagree.

pub mod prometheus;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

/// Why a vCPU came out of the guest, as counted in `vcpu_exits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// Interrupted by a signal (pause, stop, throttle kicks) or an interrupt window.
    Interrupted,
    /// HLT with nothing to wake the vCPU.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// A system event (power off, reset, crash).
    SystemEvent,
    /// KVM's emulator or event delivery failed.
    InternalError,
    /// KVM could not enter the guest.
    FailEntry,
    /// Anything else.
    Other,
}

impl ExitKind {
    /// Every kind, in the order of the counters.
    pub const ALL: [ExitKind; 11] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Interrupted,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::SystemEvent,
        ExitKind::InternalError,
        ExitKind::FailEntry,
        ExitKind::Other,
    ];

    /// The name in `stats` and in the `kind` label.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system_event",
            ExitKind::InternalError => "internal_error",
            ExitKind::FailEntry => "fail_entry",
            ExitKind::Other => "other",
        }
    }
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static EXITS: [AtomicU64; ExitKind::ALL.len()] = [ZERO; ExitKind::ALL.len()];

/// Counts one vCPU exit (a relaxed atomic add: cheap next to the exit itself).
pub fn count_exit(kind: ExitKind) {
    EXITS[kind as usize].fetch_add(1, Ordering::Relaxed);
}

/// Counters of one kind of long operation (snapshot, migration).
#[derive(Debug)]
pub struct Operations {
    count: AtomicU64,
    failures: AtomicU64,
    total_ms: AtomicU64,
    last_ms: AtomicU64,
    bytes: AtomicU64,
}

impl Operations {
    const fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            total_ms: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Records one operation that took `took`; `bytes` it wrote or sent if it succeeded,
    /// `None` if it failed.
    pub fn record(&self, took: Duration, bytes: Option<u64>) {
        let ms = took.as_millis() as u64;
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total_ms.fetch_add(ms, Ordering::Relaxed);
        self.last_ms.store(ms, Ordering::Relaxed);
        match bytes {
            Some(bytes) => {
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            None => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn json(&self) -> Value {
        json!({
            "total": self.count.load(Ordering::Relaxed),
            "failures_total": self.failures.load(Ordering::Relaxed),
            "duration_ms_total": self.total_ms.load(Ordering::Relaxed),
            "last_duration_ms": self.last_ms.load(Ordering::Relaxed),
            "bytes_total": self.bytes.load(Ordering::Relaxed),
        })
    }
}

/// Snapshots taken by this process (`bytes`: bytes of new pages written to the store).
pub static SNAPSHOTS: Operations = Operations::new();
/// Migrations started from this process (`bytes`: bytes sent by the ones that succeeded).
pub static MIGRATIONS: Operations = Operations::new();

/// The counters as `stats` fields: `vcpu_exits`, `snapshots`, `migrations`.
pub fn counters() -> Value {
    let exits: serde_json::Map<String, Value> = ExitKind::ALL
        .iter()
        .map(|&k| {
            (
                k.name().to_string(),
                EXITS[k as usize].load(Ordering::Relaxed).into(),
            )
        })
        .collect();
    json!({
        "vcpu_exits": exits,
        "snapshots": SNAPSHOTS.json(),
        "migrations": MIGRATIONS.json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_by_kind() {
        let before = counters()["vcpu_exits"]["mmio_write"].as_u64().unwrap();
        count_exit(ExitKind::MmioWrite);
        count_exit(ExitKind::MmioWrite);
        let after = counters()["vcpu_exits"]["mmio_write"].as_u64().unwrap();
        assert!(after >= before + 2);
        assert_eq!(ExitKind::ALL[ExitKind::Other as usize], ExitKind::Other);
    }

    #[test]
    fn operations_record_failures_and_durations() {
        let ops = Operations::new();
        ops.record(Duration::from_millis(30), Some(4096));
        ops.record(Duration::from_millis(10), None);
        let v = ops.json();
        assert_eq!(v["total"], 2);
        assert_eq!(v["failures_total"], 1);
        assert_eq!(v["duration_ms_total"], 40);
        assert_eq!(v["last_duration_ms"], 10);
        assert_eq!(v["bytes_total"], 4096);
    }
}
