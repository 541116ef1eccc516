//! virtio-blk request handling over fuzzed descriptor chains and request bytes.
#![no_main]

mod common;

use devices::virtio::Block;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = common::Input(data);
    let read_only = input.byte() & 1 == 1;
    let disk = tempfile::tempfile().unwrap();
    disk.set_len(64 * 1024).unwrap();
    let block = Block::new(disk, read_only).unwrap();
    common::run(block, &mut input, 0, 1);
});
