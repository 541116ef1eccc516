//! The rule builder the per-thread filters are written with, and the groups of system calls
//! several kinds of thread share (every thread's runtime, spawning threads, files).

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// What one system call is allowed with.
#[derive(Debug, Clone)]
enum Allowed {
    /// Any arguments.
    Always,
    /// Only when one of these rules matches.
    When(Vec<SeccompRule>),
}

/// The allow-list of one kind of thread: system call number → when it is allowed. Adding a
/// call twice widens it (an unconditional entry wins over conditional ones).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    calls: BTreeMap<i64, Allowed>,
    /// The first error met while building (a bad condition); reported by [`Rules::into_map`].
    error: Option<String>,
}

impl Rules {
    /// Allows each of `calls` with any arguments.
    pub fn allow(&mut self, calls: &[i64]) -> &mut Self {
        for &nr in calls {
            self.calls.insert(nr, Allowed::Always);
        }
        self
    }

    /// Allows `call` when argument `arg` (0-based, compared as 64 bits) equals one of `values`.
    pub fn allow_arg(&mut self, call: i64, arg: u8, values: &[u64]) -> &mut Self {
        for &value in values {
            self.push(call, arg, SeccompCmpOp::Eq, value);
        }
        self
    }

    /// Allows `call` when the bits `mask` of argument `arg` equal `value`.
    pub fn allow_masked(&mut self, call: i64, arg: u8, mask: u64, value: u64) -> &mut Self {
        self.push(call, arg, SeccompCmpOp::MaskedEq(mask), value);
        self
    }

    fn push(&mut self, call: i64, arg: u8, op: SeccompCmpOp, value: u64) {
        let rule = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]));
        let rule = match rule {
            Ok(rule) => rule,
            Err(e) => {
                self.error.get_or_insert(format!("system call {call}: {e}"));
                return;
            }
        };
        match self.calls.entry(call).or_insert(Allowed::When(Vec::new())) {
            Allowed::Always => {}
            Allowed::When(rules) => rules.push(rule),
        }
    }

    /// Whether `call` is allowed with at least some arguments.
    pub fn allows(&self, call: i64) -> bool {
        self.calls.contains_key(&call)
    }

    /// How many system calls are allowed (with any or some arguments).
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The map seccompiler builds a filter from (an empty rule list = any arguments).
    pub fn into_map(self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
        if let Some(e) = self.error {
            // Conditions only fail on an argument index above 5, a bug in a rules file.
            log::error!("seccomp rules: {e}");
            return Err(BackendError::InvalidArgumentNumber);
        }
        Ok(self
            .calls
            .into_iter()
            .map(|(nr, allowed)| match allowed {
                Allowed::Always => (nr, Vec::new()),
                Allowed::When(rules) => (nr, rules),
            })
            .collect())
    }
}

/// What every Rust thread needs to run, sleep, allocate, log and end: futexes (locks,
/// channels), memory (malloc, thread stacks), time, writes (logs to stderr, eventfds), the
/// signal plumbing of thread exit and the SIGSYS report, and `getrandom` (a thread's first
/// `HashMap`).
pub fn runtime(r: &mut Rules) {
    r.allow(&[
        libc::SYS_futex,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_brk,
        libc::SYS_madvise,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ])
    // Debug builds check that an fd is open before closing it.
    .allow_arg(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]);
}

/// Starting threads (glibc's `pthread_create`: `clone3`, falling back to `clone`, with a
/// thread's flags only), naming them, and waking sleepers in them.
pub fn spawn_threads(r: &mut Rules) {
    r.allow(&[libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq])
        .allow_masked(
            libc::SYS_clone,
            0,
            libc::CLONE_THREAD as u64,
            libc::CLONE_THREAD as u64,
        )
        .allow_arg(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]);
}

/// Reading files already open or opened by path (snapshot files, the store, key files).
pub fn read_files(r: &mut Rules) {
    r.allow(&[
        libc::SYS_openat,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_getdents64,
        libc::SYS_readlink,
        libc::SYS_fcntl,
        libc::SYS_flock,
    ]);
}

/// Creating, writing, syncing, renaming and removing files and directories (the store,
/// snapshots, the published identity table, memory images).
pub fn write_files(r: &mut Rules) {
    read_files(r);
    r.allow(&[
        libc::SYS_writev,
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_mkdirat,
        libc::SYS_mkdir,
        libc::SYS_renameat2,
        libc::SYS_rename,
        libc::SYS_unlinkat,
        libc::SYS_unlink,
        libc::SYS_linkat,
        libc::SYS_fchmod,
        libc::SYS_copy_file_range,
        libc::SYS_msync,
    ]);
}

/// Any KVM `ioctl` (building a VM: `/dev/kvm`, the VM and vCPU fds); no other `ioctl`.
pub fn any_kvm_ioctl(r: &mut Rules) {
    r.allow_masked(libc::SYS_ioctl, 1, 0xFF00, super::kvm::KVMIO << 8);
}

/// The `ioctl` requests in `requests`.
pub fn ioctls(r: &mut Rules, requests: &[u64]) {
    r.allow_arg(libc::SYS_ioctl, 1, requests);
}

/// Installing a filter of its own (`seccomp(SECCOMP_SET_MODE_FILTER)` after
/// `PR_SET_NO_NEW_PRIVS`), for threads whose filter the threads they start inherit: a filter
/// can only narrow what a thread may do.
pub fn install_filters(r: &mut Rules) {
    r.allow_arg(libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64])
        .allow_arg(
            libc::SYS_seccomp,
            0,
            &[libc::SECCOMP_SET_MODE_FILTER as u64],
        );
}
