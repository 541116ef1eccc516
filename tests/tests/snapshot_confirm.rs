//! Untrusted snapshots: a restore reopens only the disks and taps the user confirms on the
//! command line (`--disk PATH[,ro]`, `--net tap=NAME`), exactly as the snapshot recorded
//! them. Without the confirmation, with another disk, or from a state file edited to name
//! another file, fabvm refuses with one line before it opens anything; with it, the guest
//! runs on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fabvm_tests::{boot_guest, ctl, expect_error, fabvm, require_kvm, Vm};

const READY: Duration = Duration::from_secs(60);
const DISK_BYTES: u64 = 1 << 20;

/// A snapshot of the test guest running with a read-write disk: (snapshot, disk, store).
fn snapshot_with_disk(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let disk = tmp.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let store = tmp.join("store");
    let sock = tmp.join("vm.sock");
    let mut cmd = Command::new(fabvm());
    cmd.arg("--store").arg(&store).arg("--disk").arg(&disk);
    let mut vm = boot_guest(&mut cmd, &sock, "32M", "fill=1 passes=0 hb=50", READY);
    let snap = tmp.join("snap");
    let (ok, _, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "snapshot failed: {err}");
    vm.kill();
    (snap, disk, store)
}

fn restore(snap: &Path, store: &Path, extra: &[&str]) -> Vm {
    let mut args = vec![
        "--restore",
        snap.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Vm::start(&args)
}

/// The state file with its JSON body's `from` replaced by `to`, header length and checksum
/// made valid again (see `vmm::snapshot::format`).
fn edit_state(state: &[u8], from: &str, to: &str) -> Vec<u8> {
    let len = u64::from_le_bytes(state[16..24].try_into().unwrap()) as usize;
    let body = std::str::from_utf8(&state[24..24 + len]).unwrap();
    assert!(body.contains(from), "the state does not hold {from}");
    let body = body.replace(from, to);
    let mut out = state[..16].to_vec();
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body.as_bytes());
    out.extend_from_slice(blake3::hash(body.as_bytes()).as_bytes());
    out
}

#[test]
fn a_snapshots_disk_must_be_confirmed_exactly() {
    if require_kvm("snapshot_confirm").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (snap, disk, store) = snapshot_with_disk(tmp.path());
    let disk_arg = disk.to_str().unwrap();

    let err = expect_error(restore(&snap, &store, &[]));
    assert!(
        err.ends_with(&format!("not confirmed; add --disk {disk_arg}")),
        "{err}"
    );
    let other = tmp.path().join("other.raw");
    std::fs::write(&other, b"not the snapshot's disk").unwrap();
    let err = expect_error(restore(
        &snap,
        &store,
        &["--disk", disk_arg, "--disk", other.to_str().unwrap()],
    ));
    assert!(err.contains("has no such disk"), "{err}");
    let err = expect_error(restore(
        &snap,
        &store,
        &["--disk", &format!("{disk_arg},ro")],
    ));
    assert!(err.contains("opens it read-write"), "{err}");
    let err = expect_error(restore(
        &snap,
        &store,
        &["--disk", disk_arg, "--net", "tap=fabno0"],
    ));
    assert!(err.contains("no such tap"), "{err}");
    assert_eq!(
        std::fs::read(&other).unwrap(),
        b"not the snapshot's disk",
        "a refused restore touched a file"
    );

    let mut vm = restore(&snap, &store, &["--disk", disk_arg]);
    assert!(
        vm.wait_for_count("fabvm-guest: heartbeat", 3, READY),
        "the confirmed restore does not run:\n{}\n{}",
        vm.stdout(),
        vm.stderr()
    );
    assert!(vm.stderr().is_empty(), "{}", vm.stderr());
    assert!(!vm.stdout().contains("FAILED"), "{}", vm.stdout());
    vm.kill();
}

#[test]
fn a_state_file_edited_to_name_another_file_is_refused() {
    if require_kvm("snapshot_confirm_edited").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (snap, disk, store) = snapshot_with_disk(tmp.path());
    let secret = tmp.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5a; DISK_BYTES as usize]).unwrap();
    let edited = tmp.path().join("edited");
    std::fs::create_dir(&edited).unwrap();
    for name in ["state", "memory.manifest"] {
        std::fs::copy(snap.join(name), edited.join(name)).unwrap();
    }
    let state = std::fs::read(snap.join("state")).unwrap();
    let from = format!("\"path\":\"{}\"", disk.display());
    let to = format!("\"path\":\"{}\"", secret.display());
    std::fs::write(edited.join("state"), edit_state(&state, &from, &to)).unwrap();

    // The user confirms the disk they know of; the state names another file.
    let err = expect_error(restore(
        &edited,
        &store,
        &["--disk", disk.to_str().unwrap()],
    ));
    assert!(
        err.contains("has no such disk") && err.contains(secret.to_str().unwrap()),
        "{err}"
    );
    // Without confirmation the line names the file the state would open.
    let err = expect_error(restore(&edited, &store, &[]));
    assert!(
        err.ends_with(&format!("add --disk {}", secret.display())),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        vec![0x5a; DISK_BYTES as usize],
        "the named file was written"
    );
}
