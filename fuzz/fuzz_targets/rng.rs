//! virtio-rng over fuzzed descriptor chains.
#![no_main]

mod common;

use devices::virtio::Rng;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = common::Input(data);
    common::run(Rng::new(), &mut input, 0, 1);
});
