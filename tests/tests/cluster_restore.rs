//! A restore pulls the pages its store lacks from the cluster (issue 13, stage 2), end to
//! end on a real single-node etcd: host a snapshots a test guest into its store, host c holds
//! a sibling guest's snapshot (sharing half its pages), host b has an empty store. Restoring
//! a's snapshot on b with `--etcd` fetches pages from both a and c and the guest keeps
//! verifying; the store then holds them (a second restore needs no cluster); a lazy restore
//! pulls the same way; a registered host that claims every page and serves wrong ones costs
//! misses only. Without `--etcd`, with the only holder of some pages gone, or with etcd down,
//! the restore fails with one line.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cluster::bloom::DEFAULT_MAX_BYTES;
use cluster::record::unix_ms;
use cluster::service::{decode_request, encode_reply};
use cluster::{Bloom, HostRecord, Registry};
use fabric::migration::{MigrationKey, ServiceChannel};
use fabric::{DecodeLimits, Manifest, PAGE_SIZE};

use fabvm_tests::cluster::{find, wait_hosts, Etcd, Host, READY};
use fabvm_tests::{boot_guest, ctl, expect_error, fabvm, require_kvm, Vm};
use serde_json::Value;

/// Boots a test guest with `cmdline` on `store`, snapshots it into `snap`, shuts it down.
fn snapshot_guest(tmp: &Path, name: &str, store: &Path, cmdline: &str, snap: &Path) {
    let sock = tmp.join(format!("{name}.sock"));
    let mut cmd = Command::new(fabvm());
    cmd.env("FABVM_RUNTIME_DIR", tmp.join(name))
        .arg("--store")
        .arg(store);
    let _vm = boot_guest(&mut cmd, &sock, "64M", cmdline, READY);
    let (ok, _, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "snapshot: {err}");
}

/// `fabvm --restore SNAP --store STORE` with `extra` options, as host `b`, with memory images
/// in a directory of its own named after the store (images are per host, in /dev/shm by
/// default: a restore finding one needs no page of the store).
fn restore(b: &Host, snap: &Path, store: &Path, extra: &[&str]) -> Vm {
    let mut cmd = b.command();
    let mut images = store.as_os_str().to_owned();
    images.push("-images");
    cmd.env("FABVM_IMAGE_DIR", images)
        .arg("--restore")
        .arg(snap)
        .arg("--store")
        .arg(store)
        .args(extra);
    Vm::start_command(&mut cmd)
}

/// Registers host `liar` whose summary claims every page of `snap` and whose
/// page service answers every request with wrong pages; returns the registry and the lease
/// to revoke.
fn register_liar(url: &str, key: &Path, snap: &Path) -> (Registry, i64) {
    let bytes = std::fs::read(snap.join("memory.manifest")).unwrap();
    let manifest = Manifest::decode(&bytes, &DecodeLimits::default()).unwrap();
    let ids = manifest.distinct_ids();
    let mut bloom = Bloom::with_capacity(ids.len() as u64, DEFAULT_MAX_BYTES);
    ids.iter().for_each(|id| bloom.insert_id(id));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let key = MigrationKey::from_file_contents(&std::fs::read(key).unwrap()).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let Ok(mut ch) = ServiceChannel::accept(stream, &key) else {
                continue;
            };
            while let Ok(Some(asked)) = ch.recv().map(|b| decode_request(b).ok()) {
                let wrong = [0x5a; PAGE_SIZE];
                let reply = encode_reply(&vec![Some(&wrong); asked.len()]);
                if ch.send(&reply).is_err() {
                    break;
                }
            }
        }
    });
    let mut registry = Registry::connect(url, Duration::from_secs(3)).unwrap();
    let lease = registry.grant(Duration::from_secs(60)).unwrap();
    let summary = bloom.encode();
    registry.put_summary("liar", 1, &summary, lease).unwrap();
    let record = HostRecord {
        name: "liar".into(),
        addr,
        mem_available: 1 << 30,
        mem_total: 1 << 30,
        cpus: 1,
        vms: 0,
        pages_held: ids.len() as u64,
        store_pages: ids.len() as u64,
        summary_generation: 1,
        summary_bytes: summary.len() as u64,
        summary_fp_rate: bloom.fp_rate(),
        summary_unix_ms: unix_ms(),
        updated_unix_ms: unix_ms(),
    };
    registry.put_host(&record, lease).unwrap();
    (registry, lease)
}

/// The pull report a restore printed with `--json`.
fn pull_report(vm: &Vm) -> Value {
    let stderr = vm.stderr();
    stderr
        .lines()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v["pull"].is_object())
        })
        .unwrap_or_else(|| panic!("no pull report on stderr: {stderr}"))["pull"]
        .clone()
}

/// Waits for a restored guest to verify its memory; returns it.
fn verifies(mut vm: Vm, what: &str) -> Vm {
    assert!(
        vm.wait_for_all(&["verify ok pass="], READY),
        "{what}: restored guest never verified:\n{}\n{}",
        vm.stdout(),
        vm.stderr()
    );
    assert!(!vm.stdout().contains("FAILED"), "{what}: {}", vm.stdout());
    vm
}

#[test]
fn restore_pulls_missing_pages_from_the_hosts_holding_them() {
    if require_kvm("cluster_restore").is_none() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("fcl-restore-")
        .tempdir()
        .unwrap();
    let key = fabvm_tests::write_test_key(tmp.path());
    let key_arg = key.to_str().unwrap();
    let mut etcd = Etcd::start();
    let (mut a, b, mut c) = (
        Host::new(tmp.path(), "a"),
        Host::new(tmp.path(), "b"),
        Host::new(tmp.path(), "c"),
    );
    let snap = tmp.path().join("snap");
    let sibling = tmp.path().join("sibling");
    snapshot_guest(
        tmp.path(),
        "va",
        &a.store,
        "passes=0 hb=500 seed=21 share=50",
        &snap,
    );
    snapshot_guest(
        tmp.path(),
        "vc",
        &c.store,
        "passes=0 hb=500 seed=22 share=50",
        &sibling,
    );
    a.serve(&etcd.url, &key);
    c.serve(&etcd.url, &key);
    wait_hosts(
        &etcd.url,
        &[&a, &c],
        "a and c with their stores summarised",
        |h| {
            ["a", "c"].iter().all(|n| {
                find(h, n).is_some_and(|r| {
                    r["store_pages"].as_u64() > Some(8_000)
                        && r["summary_generation"].as_u64() > Some(0)
                })
            })
        },
    );

    // b, empty store: the restore pulls every page, from a and from c.
    let url = etcd.url.clone();
    let store_b = b.store.clone();
    let vm = restore(
        &b,
        &snap,
        &store_b,
        &["--etcd", &url, "--key", key_arg, "--json"],
    );
    let mut vm = verifies(vm, "pulled");
    let report = pull_report(&vm);
    eprintln!("pull report: {report}");
    assert!(report["wanted"].as_u64() > Some(8_000), "{report}");
    assert_eq!(report["fetched"], report["wanted"], "{report}");
    assert_eq!(report["missing"], 0, "{report}");
    let hosts = report["hosts"].as_array().unwrap();
    for name in ["a", "c"] {
        let h = find(hosts, name).unwrap_or_else(|| panic!("{name} not asked: {report}"));
        let pages = h["pages"].as_u64().unwrap();
        assert!(pages > 100, "{name} gave {pages} pages: {report}");
        assert_eq!(h["bytes"].as_u64(), Some(pages * 4096), "{report}");
        assert_eq!(h["wrong"], 0, "{report}");
        assert!(
            h["ms"].as_f64().is_some() && h["error"].is_null(),
            "{report}"
        );
    }
    vm.kill();
    // b's store now holds the snapshot: restoring again (memory image built anew from the
    // store) needs no cluster.
    std::fs::remove_dir_all(tmp.path().join("b/store-images")).unwrap();
    let mut vm = verifies(restore(&b, &snap, &store_b, &[]), "offline");
    vm.kill();

    // A host claiming every page and serving wrong ones: each page it was asked for is a
    // miss (and wrong), fetched again from a or c; the guest verifies.
    let (mut liar, lease) = register_liar(&url, &key, &snap);
    let vm = restore(
        &b,
        &snap,
        &tmp.path().join("b-liar"),
        &["--etcd", &url, "--key", key_arg, "--json"],
    );
    let mut vm = verifies(vm, "liar");
    let report = pull_report(&vm);
    eprintln!("pull report with a liar: {report}");
    let lie = find(report["hosts"].as_array().unwrap(), "liar").expect("liar asked");
    assert!(lie["asked"].as_u64() > Some(0), "{report}");
    assert_eq!(lie["wrong"], lie["asked"], "{report}");
    assert_eq!(lie["misses"], lie["asked"], "{report}");
    assert_eq!(lie["pages"], 0, "{report}");
    assert_eq!(report["fetched"], report["wanted"], "{report}");
    vm.kill();
    liar.revoke(lease).unwrap();

    // A lazy restore (userfaultfd) pulls the same way, into another empty store.
    let store_lazy = tmp.path().join("b-lazy");
    let mut vm = verifies(
        restore(
            &b,
            &snap,
            &store_lazy,
            &["--lazy", "--etcd", &url, "--key", key_arg],
        ),
        "lazy",
    );
    vm.kill();

    // Without --etcd, a store lacking pages: one line naming the count and the snapshot.
    let line = expect_error(restore(&b, &snap, &tmp.path().join("b2"), &[]));
    assert!(
        line.contains("pages are not in store") && line.contains("snap"),
        "{line}"
    );

    // a gone: the pages only a held are held by no live host.
    if let Some(mut agent) = a.agent.take() {
        agent.kill();
    }
    let line = expect_error(restore(
        &b,
        &snap,
        &tmp.path().join("b3"),
        &["--etcd", &url, "--key", key_arg],
    ));
    assert!(line.contains("held by no live host"), "{line}");

    // etcd down with pages missing: one line.
    etcd.kill();
    let line = expect_error(restore(
        &b,
        &snap,
        &tmp.path().join("b4"),
        &["--etcd", &url, "--key", key_arg],
    ));
    assert!(line.contains("etcd at"), "{line}");
    if let Some(mut agent) = c.agent.take() {
        agent.kill();
    }
}
