//! rayon's worker threads: the parallel parts of hashing, the store (reading, verifying and
//! writing pages), migration (compressing, verifying and installing pages, reading pages of
//! VMs on this host) and memory images. Started by [`super::start_workers`].

use super::rules::{self, Rules};

pub(super) fn rules(r: &mut Rules) {
    rules::write_files(r);
    r.allow(&[libc::SYS_process_vm_readv]);
}
