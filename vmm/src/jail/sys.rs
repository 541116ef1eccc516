//! The system calls a jail is built with: namespaces, mounts, device nodes, `pivot_root`,
//! and dropping privileges (groups, ids, capabilities, no_new_privs). Each wrapper turns a
//! failure into an error naming what was being done.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// An `io::Error` with what failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct SysError {
    what: String,
    source: io::Error,
}

type Result<T> = std::result::Result<T, SysError>;

fn check(ret: libc::c_int, what: impl FnOnce() -> String) -> Result<()> {
    if ret == -1 {
        return Err(SysError {
            what: what(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn cstr(s: &OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| SysError {
        what: format!("{}", s.to_string_lossy()),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// `unshare(flags)`.
pub fn unshare(flags: libc::c_int) -> Result<()> {
    // SAFETY: unshare takes flags only and touches no memory of ours.
    check(unsafe { libc::unshare(flags) }, || "unshare".into())
}

/// Joins the network namespace at `path` (`/run/netns/NAME` for `ip netns`).
pub fn enter_netns(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|source| SysError {
        what: format!("network namespace {}", path.display()),
        source,
    })?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on an fd we own; it changes only this thread's namespace.
    check(
        unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
        || format!("entering network namespace {}", path.display()),
    )
}

/// `mount(2)`; `source`, `fstype` and `data` may be absent.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let source = source.map(|s| cstr(s.as_os_str())).transpose()?;
    let target_c = cstr(target.as_os_str())?;
    let fstype = fstype.map(|s| cstr(OsStr::new(s))).transpose()?;
    let data = data.map(|s| cstr(OsStr::new(s))).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(ret, || format!("mounting {}", target.display()))
}

/// A character device node at `path` with the numbers of the host's `like`, owned by
/// `uid:gid` with `mode`.
pub fn char_device(path: &Path, like: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(like)
        .map_err(|source| SysError {
            what: format!("{}", like.display()),
            source,
        })?
        .rdev();
    let c = cstr(path.as_os_str())?;
    // SAFETY: mknod with a NUL-terminated path that outlives the call.
    let ret = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, rdev) };
    check(ret, || format!("creating device {}", path.display()))?;
    // SAFETY: chown/chmod of the node just made, path as above (umask may have cut `mode`).
    check(unsafe { libc::chown(c.as_ptr(), uid, gid) }, || {
        format!("chown {}", path.display())
    })?;
    // SAFETY: as above.
    check(unsafe { libc::chmod(c.as_ptr(), mode) }, || {
        format!("chmod {}", path.display())
    })
}

/// `chown(path, uid, gid)`.
pub fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| SysError {
        what: format!("chown {}", path.display()),
        source,
    })
}

/// Makes `new_root` the root of this mount namespace and detaches the old one.
pub fn pivot_root(new_root: &Path) -> Result<()> {
    std::env::set_current_dir(new_root).map_err(|source| SysError {
        what: format!("chdir {}", new_root.display()),
        source,
    })?;
    let dot = cstr(OsStr::new("."))?;
    // SAFETY: pivot_root(".", ".") with a NUL-terminated path; the old root ends up
    // stacked under the new one and is detached next.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(ret as libc::c_int, || "pivot_root".into())?;
    // SAFETY: detaches the old root, now mounted on "."; the string outlives the call.
    let ret = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(ret, || "detaching the old root".into())?;
    std::env::set_current_dir("/").map_err(|source| SysError {
        what: "chdir /".into(),
        source,
    })
}

/// Brings the loopback interface of this (new) network namespace up.
pub fn loopback_up() -> Result<()> {
    // SAFETY: a datagram socket, closed below; only used for interface ioctls.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, || "socket for lo".into())?;
    // SAFETY: an all-zero ifreq is valid; the name is copied in below.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads and writes one ifreq, which `req` is and outlives the call.
    let got = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    let set = if got == -1 {
        -1
    } else {
        // SAFETY: the flags member is the one SIOCGIFFLAGS filled in.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads one ifreq, as above.
        unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) }
    };
    let result = check(set, || "bringing lo up".into());
    // SAFETY: closes the socket made above, which nothing else holds.
    unsafe { libc::close(fd) };
    result
}

/// Last capability number the kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Becomes `uid:gid` with no supplementary groups and no capabilities (none kept, none
/// inheritable, none in the bounding or ambient sets), then sets no_new_privs and asks for
/// SIGKILL when the jail's supervising process dies.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    // The bounding set goes first: dropping from it needs CAP_SETPCAP, which setuid removes.
    for cap in 0..=last_cap() {
        // SAFETY: PR_CAPBSET_DROP takes a capability number; unknown ones fail harmlessly.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if ret == -1 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return check(ret, || format!("dropping capability {cap}"));
        }
    }
    // SAFETY: clears the ambient set; takes numbers only.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    check(ret, || "clearing ambient capabilities".into())?;
    // SAFETY: an empty group list; the pointer is not read when the count is 0.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, || {
        "setgroups".into()
    })?;
    // SAFETY: setresgid/setresuid take ids only.
    check(unsafe { libc::setresgid(gid, gid, gid) }, || {
        format!("setresgid {gid}")
    })?;
    // SAFETY: as above. With no PR_SET_KEEPCAPS, leaving uid 0 clears every capability.
    check(unsafe { libc::setresuid(uid, uid, uid) }, || {
        format!("setresuid {uid}")
    })?;
    // SAFETY: prctl with numbers only.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(ret, || "no_new_privs".into())?;
    let kill = libc::SIGKILL as libc::c_ulong;
    // SAFETY: as above; set after the id change, which would clear it.
    let ret = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, kill, 0, 0, 0) };
    check(ret, || "parent death signal".into())
}

/// Replaces this process with `program` `args` in environment `env`; returns only on error.
pub fn exec(program: &Path, args: &[std::ffi::OsString], env: &[(String, String)]) -> SysError {
    let to_c = |s: &OsStr| CString::new(s.as_bytes()).unwrap_or_default();
    let program_c = to_c(program.as_os_str());
    let argv: Vec<CString> = std::iter::once(to_c(OsStr::new("fabvm")))
        .chain(args.iter().map(|a| to_c(a)))
        .collect();
    let envp: Vec<CString> = env
        .iter()
        .map(|(k, v)| to_c(OsStr::new(&format!("{k}={v}"))))
        .collect();
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    // SAFETY: NULL-terminated arrays of NUL-terminated strings, all alive across the call.
    unsafe { libc::execve(program_c.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
    SysError {
        what: format!("executing {}", program.display()),
        source: io::Error::last_os_error(),
    }
}

/// The interpreter (`PT_INTERP`) an ELF executable names, e.g. `/lib64/ld-linux-x86-64.so.2`;
/// `None` for a static executable.
pub fn elf_interpreter(elf: &[u8]) -> Option<PathBuf> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    for i in 0..usize::from(u16_at(0x38)?) {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == 3 {
            let offset = usize::try_from(u64_at(ph + 8)?).ok()?;
            let size = usize::try_from(u64_at(ph + 0x20)?).ok()?;
            let raw = elf.get(offset..offset.checked_add(size)?)?;
            let name = raw.split(|&b| b == 0).next()?;
            return Some(PathBuf::from(OsStr::from_bytes(name)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_interpreter_of_this_test_binary() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let interp = elf_interpreter(&exe).expect("a dynamically linked test binary");
        assert!(interp.is_absolute(), "{}", interp.display());
        assert!(interp.exists(), "{}", interp.display());
        assert_eq!(elf_interpreter(b"\x7fELF\x02 short"), None);
        assert_eq!(elf_interpreter(b"not an elf at all"), None);
    }
}
