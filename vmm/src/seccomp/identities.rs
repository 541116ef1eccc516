//! The background identity thread (`fabvm-ids`): harvests the VM's dirty log (KVM requests
//! on the VM fd), rehashes the pages that changed (reads of guest memory, hashing spread over
//! rayon's workers) and writes their identities into the published table (a shared mapping),
//! within its CPU budget (it measures its own CPU time and sleeps).

use super::kvm;
use super::rules::{self, Rules};

pub(super) fn rules(r: &mut Rules) {
    rules::ioctls(r, &kvm::DIRTY_LOG);
}
