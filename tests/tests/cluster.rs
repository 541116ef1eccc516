//! The cluster registry end to end: a real single-node etcd (random loopback ports, data in
//! a temporary directory, killed at the end), three `fabvm host serve` agents, each a "host"
//! with its own VM registry (FABVM_RUNTIME_DIR) and store, all on loopback: host a runs a
//! test guest, host b holds a snapshot in its store, host c holds nothing. `cluster hosts`
//! lists them; `cluster place` ranks a first for the running guest and b first for the
//! snapshot; the page service returns the right pages (compared with the guest's memory and
//! the store) and refuses a wrong key; a killed agent drops out after its lease's TTL; with
//! etcd killed, `cluster hosts` fails with one line while the guest keeps verifying and the
//! page service keeps serving.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cluster::service::ServiceError;
use fabric::live::{PageState, TableReader};
use fabric::migration::{MigrationError, MigrationKey};
use fabric::{PageId, Store, PAGE_SIZE};
use fabvm_tests::cluster::{
    cluster_cmd, find, hosts, running, wait_hosts, Etcd, Host, EVENTUALLY, READY,
};
use fabvm_tests::{boot_guest, count, ctl, expect_error, fabvm, free_port, require_kvm, Vm};
use serde_json::Value;

/// Up to `n` (page index, identity) of current non-zero pages of a running VM's table.
fn vm_pages(sock: &Path, n: usize) -> (TableReader, Vec<(usize, PageId)>) {
    let (ok, out, err) = ctl(sock, &["stats"]);
    assert!(ok, "{err}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    let path = stats["identities"]["published"]
        .as_str()
        .expect("published table");
    let table = TableReader::open(Path::new(path)).unwrap();
    let mut pages = Vec::new();
    let mut entries = Vec::new();
    for chunk in 0..table.chunks() {
        table
            .read_chunk(chunk, &mut entries)
            .expect("a whole chunk");
        for (i, e) in entries.iter().enumerate() {
            if let (PageState::Current, Some(id)) = (e.state, e.id) {
                pages.push((chunk * fabric::live::CHUNK_PAGES + i, id));
            }
        }
    }
    // Pages from the middle of memory: the filled ones, not the guest's code or stack.
    let skip = pages.len() / 3;
    (table, pages.into_iter().skip(skip).take(n).collect())
}

fn open_store(dir: &Path) -> Store {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        match Store::open(dir) {
            Ok(store) => return store,
            Err(e) => assert!(Instant::now() < deadline, "store {}: {e}", dir.display()),
        }
    }
}

#[test]
fn registry_summaries_page_service_and_placement() {
    if require_kvm("cluster").is_none() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("fcl-test-")
        .tempdir()
        .unwrap();
    let key = fabvm_tests::write_test_key(tmp.path());
    let mut etcd = Etcd::start();
    let (mut a, mut b, mut c) = (
        Host::new(tmp.path(), "a"),
        Host::new(tmp.path(), "b"),
        Host::new(tmp.path(), "c"),
    );

    // A snapshot of another guest into b's store (that guest then exits: b holds its pages
    // only in the store).
    let snap = tmp.path().join("snap");
    {
        let sock = tmp.path().join("snapvm.sock");
        let mut cmd = Command::new(fabvm());
        cmd.env("FABVM_RUNTIME_DIR", tmp.path().join("snapvm"))
            .arg("--store")
            .arg(&b.store);
        let _vm = boot_guest(&mut cmd, &sock, "64M", "passes=0 hb=500 seed=12", READY);
        let (ok, _, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
        assert!(ok, "snapshot: {err}");
    }
    // A guest running on a.
    let sock = tmp.path().join("a.sock");
    let mut guest = boot_guest(
        &mut a.command(),
        &sock,
        "64M",
        "passes=0 hb=500 seed=11",
        READY,
    );

    for host in [&mut a, &mut b, &mut c] {
        host.serve(&etcd.url, &key);
    }
    let listed = wait_hosts(
        &etcd.url,
        &[&a, &b, &c],
        "three hosts with summaries",
        |h| {
            h.len() == 3
                && find(h, "a")
                    .is_some_and(|a| a["vms"] == 1 && a["pages_held"].as_u64() > Some(10_000))
                && find(h, "b").is_some_and(|b| b["store_pages"].as_u64() > Some(10_000))
                && h.iter().all(|h| h["summary_generation"].as_u64() > Some(0))
        },
    );
    let c_rec = find(&listed, "c").unwrap();
    assert_eq!(
        (c_rec["pages_held"].as_u64(), c_rec["vms"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(find(&listed, "b").unwrap()["addr"], b.addr.as_str());
    assert!(listed
        .iter()
        .all(|h| h["cpus"].as_u64() > Some(0) && h["mem_available"].as_u64() > Some(0)));
    // The table for people lists them too.
    let out = Command::new(fabvm())
        .args(["cluster", "--etcd", &etcd.url, "hosts"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && ["a ", "b ", "c ", &a.addr]
                .iter()
                .all(|s| table.contains(s)),
        "{table}"
    );

    // Placement: the host holding the pages ranks first every time, and once its summary
    // has caught up with the guest's identities (hashed in the background) it says it holds
    // nearly all of them.
    for (args, first) in [
        (vec!["place", "--api-sock", sock.to_str().unwrap()], "a"),
        (vec!["place", "--snapshot", snap.to_str().unwrap()], "b"),
    ] {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let ranked = cluster_cmd(&etcd.url, &args).unwrap();
            let hosts = ranked["hosts"].as_array().unwrap();
            assert_eq!(hosts.len(), 3, "{ranked}");
            assert_eq!(hosts[0]["name"], first, "{ranked}");
            assert!(
                hosts[1..].iter().all(|h| h["held"].as_f64().unwrap() < 0.1),
                "{ranked}"
            );
            assert!(ranked["score"].as_str().unwrap().contains("held"));
            if hosts[0]["held"].as_f64().unwrap() > 0.95 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "summary never caught up: {ranked}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    // The page service: a's pages come from the running guest (compared with its memory),
    // b's from the store (compared with what the store reads), c has none.
    let key_bytes = MigrationKey::from_file_contents(&std::fs::read(&key).unwrap()).unwrap();
    let (table, asked) = vm_pages(&sock, 300);
    assert_eq!(asked.len(), 300);
    let ids: Vec<PageId> = asked.iter().map(|(_, id)| *id).collect();
    let got = cluster::fetch_pages(&a.addr, &key_bytes, &ids).unwrap();
    let mem = std::fs::File::open(format!("/proc/{}/mem", guest.pid())).unwrap();
    let mut same = 0;
    for ((page, id), got) in asked.iter().zip(&got) {
        let got = got.as_ref().expect("a holds its guest's pages");
        assert_eq!(PageId(*blake3::hash(&got[..]).as_bytes()), *id);
        let mut now = vec![0u8; PAGE_SIZE];
        mem.read_exact_at(&mut now, table.frames().host_addr(*page).unwrap())
            .unwrap();
        same += usize::from(now == got[..]);
    }
    assert!(
        same >= 290,
        "only {same} of 300 pages equal the guest's memory"
    );
    assert!(cluster::fetch_pages(&c.addr, &key_bytes, &ids)
        .unwrap()
        .iter()
        .all(Option::is_none));

    let snap_ids: Vec<PageId> = {
        let store = open_store(&b.store);
        let root = store
            .roots()
            .into_iter()
            .next()
            .expect("the snapshot's root")
            .name;
        store
            .root_ids(&root)
            .unwrap()
            .into_iter()
            .take(100)
            .collect()
    };
    let mut asked = snap_ids.clone();
    asked.push(PageId([7; 32])); // nobody's page
    let got = cluster::fetch_pages(&b.addr, &key_bytes, &asked).unwrap();
    assert!(got[100].is_none());
    let store = open_store(&b.store);
    let mut want = vec![0u8; PAGE_SIZE];
    for (id, got) in snap_ids.iter().zip(&got) {
        store.get(id, &mut want).unwrap();
        assert_eq!(got.as_ref().map(|p| &p[..]), Some(&want[..]));
    }
    drop(store);
    // A wrong key is refused.
    let wrong = MigrationKey::new(b"not the cluster's key at all").unwrap();
    match cluster::fetch_pages(&a.addr, &wrong, &ids[..1]) {
        Err(ServiceError::Channel(MigrationError::AuthFailed)) => {}
        other => panic!("wrong key: {other:?}"),
    }

    // A killed agent drops out once its lease runs out.
    c.agent.take().unwrap().kill();
    wait_hosts(&etcd.url, &[&a, &b], "c gone", |h| {
        h.len() == 2 && find(h, "c").is_none()
    });

    // etcd down: cluster commands fail with one line; the guest keeps verifying and a keeps
    // serving pages.
    etcd.kill();
    let mut cmd = Command::new(fabvm());
    cmd.args(["cluster", "--etcd", &etcd.url, "hosts"]);
    let line = expect_error(Vm::start_command(&mut cmd));
    assert!(line.contains("etcd"), "{line}");
    let passes = count(&guest.stdout(), "verify ok");
    assert!(
        guest.wait_for_count("verify ok", passes + 1, READY),
        "guest stopped verifying with etcd down: {}",
        guest.stderr()
    );
    let got = cluster::fetch_pages(&a.addr, &key_bytes, &ids[..10]).unwrap();
    assert!(got.iter().all(Option::is_some));
    for host in [&a, &b] {
        let agent = host.agent.as_ref().unwrap();
        assert!(
            running(agent.pid()),
            "agent {} exited: {}",
            host.name,
            agent.stderr()
        );
    }

    // etcd back (same data): the agents write their records again (restored records of
    // dead agents would not be rewritten), with their summaries.
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    etcd.restart();
    wait_hosts(&etcd.url, &[&a, &b], "a and b back", |h| {
        h.len() == 2
            && ["a", "b"].iter().all(|n| {
                find(h, n).is_some_and(|r| {
                    r["summary_generation"].as_u64() > Some(0)
                        && r["updated_unix_ms"].as_u64() > Some(restarted)
                })
            })
    });
    let ranked = cluster_cmd(&etcd.url, &["place", "--snapshot", snap.to_str().unwrap()]).unwrap();
    assert_eq!(ranked["hosts"][0]["name"], "b", "{ranked}");

    // SIGTERM: the agent revokes its lease before it exits 0, so b is gone when it has.
    let agent = b.agent.as_mut().unwrap();
    // SAFETY: kill only sends a signal to the agent, a child of this process.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) }, 0);
    let status = agent
        .wait_exit(EVENTUALLY)
        .expect("agent b exits on SIGTERM");
    assert!(status.success(), "{status:?}: {}", agent.stderr());
    let left = hosts(&etcd.url);
    assert!(find(&left, "b").is_none(), "b still listed: {left:?}");
}

#[test]
fn cluster_commands_fail_with_one_line() {
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let cases: Vec<Vec<&str>> = vec![
        vec!["cluster", "--etcd", &nobody, "hosts"],
        vec!["cluster", "--etcd", &nobody, "--json", "hosts"],
        vec!["cluster", "--etcd", &nobody, "place"],
        vec![
            "cluster",
            "--etcd",
            &nobody,
            "place",
            "--snapshot",
            "/nonexistent",
        ],
        vec!["cluster", "hosts"],
        vec![
            "host",
            "serve",
            "--name",
            "a/b",
            "--listen",
            &listen,
            "--key",
            key.to_str().unwrap(),
            "--etcd",
            &nobody,
        ],
        vec![
            "host",
            "serve",
            "--name",
            "a",
            "--listen",
            &listen,
            "--key",
            "/nonexistent",
            "--etcd",
            &nobody,
        ],
        vec![
            "host",
            "serve",
            "--name",
            "a",
            "--listen",
            &listen,
            "--key",
            key.to_str().unwrap(),
            "--etcd",
            &nobody,
        ],
        vec![
            "host",
            "serve",
            "--name",
            "a",
            "--listen",
            &listen,
            "--key",
            key.to_str().unwrap(),
            "--etcd",
            &nobody,
            "--summary-max",
            "1G",
        ],
        vec![
            "host",
            "serve",
            "--name",
            "a",
            "--listen",
            "nonsense",
            "--key",
            key.to_str().unwrap(),
            "--etcd",
            &nobody,
        ],
    ];
    for args in cases {
        let mut cmd = Command::new(fabvm());
        cmd.args(&args).env_remove("FABVM_ETCD");
        let line = expect_error(Vm::start_command(&mut cmd));
        eprintln!("{args:?}: {line}");
    }
}
