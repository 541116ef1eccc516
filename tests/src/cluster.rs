//! Helpers for the cluster tests: a single-node etcd of a test's own (random loopback
//! ports, data on tmpfs, killed and removed on drop), test "hosts" (a VM registry, a store
//! and a `fabvm host serve` agent each) and `fabvm cluster` run as a command.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{fabvm, free_port, shm_dir, Vm};

pub const READY: Duration = Duration::from_secs(60);
/// How long the test waits for something that should happen within a few seconds.
pub const EVENTUALLY: Duration = Duration::from_secs(60);

/// A single-node etcd on random loopback ports, its data in a temporary directory on tmpfs
/// (a loaded machine's disk made its fsyncs, and so lease grants, take seconds); killed and
/// removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    /// Its client URL.
    pub url: String,
    peer_url: String,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts it and waits until it answers.
    pub fn start() -> Etcd {
        let mut etcd = Etcd {
            child: None,
            url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            dir: shm_dir("fcl-etcd-"),
        };
        etcd.restart();
        etcd
    }

    /// Starts it again (after [`Etcd::kill`]) on the same ports and data, and waits until it
    /// answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let (url, peer_url) = (&self.url, &self.peer_url);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", "fcl", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args(["--listen-peer-urls", peer_url])
            .args(["--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", &format!("fcl={peer_url}")])
            .arg("--auto-compaction-retention=5m")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run etcd (Debian's etcd-server, installed by scripts/setup.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + EVENTUALLY;
        while cluster_cmd(&self.url, &["hosts"]).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills it (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `fabvm cluster --etcd URL --json ARGS`: the JSON printed, or stderr.
pub fn cluster_cmd(url: &str, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(fabvm())
        .args(["cluster", "--etcd", url, "--json"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {out:?}"))
}

/// One test "host": its VM registry, store and agent.
#[derive(Debug)]
pub struct Host {
    pub name: &'static str,
    pub runtime: PathBuf,
    pub store: PathBuf,
    /// Its page service.
    pub addr: String,
    pub agent: Option<Vm>,
}

impl Host {
    /// A host named `name` under `dir`.
    pub fn new(dir: &Path, name: &'static str) -> Host {
        let runtime = dir.join(name).join("run");
        std::fs::create_dir_all(&runtime).unwrap();
        Host {
            name,
            store: dir.join(name).join("store"),
            runtime,
            addr: format!("127.0.0.1:{}", free_port()),
            agent: None,
        }
    }

    /// `fabvm` with this host's VM registry.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(fabvm());
        cmd.env("FABVM_RUNTIME_DIR", &self.runtime);
        cmd
    }

    /// Starts its agent: 2 s lease, refreshed and published every second.
    pub fn serve(&mut self, etcd: &str, key: &Path) {
        self.serve_with_env(etcd, key, &[]);
    }

    /// [`Host::serve`] with extra environment (e.g. a `FABVM_TEST_FAILPOINT`).
    pub fn serve_with_env(&mut self, etcd: &str, key: &Path, env: &[(&str, &str)]) {
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        cmd.args(["host", "serve", "--name", self.name, "--listen", &self.addr])
            .arg("--key")
            .arg(key)
            .args([
                "--etcd",
                etcd,
                "--ttl",
                "2",
                "--refresh",
                "1",
                "--publish-every",
                "1",
                "--store",
            ])
            .arg(&self.store)
            .env("RUST_LOG", "info");
        self.agent = Some(Vm::start_command(&mut cmd));
    }
}

/// Whether process `pid` runs (exists and is not a zombie), without touching it.
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_string()))
        .is_some_and(|state| !state.starts_with('Z'))
}

/// The live hosts, from `cluster hosts --json`.
pub fn hosts(url: &str) -> Vec<Value> {
    cluster_cmd(url, &["hosts"]).unwrap()["hosts"]
        .as_array()
        .unwrap()
        .clone()
}

/// The host named `name`.
pub fn find<'a>(hosts: &'a [Value], name: &str) -> Option<&'a Value> {
    hosts.iter().find(|h| h["name"] == name)
}

/// Waits until `cond` holds for the live hosts; returns them. On failure the agents' logs
/// are in the message.
pub fn wait_hosts(
    url: &str,
    agents: &[&Host],
    what: &str,
    cond: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let h = hosts(url);
        if cond(&h) {
            return h;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = agents
                .iter()
                .filter_map(|a| {
                    a.agent
                        .as_ref()
                        .map(|v| format!("{}: {}", a.name, v.stderr()))
                })
                .collect();
            panic!("{what}: hosts are {h:?}; agents:\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
