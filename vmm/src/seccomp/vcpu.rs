//! The vCPU thread: runs the guest (`KVM_RUN`), serves its port and MMIO exits from the
//! buses (serial output on stdout, eventfds for reset and exit), saves its registers for
//! snapshots and migrations, and sleeps while throttled; when the guest activates a virtio
//! device (an MMIO write) it serves that device's queues once (disk, tap and eventfd reads
//! and writes). It opens nothing, makes no other `ioctl`, starts no thread and has no sockets:
//! a guest that takes it over can read and write fds fabvm already holds, nothing else.

use super::kvm;
use super::rules::{self, Rules};

pub(super) fn rules(r: &mut Rules) {
    rules::ioctls(r, &kvm::VCPU);
    super::device::io(r);
}
