//! Snapshots on the memory fabric, end to end with the test guest: a snapshot taken while the
//! guest verifies its memory restores in a new process that keeps verifying; a second
//! snapshot adds only changed pages; sibling guests share pages in the store; VMs restored
//! from one snapshot share host memory; bad snapshot files are refused with one line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fabvm_tests::{boot_guest, count, ctl, fabvm, require_kvm, Vm};

const READY: Duration = Duration::from_secs(60);

/// Boots the test guest with an API socket; waits for its first verification pass.
fn boot(dir: &Path, name: &str, mem: &str, cmdline: &str, store: &Path) -> (Vm, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(fabvm());
    cmd.arg("--store").arg(store);
    let vm = boot_guest(&mut cmd, &sock, mem, cmdline, READY);
    (vm, sock)
}

fn snapshot(sock: &Path, dir: &Path) -> serde_json::Value {
    let (ok, out, err) = ctl(sock, &["snapshot", dir.to_str().unwrap()]);
    assert!(ok, "snapshot failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("snapshot report {out:?}: {e}"))
}

fn store_stats(store: &Path) -> serde_json::Value {
    let out = std::process::Command::new(fabvm_tests::fabvm())
        .args([
            "store",
            "--json",
            "--store",
            store.to_str().unwrap(),
            "stats",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn number(value: &serde_json::Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {value}"))
}

#[test]
fn snapshot_while_verifying_restores_and_keeps_verifying() {
    if require_kvm("snapshot_restore").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (mut vm, sock) = boot(tmp.path(), "a", "256M", "passes=0 hb=100 seed=5", &store);

    let first = snapshot(&sock, &tmp.path().join("snap1"));
    let distinct = number(&first, "distinct_pages");
    assert!(
        distinct >= 60_000,
        "a 256 MiB guest filled with unique pages: {first}"
    );
    assert_eq!(
        number(&first, "new_pages"),
        distinct,
        "an empty store takes every page"
    );
    // The guest keeps running after the snapshot.
    let seen = count(&vm.stdout(), "verify ok");
    assert!(
        vm.wait_for_all(&[&format!("verify ok pass={}", seen + 1)], READY),
        "guest stalled after snapshot"
    );

    let second = snapshot(&sock, &tmp.path().join("snap2"));
    let rehashed = number(&second, "rehashed_pages");
    assert!(
        rehashed * 10 < distinct,
        "the dirty log should spare most rehashing: {second}"
    );
    let added = number(&second, "new_pages");
    assert!(
        added * 100 < distinct,
        "second snapshot added {added} of {distinct} pages: {second}"
    );
    let stats = store_stats(&store);
    let stored = number(&stats["stats"], "pages");
    assert_eq!(
        stored,
        distinct + added,
        "store holds each distinct page once: {stats}"
    );
    assert_eq!(number(&stats["stats"], "roots"), 2);

    let (ok, _, err) = ctl(&sock, &["shutdown"]);
    assert!(ok, "{err}");
    assert_eq!(
        vm.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0)
    );

    // Restore the first snapshot in a new process: the guest carries on verifying.
    let sock2 = tmp.path().join("restored.sock");
    let mut restored = Vm::start(&[
        "--restore",
        tmp.path().join("snap1").to_str().unwrap(),
        "--api-sock",
        sock2.to_str().unwrap(),
    ]);
    assert!(
        restored.wait_for_all(&["verify ok pass=", "heartbeat"], READY),
        "restored guest silent:\n{}\n{}",
        restored.stdout(),
        restored.stderr()
    );
    let before = count(&restored.stdout(), "verify ok");
    assert!(
        restored.wait_for_count("verify ok", before + 2, READY),
        "restored guest did not complete two more passes:\n{}",
        restored.stdout()
    );
    assert!(
        !restored.stdout().contains("FAILED"),
        "{}",
        restored.stdout()
    );
    assert!(
        !restored.stdout().contains("fabvm-guest: boot"),
        "the guest rebooted instead of resuming"
    );
    let (ok, status, _) = ctl(&sock2, &["status"]);
    assert!(ok && status.contains("\"state\":\"running\""), "{status}");
    let (ok, _, err) = ctl(&sock2, &["shutdown"]);
    assert!(ok, "{err}");
    assert_eq!(
        restored
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn sibling_guests_sharing_75_percent_store_about_one_and_a_quarter_guests() {
    if require_kvm("sibling_sharing").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mut distinct = Vec::new();
    for seed in [11, 12] {
        let cmdline = format!("passes=0 hb=1000 seed={seed} share=75 sseed=99");
        let (mut vm, sock) = boot(tmp.path(), &format!("s{seed}"), "128M", &cmdline, &store);
        let report = snapshot(&sock, &tmp.path().join(format!("snap{seed}")));
        distinct.push(number(&report, "distinct_pages"));
        let _ = ctl(&sock, &["shutdown"]);
        vm.wait_exit(Duration::from_secs(30));
    }
    let stored = number(&store_stats(&store)["stats"], "pages") as f64;
    let one = distinct[0] as f64;
    let ratio = stored / one;
    eprintln!("store holds {stored} pages for two guests of {one} distinct pages: {ratio:.3}x");
    assert!(
        (1.20..1.32).contains(&ratio),
        "expected about 1.25x one guest, got {ratio:.3}x"
    );
}

#[test]
fn five_vms_restored_from_one_snapshot_share_its_memory() {
    if require_kvm("restore_sharing").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (mut vm, sock) = boot(
        tmp.path(),
        "base",
        "256M",
        "passes=0 hb=1000 seed=3",
        &store,
    );
    snapshot(&sock, &tmp.path().join("snap"));
    let _ = ctl(&sock, &["shutdown"]);
    vm.wait_exit(Duration::from_secs(30));

    let mut vms = Vec::new();
    for i in 0..5 {
        let sock = tmp.path().join(format!("r{i}.sock"));
        let mut vm = Vm::start(&[
            "--restore",
            tmp.path().join("snap").to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ]);
        assert!(
            vm.wait_for_all(&["verify ok pass="], READY),
            "restore {i}: {}",
            vm.stderr()
        );
        vms.push((vm, sock));
    }
    // Each has verified all of its memory at least once: every page has been read.
    let mut pss_total = 0u64;
    let mut rss_total = 0u64;
    for (_, sock) in &vms {
        let (ok, out, err) = ctl(sock, &["stats"]);
        assert!(ok, "{err}");
        let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
        pss_total += number(&stats["process"], "pss_bytes");
        rss_total += number(&stats["process"], "rss_bytes");
    }
    let guest = 256u64 << 20;
    eprintln!(
        "5 restored VMs: PSS {} MiB, RSS {} MiB (5 x guest = {} MiB)",
        pss_total >> 20,
        rss_total >> 20,
        (5 * guest) >> 20
    );
    assert!(
        rss_total > 4 * guest,
        "each VM maps its whole memory (RSS {rss_total})"
    );
    assert!(
        pss_total < 2 * guest,
        "shared copy-on-write pages should count once: PSS {pss_total}"
    );
    for (mut vm, sock) in vms {
        let _ = ctl(&sock, &["shutdown"]);
        vm.wait_exit(Duration::from_secs(30));
    }
}

#[test]
fn damaged_snapshots_are_refused_with_one_line() {
    if require_kvm("damaged_snapshots").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (mut vm, sock) = boot(tmp.path(), "d", "64M", "passes=0 hb=1000", &store);
    let good = tmp.path().join("good");
    snapshot(&sock, &good);
    // Snapshotting into a non-empty directory is refused and nothing is overwritten.
    let (ok, _, err) = ctl(&sock, &["snapshot", good.to_str().unwrap()]);
    assert!(!ok && err.contains("not empty"), "{err}");
    let _ = ctl(&sock, &["shutdown"]);
    vm.wait_exit(Duration::from_secs(30));

    let state = std::fs::read(good.join("state")).unwrap();
    let manifest = std::fs::read(good.join("memory.manifest")).unwrap();
    let mut newer = state.clone();
    newer[8] = 99;
    let mut flipped = state.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    let mut bad_manifest = manifest.clone();
    let last = bad_manifest.len() - 40;
    bad_manifest[last] ^= 1;
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        (
            "truncated state",
            state[..state.len() / 3].to_vec(),
            manifest.clone(),
            "truncated",
        ),
        ("flipped state", flipped, manifest.clone(), "corrupted"),
        (
            "newer version",
            newer,
            manifest.clone(),
            "newer than this fabvm",
        ),
        (
            "flipped manifest",
            state.clone(),
            bad_manifest,
            "does not belong to this snapshot",
        ),
        (
            "truncated manifest",
            state.clone(),
            manifest[..100].to_vec(),
            "does not belong to this snapshot",
        ),
    ];
    for (what, state_bytes, manifest_bytes, expect) in cases {
        let dir = tmp.path().join(what.replace(' ', "-"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("state"), &state_bytes).unwrap();
        std::fs::write(dir.join("memory.manifest"), &manifest_bytes).unwrap();
        let mut vm = Vm::start(&["--restore", dir.to_str().unwrap()]);
        let status = vm
            .wait_exit(Duration::from_secs(30))
            .expect("fabvm hung on a damaged snapshot");
        let err = vm.stderr();
        assert!(!status.success(), "{what}: accepted");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(
            err.starts_with("fabvm: ") && err.contains(expect),
            "{what}: {err}"
        );
        // Nothing was overwritten.
        assert_eq!(std::fs::read(dir.join("state")).unwrap(), state_bytes);
    }
    let mut vm = Vm::start(&["--restore", tmp.path().join("missing").to_str().unwrap()]);
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(
        !status.success() && vm.stderr().contains("not a snapshot directory"),
        "{}",
        vm.stderr()
    );
}

#[test]
fn ctl_without_a_vm_fails_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err) = ctl(&tmp.path().join("nobody.sock"), &["status"]);
    assert!(!ok && out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("fabvm: cannot connect to API socket"),
        "{err}"
    );
}

#[test]
fn lazy_restore_fetches_pages_on_touch_and_keeps_verifying() {
    if require_kvm("lazy_restore").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (mut vm, sock) = boot(
        tmp.path(),
        "l",
        "256M",
        "passes=0 hb=100 seed=21 share=40",
        &store,
    );
    snapshot(&sock, &tmp.path().join("snap"));
    let _ = ctl(&sock, &["shutdown"]);
    vm.wait_exit(Duration::from_secs(30));

    let sock2 = tmp.path().join("lazy.sock");
    let mut lazy = Vm::start_command(
        std::process::Command::new(fabvm_tests::fabvm())
            .env("RUST_LOG", "fabvm::timing=info")
            .args([
                "--restore",
                tmp.path().join("snap").to_str().unwrap(),
                "--lazy",
            ])
            .args(["--api-sock", sock2.to_str().unwrap()]),
    );
    assert!(
        lazy.wait_for_all(&["verify ok pass="], READY),
        "{}\n{}",
        lazy.stdout(),
        lazy.stderr()
    );
    let before = count(&lazy.stdout(), "verify ok");
    assert!(
        lazy.wait_for_count("verify ok", before + 2, READY),
        "{}",
        lazy.stdout()
    );
    assert!(!lazy.stdout().contains("FAILED") && !lazy.stdout().contains("fabvm-guest: boot"));
    // The loader finished: every page came from the store, and it released the store.
    let deadline = std::time::Instant::now() + READY;
    while !lazy.stderr().contains("lazy restore complete") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = lazy.stderr();
    assert!(log.contains("lazy restore complete"), "{log}");
    let stats = store_stats(&store);
    assert_eq!(
        number(&stats["stats"], "roots"),
        1,
        "store usable while the lazy VM runs: {stats}"
    );
    let (ok, _, err) = ctl(&sock2, &["shutdown"]);
    assert!(ok, "{err}");
    assert_eq!(
        lazy.wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
}

/// Re-encodes a state file after `edit` changes its JSON body (magic, version, flags and
/// length header, body, blake3 of the body), as a snapshot from another host would look.
fn reencode(state: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let len = u64::from_le_bytes(state[16..24].try_into().unwrap()) as usize;
    let mut body: serde_json::Value = serde_json::from_slice(&state[24..24 + len]).unwrap();
    edit(&mut body);
    let body = serde_json::to_vec(&body).unwrap();
    let mut out = state[..16].to_vec();
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out
}

#[test]
fn restore_on_a_host_lacking_what_the_snapshot_needs_fails_with_one_line() {
    if require_kvm("incompatible_host").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (mut vm, sock) = boot(tmp.path(), "c", "64M", "passes=0 hb=1000", &store);
    let good = tmp.path().join("good");
    snapshot(&sock, &good);
    let _ = ctl(&sock, &["shutdown"]);
    vm.wait_exit(Duration::from_secs(30));
    let state = std::fs::read(good.join("state")).unwrap();
    let manifest = std::fs::read(good.join("memory.manifest")).unwrap();

    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "an MSR this host's KVM does not have",
            Box::new(|b| {
                // kvm_msr_entry as saved: index (u32 LE), reserved, data (u64 LE), as bytes.
                let msrs = b["vcpus"][0]["msrs"].as_array_mut().unwrap();
                let mut bogus = msrs[0].clone();
                for (i, byte) in 0x4fff_fff0u32.to_le_bytes().into_iter().enumerate() {
                    bogus[i] = serde_json::json!(byte);
                }
                msrs.push(bogus);
            }),
            "(first refused: 0x4ffffff0)",
        ),
        (
            "an XSAVE area larger than this host's",
            Box::new(|b| {
                let xsave = b["vcpus"][0]["xsave"].as_array_mut().unwrap();
                xsave.extend(std::iter::repeat_n(serde_json::json!(0), 1 << 16));
            }),
            "does not fit this host",
        ),
        (
            "more vCPUs than states",
            Box::new(|b| b["cpus"] = serde_json::json!(2)),
            "2 vCPUs with 1 vCPU states",
        ),
    ];
    for (what, edit, expect) in cases {
        let dir = tmp.path().join(what.replace(' ', "-").replace('\'', ""));
        std::fs::create_dir(&dir).unwrap();
        let edited = reencode(&state, edit);
        std::fs::write(dir.join("state"), &edited).unwrap();
        std::fs::write(dir.join("memory.manifest"), &manifest).unwrap();
        let mut vm = Vm::start(&["--restore", dir.to_str().unwrap()]);
        let status = vm.wait_exit(Duration::from_secs(30)).expect("hung");
        let err = vm.stderr();
        assert!(!status.success(), "{what}: accepted");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(
            err.starts_with("fabvm: ") && err.contains(expect),
            "{what}: {err}"
        );
        assert_eq!(
            std::fs::read(dir.join("state")).unwrap(),
            edited,
            "{what}: state overwritten"
        );
        assert!(vm.stdout().is_empty(), "{what}: the guest ran");
    }
}
