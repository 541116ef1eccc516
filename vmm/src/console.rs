//! The host side of the serial console: stdin in raw mode when it is a terminal, restored on
//! drop; reading input without blocking the event loop.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

use vmm_sys_util::terminal::Terminal;

/// Puts stdin in raw mode while alive, if stdin is a terminal.
#[derive(Debug)]
pub struct RawStdin {
    raw: bool,
}

impl RawStdin {
    /// Switches a terminal stdin to raw mode; does nothing for pipes and files.
    pub fn new() -> Self {
        let stdin = std::io::stdin();
        let raw = stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok();
        Self { raw }
    }
}

impl Default for RawStdin {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if self.raw {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

/// Reads what stdin has ready (one read(2), bypassing std's buffer so epoll readiness stays
/// exact); `Ok(None)` at end of input.
pub fn read_stdin(buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    // SAFETY: read(2) writes at most `buf.len()` bytes into memory we own exclusively.
    let n = unsafe { libc::read(stdin_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    match n {
        0 => Ok(None),
        n if n > 0 => Ok(Some(n as usize)),
        _ => {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => Ok(Some(0)),
                _ => Err(e),
            }
        }
    }
}

/// The raw fd of stdin, for epoll.
pub fn stdin_fd() -> i32 {
    std::io::stdin().as_raw_fd()
}
