//! fabvm: a minimal KVM microVM monitor with a memory fabric. This library holds everything
//! the `fabvm` binary does: configuration, the VM, x86_64 boot, vCPUs, devices, the run loop.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod event_loop;
pub mod failpoint;
pub mod host_index;
pub mod host_pages;
pub mod host_ranges;
pub mod jail;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod runner;
pub mod seccomp;
pub mod sharing;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod vm_state;
