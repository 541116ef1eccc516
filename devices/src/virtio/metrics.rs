//! Per-device request counters: cheap atomics the transport and devices bump as chains move,
//! read by the VMM for `stats` and the Prometheus `/metrics` page.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one virtio device, shared (`Arc`) between its transport and the VMM.
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    requests: AtomicU64,
    to_guest_bytes: AtomicU64,
    from_guest_bytes: AtomicU64,
}

/// A point-in-time copy of [`DeviceMetrics`] (JSON names end in `_total`: they only grow).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceCounts {
    /// Descriptor chains returned to the driver (completed requests, malformed ones included).
    #[serde(rename = "requests_total")]
    pub requests: u64,
    /// Bytes the device wrote into guest buffers (used lengths: data, headers, status bytes).
    #[serde(rename = "to_guest_bytes_total")]
    pub to_guest_bytes: u64,
    /// Bytes the driver offered in device-readable buffers (request headers included).
    #[serde(rename = "from_guest_bytes_total")]
    pub from_guest_bytes: u64,
}

impl DeviceMetrics {
    /// One chain returned with `len` bytes written into it.
    pub fn used(&self, len: u32) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.to_guest_bytes
            .fetch_add(u64::from(len), Ordering::Relaxed);
    }

    /// A chain whose device-readable buffers hold `len` bytes.
    pub fn offered(&self, len: u64) {
        self.from_guest_bytes.fetch_add(len, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn counts(&self) -> DeviceCounts {
        DeviceCounts {
            requests: self.requests.load(Ordering::Relaxed),
            to_guest_bytes: self.to_guest_bytes.load(Ordering::Relaxed),
            from_guest_bytes: self.from_guest_bytes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_accumulate() {
        let m = DeviceMetrics::default();
        m.used(10);
        m.used(0);
        m.offered(4096);
        assert_eq!(
            m.counts(),
            DeviceCounts {
                requests: 2,
                to_guest_bytes: 10,
                from_guest_bytes: 4096
            }
        );
    }
}
