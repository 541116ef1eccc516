//! Figures of a migration for the report: bytes on the wire as the protocol sees them,
//! page counts by fate, compression savings and per-round timings. Serializable.

use serde::{Deserialize, Serialize};

use super::channel::Counters;

/// One pre-copy round as the source saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Round number, from 1.
    pub round: u32,
    /// Whether this was the final round (the last dirty set, guest paused).
    pub last: bool,
    /// Wall time from the first offer to the end of the round, in microseconds.
    pub duration_us: u64,
    /// Non-zero pages offered.
    pub pages_offered: u64,
    /// Zero pages announced (never sent).
    pub pages_zero: u64,
    /// Offered pages the destination did not ask for (it held them).
    pub pages_found: u64,
    /// Pages whose content went over the wire.
    pub pages_sent: u64,
    /// Bytes written in this round, frames included.
    pub bytes_sent: u64,
}

/// A migration as the source saw it; returned by [`super::Sender::finish`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// Bytes written: hello, frame headers, payloads and MACs.
    pub bytes_sent: u64,
    /// Bytes read.
    pub bytes_received: u64,
    /// Payload bytes written (without framing).
    pub payload_bytes_sent: u64,
    /// Payload bytes read.
    pub payload_bytes_received: u64,
    /// Messages written.
    pub messages_sent: u64,
    /// Messages read.
    pub messages_received: u64,
    /// Non-zero pages offered, over all rounds.
    pub pages_offered: u64,
    /// Zero pages announced.
    pub pages_zero: u64,
    /// Offered pages the destination already held.
    pub pages_found: u64,
    /// Pages whose content was sent (raw or compressed).
    pub pages_sent: u64,
    /// Of those, sent compressed.
    pub pages_compressed: u64,
    /// Pages the destination asked for that repeat one sent earlier in the round
    /// (sent as a reference, no content).
    pub pages_deduplicated: u64,
    /// Asked-for pages that were zero by the time they were sent.
    pub pages_changed: u64,
    /// Bytes compression saved against sending those pages raw.
    pub compression_saved_bytes: u64,
    /// Range summaries sent (top level and sub-ranges), and of those the destination held.
    pub ranges_summarized: u64,
    pub ranges_held: u64,
    /// Pages sent in pushes (without an offer).
    pub pages_pushed: u64,
    /// Bytes of vCPU and device state sent.
    pub state_bytes: u64,
    /// Rounds, the final one included.
    pub rounds: Vec<RoundStats>,
    /// Time from the start of [`super::Sender::finish`] to the last byte of `Complete`
    /// written, in microseconds (final round and state).
    pub stop_copy_us: u64,
    /// Time from `Complete` written to `Ack`, in microseconds (the destination's checks,
    /// restore and resume, and one trip back).
    pub commit_us: u64,
}

impl MigrationStats {
    pub(crate) fn set_counters(&mut self, c: &Counters) {
        self.bytes_sent = c.wire_sent;
        self.bytes_received = c.wire_received;
        self.payload_bytes_sent = c.payload_sent;
        self.payload_bytes_received = c.payload_received;
        self.messages_sent = c.messages_sent;
        self.messages_received = c.messages_received;
    }

    /// Bytes both ways.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }
}

/// A migration as the destination saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverStats {
    /// Bytes read: hello, frame headers, payloads and MACs.
    pub bytes_received: u64,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Payload bytes read.
    pub payload_bytes_received: u64,
    /// Payload bytes written.
    pub payload_bytes_sent: u64,
    /// Non-zero pages offered.
    pub pages_offered: u64,
    /// Zero pages announced.
    pub pages_zero: u64,
    /// Offered pages already in place (same identity at the same frame).
    pub pages_unchanged: u64,
    /// Offered pages copied from another frame received in this migration.
    pub pages_copied: u64,
    /// Offered pages taken from the [`super::PageSource`] (store, sibling VMs).
    pub pages_fetched: u64,
    /// Pages the source gave that did not match their identity (then asked for).
    pub fetch_mismatches: u64,
    /// Pages asked from the source.
    pub pages_needed: u64,
    /// Pages whose content arrived (raw or compressed).
    pub pages_received: u64,
    /// Of those, compressed.
    pub pages_compressed: u64,
    /// Asked-for pages that arrived as a reference to one sent earlier in the round.
    pub pages_deduplicated: u64,
    /// Pages that arrived not matching their identity (changed at the source after the
    /// offer, or damaged): not installed, and needed again in a later round.
    pub pages_mismatched: u64,
    /// Range summaries received (top level and sub-ranges).
    pub ranges_summarized: u64,
    /// Of those, held here (wholly, or but for a few pages asked for).
    pub ranges_held: u64,
    /// Pages installed from ranges held here.
    pub pages_held: u64,
    /// Pages that arrived in pushes (without an offer).
    pub pages_pushed: u64,
    /// Bytes of vCPU and device state received.
    pub state_bytes: u64,
    /// Rounds completed.
    pub rounds: u32,
}

impl ReceiverStats {
    pub(crate) fn set_counters(&mut self, c: &Counters) {
        self.bytes_sent = c.wire_sent;
        self.bytes_received = c.wire_received;
        self.payload_bytes_sent = c.payload_sent;
        self.payload_bytes_received = c.payload_received;
    }
}
