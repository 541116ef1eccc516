//! virtio-net on a tap: queue 0 receives (tap → guest), queue 1 transmits (guest → tap), one
//! frame per descriptor chain with a 12-byte `virtio_net_hdr_v1` in front, the MAC in config
//! space (`VIRTIO_NET_F_MAC`) and every offload off. When the guest has no receive buffer the
//! frame read from the tap is kept and the tap is left alone until the guest adds buffers.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use vmm_sys_util::eventfd::EventFd;

use super::chain;
use super::device::{read_config_bytes, DeviceError, Queues, VirtioDevice};
use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::{
    GuestMemoryMmap, Interrupt, MmioError, MmioTransport, TransportState, VirtioSubscriber,
};

/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame moved, header included (65550 bytes is virtio-net's largest packet without
/// segmentation offloads).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

/// Errors from configuring or restoring a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A MAC address that is not six hex bytes separated by colons.
    #[error("invalid MAC address {0:?}")]
    Mac(String),
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A saved pending frame larger than any frame the device moves.
    #[error("saved pending frame of {0} bytes is too large")]
    PendingFrame(usize),
    /// The transport part of the state was refused.
    #[error(transparent)]
    Transport(#[from] MmioError),
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address.
    pub fn random_local() -> Self {
        let mut bytes = [0u8; 6];
        // Fall back to a fixed local address if the kernel has no entropy to give.
        // SAFETY: the kernel writes at most 6 bytes into `bytes`, which we own.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n != 6 {
            bytes = [0, 0x46, 0x42, 0x56, 0x4d, 0x01];
        }
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        Self(bytes)
    }
}

impl FromStr for MacAddr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let err = || NetError::Mac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A virtio network device on a tap.
#[derive(Debug)]
pub struct Net {
    tap: Tap,
    mac: MacAddr,
    /// The frame being received; `rx_len` bytes of it are pending when set.
    rx_frame: Vec<u8>,
    rx_len: Option<usize>,
    /// The guest had no receive buffer for the pending frame: the tap is left alone until
    /// the receive queue is notified.
    rx_blocked: bool,
    tx_frame: Vec<u8>,
}

/// Offloads are off, so a header carries nothing but `num_buffers`, which is 1 without
/// `VIRTIO_NET_F_MRG_RXBUF`.
fn clean_header(frame: &mut [u8], num_buffers: u16) {
    frame[..VNET_HDR_LEN].fill(0);
    frame[VNET_HDR_LEN - 2..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
}

impl Net {
    /// A device on `tap` with address `mac`.
    pub fn new(tap: Tap, mac: MacAddr) -> Self {
        Self {
            tap,
            mac,
            rx_frame: vec![0; MAX_FRAME],
            rx_len: None,
            rx_blocked: false,
            tx_frame: vec![0; MAX_FRAME],
        }
    }

    /// The MAC address the guest sees.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap's fd, to watch for readability (edge-triggered).
    pub fn tap_fd(&self) -> std::os::fd::RawFd {
        self.tap.as_raw_fd()
    }

    /// A frame is waiting for a receive buffer.
    pub fn rx_blocked(&self) -> bool {
        self.rx_blocked
    }

    /// The tap has frames: receive them while the guest has buffers. Call through
    /// [`MmioTransport::with_device`] so the guest is interrupted.
    pub fn process_tap(&mut self, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        if self.rx_blocked {
            return Ok(());
        }
        self.receive(queues)
    }

    /// Moves frames from the tap into receive buffers until the tap is empty or the buffers
    /// run out (then the frame in hand stays pending).
    fn receive(&mut self, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        loop {
            let len = match self.rx_len {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    // End of file (a closed socket in tests): nothing more to read.
                    Ok(0) => return Ok(()),
                    Ok(len) if len < VNET_HDR_LEN => {
                        log::debug!("virtio-net: {len}-byte read from the tap, dropped");
                        continue;
                    }
                    Ok(len) => {
                        clean_header(&mut self.rx_frame, 1);
                        self.rx_len = Some(len);
                        len
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("virtio-net: tap {}: read: {e}", self.tap.name());
                        return Ok(());
                    }
                },
            };
            if !self.deliver(queues, len)? {
                self.rx_blocked = true;
                return Ok(());
            }
            self.rx_len = None;
        }
    }

    /// Puts the pending frame in the next receive buffer. False when there is none; a frame
    /// that does not fit the buffer is dropped and the buffer kept for the next frame.
    fn deliver(&mut self, queues: &mut Queues<'_>, len: usize) -> Result<bool, DeviceError> {
        loop {
            let Some(desc_chain) = queues.pop(RX_QUEUE)? else {
                return Ok(false);
            };
            let head = desc_chain.head_index();
            let chain = match queues.parse(desc_chain) {
                Ok(chain) => chain,
                Err(e) => {
                    log::debug!("virtio-net: malformed receive chain {head}: {e}");
                    queues.add_used(RX_QUEUE, head, 0)?;
                    continue;
                }
            };
            if chain.writable_len() < len as u64 {
                log::debug!(
                    "virtio-net: {len}-byte frame does not fit a {}-byte buffer, dropped",
                    chain.writable_len()
                );
                queues.undo_pop(RX_QUEUE)?;
                return Ok(true);
            }
            let used =
                match chain::write_bytes(queues.mem, &chain.writable, 0, &self.rx_frame[..len]) {
                    Ok(()) => len as u32,
                    Err(e) => {
                        log::debug!("virtio-net: receive chain {head}: {e}");
                        0
                    }
                };
            queues.add_used(RX_QUEUE, head, used)?;
            return Ok(true);
        }
    }

    /// Sends every frame the guest queued for transmission.
    fn transmit(&mut self, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        while let Some(desc_chain) = queues.pop(TX_QUEUE)? {
            let head = desc_chain.head_index();
            match queues.parse(desc_chain) {
                Ok(chain) => self.send(queues.mem, &chain),
                Err(e) => log::debug!("virtio-net: malformed transmit chain {head}: {e}"),
            }
            queues.add_used(TX_QUEUE, head, 0)?;
        }
        Ok(())
    }

    fn send(&mut self, mem: &GuestMemoryMmap, chain: &chain::Chain) {
        let len = chain.readable_len();
        if len < VNET_HDR_LEN as u64 || len > MAX_FRAME as u64 {
            log::debug!("virtio-net: {len}-byte transmit buffer, dropped");
            return;
        }
        let frame = &mut self.tx_frame[..len as usize];
        if let Err(e) = chain::read_bytes(mem, &chain.readable, 0, frame) {
            log::debug!("virtio-net: transmit: {e}");
            return;
        }
        // No offloads were negotiated: whatever the guest put in the header is not asked for.
        clean_header(frame, 0);
        match self.tap.write_frame(frame) {
            Ok(_) => {}
            // A full tap queue drops the frame, as a busy link would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                log::debug!("virtio-net: tap {} full, frame dropped", self.tap.name())
            }
            Err(e) => log::warn!("virtio-net: tap {}: write: {e}", self.tap.name()),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac.0, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-net: config write at {offset:#x} ignored (the MAC is read-only)");
    }

    fn activate(&mut self, _features: u64, _queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        match index {
            RX_QUEUE => {
                // New receive buffers: hand over the pending frame and read the tap again.
                self.rx_blocked = false;
                self.receive(queues)
            }
            TX_QUEUE => self.transmit(queues),
            _ => Err(DeviceError::NoQueue(index)),
        }
    }

    fn reset(&mut self) {
        self.rx_len = None;
        self.rx_blocked = false;
    }
}

/// A net device's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Registers, queues and features.
    pub transport: TransportState,
    /// The MAC address in config space.
    pub mac: MacAddr,
    /// A frame read from the tap that no receive buffer has taken yet (header included).
    pub pending_rx: Option<Vec<u8>>,
}

impl MmioTransport<Net> {
    /// The device's saved state.
    pub fn state(&self) -> NetState {
        let net = self.device();
        NetState {
            transport: self.transport_state(),
            mac: net.mac,
            pending_rx: net.rx_len.map(|len| net.rx_frame[..len].to_vec()),
        }
    }

    /// Rebuilds a net device on `tap` from `state`.
    pub fn from_state(
        state: &NetState,
        tap: Tap,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<Self, NetError> {
        let mut net = Net::new(tap, state.mac);
        if let Some(frame) = &state.pending_rx {
            if frame.len() > MAX_FRAME || frame.len() < VNET_HDR_LEN {
                return Err(NetError::PendingFrame(frame.len()));
            }
            net.rx_frame[..frame.len()].copy_from_slice(frame);
            net.rx_len = Some(frame.len());
            // Retried when the guest next adds receive buffers (or processes its queues).
            net.rx_blocked = true;
        }
        Ok(MmioTransport::restore(
            net,
            mem,
            interrupt,
            &state.transport,
        )?)
    }
}

/// An event-manager subscriber for a net device: the queues' ioeventfds (`notify[i]` for queue
/// `i`) and the tap, edge-triggered.
pub fn net_subscriber(
    transport: Arc<Mutex<MmioTransport<Net>>>,
    notify: Vec<EventFd>,
) -> VirtioSubscriber<Net> {
    let tap_fd = transport
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .device()
        .tap_fd();
    VirtioSubscriber::new(transport, notify).with_backend(tap_fd, Net::process_tap)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;
    use crate::virtio::testutil::*;

    const BUF: u64 = 0x10_0000;
    const RX_RINGS: u64 = 0;
    const TX_RINGS: u64 = 0x8000;

    /// A device whose "tap" is a datagram socket; returns the host's end too.
    fn device() -> (Net, UnixDatagram) {
        let (ours, host) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let tap = Tap::from_fd(ours.into(), "test0");
        (Net::new(tap, "52:54:00:12:34:56".parse().unwrap()), host)
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn mac_parses_and_prints() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let r = MacAddr::random_local();
        assert_eq!(r.0[0] & 0x03, 0x02, "local, unicast");
    }

    #[test]
    fn config_has_the_mac() {
        let m = mem();
        let (net, _host) = device();
        let (mut t, _irq) = transport(net, &m);
        let mut mac = [0u8; 6];
        crate::BusDevice::read(&mut t, 0x100, &mut mac);
        assert_eq!(mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_ne!(r32(&mut t, 0x10) & (1 << VIRTIO_NET_F_MAC), 0);
        assert_eq!(r32(&mut t, 0x8), VIRTIO_ID_NET);
    }

    #[test]
    fn transmits_frames_with_a_clean_header() {
        let m = mem();
        let (net, host) = device();
        let (mut t, irq) = transport(net, &m);
        let rx = Driver::at(&m, RX_RINGS, 16);
        let mut tx = Driver::at(&m, TX_RINGS, 16);
        activate(&mut t, &[&rx, &tx]);
        // A header asking for checksum offload the device never offered.
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[0] = 1;
        put(&m, BUF, &hdr);
        put(&m, BUF + 0x1000, &[7u8; 60]);
        tx.add(&[Desc::r(BUF, VNET_HDR_LEN as u32), Desc::r(BUF + 0x1000, 60)]);
        notify(&mut t, 1);
        assert_eq!(tx.used_idx(), 1);
        assert_eq!(tx.used(0).1, 0);
        assert_eq!(irq.used(), 1);
        let mut got = [0u8; 256];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frame(&[7u8; 60])[..]);
    }

    #[test]
    fn bad_transmit_chains_are_dropped() {
        let m = mem();
        let (net, host) = device();
        let (mut t, _irq) = transport(net, &m);
        let rx = Driver::at(&m, RX_RINGS, 16);
        let mut tx = Driver::at(&m, TX_RINGS, 16);
        activate(&mut t, &[&rx, &tx]);
        tx.add(&[Desc::r(BUF, 8)]); // shorter than the header
        tx.add(&[Desc::r(BUF, MAX_FRAME as u32 + 1)]); // oversize
        tx.add(&[Desc::r(MEM_SIZE - 16, 64)]); // outside memory
        tx.add(&[Desc::r(BUF, 0)]); // zero length
        tx.add_raw(&[(BUF, 64, false, Some(1)), (BUF, 64, false, Some(0))]); // loop
        notify(&mut t, 1);
        assert_eq!(tx.used_idx(), 5);
        assert!(t.is_activated());
        let mut got = [0u8; 256];
        assert_eq!(
            host.recv(&mut got).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn receive_waits_for_buffers_and_keeps_the_frame() {
        let m = mem();
        let (net, host) = device();
        let (mut t, irq) = transport(net, &m);
        let mut rx = Driver::at(&m, RX_RINGS, 16);
        let tx = Driver::at(&m, TX_RINGS, 16);
        activate(&mut t, &[&rx, &tx]);

        // A frame arrives with no receive buffer: it stays pending.
        let mut f1 = frame(&[1u8; 100]);
        f1[0] = 0x55; // garbage in the tap's header is not passed on
        host.send(&f1).unwrap();
        host.send(&frame(&[2u8; 80])).unwrap();
        t.with_device(|net, q| net.process_tap(q)).unwrap();
        assert!(t.device().rx_blocked());
        assert_eq!(irq.used(), 0);
        // While blocked, tap events do not read.
        t.with_device(|net, q| net.process_tap(q)).unwrap();

        // The guest adds one buffer: the first frame goes in, the second waits.
        rx.add(&[Desc::w(BUF, 1526)]);
        notify(&mut t, 0);
        assert_eq!(rx.used(0).1, 112);
        let got = get(&m, BUF, 112);
        let mut want = frame(&[1u8; 100]);
        want[10] = 1; // num_buffers
        assert_eq!(got, want);
        assert_eq!(irq.used(), 1);
        assert!(t.device().rx_blocked());

        // A second buffer, split in two descriptors, takes the second frame.
        rx.add(&[Desc::w(BUF + 0x1000, 50), Desc::w(BUF + 0x2000, 1000)]);
        notify(&mut t, 0);
        assert_eq!(rx.used(1).1, 92);
        assert_eq!(get(&m, BUF + 0x1000 + 12, 38), vec![2u8; 38]);
        assert_eq!(get(&m, BUF + 0x2000, 42), vec![2u8; 42]);
        assert!(!t.device().rx_blocked());
    }

    #[test]
    fn receive_skips_bad_buffers_and_drops_frames_that_do_not_fit() {
        let m = mem();
        let (net, host) = device();
        let (mut t, _irq) = transport(net, &m);
        let mut rx = Driver::at(&m, RX_RINGS, 16);
        let tx = Driver::at(&m, TX_RINGS, 16);
        activate(&mut t, &[&rx, &tx]);
        rx.add(&[Desc::w(MEM_SIZE, 2048)]); // outside memory: returned empty
        rx.add(&[Desc::w(BUF, 64)]); // too small for the first frame
        host.send(&frame(&[3u8; 500])).unwrap(); // dropped
        host.send(&frame(&[4u8; 40])).unwrap(); // fits
        t.with_device(|net, q| net.process_tap(q)).unwrap();
        assert_eq!(rx.used_idx(), 2);
        assert_eq!(rx.used(0).1, 0);
        assert_eq!(rx.used(1).1, 52);
        assert_eq!(get(&m, BUF + 12, 40), vec![4u8; 40]);
    }

    #[test]
    fn frames_wait_for_activation() {
        let m = mem();
        let (net, host) = device();
        let (mut t, _irq) = transport(net, &m);
        let mut rx = Driver::at(&m, RX_RINGS, 16);
        let tx = Driver::at(&m, TX_RINGS, 16);
        host.send(&frame(&[9u8; 20])).unwrap();
        assert!(t.with_device(|net, q| net.process_tap(q)).is_none());
        rx.add(&[Desc::w(BUF, 1526)]);
        // The guest made a buffer available before DRIVER_OK: activation looks at it.
        activate(&mut t, &[&rx, &tx]);
        assert_eq!(rx.used_idx(), 1);
        assert_eq!(rx.used(0).1, 32);
    }

    #[test]
    fn state_round_trip_keeps_the_pending_frame() {
        let m = mem();
        let (net, host) = device();
        let (mut t, _irq) = transport(net, &m);
        let mut rx = Driver::at(&m, RX_RINGS, 16);
        let tx = Driver::at(&m, TX_RINGS, 16);
        activate(&mut t, &[&rx, &tx]);
        host.send(&frame(&[5u8; 30])).unwrap();
        t.with_device(|net, q| net.process_tap(q)).unwrap();
        let state = t.state();
        assert_eq!(state.pending_rx.as_ref().map(Vec::len), Some(42));
        let back: NetState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(back, state);

        let (net2, _host2) = device();
        let irq = Arc::new(CountingInterrupt::default());
        let tap = Tap::from_fd(
            {
                let (a, _b) = UnixDatagram::pair().unwrap();
                a.set_nonblocking(true).unwrap();
                a.into()
            },
            "test1",
        );
        drop(net2);
        let mut restored = MmioTransport::<Net>::from_state(&back, tap, m.clone(), irq).unwrap();
        assert_eq!(restored.state(), state);
        rx.add(&[Desc::w(BUF, 1526)]);
        notify(&mut restored, 0);
        assert_eq!(rx.used(0).1, 42);
        assert_eq!(get(&m, BUF + 12, 30), vec![5u8; 30]);

        let mut bad = back.clone();
        bad.pending_rx = Some(vec![0; MAX_FRAME + 1]);
        let (net3, _h) = device();
        let irq = Arc::new(CountingInterrupt::default());
        assert!(matches!(
            MmioTransport::<Net>::from_state(&bad, net3.tap, m, irq),
            Err(NetError::PendingFrame(_))
        ));
    }
}
