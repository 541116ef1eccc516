//! virtio-net transmit over fuzzed descriptor chains and frames; the tap is a datagram
//! socket whose far end is drained and checked after the run.
#![no_main]

mod common;

use std::os::unix::net::UnixDatagram;

use devices::virtio::net::{MAX_FRAME, TX_QUEUE};
use devices::virtio::tap::VNET_HDR_LEN;
use devices::virtio::{MacAddr, Net, Tap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = common::Input(data);
    let (ours, host) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let net = Net::new(
        Tap::from_fd(ours.into(), "fuzz0"),
        MacAddr([2, 0, 0, 0, 0, 1]),
    );
    common::run(net, &mut input, TX_QUEUE, 2);
    // Every frame that reached the "tap" has a clean header and a sane length.
    let mut buf = vec![0u8; MAX_FRAME + 1];
    while let Ok(n) = host.recv(&mut buf) {
        assert!(
            (VNET_HDR_LEN..=MAX_FRAME).contains(&n),
            "frame of {n} bytes"
        );
        assert_eq!(
            &buf[..VNET_HDR_LEN],
            &[0u8; VNET_HDR_LEN],
            "header not cleaned"
        );
    }
});
