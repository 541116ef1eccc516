//! The migration sender over fuzzed answers: a genuine handshake as the destination, then
//! `Accept`, `Answer`, `Need` and `Ack` messages (or anything else) chosen by the fuzzer,
//! framed with valid MACs and sequence numbers, so the fuzzer reaches the version 3
//! decoders the source runs (range answers and their want bitmaps, needs) and the
//! sender's state machine. The sender must never panic, never read a frame outside the
//! guest, and never report success without the destination's `Ack`
//! (see `fabric::migration::fuzzing::run_sender`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fabric::migration::fuzzing::run_sender(data);
});
