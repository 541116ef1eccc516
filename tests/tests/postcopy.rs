//! Post-copy (hybrid) migration with the test guest as workload and oracle: after one
//! pre-copy round and at once, the guest verifies all its memory at the destination and the
//! report's counters add up; a source killed during post-copy is replaced by the cluster's
//! page service when a third host holds every page, and otherwise the destination fails
//! with one line; a stalled link only makes the guest wait; a tampered stream fails both
//! ends with one line. The background stream is throttled (`FABVM_POSTCOPY_STREAM_PAGES_PER_S`,
//! a knob for tests) so pages are still missing when the test acts.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fabvm_tests::cluster::{find, wait_hosts, Etcd, Host as ClusterHost};
use fabvm_tests::netns::{Host, TwoHosts};
use fabvm_tests::{
    boot_guest, count, ctl, fabvm, flipping_relay, free_port, require_kvm, wait_for_socket,
    write_test_key, Vm,
};

const READY: Duration = Duration::from_secs(90);
const PACE: &str = "FABVM_POSTCOPY_STREAM_PAGES_PER_S";

/// Source and destination: in two network namespaces, or both on loopback in this one
/// (with their own VM registries, so neither takes pages from the other).
struct Pair {
    hosts: Option<TwoHosts>,
    dir: tempfile::TempDir,
    key: PathBuf,
    port: u16,
}

impl Pair {
    fn netns() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let key = write_test_key(dir.path());
        Pair {
            hosts: Some(TwoHosts::new()),
            dir,
            key,
            port: 7151,
        }
    }

    fn loopback() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let key = write_test_key(dir.path());
        Pair {
            hosts: None,
            dir,
            key,
            port: free_port(),
        }
    }

    fn command(&self, host: Host) -> Command {
        match &self.hosts {
            Some(h) => h.command(host, &fabvm()),
            None => {
                let mut cmd = Command::new(fabvm());
                let run = self.dir.path().join(format!("{host:?}"));
                std::fs::create_dir_all(&run).unwrap();
                cmd.env("FABVM_RUNTIME_DIR", run);
                cmd
            }
        }
    }

    fn dest(&self) -> String {
        match &self.hosts {
            Some(h) => format!("{}:{}", h.ip(Host::B), self.port),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// The test guest on host A, its background stream paced at `pace` pages/s (if any).
    fn source(&self, mem: &str, cmdline: &str, pace: Option<u32>) -> (Vm, PathBuf) {
        let sock = self.sock("source");
        let mut cmd = self.command(Host::A);
        if let Some(p) = pace {
            cmd.env(PACE, p.to_string());
        }
        (boot_guest(&mut cmd, &sock, mem, cmdline, READY), sock)
    }

    /// `fabvm receive --json` on host B, with `extra` arguments.
    fn receiver(&self, listen_on: &str, extra: &[&str]) -> (Vm, PathBuf) {
        let sock = self.sock("dest");
        let mut cmd = self.command(Host::B);
        let listen = match &self.hosts {
            Some(h) => format!("{}:{}", h.ip(Host::B), self.port),
            None => format!("{listen_on}:{}", self.port),
        };
        cmd.args(["receive", "--json", "--listen", &listen, "--key"])
            .arg(&self.key)
            .arg("--api-sock")
            .arg(&sock)
            .args(extra);
        let vm = Vm::start_command(&mut cmd);
        std::thread::sleep(Duration::from_millis(300)); // listening
        (vm, sock)
    }
}

/// `ctl --json migrate` with `args`: (ok, report, stderr).
fn migrate(
    sock: &Path,
    dest: &str,
    key: &Path,
    args: &[&str],
) -> (bool, serde_json::Value, String) {
    let mut all = vec!["migrate", dest, "--key", key.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, out, err) = ctl(sock, &all);
    (ok, serde_json::from_str(&out).unwrap_or_default(), err)
}

/// The destination runs the guest and it verifies twice more, without a failure.
fn verifies_at_destination(dest: &mut Vm, dest_sock: &Path, what: &str) {
    assert!(wait_for_socket(dest_sock, READY), "{what}: destination API");
    let seen = count(&dest.stdout(), "verify ok");
    assert!(
        dest.wait_for_count("verify ok", seen + 2, READY),
        "{what}: destination guest:\n{}\n{}",
        dest.stdout(),
        dest.stderr()
    );
    assert!(
        !dest.stdout().contains("FAILED") && !dest.stdout().contains("fabvm-guest: boot"),
        "{what}: {}",
        dest.stdout()
    );
}

/// Waits until `vm`'s stderr contains `needle`.
fn wait_stderr(vm: &Vm, needle: &str, what: &str) {
    let deadline = Instant::now() + READY;
    while !vm.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{what}: no {needle:?} in:\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The report's post-copy counters add up: every listed page came one way.
fn counters_add_up(report: &serde_json::Value) -> u64 {
    let pc = &report["postcopy"];
    let n = |k: &str| {
        pc[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {report}"))
    };
    assert!(n("pages") > 0, "{report}");
    assert_eq!(
        n("faulted") + n("streamed") + n("held"),
        n("pages"),
        "post-copy counters: {report}"
    );
    assert!(pc["complete_ms"].as_f64().unwrap() >= pc["downtime_ms"].as_f64().unwrap());
    n("pages")
}

/// A complete post-copy migration over the namespaces' link: the guest verifies there and
/// the source exits 0.
fn postcopy_migration(cmdline: &str, args: &[&str], pace: Option<u32>) -> serde_json::Value {
    let p = Pair::netns();
    let (mut source, src_sock) = p.source("256M", cmdline, pace);
    let (mut dest, dest_sock) = p.receiver("", &[]);
    let (ok, report, err) = migrate(&src_sock, &p.dest(), &p.key, args);
    assert!(ok, "migration failed: {err}\ndest: {}", dest.stderr());
    assert_eq!(
        source
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0),
        "source exit: {}",
        source.stderr()
    );
    verifies_at_destination(&mut dest, &dest_sock, "post-copy");
    wait_stderr(&dest, "\"postcopy\":{", "destination's post-copy report");
    report
}

#[test]
fn postcopy_after_first_round_verifies() {
    if require_kvm("postcopy_hybrid").is_none() {
        return;
    }
    let report = postcopy_migration("passes=0 hb=200 seed=81 dirty=20000", &["--postcopy"], None);
    assert_eq!(report["rounds"].as_u64(), Some(1), "{report}");
    assert_eq!(report["postcopy"]["rounds_before"].as_u64(), Some(1));
    counters_add_up(&report);
}

#[test]
fn postcopy_at_once_verifies() {
    if require_kvm("postcopy_at_once").is_none() {
        return;
    }
    let report = postcopy_migration(
        "passes=0 hb=200 seed=82 dirty=2000",
        &["--postcopy-after", "0"],
        Some(20_000),
    );
    assert_eq!(report["rounds"].as_u64(), Some(0), "{report}");
    let pages = counters_add_up(&report);
    assert!(
        pages > 60_000,
        "a 256 MiB guest's filled pages all listed: {report}"
    );
}

/// Starts a post-copy migration at once from `p`'s source (stream paced slow), waits for
/// the destination to switch, then SIGKILLs the source. Returns the destination.
fn kill_source_during_postcopy(p: &Pair, src: &mut Vm, src_sock: &Path, dest: Vm) -> Vm {
    let target = p.dest();
    let key = p.key.clone();
    let sock = src_sock.to_path_buf();
    let migration =
        std::thread::spawn(move || migrate(&sock, &target, &key, &["--postcopy-after", "0"]));
    wait_stderr(&dest, "\"postcopy\":\"switched\"", "switch");
    // SIGKILL: the source's pages not yet sent are gone with it.
    src.kill();
    let (ok, _, _) = migration.join().unwrap();
    assert!(!ok, "ctl migrate cannot succeed with the source killed");
    dest
}

#[test]
fn source_killed_during_postcopy_without_holders_fails_in_one_line() {
    if require_kvm("postcopy_source_killed").is_none() {
        return;
    }
    let p = Pair::loopback();
    let (mut source, src_sock) = p.source("256M", "passes=0 hb=200 seed=83", Some(200));
    let (dest, _) = p.receiver("127.0.0.1", &[]);
    let mut dest = kill_source_during_postcopy(&p, &mut source, &src_sock, dest);
    let status = dest
        .wait_exit(Duration::from_secs(200))
        .expect("the destination hung after its source died");
    assert!(!status.success(), "destination exit: {status:?}");
    assert_ne!(status.code(), Some(101), "panicked: {}", dest.stderr());
    let stderr = dest.stderr();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("fabvm:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(
        errors[0].contains("pages missing") && errors[0].contains("the VM is lost"),
        "{}",
        errors[0]
    );
}

#[test]
fn source_killed_during_postcopy_is_replaced_by_a_host_holding_every_page() {
    if require_kvm("postcopy_source_killed_cluster").is_none() {
        return;
    }
    let p = Pair::loopback();
    let etcd = Etcd::start();
    let mut c = ClusterHost::new(p.dir.path(), "c");
    // The source's guest, paused, snapshotted into host c's store: c holds every page the
    // paused guest has, and the guest stays paused until it runs at the destination.
    let sock = p.sock("source");
    let mut cmd = p.command(Host::A);
    cmd.env(PACE, "200").arg("--store").arg(&c.store);
    let mut source = boot_guest(&mut cmd, &sock, "256M", "passes=0 hb=200 seed=84", READY);
    let (ok, _, err) = ctl(&sock, &["pause"]);
    assert!(ok, "pause: {err}");
    let snap = p.dir.path().join("snap");
    let (ok, _, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "snapshot: {err}");
    c.serve(&etcd.url, &p.key);
    wait_hosts(&etcd.url, &[&c], "c with its store summarised", |h| {
        find(h, "c").is_some_and(|r| {
            r["store_pages"].as_u64() > Some(60_000) && r["summary_generation"].as_u64() > Some(0)
        })
    });
    let (dest, dest_sock) = p.receiver("127.0.0.1", &["--etcd", &etcd.url]);
    let mut dest = kill_source_during_postcopy(&p, &mut source, &sock, dest);
    verifies_at_destination(&mut dest, &dest_sock, "after the source died");
    wait_stderr(&dest, "\"source_failed\"", "destination's post-copy report");
    assert!(dest.stderr().contains("\"pulled\""), "{}", dest.stderr());
}

#[test]
fn stalled_link_during_postcopy_makes_the_guest_wait_then_resume() {
    if require_kvm("postcopy_link_stalled").is_none() {
        return;
    }
    let p = Pair::netns();
    let (mut source, src_sock) = p.source("256M", "passes=0 hb=200 seed=85", Some(2_000));
    let (mut dest, dest_sock) = p.receiver("", &[]);
    let (target, key, sock) = (p.dest(), p.key.clone(), src_sock.clone());
    let migration =
        std::thread::spawn(move || migrate(&sock, &target, &key, &["--postcopy-after", "0"]));
    wait_stderr(&dest, "\"postcopy\":\"switched\"", "switch");
    let hosts = p.hosts.as_ref().unwrap();
    hosts.stall(Host::A);
    std::thread::sleep(Duration::from_secs(5));
    hosts.unstall(Host::A);
    let (ok, report, err) = migration.join().unwrap();
    assert!(
        ok,
        "migration after the stall: {err}\ndest: {}",
        dest.stderr()
    );
    counters_add_up(&report);
    assert_eq!(
        source
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    verifies_at_destination(&mut dest, &dest_sock, "after the stall");
}

#[test]
fn tampered_stream_during_postcopy_fails_both_ends_in_one_line() {
    if require_kvm("postcopy_tampered").is_none() {
        return;
    }
    let p = Pair::loopback();
    let (mut source, src_sock) = p.source("256M", "passes=0 hb=200 seed=86", Some(2_000));
    let (mut dest, _) = p.receiver("127.0.0.1", &[]);
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    // The list of missing identities and the state take about 3 MB for this guest: the
    // damage starts in the page stream, after the switch.
    // The source's first 16 MiB pass; then a bit of every 4 KiB toward the destination flips.
    let clean = 16 << 20;
    flipping_relay(relay, p.dest(), move |at| {
        at >= clean && at.is_multiple_of(4096)
    });
    let (ok, _, err) = migrate(&src_sock, &relay_addr, &p.key, &["--postcopy-after", "0"]);
    assert!(!ok, "a tampered post-copy cannot succeed");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let status = dest
        .wait_exit(Duration::from_secs(200))
        .expect("destination hung");
    assert!(!status.success());
    assert_ne!(status.code(), Some(101), "panicked: {}", dest.stderr());
    let errors: Vec<String> = dest
        .stderr()
        .lines()
        .filter(|l| l.starts_with("fabvm:"))
        .map(String::from)
        .collect();
    assert_eq!(errors.len(), 1, "{}", dest.stderr());
    assert!(errors[0].contains("failed authentication"), "{}", errors[0]);
    let status = source
        .wait_exit(Duration::from_secs(200))
        .expect("source hung");
    assert!(
        !status.success(),
        "the source cannot resume after the switch"
    );
    assert!(!source.stderr().contains("panicked"), "{}", source.stderr());
}
