//! fabvm's emulated devices and the buses they sit on.
//! The vCPU loop never matches addresses: it hands every PIO/MMIO exit to a [`Bus`].

pub mod acpi_pm;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use acpi_pm::AcpiPm;
pub use bus::{Bus, BusDevice, BusError};
pub use debug_exit::DebugExit;
pub use i8042::{I8042State, I8042};
pub use serial::{EventFdTrigger, InputDrained, SerialDevice, SerialDeviceState};
