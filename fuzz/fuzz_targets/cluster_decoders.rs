//! The cluster's decoders of bytes from other hosts (`cluster::fuzzing::run`): page-service
//! requests (an accepted one re-encodes to the same bytes), replies (every page accepted
//! hashes to the identity asked for at its position), page summaries (raw, or sealed with a
//! valid checksum; an accepted one re-encodes exactly) and host records (an accepted one has
//! a valid name and re-decodes), control requests and replies (an accepted one re-decodes
//! from its encoding to the same message).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cluster::fuzzing::run(data));
