//! Unit tests of the filters: every kind builds, the groups are where they belong, and an
//! installed filter refuses what it does not list while the rest still works.

use std::os::fd::AsRawFd;

use seccompiler::SeccompAction;

use super::*;

#[test]
fn every_kind_builds_in_both_modes() {
    for kind in ThreadKind::ALL {
        for action in [SeccompAction::Trap, SeccompAction::Log] {
            let program = kind.program(action).unwrap();
            assert!(!program.is_empty(), "{}", kind.name());
        }
    }
}

#[test]
fn no_kind_may_run_programs_trace_or_mount() {
    let never = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_init_module,
        libc::SYS_bpf,
        libc::SYS_personality,
        libc::SYS_setuid,
        libc::SYS_fork,
        libc::SYS_vfork,
    ];
    for kind in ThreadKind::ALL {
        let rules = kind.rules();
        for nr in never {
            assert!(
                !rules.allows(nr),
                "{} allows {}",
                kind.name(),
                names::name(nr)
            );
        }
        // What the SIGSYS report and thread exit need is in every filter.
        for nr in [libc::SYS_write, libc::SYS_exit_group, libc::SYS_exit] {
            assert!(
                rules.allows(nr),
                "{} lacks {}",
                kind.name(),
                names::name(nr)
            );
        }
    }
}

#[test]
fn guest_facing_threads_open_nothing_and_reach_no_network() {
    for kind in [ThreadKind::Vcpu, ThreadKind::Device] {
        let rules = kind.rules();
        for nr in [
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_clone3,
            libc::SYS_clone,
            libc::SYS_process_vm_readv,
        ] {
            assert!(
                !rules.allows(nr),
                "{} allows {}",
                kind.name(),
                names::name(nr)
            );
        }
    }
    assert!(!ThreadKind::Api.rules().allows(libc::SYS_openat));
    assert!(!ThreadKind::Api.rules().allows(libc::SYS_ioctl));
}

#[test]
fn the_report_is_one_line_naming_call_and_kind() {
    let mut buf = [0u8; 192];
    let len = report::line(&mut buf, libc::SYS_socket, "vcpu");
    let text = std::str::from_utf8(&buf[..len]).unwrap();
    assert_eq!(
        text,
        "fabvm: seccomp: forbidden system call 41 (socket) on a vcpu thread; exiting\n"
    );
    let mut small = [0u8; 10];
    assert_eq!(report::line(&mut small, 41, "vcpu"), 10);
}

/// On a thread of its own (a filter cannot be removed), with "refuse with EPERM" in place of
/// the trap so the test process lives: the vCPU filter refuses a socket and allows writes.
#[test]
fn an_installed_filter_refuses_what_it_does_not_list() {
    let result = std::thread::spawn(|| {
        let (reader, writer) = std::io::pipe().unwrap();
        let program = ThreadKind::Vcpu
            .program(SeccompAction::Errno(libc::EPERM as u32))
            .unwrap();
        seccompiler::apply_filter(&program).unwrap();
        // SAFETY: socket(2) with constant arguments; a returned fd would be closed below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        let socket_errno = std::io::Error::last_os_error().raw_os_error();
        // SAFETY: writes one byte from a live buffer to a pipe this thread owns.
        let wrote = unsafe { libc::write(writer.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        drop(reader);
        (fd, socket_errno, wrote)
    })
    .join()
    .unwrap();
    assert_eq!(result.0, -1, "socket() was allowed on a vCPU thread");
    assert_eq!(result.1, Some(libc::EPERM));
    assert_eq!(result.2, 1, "write() was refused on a vCPU thread");
}
