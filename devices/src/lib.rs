//! fabvm devices.
