//! Helpers for fabvm's integration tests: find (or build) the `fabvm` binary and the guest
//! images, check for KVM loudly, and run a VM while watching its serial console.

pub mod cluster;
pub mod debian;
pub mod ksm;
pub mod netns;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `fabvm` binary: `$FABVM_BIN`, or built (once) with cargo in the test's profile.
pub fn fabvm() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(bin) = std::env::var("FABVM_BIN") {
            return PathBuf::from(bin);
        }
        let _lock = FileLock::take("cargo-build");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "vmm", "--bin", "fabvm"])
            .current_dir(workspace())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of fabvm failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target"));
        target.join("debug").join("fabvm")
    })
    .clone()
}

/// Runs one of the guest-images scripts (idempotent), serialised across test processes.
fn build_image(script: &str, output: &Path) -> PathBuf {
    let _lock = FileLock::take(script);
    let status = Command::new("bash")
        .arg(workspace().join("guest-images").join(script))
        .current_dir(workspace())
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run guest-images/{script}: {e}"));
    assert!(status.success(), "guest-images/{script} failed");
    assert!(
        output.exists(),
        "guest-images/{script} did not produce {}",
        output.display()
    );
    output.to_path_buf()
}

/// The test guest ELF, built by `guest-images/build-test-guest.sh`.
pub fn test_guest() -> PathBuf {
    build_image(
        "build-test-guest.sh",
        &workspace().join("guest-images/out/test-guest.elf"),
    )
}

/// The Debian kernel directory (vmlinuz, vmlinux, initramfs.cpio.gz), made by
/// `guest-images/debian-kernel.sh`.
pub fn debian_kernel() -> PathBuf {
    let dir = workspace().join("guest-images/out/debian");
    build_image("debian-kernel.sh", &dir.join("vmlinux"));
    dir
}

/// QEMU (`qemu-system-x86_64`, Debian package `qemu-system-x86`, installed by
/// `scripts/setup.sh`): `$FABVM_QEMU` or the one in PATH.
pub fn qemu() -> PathBuf {
    if let Some(q) = std::env::var_os("FABVM_QEMU") {
        return PathBuf::from(q);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|p| p.is_file())
        })
        .expect("qemu-system-x86_64 not found: run scripts/setup.sh (installs qemu-system-x86)")
}

/// Which kind of KVM runs the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// kvm_pvm: nested, guest ring 0 emulated (about 1 MIPS); Linux does not reach /init.
    Emulated,
    /// Hardware-backed KVM (VMX/SVM).
    Hardware,
}

/// Asserts that KVM is usable, and says which tier. With `FABVM_ALLOW_NO_KVM=1` a missing KVM
/// returns `None` after a loud notice instead of failing.
pub fn require_kvm(test: &str) -> Option<Tier> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {
            let tier = if Path::new("/sys/module/kvm_pvm").exists() {
                Tier::Emulated
            } else {
                Tier::Hardware
            };
            eprintln!("{test}: KVM tier: {tier:?}");
            Some(tier)
        }
        Err(e) if std::env::var("FABVM_ALLOW_NO_KVM").as_deref() == Ok("1") => {
            eprintln!("!!! {test}: SKIPPED, /dev/kvm unusable ({e}) and FABVM_ALLOW_NO_KVM=1 !!!");
            None
        }
        Err(e) => panic!(
            "{test} needs KVM and /dev/kvm is unusable: {e} (set FABVM_ALLOW_NO_KVM=1 to skip)"
        ),
    }
}

/// A running fabvm process with its console captured.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    /// A restore's memory image directory, unless the test chose one.
    _images: Option<Arc<tempfile::TempDir>>,
}

impl Vm {
    /// Starts `fabvm` with `args`, stdin closed.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vm {
        Self::start_command(Command::new(fabvm()).args(args))
    }

    /// Starts a prepared command (e.g. wrapped in `setpriv` or `unshare`).
    pub fn start_command(command: &mut Command) -> Vm {
        let images = image_dir_for(command);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fabvm");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            pump(child.stdout.take().expect("stdout"), stdout.clone()),
            pump(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        Vm {
            child,
            stdout,
            stderr,
            readers,
            started: Instant::now(),
            _images: images,
        }
    }

    /// Console output so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the console holds every one of `needles` (true), or the process ends or
    /// `timeout` passes (false).
    pub fn wait_for_all(&mut self, needles: &[&str], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            if needles.iter().all(|n| out.contains(n)) {
                return true;
            }
            if Instant::now() > deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                // One last look: output may have landed just before the exit.
                std::thread::sleep(Duration::from_millis(50));
                let out = self.stdout();
                return needles.iter().all(|n| out.contains(n));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the console holds `needle` at least `n` times (true), or `timeout` passes or
    /// the process ends (false).
    pub fn wait_for_count(&mut self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while count(&self.stdout(), needle) < n {
            if Instant::now() > deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                return count(&self.stdout(), needle) >= n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Waits for the process to exit; kills it and returns `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since the process started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Kills the process (if still running) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Restores get a memory image directory on tmpfs, one per snapshot while any VM restored
/// from it runs (so they share the image), removed with the last of them, unless the test
/// set `FABVM_IMAGE_DIR`: images would otherwise stay in `/dev/shm` after the test.
fn image_dir_for(command: &mut Command) -> Option<Arc<tempfile::TempDir>> {
    static DIRS: Mutex<Vec<(std::ffi::OsString, std::sync::Weak<tempfile::TempDir>)>> =
        Mutex::new(Vec::new());
    let args: Vec<&std::ffi::OsStr> = command.get_args().collect();
    let snapshot = args.windows(2).find(|w| w[0] == "--restore")?[1].to_os_string();
    if command.get_envs().any(|(k, _)| k == "FABVM_IMAGE_DIR") {
        return None;
    }
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    dirs.retain(|(_, dir)| dir.strong_count() > 0);
    let dir = match dirs.iter().find(|(s, _)| *s == snapshot) {
        Some((_, dir)) => dir.upgrade()?,
        None => {
            let dir = Arc::new(shm_dir("fabvm-test-images-"));
            dirs.push((snapshot, Arc::downgrade(&dir)));
            dir
        }
    };
    command.env("FABVM_IMAGE_DIR", dir.path());
    Some(dir)
}

/// A temporary directory on tmpfs (`/dev/shm`, else the temp dir), e.g. for memory images.
pub fn shm_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::Builder::new().prefix(prefix).tempdir())
        .expect("create a temporary directory")
}

fn pump(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

/// An exclusive lock on a file under `target/`, held across test processes (nextest runs each
/// test in its own process).
#[derive(Debug)]
pub struct FileLock(#[allow(dead_code)] File);

impl FileLock {
    /// Blocks until the named lock is ours.
    pub fn take(name: &str) -> FileLock {
        let dir = workspace().join("target").join("test-locks");
        std::fs::create_dir_all(&dir).expect("create lock dir");
        let file = File::create(dir.join(name)).expect("create lock file");
        // SAFETY: flock on an fd we own; it only affects advisory locks on that file.
        let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(ret, 0, "flock: {}", std::io::Error::last_os_error());
        FileLock(file)
    }
}

/// Lines of `text` that start with `prefix`.
pub fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with(prefix))
        .collect()
}

/// Runs `fabvm ctl --api-sock SOCK --json ARGS...`; returns (exit success, stdout, stderr).
pub fn ctl(sock: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(fabvm())
        .arg("ctl")
        .arg("--api-sock")
        .arg(sock)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run fabvm ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until a Unix socket accepts connections.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Boots the test guest under `cmd` (`fabvm` itself, or wrapped, e.g. in a network
/// namespace, with any extra options already given) with `mem`, `cmdline` and an API socket
/// at `sock`, and waits up to `timeout` for the socket and the guest's first verification.
pub fn boot_guest(
    cmd: &mut Command,
    sock: &Path,
    mem: &str,
    cmdline: &str,
    timeout: Duration,
) -> Vm {
    cmd.arg("--kernel")
        .arg(test_guest())
        .args(["--mem", mem, "--cmdline", cmdline, "--api-sock"])
        .arg(sock);
    let mut vm = Vm::start_command(cmd);
    assert!(
        wait_for_socket(sock, timeout),
        "{}: no API socket: {}",
        sock.display(),
        vm.stderr()
    );
    assert!(
        vm.wait_for_all(&["fabvm-guest: verify ok pass=1"], timeout),
        "{}: guest never verified:\n{}\n{}",
        sock.display(),
        vm.stdout(),
        vm.stderr()
    );
    vm
}

/// The pages the test guest filled, from its `ready pages=N` line in `console`.
pub fn filled_pages(console: &str) -> u64 {
    let line = console
        .lines()
        .find(|l| l.contains("fabvm-guest: ready pages="))
        .expect("ready line");
    line.split("pages=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a page count")
}

/// How many times `needle` occurs in `haystack`.
pub fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Writes the tests' migration and page-service key (32 bytes in hex) to `dir/key`.
pub fn write_test_key(dir: &Path) -> PathBuf {
    let key = dir.join("key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .expect("write the key file");
    key
}

/// Waits for a fabvm that was given bad input and checks the failure contract: a non-zero
/// exit within 30 s, no panic, exactly one line on stderr starting `fabvm: `, no console
/// output. Returns the error line.
pub fn expect_error(mut vm: Vm) -> String {
    let status = vm
        .wait_exit(Duration::from_secs(30))
        .expect("fabvm hung on bad input");
    let stderr = vm.stderr();
    assert!(
        !status.success(),
        "exit status {status:?} for bad input; stderr: {stderr}"
    );
    assert_ne!(status.code(), Some(101), "panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {stderr:?}");
    assert!(lines[0].starts_with("fabvm: "), "error line: {}", lines[0]);
    assert!(
        vm.stdout().is_empty(),
        "console output on bad input: {}",
        vm.stdout()
    );
    lines[0].to_string()
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP relay for fault tests: accepts one connection on `listen`, connects to `to`, passes
/// the reply direction untouched and flips the low bit of every byte toward `to` whose
/// offset in the stream `flip` picks (a link corrupting data under TCP's checksum, or a
/// tampering middlebox). Runs on its own threads; ends when either side closes.
pub fn flipping_relay(
    listen: std::net::TcpListener,
    to: String,
    flip: impl Fn(usize) -> bool + Send + 'static,
) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let Ok((mut client, _)) = listen.accept() else {
            return;
        };
        let Ok(mut server) = std::net::TcpStream::connect(&to) else {
            return;
        };
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
        });
        let mut seen = 0usize;
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = client.read(&mut buf) {
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter_mut().enumerate() {
                if flip(seen + i) {
                    *b ^= 1;
                }
            }
            seen += n;
            if server.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = server.shutdown(std::net::Shutdown::Both);
        let _ = client.shutdown(std::net::Shutdown::Both);
    });
}
