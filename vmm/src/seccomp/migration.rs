//! A live migration's two ends. The source runs on a thread of its own (and its throttle
//! helper, which inherits this filter): it reads the key file, connects to the destination
//! over TCP, pauses, kicks and resumes the vCPUs, harvests the dirty log and saves VM state,
//! and streams pages. The destination is `fabvm receive`'s main thread from just before it
//! listens until the VM runs (then the [`super::vmm`] filter is stacked on top): it takes the
//! source's connection, creates the VM (`/dev/kvm`, guest memory, eventfds, taps), reads
//! pages of VMs on this host (`/proc/PID/mem`) and from the store, and restores state. In
//! post-copy it registers guest RAM on userfaultfd, and its loader thread (under this
//! filter) answers the guest's faults.

use super::kvm;
use super::rules::{self, Rules};
use super::vmm::FILE_FLAGS;

/// Attaching a tap: `TUNSETIFF`, `TUNSETOFFLOAD`, `TUNSETVNETHDRSZ`, `TUNGETVNETHDRSZ`.
const TAP: [u64; 4] = [
    libc::TUNSETIFF,
    libc::TUNSETOFFLOAD,
    libc::TUNSETVNETHDRSZ,
    libc::TUNGETVNETHDRSZ,
];

/// A TCP connection to a migration peer (IPv4 or IPv6): connecting with a timeout, socket
/// options, sending and receiving, and how much of what it wrote it has not sent yet
/// (`SIOCOUTQ`). The main thread's filter has these too: the migration thread starts under
/// it, and stacked filters must all allow a call.
pub(super) fn network(r: &mut Rules) {
    rules::ioctls(r, &[libc::TIOCOUTQ]);
    r.allow_arg(
        libc::SYS_socket,
        0,
        &[libc::AF_INET as u64, libc::AF_INET6 as u64],
    )
    .allow(&[
        libc::SYS_connect,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_read,
        libc::SYS_writev,
        libc::SYS_shutdown,
    ]);
}

pub(super) fn source(r: &mut Rules) {
    rules::spawn_threads(r);
    rules::read_files(r);
    rules::ioctls(r, &kvm::DIRTY_LOG);
    rules::ioctls(r, &kvm::VM_STATE);
    rules::ioctls(r, &FILE_FLAGS);
    network(r);
    r.allow(&[libc::SYS_tgkill]);
}

pub(super) fn destination(r: &mut Rules) {
    super::vmm::rules(r);
    source(r);
    rules::any_kvm_ioctl(r);
    rules::ioctls(r, &TAP);
    // The vCPUs' kick signal handler is set when they start.
    let kick = u64::try_from(libc::SIGRTMIN()).unwrap_or(0);
    // Post-copy: guest RAM on userfaultfd, answered by the loader thread (which runs under
    // this filter), and the cluster's page service when the source fails.
    r.allow(&[libc::SYS_userfaultfd]).allow_masked(
        libc::SYS_ioctl,
        1,
        0xFF00,
        super::lazy::UFFDIO << 8,
    );
    r.allow_arg(libc::SYS_rt_sigaction, 0, &[kick])
        .allow_arg(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])
        .allow(&[
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept4,
            libc::SYS_accept,
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_memfd_create,
            libc::SYS_process_vm_readv,
            libc::SYS_prlimit64,
            libc::SYS_kill,
        ]);
}
