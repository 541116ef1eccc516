//! Builds the devices and puts them on the buses: COM1 (irqfd on GSI 4), the i8042, the
//! debug-exit port, the ACPI power-management registers and the virtio-mmio devices (built by
//! [`crate::virtio`]).
//! Owns the eventfds the event loop watches for console input and guest reset.

use std::sync::{Arc, Mutex};

use devices::{
    AcpiPm, Bus, BusError, DebugExit, EventFdTrigger, I8042State, InputDrained, SerialDevice,
    SerialDeviceState, I8042,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout;
use crate::vcpu::exit::Buses;
use crate::virtio::VirtioDevices;

/// COM1 ports.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1's ISA interrupt.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port; the command port is at +4.
pub const I8042_BASE: u64 = 0x60;

/// Errors from building the devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd.
    #[error("KVM refused irqfd for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    /// Saved serial state that cannot be restored.
    #[error(transparent)]
    Serial(#[from] devices::serial::SerialError),
    /// Two devices claim the same range.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The VM's devices and the handles the event loop needs.
#[derive(Debug)]
pub struct DeviceManager {
    /// Buses shared with the vCPUs.
    pub buses: Arc<Buses>,
    /// The console UART.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest has drained the UART's receive FIFO.
    pub serial_drained: EventFd,
    /// Signalled when the guest asks the i8042 for a reset.
    pub reset: EventFd,
    /// Signalled (status + 1) when the guest writes its exit status to the debug-exit port.
    pub debug_exit: EventFd,
    /// Signalled when the guest enters ACPI S5 (power off).
    pub power_off: EventFd,
    /// The keyboard controller, for its state.
    pub i8042: Arc<Mutex<I8042>>,
    /// The virtio-mmio devices and their thread.
    pub virtio: VirtioDevices,
}

/// Saved device state to start from, instead of power-on state.
#[derive(Debug, Clone, Copy)]
pub struct DeviceStates<'a> {
    /// COM1.
    pub serial: &'a SerialDeviceState,
    /// The i8042.
    pub i8042: &'a I8042State,
}

impl DeviceManager {
    /// Creates the devices, wires their interrupts into `vm` and writes console output to `out`.
    pub fn new(
        vm: &VmFd,
        out: Box<dyn std::io::Write + Send>,
        saved: Option<DeviceStates<'_>>,
    ) -> Result<Self, DeviceError> {
        Self::with_virtio(vm, out, saved, VirtioDevices::none())
    }

    /// [`DeviceManager::new`] plus the `virtio` devices on the MMIO bus.
    pub fn with_virtio(
        vm: &VmFd,
        out: Box<dyn std::io::Write + Send>,
        saved: Option<DeviceStates<'_>>,
        virtio: VirtioDevices,
    ) -> Result<Self, DeviceError> {
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd);
        let irq = eventfd()?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(|source| DeviceError::Irqfd {
                gsi: COM1_IRQ,
                source,
            })?;
        let serial_drained = eventfd()?;
        let reset = eventfd()?;
        let debug_exit = eventfd()?;
        let clone = |evt: &EventFd| evt.try_clone().map_err(DeviceError::EventFd);
        let (trigger, drained) = (EventFdTrigger(irq), InputDrained(clone(&serial_drained)?));
        let serial = match saved {
            Some(saved) => SerialDevice::from_state(saved.serial, trigger, drained, out)?,
            None => SerialDevice::new(trigger, drained, out),
        };
        let serial = Arc::new(Mutex::new(serial));
        let i8042 = match saved {
            Some(saved) => I8042::from_state(saved.i8042, clone(&reset)?),
            None => I8042::new(clone(&reset)?),
        };
        let i8042 = Arc::new(Mutex::new(i8042));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), COM1_BASE, 8)?;
        pio.insert(i8042.clone(), I8042_BASE, 5)?;
        let exit_port = Arc::new(Mutex::new(DebugExit::new(clone(&debug_exit)?)));
        pio.insert(exit_port, devices::debug_exit::DEBUG_EXIT_PORT, 1)?;
        // ACPI S5 is a power-off like status 0 on the debug-exit port: it signals 1 (= status 0)
        // on the same eventfd, so the event loop handles both in one place. ACPI reset signals
        // the i8042's reset eventfd.
        let power_off = eventfd()?;
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(clone(&power_off)?, clone(&reset)?)));
        pio.insert(acpi_pm, layout::ACPI_PM_PORT, devices::acpi_pm::PORTS)?;
        let mut mmio = Bus::new();
        virtio.attach(&mut mmio)?;
        let buses = Arc::new(Buses { pio, mmio });
        Ok(Self {
            buses,
            serial,
            serial_drained,
            reset,
            debug_exit,
            power_off,
            i8042,
            virtio,
        })
    }

    /// The devices' state, for a snapshot (vCPUs paused).
    pub fn state(&self) -> (SerialDeviceState, I8042State) {
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state();
        let i8042 = self.i8042.lock().unwrap_or_else(|e| e.into_inner()).state();
        (serial, i8042)
    }
}
