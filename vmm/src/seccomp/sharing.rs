//! The sharing agent (`fabvm-share`, `--share=guided`): reads the plan the host's leader
//! wrote for this VM and marks those guest pages mergeable (`madvise`); on the VM that holds
//! the registry's lock it is also the leader: it reads the identity tables other VMs publish,
//! plans which pages merge, writes the plans, and tunes ksmd through sysfs.

use super::rules::{self, Rules};

pub(super) fn rules(r: &mut Rules) {
    rules::write_files(r);
    r.allow(&[
        libc::SYS_geteuid,
        libc::SYS_getpriority,
        libc::SYS_setpriority,
        libc::SYS_kill,
        libc::SYS_process_vm_readv,
    ]);
}
