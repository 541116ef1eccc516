//! Tests of the virtio-mmio transport against a dummy device.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::bus::BusDevice;
use crate::virtio::testutil::*;

/// A device that records what the transport asks of it.
#[derive(Debug, Default)]
struct Dummy {
    config: [u8; 8],
    fail_activate: bool,
    activations: usize,
    resets: usize,
    processed: Arc<AtomicUsize>,
}

const DUMMY_FEATURES: u64 = (1 << 3) | (1 << 40);

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8, 16]
    }
    fn features(&self) -> u64 {
        DUMMY_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::device::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        if let Some(dst) = self.config.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
    }
    fn activate(&mut self, features: u64, _q: &mut Queues<'_>) -> Result<(), DeviceError> {
        assert_eq!(features & F_VERSION_1, F_VERSION_1);
        self.activations += 1;
        if self.fail_activate {
            return Err(DeviceError::NoQueue(7));
        }
        Ok(())
    }
    fn process_queue(&mut self, index: usize, q: &mut Queues<'_>) -> Result<(), DeviceError> {
        self.processed.fetch_add(1, Ordering::SeqCst);
        while let Some(chain) = q.pop(index)? {
            q.add_used(index, chain.head_index(), 0)?;
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
    }
}

fn dummy(m: &GuestMemoryMmap) -> (MmioTransport<Dummy>, Arc<CountingInterrupt>) {
    transport(Dummy::default(), m)
}

#[test]
fn cmdline_entry_format() {
    assert_eq!(
        cmdline_entry(0xd000_0000, 5),
        "virtio_mmio.device=512@0xd0000000:5"
    );
}

#[test]
fn identifies_itself() {
    let m = mem();
    let (mut t, _) = dummy(&m);
    assert_eq!(r32(&mut t, 0x000), 0x7472_6976);
    assert_eq!(r32(&mut t, 0x004), 2);
    assert_eq!(r32(&mut t, 0x008), 42);
    assert_eq!(r32(&mut t, 0x00c), 0);
    assert_eq!(r32(&mut t, 0x0b0), u32::MAX, "no shared memory");
    // Narrow or unaligned register reads return zero.
    let mut b = [0xffu8; 2];
    t.read(0x000, &mut b);
    assert_eq!(b, [0, 0]);
    assert_eq!(r32(&mut t, 0x002), 0);
}

#[test]
fn negotiates_features() {
    let m = mem();
    let (mut t, _) = dummy(&m);
    w32(&mut t, 0x14, 0);
    assert_eq!(r32(&mut t, 0x10), 1 << 3);
    w32(&mut t, 0x14, 1);
    assert_eq!(
        r32(&mut t, 0x10),
        (1 << 8) | 1,
        "VIRTIO_F_VERSION_1 and bit 40"
    );
    w32(&mut t, 0x14, 2);
    assert_eq!(r32(&mut t, 0x10), 0);

    // A subset with VERSION_1 is accepted.
    assert_eq!(
        negotiate(&mut t, F_VERSION_1 | (1 << 3)),
        ACK | DRIVER | FEATURES_OK
    );
    // Feature writes after FEATURES_OK are ignored.
    w32(&mut t, 0x24, 0);
    w32(&mut t, 0x20, 0);
    assert_eq!(t.transport_state().driver_features, F_VERSION_1 | (1 << 3));
}

#[test]
fn refuses_features_without_version_1_or_not_offered() {
    let m = mem();
    for features in [1u64 << 3, F_VERSION_1 | (1 << 4), F_VERSION_1 | (1 << 63)] {
        let (mut t, _) = dummy(&m);
        assert_eq!(negotiate(&mut t, features), ACK | DRIVER, "{features:#x}");
        // DRIVER_OK without FEATURES_OK goes nowhere.
        w32(&mut t, 0x70, ACK | DRIVER | DRIVER_OK);
        assert_eq!(r32(&mut t, 0x70), ACK | DRIVER);
        assert!(!t.is_activated());
    }
}

#[test]
fn status_only_moves_forward() {
    let m = mem();
    let (mut t, _) = dummy(&m);
    w32(&mut t, 0x70, DRIVER); // DRIVER without ACK
    assert_eq!(r32(&mut t, 0x70), 0);
    w32(&mut t, 0x70, ACK);
    w32(&mut t, 0x70, ACK | DRIVER);
    w32(&mut t, 0x70, ACK); // clearing a bit without reset
    assert_eq!(r32(&mut t, 0x70), ACK | DRIVER);
    w32(&mut t, 0x70, ACK | DRIVER | 0x10); // unknown bit
    assert_eq!(r32(&mut t, 0x70), ACK | DRIVER);
    // Features written before DRIVER are ignored.
    let (mut t2, _) = dummy(&m);
    w32(&mut t2, 0x70, ACK);
    w32(&mut t2, 0x24, 1);
    w32(&mut t2, 0x20, 1);
    assert_eq!(t2.transport_state().driver_features, 0);
    // FAILED sticks until reset.
    w32(&mut t, 0x70, ACK | DRIVER | 0x80);
    assert_eq!(r32(&mut t, 0x70), ACK | DRIVER | 0x80);
    w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK);
    assert_eq!(r32(&mut t, 0x70), ACK | DRIVER | 0x80);
    w32(&mut t, 0x70, 0);
    assert_eq!(r32(&mut t, 0x70), 0);
}

#[test]
fn activates_and_processes_notified_queues() {
    let m = mem();
    let (mut t, irq) = dummy(&m);
    let processed = t.device().processed.clone();
    let mut q0 = Driver::at(&m, 0, 8);
    let q1 = Driver::at(&m, 0x4000, 16);
    // Notifications before DRIVER_OK are ignored.
    notify(&mut t, 0);
    assert_eq!(processed.load(Ordering::SeqCst), 0);
    activate(&mut t, &[&q0, &q1]);
    assert_eq!(t.device().activations, 1);
    // Activation looks at every ready queue once.
    assert_eq!(processed.load(Ordering::SeqCst), 2);
    assert_eq!(r32(&mut t, 0x34), 16, "QueueSel still 1");
    w32(&mut t, 0x30, 0);
    assert_eq!(r32(&mut t, 0x34), 8);
    assert_eq!(r32(&mut t, 0x44), 1);

    q0.add(&[Desc::r(0x10_0000, 4)]);
    notify(&mut t, 0);
    assert_eq!(q0.used_idx(), 1);
    assert_eq!(irq.used(), 1);
    assert_eq!(r32(&mut t, 0x60), 1);
    w32(&mut t, 0x64, 1);
    assert_eq!(r32(&mut t, 0x60), 0);
    // No new used entries, no interrupt; unknown queues are ignored.
    notify(&mut t, 0);
    notify(&mut t, 2);
    notify(&mut t, u32::MAX);
    assert_eq!(irq.used(), 1);
    // Queue registers are frozen once the device is live.
    w32(&mut t, 0x38, 4);
    w32(&mut t, 0x44, 0);
    assert_eq!(r32(&mut t, 0x44), 1);
    assert_eq!(t.transport_state().queues[0].size, 8);
}

#[test]
fn reset_clears_everything() {
    let m = mem();
    let (mut t, _) = dummy(&m);
    let mut q0 = Driver::at(&m, 0, 8);
    let q1 = Driver::at(&m, 0x4000, 16);
    activate(&mut t, &[&q0, &q1]);
    q0.add(&[Desc::r(0x10_0000, 4)]);
    notify(&mut t, 0);
    w32(&mut t, 0x14, 1);
    w32(&mut t, 0x70, 0);
    assert_eq!(t.device().resets, 1);
    assert!(!t.is_activated());
    let fresh = dummy(&m).0.transport_state();
    assert_eq!(t.transport_state(), fresh);
    assert_eq!(r32(&mut t, 0x70), 0);
    assert_eq!(r32(&mut t, 0x44), 0);
    assert_eq!(r32(&mut t, 0x60), 0);
    // Notifications after reset are ignored.
    let processed = t.device().processed.load(Ordering::SeqCst);
    notify(&mut t, 0);
    assert_eq!(t.device().processed.load(Ordering::SeqCst), processed);
    // And the device can be brought up again.
    let q0 = Driver::at(&m, 0x8000, 8);
    activate(&mut t, &[&q0, &q1]);
}

#[test]
fn bad_queue_sizes_need_reset() {
    let m = mem();
    for size in [0u32, 3, 12, 16, 1 << 16, u32::MAX] {
        let (mut t, irq) = dummy(&m);
        negotiate(&mut t, F_VERSION_1);
        w32(&mut t, 0x30, 0);
        w32(&mut t, 0x38, size);
        assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, NEEDS_RESET, "size {size}");
        assert_eq!(irq.config(), 0, "no interrupt before DRIVER_OK");
        // DRIVER_OK does not activate a device that needs reset.
        w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!t.is_activated());
        // Reset recovers.
        w32(&mut t, 0x70, 0);
        assert_eq!(r32(&mut t, 0x70), 0);
    }
}

#[test]
fn misaligned_rings_need_reset() {
    let m = mem();
    for (reg, value) in [(0x80, 0x1008), (0x90, 0x1001), (0xa0, 0x1002)] {
        let (mut t, _) = dummy(&m);
        negotiate(&mut t, F_VERSION_1);
        w32(&mut t, reg, value);
        assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, NEEDS_RESET, "{reg:#x}");
    }
}

#[test]
fn rings_outside_memory_fail_activation() {
    let m = mem();
    let (mut t, irq) = dummy(&m);
    negotiate(&mut t, F_VERSION_1);
    let q = Driver::at(&m, 0, 8);
    setup_queue(&mut t, 0, &q);
    // Move the used ring past the end of guest memory (high half).
    w32(&mut t, 0xa4, 1);
    w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(!t.is_activated());
    assert_eq!(
        r32(&mut t, 0x70),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    );
    assert_eq!(irq.config(), 1);
    assert_eq!(r32(&mut t, 0x60), 2);
    notify(&mut t, 0);
    assert_eq!(t.device().processed.load(Ordering::SeqCst), 0);
}

#[test]
fn available_ring_at_zero_fails_activation() {
    let m = mem();
    let (mut t, _) = dummy(&m);
    negotiate(&mut t, F_VERSION_1);
    setup_queue(&mut t, 0, &Driver::at(&m, 0x1000, 8));
    w32(&mut t, 0x90, 0);
    w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(!t.is_activated());
    assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, NEEDS_RESET);
}

#[test]
fn queue_setup_outside_its_window_is_ignored() {
    let m = mem();
    let (mut t, _) = dummy(&m);
    // Before FEATURES_OK.
    w32(&mut t, 0x70, ACK | DRIVER);
    w32(&mut t, 0x30, 0);
    w32(&mut t, 0x38, 4);
    w32(&mut t, 0x44, 1);
    assert_eq!(r32(&mut t, 0x44), 0);
    assert_eq!(t.transport_state().queues[0].size, 8);
    // A queue that does not exist.
    negotiate(&mut t, F_VERSION_1);
    w32(&mut t, 0x30, 5);
    assert_eq!(r32(&mut t, 0x34), 0);
    w32(&mut t, 0x38, 4);
    w32(&mut t, 0x44, 1);
    assert_eq!(r32(&mut t, 0x44), 0);
    assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, 0);
}

#[test]
fn activation_failure_needs_reset() {
    let m = mem();
    let (mut t, irq) = transport(
        Dummy {
            fail_activate: true,
            ..Dummy::default()
        },
        &m,
    );
    negotiate(&mut t, F_VERSION_1);
    w32(&mut t, 0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(!t.is_activated());
    assert_eq!(r32(&mut t, 0x70) & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(irq.config(), 1);
}

#[test]
fn config_space_and_generation() {
    let m = mem();
    let (mut t, irq) = dummy(&m);
    t.write(0x102, &[0xaa, 0xbb]);
    let mut b = [0u8; 4];
    t.read(0x100, &mut b);
    assert_eq!(b, [0, 0, 0xaa, 0xbb]);
    let mut past = [0xffu8; 8];
    t.read(0x1f8, &mut past);
    assert_eq!(past, [0; 8]);
    assert_eq!(r32(&mut t, 0xfc), 0);
    t.config_changed();
    assert_eq!(r32(&mut t, 0xfc), 1);
    assert_eq!(r32(&mut t, 0x60), 2);
    assert_eq!(irq.config(), 1);
}

#[test]
fn restore_validates_state() {
    let m = mem();
    let (mut t, _) = dummy(&m);
    negotiate(&mut t, F_VERSION_1 | (1 << 40));
    let good = t.transport_state();
    let irq: Arc<dyn Interrupt> = Arc::new(CountingInterrupt::default());
    let restore =
        |s: &TransportState| MmioTransport::restore(Dummy::default(), m.clone(), irq.clone(), s);
    let back = restore(&good).unwrap();
    assert_eq!(back.transport_state(), good);
    assert!(!back.is_activated());

    let mut bad = good.clone();
    bad.device_type = 2;
    assert!(matches!(restore(&bad), Err(MmioError::DeviceType { .. })));
    let mut bad = good.clone();
    bad.device_features |= 1;
    assert!(matches!(restore(&bad), Err(MmioError::Features { .. })));
    let mut bad = good.clone();
    bad.queues.pop();
    assert!(matches!(restore(&bad), Err(MmioError::QueueCount { .. })));
    for status in [
        DRIVER,
        ACK | DRIVER_OK,
        0x10,
        ACK | DRIVER | FEATURES_OK | 0x20,
    ] {
        let mut bad = good.clone();
        bad.status = status;
        assert!(
            matches!(restore(&bad), Err(MmioError::Status { .. })),
            "{status:#x}"
        );
    }
    let mut bad = good.clone();
    bad.interrupt_status = 4;
    assert!(matches!(restore(&bad), Err(MmioError::Status { .. })));
    let mut bad = good.clone();
    bad.driver_features = 1 << 5;
    assert!(matches!(restore(&bad), Err(MmioError::Status { .. })));
    for (i, f) in [
        |q: &mut QueueSnapshot| q.size = 3,
        |q: &mut QueueSnapshot| q.size = 32,
        |q: &mut QueueSnapshot| q.max_size = 4,
        |q: &mut QueueSnapshot| q.desc_table = 8,
    ]
    .iter()
    .enumerate()
    {
        let mut bad = good.clone();
        f(&mut bad.queues[0]);
        assert!(
            matches!(restore(&bad), Err(MmioError::Queue { .. })),
            "case {i}"
        );
    }
    // An active device whose rings are outside this memory.
    let mut bad = good.clone();
    bad.status = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
    bad.queues[0].ready = true;
    bad.queues[0].used_ring = 1 << 40;
    assert!(matches!(restore(&bad), Err(MmioError::Queue { .. })));
}
