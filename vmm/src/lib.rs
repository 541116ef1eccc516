//! fabvm VMM library.
