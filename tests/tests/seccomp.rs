//! seccomp filters: every thread of a running VMM is filtered, and a forbidden system call
//! ends the process with one line naming the call and the thread's kind instead of passing.
//! The violations come from the debug build's test hook `FABVM_TEST_SECCOMP_VIOLATION=KIND`
//! (see `vmm/src/seccomp/mod.rs`). They clear `FABVM_SECCOMP`, so a suite run with it set
//! to `log` or `off` still checks the default.

use std::process::Command;
use std::time::Duration;

use fabvm_tests::{boot_guest, ctl, fabvm, require_kvm, test_guest, Vm};

const EXIT: Duration = Duration::from_secs(60);
/// 128 + SIGSYS, fabvm's exit status after a forbidden call.
const VIOLATION_EXIT: i32 = 159;

/// Boots the test guest with the hook set for `kind` (and `extra` options); returns the exit
/// status and stderr.
fn violate(kind: &str, extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut vm = Vm::start_command(
        Command::new(fabvm())
            .env_remove("FABVM_SECCOMP")
            .env("FABVM_TEST_SECCOMP_VIOLATION", kind)
            .arg("--kernel")
            .arg(test_guest())
            .args([
                "--mem",
                "128M",
                "--cmdline",
                "passes=3 fill=1 hb=0",
                "--rng",
            ])
            .arg("--api-sock")
            .arg(&sock)
            .args(extra),
    );
    let status = vm.wait_exit(EXIT).expect("fabvm did not exit");
    (status.code(), vm.stderr())
}

#[test]
fn a_forbidden_call_ends_the_process_on_every_kind_of_thread() {
    if require_kvm("forbidden_call").is_none() {
        return;
    }
    for kind in ["vcpu", "device", "api", "vmm", "identities", "worker"] {
        let (code, stderr) = violate(kind, &[]);
        assert_eq!(code, Some(VIOLATION_EXIT), "{kind}: {stderr}");
        let line = format!(
            "fabvm: seccomp: forbidden system call 135 (personality) on a {kind} thread; exiting"
        );
        assert!(stderr.contains(&line), "{kind}: {stderr}");
        assert!(!stderr.contains("panicked"), "{kind}: {stderr}");
    }
}

#[test]
fn a_migration_destination_is_filtered_before_it_listens() {
    if require_kvm("destination_filtered").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff\n").unwrap();
    let mut vm = Vm::start_command(
        Command::new(fabvm())
            .env_remove("FABVM_SECCOMP")
            .env("FABVM_TEST_SECCOMP_VIOLATION", "migration-destination")
            .args(["receive", "--listen", "127.0.0.1:0", "--key"])
            .arg(&key),
    );
    let status = vm.wait_exit(EXIT).expect("fabvm receive did not exit");
    assert_eq!(status.code(), Some(VIOLATION_EXIT), "{}", vm.stderr());
    assert!(
        vm.stderr().contains("on a migration-destination thread"),
        "{}",
        vm.stderr()
    );
}

#[test]
fn with_filters_off_or_logging_the_same_call_passes() {
    if require_kvm("filters_off").is_none() {
        return;
    }
    for mode in ["off", "log"] {
        let (code, stderr) = violate("vcpu", &["--seccomp", mode]);
        assert_eq!(code, Some(0), "--seccomp {mode}: {stderr}");
        assert!(!stderr.contains("seccomp"), "--seccomp {mode}: {stderr}");
    }
}

/// Every thread of a running VMM (ours, rayon's, tiny_http's) is under a filter: the kernel
/// says `Seccomp: 2` for each task.
#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    if require_kvm("every_thread_filtered").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut cmd = Command::new(fabvm());
    cmd.env_remove("FABVM_SECCOMP")
        .args(["--rng", "--cpus", "2", "--store"])
        .arg(dir.path().join("store"));
    let mut vm = boot_guest(&mut cmd, &sock, "128M", "cpus=2 passes=0 hb=500", EXIT);
    // A request and a snapshot start the API's connection threads and use the workers.
    let (ok, _, err) = ctl(&sock, &["stats"]);
    assert!(ok, "{err}");
    let snap = dir.path().join("snap");
    let (ok, _, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "{err}");
    let tasks = format!("/proc/{}/task", vm.pid());
    let mut names = Vec::new();
    for task in std::fs::read_dir(&tasks).unwrap() {
        let path = task.unwrap().path();
        let Ok(status) = std::fs::read_to_string(path.join("status")) else {
            continue; // ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let name = field("Name:");
        assert_eq!(field("Seccomp:"), "2", "thread {name} is not filtered");
        names.push(name);
    }
    for expected in [
        "fabvm",
        "vcpu0",
        "vcpu1",
        "virtio",
        "api",
        "fabvm-ids",
        "fabvm-worker0",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected} thread in {names:?}"
        );
    }
    vm.kill();
}
