//! A tap interface for virtio-net: `/dev/net/tun` opened with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, a 12-byte `virtio_net_hdr_v1` in front of every frame, offloads off,
//! non-blocking. One read or write moves one frame.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of the virtio-net header the tap puts in front of frames (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";

/// Errors from opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Interface names are 1 to 15 bytes without NUL.
    #[error("invalid tap name {0:?}")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_PATH}: {0}")]
    Open(io::Error),
    /// The kernel refused to create or attach the interface.
    #[error("cannot attach tap {name}: {source}")]
    Attach { name: String, source: io::Error },
    /// A tap ioctl failed.
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if needed) the tap interface `name`, with the virtio-net header on
    /// and every offload off.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::Open)?;

        // SAFETY: `ifreq` is plain old data for which all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is and outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        // The kernel may complete a pattern such as "tap%d"; read back the real name.
        let name: String = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        let ioctl_err = |what| TapError::Ioctl {
            name: name.clone(),
            what,
            source: io::Error::last_os_error(),
        };

        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ"));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value and touches no memory of ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_uint) };
        if ret < 0 {
            return Err(ioctl_err("TUNSETOFFLOAD"));
        }
        Ok(Self { file, name })
    }

    /// Wraps an fd that already behaves like a configured tap: one frame (with its
    /// 12-byte virtio-net header) per read or write, non-blocking. Tests and fuzzing use one end
    /// of a datagram socket pair.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Self {
        Self {
            file: File::from(fd),
            name: name.to_owned(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included) into `buf`; `WouldBlock` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_names() {
        for name in ["", "a-name-that-is-too-long", "nul\0"] {
            assert!(matches!(Tap::open(name), Err(TapError::Name(_))));
        }
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun; says SKIPPED otherwise.
    #[test]
    fn opens_a_tap_with_the_vnet_header() {
        let tap = match Tap::open("fabvmtest%d") {
            Ok(tap) => tap,
            Err(e) => {
                eprintln!("SKIPPED: cannot create a tap here: {e}");
                return;
            }
        };
        assert!(tap.name().starts_with("fabvmtest"), "{}", tap.name());
        let mut len: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int into `len`.
        let ret = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut len) };
        assert_eq!(ret, 0);
        assert_eq!(len as usize, VNET_HDR_LEN);
        // Nothing queued on a fresh interface that is down.
        let mut buf = [0u8; 64];
        let mut tap = tap;
        assert_eq!(
            tap.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
