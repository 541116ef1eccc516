//! `fabvm jail`: the jailed VMM boots the test guest, takes a snapshot into a bound directory
//! and migrates to a jailed `fabvm receive` in another network namespace, running as an
//! unprivileged user with no capabilities in namespaces of its own. Needs root and KVM; says
//! loudly when it skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fabvm_tests::netns::{Host, TwoHosts};
use fabvm_tests::{
    boot_guest, count, ctl, expect_error, fabvm, require_kvm, wait_for_socket, write_test_key, Vm,
};

const READY: Duration = Duration::from_secs(90);
const UID: u32 = 65534;
const PORT: u16 = 7131;

/// Root and KVM, or a loud skip.
fn can_jail(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! {test}: SKIPPED, fabvm jail needs root !!!");
        return false;
    }
    require_kvm(test).is_some()
}

/// A directory the jailed user owns.
fn user_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    std::os::unix::fs::chown(path, Some(UID), Some(UID)).unwrap();
    path.to_path_buf()
}

/// `fabvm jail` as 65534 in `host`'s network namespace, with `binds`, then `--`.
fn jail(hosts: &TwoHosts, host: Host, base: &Path, id: &str, binds: &[String]) -> Command {
    let mut cmd = Command::new(fabvm());
    // The filters are checked as they are by default.
    cmd.env_remove("FABVM_SECCOMP")
        .args(["jail", "--uid", "65534", "--gid", "65534", "--id", id])
        .arg("--chroot-base")
        .arg(base)
        .args(["--netns", hosts.name(host)]);
    for bind in binds {
        cmd.args(["--bind", bind]);
    }
    cmd.arg("--");
    cmd
}

/// The jailed fabvm: the one child of the `fabvm jail` process.
fn jailed_pid(jail: &Vm) -> u32 {
    let children = format!("/proc/{0}/task/{0}/children", jail.pid());
    let text = std::fs::read_to_string(&children).unwrap();
    let pids: Vec<u32> = text
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "fabvm jail has children {pids:?}");
    pids[0]
}

/// The value of `key` in /proc/PID/status.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn jailed_vmm_boots_snapshots_and_migrates() {
    if !can_jail("jailed_vmm_boots_snapshots_and_migrates") {
        return;
    }
    let hosts = TwoHosts::new();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    let (run_a, run_b) = (
        user_dir(&dir.path().join("a")),
        user_dir(&dir.path().join("b")),
    );
    let snaps = user_dir(&dir.path().join("snaps"));
    let store = dir.path().join("store");
    let key = write_test_key(dir.path());
    let id = format!("src{}", std::process::id());

    // Boot in the jail on host A.
    let sock = run_a.join("api.sock");
    let binds = [snaps.display().to_string(), format!("{}:ro", key.display())];
    let mut cmd = jail(&hosts, Host::A, &base, &id, &binds);
    cmd.arg("--store").arg(&store);
    let mut source = boot_guest(&mut cmd, &sock, "256M", "passes=0 hb=500 seed=17", READY);

    // Confined: PID 1 of its own namespace, user 65534, no capabilities, no_new_privs,
    // seccomp filters, no host files, under the jail root.
    let (ok, status, err) = ctl(&sock, &["status"]);
    assert!(ok, "status: {err}");
    assert!(
        status.contains("\"pid\":1,") || status.contains("\"pid\":1}"),
        "{status}"
    );
    let pid = jailed_pid(&source);
    assert_eq!(status_field(pid, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Gid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(root.join("fabvm").exists());
    assert!(root.join("dev/kvm").exists());
    assert!(!root.join("etc").exists(), "the jail shows the host's /etc");
    assert!(!root.join("dev/sda").exists() && !root.join("dev/mem").exists());
    assert!(base.join("fabvm").join(&id).join("root").is_dir());

    // A snapshot into the bound directory; the store the jail made belongs to the user.
    let snap = snaps.join("one");
    let (ok, report, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "snapshot in the jail failed: {err}");
    assert!(report.contains("bytes_written"), "{report}");
    assert!(
        std::fs::read_dir(&snap).unwrap().count() > 0,
        "empty snapshot"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&store).unwrap().uid(), UID);

    // Migrate to a jailed receiver on host B.
    let dest_sock = run_b.join("api.sock");
    let listen = format!("{}:{PORT}", hosts.ip(Host::B));
    let mut cmd = jail(
        &hosts,
        Host::B,
        &base,
        &format!("dst{}", std::process::id()),
        &[],
    );
    cmd.args(["receive", "--listen", &listen, "--key"])
        .arg(&key)
        .arg("--api-sock")
        .arg(&dest_sock);
    let mut dest = Vm::start_command(&mut cmd);
    std::thread::sleep(Duration::from_millis(500)); // listening
    let dest_addr = format!("{}:{PORT}", hosts.ip(Host::B));
    let (ok, _, err) = ctl(
        &sock,
        &["migrate", &dest_addr, "--key", key.to_str().unwrap()],
    );
    assert!(
        ok,
        "jailed migration failed: {err}\nsource: {}\ndest: {}",
        source.stderr(),
        dest.stderr()
    );
    let exit = source.wait_exit(READY).expect("source still running");
    assert!(exit.success(), "source exit {exit:?}: {}", source.stderr());
    assert!(
        !base.join("fabvm").join(&id).exists(),
        "the jail directory stayed"
    );
    assert!(wait_for_socket(&dest_sock, READY), "{}", dest.stderr());
    let before = count(&dest.stdout(), "verify ok");
    assert!(
        dest.wait_for_count("verify ok", before + 1, READY),
        "the migrated guest does not verify in the destination jail:\n{}\n{}",
        dest.stdout(),
        dest.stderr()
    );
    assert!(!dest.stdout().contains("FAILED"), "{}", dest.stdout());
    let (ok, status, _) = ctl(&dest_sock, &["status"]);
    assert!(ok && status.contains("\"state\":\"running\""), "{status}");
    let (ok, _, err) = ctl(&dest_sock, &["shutdown"]);
    assert!(ok, "{err}");
    let exit = dest.wait_exit(READY).expect("destination still running");
    assert!(
        exit.success(),
        "destination exit {exit:?}: {}",
        dest.stderr()
    );
}

#[test]
fn bad_jail_arguments_give_one_line() {
    if !can_jail("bad_jail_arguments_give_one_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    // (uid and gid, chroot base, what to run): uid 0, a missing kernel, a relative base,
    // and a command that is not a VM.
    let cases: [(&str, &str, &[&str]); 4] = [
        ("0", base, &["--kernel", "/k"]),
        ("1", base, &["--kernel", "/no/such/kernel"]),
        ("1", "relative", &["--kernel", "/k"]),
        ("1", base, &["ctl", "--api-sock", "/a", "status"]),
    ];
    for (id, chroot, run) in cases {
        let mut args = vec![
            "jail",
            "--uid",
            id,
            "--gid",
            id,
            "--chroot-base",
            chroot,
            "--",
        ];
        args.extend_from_slice(run);
        let line = expect_error(Vm::start(&args));
        assert!(line.starts_with("fabvm: jail: "), "{args:?}: {line}");
    }
}
