//! The lazy-restore loader (`--restore --lazy`): answers the guest's page faults through
//! userfaultfd (reads of its fd, `UFFDIO_*` requests), fetching pages from the store and
//! writing them into the memory image file.

use super::rules::{self, Rules};

/// The `ioctl` type byte of userfaultfd's requests (`UFFDIO`).
pub(super) const UFFDIO: u64 = 0xAA;

pub(super) fn rules(r: &mut Rules) {
    rules::write_files(r);
    r.allow(&[
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
    ])
    .allow_masked(libc::SYS_ioctl, 1, 0xFF00, UFFDIO << 8);
}
