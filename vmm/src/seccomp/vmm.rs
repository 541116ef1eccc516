//! The main thread once the VM runs (installed just before the event loop serves its first
//! event): the event loop (epoll over eventfds, stdin, the API mailbox), the console's
//! terminal mode, pausing and kicking vCPUs, the dirty log and VM state (snapshots), the
//! store, snapshot directories, memory images and the host registry (files), process figures
//! from `/proc`, closing the API socket, and starting a migration's thread. That thread
//! inherits this filter before adding its own, so this one also holds what a migration
//! source needs ([`super::migration::network`]).

use super::kvm;
use super::rules::{self, Rules};

/// Terminal requests: `TCGETS`, `TCSETS`, `TCSETSW`, `TCSETSF` (raw mode for the console).
const TERMINAL: [u64; 4] = [0x5401, 0x5402, 0x5403, 0x5404];
/// `FIONBIO` and `FIOCLEX` (std sets sockets non-blocking and close-on-exec with these).
pub(super) const FILE_FLAGS: [u64; 2] = [0x5421, 0x5451];

pub(super) fn rules(r: &mut Rules) {
    rules::spawn_threads(r);
    rules::install_filters(r);
    rules::write_files(r);
    rules::ioctls(r, &kvm::DIRTY_LOG);
    rules::ioctls(r, &kvm::VM_STATE);
    rules::ioctls(r, &TERMINAL);
    rules::ioctls(r, &FILE_FLAGS);
    super::migration::network(r);
    r.allow_arg(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])
        .allow(&[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_tgkill,
            libc::SYS_getrusage,
            libc::SYS_statfs,
            libc::SYS_fstatfs,
            libc::SYS_getcwd,
            libc::SYS_access,
            libc::SYS_getuid,
            libc::SYS_geteuid,
        ]);
}
