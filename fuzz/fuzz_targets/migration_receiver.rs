//! The migration receiver over fuzzed streams: the raw stream (hello included), raw bytes
//! after a genuine handshake, or messages framed with valid MACs and sequence numbers
//! after a genuine handshake (with or without a valid `Describe`), so the fuzzer reaches
//! the decoders and the receiver's state machine. The receiver must never panic, never
//! touch a frame outside the described guest, and never install a page that does not
//! match its identity (see `fabric::migration::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fabric::migration::fuzzing::run_receiver(data);
});
