//! What a vCPU does with each KVM exit: a pure function over the PIO and MMIO buses, so the
//! whole dispatch is unit-tested with made-up exits and no KVM.

use devices::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

use crate::metrics::ExitKind;

/// The buses a vCPU dispatches I/O to.
#[derive(Debug, Clone, Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// Why a VM stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked for a reset (i8042, triple fault, PSCI-style system event).
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The VMM was asked to stop.
    Requested,
    /// The VM was migrated away and runs elsewhere now.
    Migrated,
    /// Something went wrong; the message says what.
    Failed(String),
}

impl StopReason {
    /// The process exit code for this reason: 0 for a guest-initiated stop.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::Reset
            | StopReason::PowerOff
            | StopReason::Requested
            | StopReason::Migrated => 0,
            StopReason::Failed(_) => 1,
        }
    }
}

/// What the vCPU loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Stop the VM.
    Stop(StopReason),
    /// The guest hit an exit that needs the vCPU's registers to explain (emulation failure).
    InternalError,
}

/// Which counter an exit goes to (`vcpu_exits` in stats).
pub fn kind(exit: &VcpuExit<'_>) -> ExitKind {
    match exit {
        VcpuExit::IoIn(..) => ExitKind::IoIn,
        VcpuExit::IoOut(..) => ExitKind::IoOut,
        VcpuExit::MmioRead(..) => ExitKind::MmioRead,
        VcpuExit::MmioWrite(..) => ExitKind::MmioWrite,
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitKind::Interrupted,
        VcpuExit::Hlt => ExitKind::Hlt,
        VcpuExit::Shutdown => ExitKind::Shutdown,
        VcpuExit::SystemEvent(..) => ExitKind::SystemEvent,
        VcpuExit::InternalError => ExitKind::InternalError,
        VcpuExit::FailEntry(..) => ExitKind::FailEntry,
        _ => ExitKind::Other,
    }
}

/// Handles one exit.
pub fn handle(exit: VcpuExit<'_>, buses: &Buses) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                log::trace!("unhandled PIO read {port:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) {
                log::trace!("unhandled PIO write {port:#x} {data:x?}");
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                log::debug!("unhandled MMIO read {addr:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                log::debug!("unhandled MMIO write {addr:#x}");
            }
            ExitAction::Continue
        }
        // Signals (pause, stop) and interrupt windows: the loop looks at its mailbox.
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitAction::Continue,
        // A triple fault: x86 resets, and so does the VM (Linux uses it for reboot=t).
        VcpuExit::Shutdown => ExitAction::Stop(StopReason::Reset),
        // With the in-kernel LAPIC, HLT stays in the kernel; seeing it means the guest halted
        // with nothing to wake it.
        VcpuExit::Hlt => ExitAction::Stop(StopReason::PowerOff),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(StopReason::PowerOff),
            KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(StopReason::Reset),
            KVM_SYSTEM_EVENT_CRASH => ExitAction::Stop(StopReason::Failed("guest crashed".into())),
            other => ExitAction::Stop(StopReason::Failed(format!("unknown system event {other}"))),
        },
        VcpuExit::InternalError => ExitAction::InternalError,
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(StopReason::Failed(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        ))),
        other => ExitAction::Stop(StopReason::Failed(format!("unexpected KVM exit {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Port(Vec<u8>);

    impl BusDevice for Port {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    fn buses() -> (Buses, Arc<Mutex<Port>>, Arc<Mutex<Port>>) {
        let (pio_dev, mmio_dev) = (
            Arc::new(Mutex::new(Port::default())),
            Arc::new(Mutex::new(Port::default())),
        );
        let mut buses = Buses::default();
        buses.pio.insert(pio_dev.clone(), 0x3f8, 8).unwrap();
        buses
            .mmio
            .insert(mmio_dev.clone(), 0xd000_0000, 0x1000)
            .unwrap();
        (buses, pio_dev, mmio_dev)
    }

    #[test]
    fn port_io_reaches_the_device() {
        let (buses, pio, _) = buses();
        assert_eq!(
            handle(VcpuExit::IoOut(0x3f8, b"A"), &buses),
            ExitAction::Continue
        );
        assert_eq!(pio.lock().unwrap().0, b"A");
        let mut data = [0u8; 1];
        assert_eq!(
            handle(VcpuExit::IoIn(0x3fd, &mut data), &buses),
            ExitAction::Continue
        );
        assert_eq!(data, [0x45]);
    }

    #[test]
    fn unmapped_io_reads_ones_and_continues() {
        let (buses, _, _) = buses();
        let mut data = [0u8; 4];
        assert_eq!(
            handle(VcpuExit::IoIn(0xcfc, &mut data), &buses),
            ExitAction::Continue
        );
        assert_eq!(data, [0xff; 4]);
        assert_eq!(
            handle(VcpuExit::MmioWrite(0x1234, &[1]), &buses),
            ExitAction::Continue
        );
    }

    #[test]
    fn mmio_reaches_the_device() {
        let (buses, _, mmio) = buses();
        handle(VcpuExit::MmioWrite(0xd000_0010, &[1, 2, 3, 4]), &buses);
        assert_eq!(mmio.lock().unwrap().0, vec![1, 2, 3, 4]);
        let mut data = [0u8; 2];
        handle(VcpuExit::MmioRead(0xd000_0002, &mut data), &buses);
        assert_eq!(data, [0x42, 0x42]);
    }

    #[test]
    fn guest_stops_map_to_reasons() {
        let (buses, _, _) = buses();
        assert_eq!(
            handle(VcpuExit::Shutdown, &buses),
            ExitAction::Stop(StopReason::Reset)
        );
        assert_eq!(
            handle(
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                &buses
            ),
            ExitAction::Stop(StopReason::PowerOff)
        );
        assert_eq!(
            handle(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &buses),
            ExitAction::Stop(StopReason::Reset)
        );
        assert!(matches!(
            handle(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[]), &buses),
            ExitAction::Stop(StopReason::Failed(_))
        ));
        assert_eq!(
            handle(VcpuExit::InternalError, &buses),
            ExitAction::InternalError
        );
        assert!(matches!(
            handle(VcpuExit::FailEntry(7, 0), &buses),
            ExitAction::Stop(StopReason::Failed(_))
        ));
        assert!(matches!(
            handle(VcpuExit::Unknown, &buses),
            ExitAction::Stop(StopReason::Failed(_))
        ));
        assert_eq!(handle(VcpuExit::Intr, &buses), ExitAction::Continue);
    }

    #[test]
    fn exits_have_kinds() {
        let mut data = [0u8; 1];
        assert_eq!(kind(&VcpuExit::IoIn(0x3f8, &mut data)), ExitKind::IoIn);
        assert_eq!(kind(&VcpuExit::IoOut(0x3f8, b"A")), ExitKind::IoOut);
        assert_eq!(kind(&VcpuExit::MmioWrite(0, &[1])), ExitKind::MmioWrite);
        assert_eq!(kind(&VcpuExit::Intr), ExitKind::Interrupted);
        assert_eq!(kind(&VcpuExit::Hlt), ExitKind::Hlt);
        assert_eq!(kind(&VcpuExit::Unknown), ExitKind::Other);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(StopReason::Reset.exit_code(), 0);
        assert_eq!(StopReason::PowerOff.exit_code(), 0);
        assert_eq!(StopReason::Failed("x".into()).exit_code(), 1);
    }
}
