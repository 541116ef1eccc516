//! The virtio device thread: waits on its event loop (queue notifications, tap readiness),
//! moves data between guest memory and disk images (positioned reads and writes, flushes),
//! taps (reads and writes) and the host's entropy (`getrandom`), and signals the guest
//! through irqfds (eventfd writes). It opens nothing and makes no KVM requests.

use super::rules::Rules;

pub(super) fn rules(r: &mut Rules) {
    r.allow(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
    ]);
    io(r);
}

/// Moving a virtio device's data: disk images, taps, eventfds. The vCPU thread needs this too:
/// a device that the guest activates (an MMIO write) serves its queues once right there.
pub(super) fn io(r: &mut Rules) {
    r.allow(&[
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fstat,
    ]);
}
