//! The snapshot state file (`vmm::snapshot::format`) over fuzzed bytes: the whole file
//! (first byte even) or a JSON body framed here with a valid header and checksum (odd), so
//! the fuzzer reaches the body decoder. A decoded state then goes through what a restore
//! does with it before KVM is touched: the consistency check against a manifest of its
//! regions, the confirmation of its disks and taps, and each virtio device's saved state
//! restored onto a transport over guest memory (backends made here, never the paths or
//! taps the input names) and notified, so restored queues are served.
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;

use devices::virtio::{GuestMemoryMmap, Interrupt, MmioTransport, Tap, VirtioDevice};
use devices::BusDevice;
use fabric::Manifest;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm::snapshot::confirm::Confirmed;
use vmm::snapshot::format;
use vmm::snapshot::restore::Loaded;
use vmm::virtio::VirtioDeviceState;

#[path = "common/interrupt.rs"]
mod interrupt;
use interrupt::NoInterrupt;

/// Largest disk made for a restored block device (sparse): 1 GiB.
const MAX_SECTORS: u64 = 1 << 21;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        frame(rest)
    };
    let Ok(state) = format::decode(&file) else {
        return;
    };
    let again = format::encode(&state);
    assert!(
        format::decode(&again).is_ok(),
        "a decoded state re-encodes to a file that does not decode"
    );
    let dir = Path::new("/nonexistent/snapshot");
    if let Ok(manifest) = Manifest::new(&state.regions) {
        let _ = Loaded::new(dir, state.clone(), manifest, String::new());
    }
    let own = Confirmed::of(&state.virtio);
    if let Err(e) = own.check(dir, &state.virtio) {
        panic!("the snapshot's own disks and taps do not confirm it: {e}");
    }
    let unconfirmed = Confirmed::default().check(dir, &state.virtio);
    assert_eq!(
        unconfirmed.is_ok(),
        own.disks.is_empty() && own.nets.is_empty(),
        "{unconfirmed:?}"
    );
    if let Err(e) = unconfirmed {
        assert!(!e.to_string().contains('\n'), "error on two lines: {e}");
    }
    for device in &state.virtio {
        restore_device(device);
    }
});

/// The state file around `body` (see `vmm::snapshot::format`).
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 56);
    out.extend_from_slice(b"FABVMSNP");
    out.extend_from_slice(&format::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(blake3::hash(body).as_bytes());
    out
}

/// Restores one device over 4 MiB of guest memory and notifies each of its queues.
fn restore_device(device: &VirtioDeviceState) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let irq: Arc<dyn Interrupt> = Arc::new(NoInterrupt);
    match device {
        VirtioDeviceState::Block { state, .. } => {
            if state.capacity > MAX_SECTORS {
                return;
            }
            let disk = tempfile::tempfile().unwrap();
            disk.set_len(state.capacity * 512).unwrap();
            if let Ok(t) =
                MmioTransport::<devices::virtio::Block>::from_state(state, disk, mem, irq)
            {
                notify_all(t);
            }
        }
        VirtioDeviceState::Net { state, .. } => {
            let (ours, _far) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let tap = Tap::from_fd(ours.into(), "fuzz0");
            if let Ok(t) = MmioTransport::<devices::virtio::Net>::from_state(state, tap, mem, irq) {
                notify_all(t);
            }
        }
        VirtioDeviceState::Rng { state } => {
            if let Ok(t) = MmioTransport::<devices::virtio::Rng>::from_state(state, mem, irq) {
                notify_all(t);
            }
        }
    }
}

/// Writes QueueNotify for every queue the device has (and one past them).
fn notify_all<D: VirtioDevice>(mut t: MmioTransport<D>) {
    for queue in 0..4u32 {
        t.write(0x50, &queue.to_le_bytes());
    }
    let mut status = [0u8; 4];
    t.read(0x70, &mut status);
}
