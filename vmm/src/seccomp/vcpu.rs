//! The vCPU thread: runs the guest (`KVM_RUN`), serves its port and MMIO exits from the
//! buses (serial output on stdout, eventfds for reset and exit), saves its registers for
//! snapshots and migrations, and sleeps while throttled. It opens nothing and talks to no
//! one: a guest that takes it over can run KVM requests on its own fds and write to fds it
//! already holds, nothing else.

use super::kvm;
use super::rules::{self, Rules};

pub(super) fn rules(r: &mut Rules) {
    rules::ioctls(r, &kvm::VCPU);
}
