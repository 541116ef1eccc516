//! A minimal userfaultfd: create, register ranges for missing-page faults, read fault
//! events, and resolve them by copying or zero-filling a page. Written against the stable
//! kernel ABI (linux/userfaultfd.h) because the Rust crate generates its bindings with
//! bindgen at build time, which would make libclang a build dependency of fabvm.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const UFFD_API: u64 = 0xaa;
const UFFDIO: u32 = 0xaa;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);

/// How a page request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// We installed the page.
    Now,
    /// It was already there (a fault raced with a prefetch).
    Already,
}

/// An open userfaultfd (non-blocking, close-on-exec, kernel faults included).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd and negotiates the API.
    pub fn new() -> io::Result<Self> {
        // SAFETY: the syscall takes flags only and returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes exactly a uffdio_api, which `api` is.
        check(unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API(), &mut api) })?;
        Ok(Self { fd })
    }

    /// Asks for missing-page faults in `[start, start + len)`.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly a uffdio_register; the kernel checks
        // the range belongs to a mapping of ours.
        check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut reg) })
    }

    /// Stops fault handling for a range.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads exactly a uffdio_range.
        check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_UNREGISTER(), &mut range) })
    }

    /// Wakes whoever faulted in a range whose pages appeared by other means (a write into
    /// the shmem file a private mapping is made of): they fault again and find them.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads exactly a uffdio_range.
        check(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_WAKE(), &mut range) })
    }

    /// The next faulting address, if one is waiting.
    pub fn next_fault(&self) -> io::Result<Option<u64>> {
        let mut msg = [0u8; 32];
        loop {
            // SAFETY: read(2) of at most 32 bytes into a 32-byte buffer we own.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n as usize != msg.len() {
                return Err(io::Error::other("short userfaultfd message"));
            }
            if msg[0] == UFFD_EVENT_PAGEFAULT {
                // uffd_msg.arg.pagefault.address sits after the 8-byte header and flags.
                return Ok(Some(u64::from_le_bytes(
                    msg[16..24].try_into().expect("8 bytes"),
                )));
            }
        }
    }

    /// Waits up to `timeout_ms` for a fault event (0 = just look).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            n => Ok(n > 0),
        }
    }

    /// Installs `page` (4 KiB) at `dst` and wakes whoever faulted on it.
    pub fn copy(&self, dst: u64, page: &[u8]) -> io::Result<Filled> {
        let mut copy = UffdioCopy {
            dst,
            src: page.as_ptr() as u64,
            len: page.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes from `src`, which `page` provides, and writes
        // only into the registered range at `dst`, which the kernel checks.
        filled(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut copy) })
    }

    /// Maps the zero page at `dst` and wakes whoever faulted on it.
    pub fn zero(&self, dst: u64, len: u64) -> io::Result<Filled> {
        let mut zero = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes exactly a uffdio_zeropage; the kernel checks
        // the range is registered.
        filled(unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE(), &mut zero) })
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn filled(ret: i32) -> io::Result<Filled> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(Filled::Already);
        }
        return Err(e);
    }
    Ok(Filled::Now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        // _IOWR(0xAA, 0x3F, 24 bytes), _IOWR(0xAA, 0x00, 32), _IOR(0xAA, 0x01, 16), _IOR(0xAA, 0x02, 16),
        // _IOWR(0xAA, 0x03, 40), _IOWR(0xAA, 0x04, 32), as in linux/userfaultfd.h.
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER(), 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE(), 0xc020_aa04);
    }

    #[test]
    fn faults_are_served_by_copy_and_zero() {
        let Ok(uffd) = Uffd::new() else {
            eprintln!("!!! faults_are_served: SKIPPED, userfaultfd unavailable to this user !!!");
            return;
        };
        const LEN: usize = 2 * 4096;
        // SAFETY: a fresh private anonymous mapping of LEN bytes, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let base = addr as u64;
        uffd.register(base, LEN as u64).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: a read within the mapping; it blocks until the handler fills the page.
            let first = unsafe { std::ptr::read_volatile((base + 8) as *const u8) };
            // SAFETY: as above, in the second page.
            let second = unsafe { std::ptr::read_volatile((base + 4096) as *const u8) };
            (first, second)
        });
        let page = vec![7u8; 4096];
        let mut served = 0;
        while served < 2 {
            assert!(uffd.wait(5000).unwrap(), "no fault arrived");
            while let Some(fault) = uffd.next_fault().unwrap() {
                let page_addr = fault & !4095;
                let r = if page_addr == base {
                    uffd.copy(page_addr, &page)
                } else {
                    uffd.zero(page_addr, 4096)
                };
                assert_eq!(r.unwrap(), Filled::Now);
                served += 1;
            }
        }
        assert_eq!(reader.join().unwrap(), (7, 0));
        assert_eq!(uffd.copy(base, &page).unwrap(), Filled::Already);
        uffd.unregister(base, LEN as u64).unwrap();
        // SAFETY: unmapping the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(addr, LEN) };
    }

    #[test]
    fn shmem_pages_written_into_the_file_are_served_by_wake() {
        let Ok(uffd) = Uffd::new() else {
            eprintln!("!!! shmem_wake: SKIPPED, userfaultfd unavailable to this user !!!");
            return;
        };
        use std::os::unix::fs::FileExt;
        const LEN: usize = 2 * 4096;
        // SAFETY: memfd_create takes a NUL-terminated name and flags, returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(raw) };
        file.set_len(LEN as u64).unwrap();
        // SAFETY: a private mapping of the memfd's LEN bytes, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let base = addr as u64;
        uffd.register(base, LEN as u64).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: reads within the mapping; each blocks until the handler serves it.
            let first = unsafe { std::ptr::read_volatile((base + 8) as *const u8) };
            // SAFETY: as above, in the second page.
            let second = unsafe { std::ptr::read_volatile((base + 4096) as *const u8) };
            (first, second)
        });
        let mut served = 0;
        while served < 2 {
            assert!(uffd.wait(5000).unwrap(), "no fault arrived");
            while let Some(fault) = uffd.next_fault().unwrap() {
                let page_addr = fault & !4095;
                if page_addr == base {
                    // The page goes into the shared file; the faulting thread maps it.
                    file.write_all_at(&[9u8; 4096], 0).unwrap();
                    uffd.wake(page_addr, 4096).unwrap();
                } else {
                    assert_eq!(uffd.zero(page_addr, 4096).unwrap(), Filled::Now);
                }
                served += 1;
            }
        }
        assert_eq!(reader.join().unwrap(), (9, 0));
        uffd.unregister(base, LEN as u64).unwrap();
        // SAFETY: unmapping the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(addr, LEN) };
    }
}
