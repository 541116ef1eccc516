//! virtio-rng (entropy device): fills the driver's device-writable buffers with bytes from the
//! host's getrandom(2), at most [`MAX_REQUEST`] bytes per request.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::chain;
use super::device::{DeviceError, Queues, VirtioDevice};
use super::{GuestMemoryMmap, Interrupt, MmioError, MmioTransport, TransportState};

/// Descriptors in the request queue.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes served per request; a larger buffer gets this much (the used length says so).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A virtio entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    scratch: Vec<u8>,
}

impl Rng {
    /// A device drawing on the host's getrandom(2).
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves one chain; returns the bytes written.
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: &chain::Chain) -> u32 {
        let n = chain.writable_len().min(MAX_REQUEST as u64) as usize;
        if n == 0 {
            return 0;
        }
        self.scratch.resize(n, 0);
        if let Err(e) = getrandom(&mut self.scratch[..n]) {
            log::warn!("virtio-rng: getrandom: {e}");
            return 0;
        }
        match chain::write_bytes(mem, &chain.writable, 0, &self.scratch[..n]) {
            Ok(()) => n as u32,
            Err(e) => {
                log::debug!("virtio-rng: {e}");
                0
            }
        }
    }
}

/// Fills `buf` from the kernel's entropy pool.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we own
        // exclusively for the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-rng: config write at {offset:#x} ignored (no config space)");
    }

    fn activate(&mut self, _features: u64, _queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut Queues<'_>) -> Result<(), DeviceError> {
        while let Some(desc_chain) = queues.pop(index)? {
            let head = desc_chain.head_index();
            let used = match queues.parse(desc_chain) {
                Ok(chain) => self.serve(queues.mem, &chain),
                Err(e) => {
                    log::debug!("virtio-rng: malformed chain {head}: {e}");
                    0
                }
            };
            queues.add_used(index, head, used)?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.scratch = Vec::new();
    }
}

/// An entropy device's saved state: the transport's only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Registers, queues and features.
    pub transport: TransportState,
}

impl MmioTransport<Rng> {
    /// The device's saved state.
    pub fn state(&self) -> RngState {
        RngState {
            transport: self.transport_state(),
        }
    }

    /// Rebuilds an entropy device from `state`.
    pub fn from_state(
        state: &RngState,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<Self, MmioError> {
        MmioTransport::restore(Rng::new(), mem, interrupt, &state.transport)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::*;

    const BUF: u64 = 0x10_0000;

    /// One request on a fresh device; returns the used length.
    fn one(descs: &[Desc]) -> (u32, GuestMemoryMmap) {
        let m = mem();
        let (mut t, irq) = transport(Rng::new(), &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        d.add(descs);
        notify(&mut t, 0);
        assert_eq!(d.used_idx(), 1, "every chain is returned");
        assert_eq!(irq.used(), 1);
        assert!(t.is_activated());
        let len = d.used(0).1;
        (len, m)
    }

    #[test]
    fn fills_writable_buffers() {
        let (len, m) = one(&[Desc::w(BUF, 64), Desc::w(BUF + 0x1000, 64)]);
        assert_eq!(len, 128);
        // 64 zero bytes from getrandom has probability 2^-512.
        assert_ne!(get(&m, BUF, 64), vec![0; 64]);
        assert_ne!(get(&m, BUF + 0x1000, 64), vec![0; 64]);
        assert_eq!(
            get(&m, BUF + 64, 64),
            vec![0; 64],
            "nothing past the buffer"
        );
    }

    #[test]
    fn bad_chains_get_nothing() {
        // Readable only, zero length, outside memory, straddling its end.
        assert_eq!(one(&[Desc::r(BUF, 64)]).0, 0);
        assert_eq!(one(&[Desc::w(BUF, 0)]).0, 0);
        assert_eq!(one(&[Desc::w(MEM_SIZE, 64)]).0, 0);
        assert_eq!(one(&[Desc::w(MEM_SIZE - 32, 64)]).0, 0);
        assert_eq!(one(&[Desc::w(BUF, 64), Desc::r(BUF + 64, 8)]).0, 0);
    }

    #[test]
    fn oversize_buffer_gets_the_maximum() {
        let (len, m) = one(&[Desc::w(BUF, 8 << 20)]);
        assert_eq!(len as usize, MAX_REQUEST);
        assert_eq!(get(&m, BUF + MAX_REQUEST as u64, 64), vec![0; 64]);
    }

    #[test]
    fn descriptor_loop_is_dropped() {
        let m = mem();
        let (mut t, _irq) = transport(Rng::new(), &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        d.add_raw(&[(BUF, 16, true, Some(1)), (BUF + 16, 16, true, Some(0))]);
        notify(&mut t, 0);
        assert_eq!(d.used(0), (0, 0));
    }

    #[test]
    fn state_round_trip() {
        let m = mem();
        let (mut t, _irq) = transport(Rng::new(), &m);
        let mut d = Driver::new(&m, 16);
        activate(&mut t, &[&d]);
        d.add(&[Desc::w(BUF, 16)]);
        notify(&mut t, 0);
        let state = t.state();
        let back: RngState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(back, state);
        let irq = Arc::new(CountingInterrupt::default());
        let mut restored = MmioTransport::<Rng>::from_state(&back, m.clone(), irq.clone()).unwrap();
        assert_eq!(restored.state(), state);
        d.add(&[Desc::w(BUF, 16)]);
        notify(&mut restored, 0);
        assert_eq!(d.used_idx(), 2);
        assert_eq!(irq.used(), 1);
    }
}
