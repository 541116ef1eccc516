//! `fabvm cluster drain` and `pack` end to end: a real single-node etcd and three agents on
//! loopback (each "host" with its own VM registry and store), real test guests. Host a runs
//! two guests; b runs a sibling of the first (same seeds), c a sibling of the second. Drain
//! sends each guest to the host holding its pages, each verifies there, a lists no VMs, and
//! `pack --dry-run` then names a and b to switch off. A destination that dies mid-drain (its
//! receiver before resuming the guest, or its agent when asked for a receiver) leaves the VM
//! running on the source, and drain reports it and exits 1. Bad input and etcd down give one
//! line.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fabvm_tests::cluster::{find, wait_hosts, Etcd, Host, EVENTUALLY, READY};
use fabvm_tests::{boot_guest, count, ctl, expect_error, fabvm, free_port, require_kvm, Vm};
use serde_json::Value;

/// `fabvm cluster --etcd URL --key KEY --json ARGS`: (success, stdout as JSON, stderr).
fn cluster(url: &str, key: &Path, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(fabvm())
        .args(["cluster", "--etcd", url, "--json", "--key"])
        .arg(key)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Processes the drain started (VMs received by the agents' receivers): killed on drop,
/// whatever the test's outcome.
#[derive(Default)]
struct Received(Vec<u32>);

impl Received {
    fn add(&mut self, report: &Value) {
        for m in report["moves"].as_array().into_iter().flatten() {
            if let Some(pid) = m["dest_pid"].as_u64() {
                self.0.push(pid as u32);
            }
        }
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill only sends a signal to a VM process this test had started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Waits until the console file at `path` shows `n` verifications, none failed.
fn console_verifies(path: &str, n: usize) {
    let deadline = Instant::now() + READY;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        assert!(!text.contains("FAILED"), "{path}: {text}");
        if count(&text, "fabvm-guest: verify ok") >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{path} never verified: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `drain HOST --dry-run` plans each (pid, host) of `want`, with most of the
/// VM's pages there (the summaries have caught up with the guests' identities).
fn wait_plan(url: &str, key: &Path, host: &str, want: &[(u32, &str)]) -> Value {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        // Until the agents have registered, the host may be unknown.
        let (ok, plan, err) = cluster(url, key, &["drain", host, "--dry-run"]);
        let empty = Vec::new();
        let moves = plan["moves"].as_array().unwrap_or(&empty);
        let done = ok
            && moves.len() == want.len()
            && want.iter().all(|(pid, to)| {
                moves.iter().any(|m| {
                    m["pid"] == *pid && m["to"] == *to && m["held"].as_f64().unwrap() > 0.9
                })
            });
        if done {
            return plan;
        }
        assert!(
            Instant::now() < deadline,
            "plan never settled: {plan} {err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The guest behind `vm` still runs on its host and verifies again.
fn still_runs(vm: &mut Vm, sock: &Path) {
    let (ok, status, err) = ctl(sock, &["status"]);
    assert!(ok && status.contains("\"running\""), "{status} {err}");
    let seen = count(&vm.stdout(), "verify ok");
    assert!(
        vm.wait_for_count("verify ok", seen + 1, READY),
        "guest stalled: {}",
        vm.stderr()
    );
    assert!(!vm.stdout().contains("FAILED"));
}

struct Cluster {
    tmp: tempfile::TempDir,
    key: std::path::PathBuf,
    etcd: Etcd,
    hosts: Vec<Host>,
    guests: Vec<(Vm, std::path::PathBuf)>,
}

/// etcd, hosts a, b, c; guests 1 and 2 on a (seeds 1 and 2 below), a sibling of 1 on b
/// and of 2 on c. Guest order in `guests`: a1, a2, b1, c2. Agents are not started.
fn setup(seeds: (u32, u32)) -> Cluster {
    let tmp = tempfile::Builder::new()
        .prefix("fcl-drain-")
        .tempdir()
        .unwrap();
    let key = fabvm_tests::write_test_key(tmp.path());
    let etcd = Etcd::start();
    let hosts = vec![
        Host::new(tmp.path(), "a"),
        Host::new(tmp.path(), "b"),
        Host::new(tmp.path(), "c"),
    ];
    let mut guests = Vec::new();
    for (host, name, seed) in [
        (0, "a1", seeds.0),
        (0, "a2", seeds.1),
        (1, "b1", seeds.0),
        (2, "c2", seeds.1),
    ] {
        let sock = tmp.path().join(format!("{name}.sock"));
        let cmdline = format!("passes=0 hb=500 seed={seed}");
        let mut cmd = hosts[host].command();
        cmd.arg("--store").arg(&hosts[host].store);
        let vm = boot_guest(&mut cmd, &sock, "64M", &cmdline, READY);
        guests.push((vm, sock));
    }
    Cluster {
        tmp,
        key,
        etcd,
        hosts,
        guests,
    }
}

#[test]
fn drain_sends_each_vm_to_the_host_holding_its_pages() {
    if require_kvm("cluster_drain").is_none() {
        return;
    }
    let mut c = setup((31, 32));
    for host in &mut c.hosts {
        host.serve(&c.etcd.url, &c.key);
    }
    let (url, key) = (c.etcd.url.clone(), c.key.clone());
    let (p1, p2) = (c.guests[0].0.pid(), c.guests[1].0.pid());
    wait_plan(&url, &key, "a", &[(p1, "b"), (p2, "c")]);

    let mut received = Received::default();
    let (ok, report, err) = cluster(&url, &key, &["drain", "a"]);
    received.add(&report);
    assert!(ok, "drain: {err}\n{report}");
    assert_eq!(
        (report["moved"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(0))
    );
    assert!(report["bytes"].as_u64() > Some(0), "{report}");
    for (pid, to) in [(p1, "b"), (p2, "c")] {
        let m = report["moves"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["pid"] == pid)
            .unwrap_or_else(|| panic!("{pid} not moved: {report}"));
        assert_eq!(m["to"], to, "{report}");
        assert_eq!(m["ok"], true);
        // Most pages were found at the destination: far fewer bytes than the guest's
        // 64 MiB crossed.
        assert!(m["bytes"].as_u64().unwrap() < 16 << 20, "{m}");
        console_verifies(m["console"].as_str().unwrap(), 2);
    }
    for (vm, _) in &mut c.guests[..2] {
        let status = vm
            .wait_exit(EVENTUALLY)
            .expect("source exits after the move");
        assert!(status.success(), "{status:?}: {}", vm.stderr());
    }
    // a holds no VM now; b and c two each.
    let listed = wait_hosts(&url, &[], "a drained", |h| {
        [("a", 0), ("b", 2), ("c", 2)]
            .iter()
            .all(|(n, vms)| find(h, n).is_some_and(|r| r["vms"] == *vms))
    });
    assert_eq!(listed.len(), 3);
    let (ok, plan, _) = cluster(&url, &key, &["drain", "a", "--dry-run"]);
    assert!(ok && plan["moves"].as_array().unwrap().is_empty(), "{plan}");
    // Pack: a has nothing, b's two VMs fit on c: a and b can be switched off.
    let (ok, plan, err) = cluster(&url, &key, &["pack", "--dry-run"]);
    assert!(ok, "pack: {err}");
    assert_eq!(plan["switch_off"], serde_json::json!(["a", "b"]), "{plan}");
    assert_eq!(plan["keep"], serde_json::json!(["c"]), "{plan}");
    assert_eq!(plan["moves"].as_array().unwrap().len(), 2, "{plan}");
    assert!(plan["moves"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["to"] == "c"));
    // And for real, as people read it: a line per VM on stderr, the hosts to switch off.
    let out = Command::new(fabvm())
        .args(["cluster", "--etcd", &url, "--key"])
        .arg(&key)
        .arg("pack")
        .output()
        .unwrap();
    let (text, progress) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{text}\n{progress}");
    assert!(text.contains("pack: 2 of 2 VMs moved"), "{text}");
    assert!(text.contains("switch off: a, b"), "{text}");
    assert_eq!(count(&progress, ": migrating"), 2, "{progress}");
    assert_eq!(count(&progress, "-> c: moved"), 2, "{progress}");
    c.guests[2]
        .0
        .wait_exit(EVENTUALLY)
        .expect("b's sibling moved");
    wait_hosts(&url, &[], "c holds all", |h| {
        [("a", 0), ("b", 0), ("c", 4)]
            .iter()
            .all(|(n, vms)| find(h, n).is_some_and(|r| r["vms"] == *vms))
    });
    // The consoles of the VMs received on c (the pack's report is for people; find them).
    let consoles: Vec<std::path::PathBuf> = std::fs::read_dir(c.hosts[2].runtime.join("received"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "console"))
        .collect();
    assert_eq!(consoles.len(), 3, "{consoles:?}");
    for console in &consoles {
        let text = std::fs::read_to_string(console).unwrap();
        console_verifies(console.to_str().unwrap(), count(&text, "verify ok") + 1);
    }
    received.0.extend(received_pids(&c.hosts[2].runtime));
    // Bad input: one line each.
    let wrong = c.tmp.path().join("wrong.key");
    std::fs::write(&wrong, "ffeeddccbbaa99887766554433221100").unwrap();
    let nokey = c.tmp.path().join("absent.key");
    for (key_file, args, says) in [
        (&key, vec!["drain", "nosuch"], "no live host named"),
        (&nokey, vec!["drain", "b"], "absent.key"),
        (&wrong, vec!["drain", "b"], "host b"),
        (&wrong, vec!["pack"], "no agent answered"),
    ] {
        let mut cmd = Command::new(fabvm());
        cmd.args(["cluster", "--etcd", &url, "--key"])
            .arg(key_file)
            .args(&args);
        let line = expect_error(Vm::start_command(&mut cmd));
        assert!(line.contains(says), "{args:?}: {line}");
    }
    // etcd down: one line, exit 1; the guests run on.
    c.etcd.kill();
    let mut cmd = Command::new(fabvm());
    cmd.args(["cluster", "--etcd", &url, "--key"])
        .arg(&key)
        .args(["drain", "b"]);
    let line = expect_error(Vm::start_command(&mut cmd));
    assert!(line.contains("etcd"), "{line}");
    let (c2, sock) = &mut c.guests[3];
    still_runs(c2, sock);
}

/// Pids of the VMs received under a host's runtime directory (from their API sockets'
/// owners is more than needed: the registry lists them).
fn received_pids(runtime: &Path) -> Vec<u32> {
    std::fs::read_dir(runtime.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".json")?.parse().ok()
        })
        .collect()
}

#[test]
fn a_destination_dying_mid_drain_leaves_the_vm_on_the_source() {
    if require_kvm("cluster_drain").is_none() {
        return;
    }
    let mut c = setup((41, 42));
    // c's receivers die just before resuming the guest, as a host dying mid-migration.
    for (i, host) in c.hosts.iter_mut().enumerate() {
        let env: &[(&str, &str)] = if i == 2 {
            &[("FABVM_TEST_FAILPOINT", "before-resume")]
        } else {
            &[]
        };
        host.serve_with_env(&c.etcd.url, &c.key, env);
    }
    let (url, key) = (c.etcd.url.clone(), c.key.clone());
    let (p1, p2) = (c.guests[0].0.pid(), c.guests[1].0.pid());
    wait_plan(&url, &key, "a", &[(p1, "b"), (p2, "c")]);

    let mut received = Received::default();
    let (ok, report, err) = cluster(&url, &key, &["drain", "a"]);
    received.add(&report);
    assert!(!ok, "drain succeeded: {report}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("1 of 2 VMs not moved"), "{err}");
    assert_eq!(
        (report["moved"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(1))
    );
    let failed = report["moves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["ok"] == false)
        .unwrap();
    assert_eq!(
        (failed["pid"].as_u64(), failed["to"].as_str()),
        (Some(p2 as u64), Some("c"))
    );
    // Guest 1 moved to b and verifies there; guest 2 still runs on a.
    let moved = report["moves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["ok"] == true)
        .unwrap();
    console_verifies(moved["console"].as_str().unwrap(), 2);
    {
        let (a2, sock) = &mut c.guests[1];
        still_runs(a2, sock);
    }

    // c's agent itself dies when asked for a receiver (the host goes down mid-drain): the
    // guest stays on a again.
    let c_host = &mut c.hosts[2];
    c_host.agent.take().unwrap().kill();
    c_host.serve_with_env(&url, &key, &[("FABVM_TEST_FAILPOINT", "agent-receive")]);
    wait_plan(&url, &key, "a", &[(p2, "c")]);
    let (ok, report, err) = cluster(&url, &key, &["drain", "a"]);
    received.add(&report);
    assert!(!ok && report["failed"] == 1, "{report} {err}");
    assert!(err.contains("host c"), "{err}");
    let agent = c.hosts[2].agent.as_mut().unwrap();
    let status = agent.wait_exit(EVENTUALLY).expect("agent c died");
    assert_eq!(status.code(), Some(3));
    let (a2, sock) = &mut c.guests[1];
    still_runs(a2, sock);
}

#[test]
fn drain_and_pack_fail_with_one_line_without_a_cluster() {
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let tmp = tempfile::tempdir().unwrap();
    let key = fabvm_tests::write_test_key(tmp.path());
    let key = key.to_str().unwrap();
    for args in [
        vec!["cluster", "--etcd", &nobody, "--key", key, "drain", "a"],
        vec![
            "cluster",
            "--etcd",
            &nobody,
            "--key",
            key,
            "pack",
            "--dry-run",
        ],
        vec!["cluster", "--etcd", &nobody, "drain", "a"],
        vec!["cluster", "--etcd", &nobody, "--key", key, "drain"],
        vec![
            "cluster",
            "--etcd",
            &nobody,
            "--key",
            key,
            "drain",
            "a",
            "--placement",
            "best",
        ],
    ] {
        let mut cmd = Command::new(fabvm());
        cmd.args(&args).env_remove("FABVM_ETCD");
        let line = expect_error(Vm::start_command(&mut cmd));
        eprintln!("{args:?}: {line}");
    }
}
