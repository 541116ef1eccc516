//! Network namespaces for tests, removed on drop: two test "hosts" on one machine joined by a
//! veth pair, each with its own fabvm VM registry (so a destination sees only the VMs on its
//! own host; bytes on the wire are read from the veth counters); and [`TapNs`], a namespace
//! holding the tap a guest's virtio-net is backed by.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One side of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The source host.
    A,
    /// The destination host.
    B,
}

/// Two namespaces and the link between them.
#[derive(Debug)]
pub struct TwoHosts {
    names: [String; 2],
    devs: [String; 2],
    ips: [String; 2],
    runtime: tempfile::TempDir,
}

fn run(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(run(args), "command failed: {args:?}");
}

impl TwoHosts {
    /// Creates the namespaces (unique to this process) and the link, 10.199.N.1 and .2.
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        let names = [format!("fva{tag}"), format!("fvb{tag}")];
        let devs = [format!("fva{tag}"), format!("fvb{tag}")];
        let subnet = (pid % 200) as u8 + u8::try_from(n % 50).unwrap_or(0);
        let ips = [format!("10.199.{subnet}.1"), format!("10.199.{subnet}.2")];
        let hosts = Self {
            names,
            devs,
            ips,
            runtime: tempfile::tempdir().expect("tempdir"),
        };
        for name in &hosts.names {
            must(&["ip", "netns", "add", name]);
        }
        must(&[
            "ip",
            "link",
            "add",
            &hosts.devs[0],
            "type",
            "veth",
            "peer",
            "name",
            &hosts.devs[1],
        ]);
        for i in 0..2 {
            let (ns, dev) = (&hosts.names[i], &hosts.devs[i]);
            must(&["ip", "link", "set", dev, "netns", ns]);
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", hosts.ips[i]),
                "dev",
                dev,
            ]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            std::fs::create_dir_all(hosts.runtime_dir(if i == 0 { Host::A } else { Host::B }))
                .unwrap();
        }
        hosts
    }

    fn i(host: Host) -> usize {
        match host {
            Host::A => 0,
            Host::B => 1,
        }
    }

    /// The host's address on the link.
    pub fn ip(&self, host: Host) -> &str {
        &self.ips[Self::i(host)]
    }

    /// The host's network namespace (an `ip netns` name).
    pub fn name(&self, host: Host) -> &str {
        &self.names[Self::i(host)]
    }

    /// The host's VM registry (FABVM_RUNTIME_DIR).
    pub fn runtime_dir(&self, host: Host) -> PathBuf {
        self.runtime.path().join(&self.names[Self::i(host)])
    }

    /// A command that runs `program` on `host`, with that host's VM registry.
    pub fn command(&self, host: Host, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[Self::i(host)]])
            .arg(program)
            .env("FABVM_RUNTIME_DIR", self.runtime_dir(host));
        cmd
    }

    fn counter(&self, host: Host, name: &str) -> u64 {
        let path = format!(
            "/sys/class/net/{}/statistics/{name}",
            self.devs[Self::i(host)]
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &self.names[Self::i(host)], "cat", &path])
            .output()
            .expect("read counter");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Bytes that crossed the link in both directions (IP, TCP and Ethernet headers included).
    pub fn wire_bytes(&self) -> u64 {
        self.counter(Host::A, "tx_bytes") + self.counter(Host::A, "rx_bytes")
    }

    /// Limits `host`'s outgoing rate (tc tbf).
    pub fn limit_rate(&self, host: Host, rate: &str) {
        let dev = &self.devs[Self::i(host)];
        self.must_in(
            host,
            &[
                "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "64k",
                "latency", "400ms",
            ],
        );
    }

    /// Takes `host`'s end of the link down.
    pub fn cut(&self, host: Host) {
        must(&[
            "ip",
            "-n",
            &self.names[Self::i(host)],
            "link",
            "set",
            &self.devs[Self::i(host)],
            "down",
        ]);
    }

    /// Silently drops everything `host` sends (the link stays up: a stall, not a cut).
    pub fn stall(&self, host: Host) {
        self.must_in(host, &["nft", "add", "table", "inet", "fabvmstall"]);
        self.must_in(
            host,
            &[
                "nft",
                "add chain inet fabvmstall out { type filter hook output priority 0 ; }",
            ],
        );
        self.must_in(
            host,
            &["nft", "add", "rule", "inet", "fabvmstall", "out", "drop"],
        );
    }

    /// Ends a [`TwoHosts::stall`]: `host`'s packets flow again.
    pub fn unstall(&self, host: Host) {
        self.must_in(host, &["nft", "delete", "table", "inet", "fabvmstall"]);
    }

    /// Runs `args` in `host`'s namespace; panics if it fails.
    fn must_in(&self, host: Host, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", self.names[Self::i(host)].as_str()];
        all.extend_from_slice(args);
        must(&all);
    }
}

impl Default for TwoHosts {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Killing what still runs inside, then the namespaces (the veth goes with them).
        for name in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .map(|out| {
                    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            run(&["ip", "netns", "del", name]);
        }
    }
}

/// A network namespace with a tap `vtap0` (10.0.0.1/24, up) in it, deleted on drop: the
/// host side of a guest's `--net tap=vtap0`. Run the VMM with [`TapNs::command`].
#[derive(Debug)]
pub struct TapNs {
    name: String,
}

impl TapNs {
    /// The tap's name inside the namespace (`--net tap=vtap0`).
    pub const TAP: &'static str = "vtap0";
    /// The host's address on the tap (a /24).
    pub const HOST_IP: &'static str = "10.0.0.1";

    /// None (with a SKIPPED notice) when namespaces cannot be made here.
    pub fn new(test: &str) -> Option<TapNs> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("fabvm-test-{}-{n}", std::process::id());
        if !ip_quiet(&["netns", "add", &name]) {
            eprintln!("!!! {test}: SKIPPED, cannot create a network namespace (need root and iproute2) !!!");
            return None;
        }
        let ns = TapNs { name };
        for args in [
            &["link", "set", "lo", "up"][..],
            &["tuntap", "add", "dev", "vtap0", "mode", "tap"],
            &["addr", "add", "10.0.0.1/24", "dev", "vtap0"],
            &["link", "set", "vtap0", "up"],
        ] {
            let mut full = vec!["-n", ns.name.as_str()];
            full.extend_from_slice(args);
            assert!(ip_quiet(&full), "ip {full:?} failed");
        }
        Some(ns)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A UDP socket bound to `addr` inside the namespace, counting what arrives until
    /// [`UdpReceiver::finish`], and how many datagrams differ from what the test guest's
    /// `netbench` sends (1472 bytes, byte k = 42 + k).
    pub fn udp_receiver(&self, addr: &str) -> UdpReceiver {
        let netns = std::fs::File::open(format!("/var/run/netns/{}", self.name)).unwrap();
        let addr = addr.to_owned();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns only switches this thread's network namespace to the one the open
            // file refers to; no memory is shared with the kernel.
            let ret = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            let socket = std::net::UdpSocket::bind(&addr).expect("bind in the namespace");
            socket
                .set_read_timeout(Some(std::time::Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let (mut datagrams, mut bad) = (0u64, 0u64);
            let mut buf = [0u8; 2048];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                datagrams += 1;
                let intact = n == 1472
                    && buf[..n]
                        .iter()
                        .enumerate()
                        .all(|(k, &b)| b == (42 + k) as u8);
                bad += u64::from(!intact);
            }
            (datagrams, bad)
        });
        ready.recv().expect("the receiver thread failed");
        UdpReceiver { stop, thread }
    }

    /// A file under /sys/class/net/vtap0 as seen inside the namespace.
    pub fn tap_attr(&self, attr: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/vtap0/{attr}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "cannot read vtap0/{attr}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// See [`TapNs::udp_receiver`].
#[derive(Debug)]
pub struct UdpReceiver {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl UdpReceiver {
    /// Datagrams received, and how many of them had an unexpected payload.
    pub fn finish(self) -> (u64, u64) {
        // Let the last datagrams in the socket's buffer be read.
        std::thread::sleep(std::time::Duration::from_millis(300));
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("receiver thread")
    }
}

impl Drop for TapNs {
    fn drop(&mut self) {
        if !ip_quiet(&["netns", "del", &self.name]) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

fn ip_quiet(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
