//! Live page identities: kept current in the background, never wrong for a page not marked
//! stale (checked against a full rehash after guest and device writes, with and without
//! transparent huge pages), and published so that a migration destination finds pages
//! across the VMs running there, never uses a page rewritten since it was published, and
//! survives a publishing VM killed while it reads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fabvm_tests::netns::{Host, TwoHosts};
use fabvm_tests::{
    boot_guest, count, ctl, fabvm, filled_pages, require_kvm, wait_for_socket, write_test_key, Vm,
};

const READY: Duration = Duration::from_secs(90);
/// The rehash-check guests keep rewriting memory and a disk: slow to verify on a loaded host.
const BUSY_READY: Duration = Duration::from_secs(240);
const PORT: u16 = 7201;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn check(sock: &Path) -> serde_json::Value {
    let (ok, out, err) = ctl(sock, &["identities"]);
    assert!(ok, "ctl identities: {err}");
    json(&out)
}

fn stats(sock: &Path) -> serde_json::Value {
    let (ok, out, err) = ctl(sock, &["stats"]);
    assert!(ok, "ctl stats: {err}");
    json(&out)["identities"].clone()
}

/// A guest rewriting pages and a virtio-blk device writing guest memory (its reads land in
/// guest buffers) while the background keeps identities: every identity not marked stale
/// equals a fresh hash of its page, checked several times.
fn identities_match_a_full_rehash(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let sock = dir.path().join("api.sock");
    let mut cmd = std::process::Command::new(fabvm());
    cmd.env("FABVM_RUNTIME_DIR", dir.path().join("run"))
        .args(["--disk", disk.to_str().unwrap()])
        .args(extra);
    let mut vm = boot_guest(
        &mut cmd,
        &sock,
        "256M",
        "fill=48 seed=5 dirty=20000 hb=200 blk=4000 blkwait=1",
        BUSY_READY,
    );
    let mut checked = 0;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        let report = check(&sock);
        assert_eq!(report["mismatched_pages"], 0, "{report}");
        checked += report["checked_pages"].as_u64().unwrap();
    }
    // Of 65,536 pages, those stale at a check (written since the last harvest, or waiting
    // for the budget: about 5,000 at 20,000 pages/s) are not compared; the rest are. On a
    // loaded machine the background lags further.
    assert!(checked > 4 * 50_000, "too few pages checked: {checked}");
    let out = vm.stdout();
    assert!(
        count(&out, "blk ok") > 10,
        "the device wrote guest memory: {out}"
    );
    let figures = stats(&sock);
    assert_eq!(figures["pages"], 65536, "{figures}");
    // Every filled page is known: current, or stale while the guest keeps rewriting it.
    let known = figures["current"].as_u64().unwrap() + figures["stale"].as_u64().unwrap();
    assert!(
        known >= 48 * 256 * 9 / 10,
        "filled pages are known: {figures}"
    );
    assert!(figures["harvests"].as_u64().unwrap() > 0, "{figures}");
    let before = count(&vm.stdout(), "verify ok");
    assert!(vm.wait_for_count("verify ok", before + 1, BUSY_READY));
    assert!(!vm.stdout().contains("FAILED"), "{}", vm.stdout());
    let _ = ctl(&sock, &["shutdown"]);
    assert_eq!(
        vm.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn identities_match_a_full_rehash_with_huge_pages() {
    if require_kvm("identities_thp").is_none() {
        return;
    }
    identities_match_a_full_rehash(&[]);
}

#[test]
fn identities_match_a_full_rehash_with_small_pages() {
    if require_kvm("identities_small_pages").is_none() {
        return;
    }
    identities_match_a_full_rehash(&["--no-hugepages"]);
}

#[test]
fn identities_off_still_gives_exact_identities_on_demand() {
    if require_kvm("identities_off").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut cmd = std::process::Command::new(fabvm());
    cmd.env("FABVM_RUNTIME_DIR", dir.path().join("run"))
        .args(["--identities", "off"]);
    let mut vm = boot_guest(
        &mut cmd,
        &sock,
        "128M",
        "fill=64 seed=9 dirty=5000 hb=200",
        READY,
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = stats(&sock);
    assert_eq!(before["background"], false, "{before}");
    assert_eq!(
        before["rehashed_pages"], 0,
        "nothing hashed in the background"
    );
    assert!(before["stale"].as_u64().unwrap() > 0 || before["current"] == 0);
    let report = check(&sock);
    assert_eq!(report["mismatched_pages"], 0, "{report}");
    let after = stats(&sock);
    assert!(
        after["current"].as_u64().unwrap() >= 64 * 256 * 9 / 10,
        "a check syncs: {after}"
    );
    vm.kill();
}

/// Two hosts; host B runs `siblings` (name, command line), all 256 MiB.
struct Fabric {
    hosts: TwoHosts,
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Fabric {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = write_test_key(dir.path());
        Fabric {
            hosts: TwoHosts::new(),
            dir,
            key,
        }
    }

    fn vm(&self, host: Host, name: &str, cmdline: &str) -> (Vm, PathBuf) {
        let sock = self.dir.path().join(format!("{name}.sock"));
        let mut cmd = self.hosts.command(host, &fabvm());
        let vm = boot_guest(&mut cmd, &sock, "256M", cmdline, READY);
        (vm, sock)
    }

    fn receiver(&self, extra: &[&str]) -> (Vm, PathBuf) {
        let sock = self.dir.path().join("dest.sock");
        let mut cmd = self.hosts.command(Host::B, &fabvm());
        let listen = format!("{}:{PORT}", self.hosts.ip(Host::B));
        cmd.env("RUST_LOG", "info")
            .args(["receive", "--json", "--listen", &listen, "--key"])
            .arg(&self.key)
            .arg("--api-sock")
            .arg(&sock)
            .args(extra);
        let vm = Vm::start_command(&mut cmd);
        std::thread::sleep(Duration::from_millis(300));
        (vm, sock)
    }

    /// Migrates the VM behind `sock` to host B; checks the source exits 0 and the guest
    /// verifies there; returns the source's report and the destination's.
    fn migrate(&self, source: &mut Vm, sock: &Path) -> (serde_json::Value, serde_json::Value) {
        self.migrate_with(source, sock, &[])
    }

    /// [`Fabric::migrate`] with `extra` arguments for `fabvm receive`.
    fn migrate_with(
        &self,
        source: &mut Vm,
        sock: &Path,
        extra: &[&str],
    ) -> (serde_json::Value, serde_json::Value) {
        let (mut dest, dest_sock) = self.receiver(extra);
        let dest_addr = format!("{}:{PORT}", self.hosts.ip(Host::B));
        let (ok, out, err) = ctl(
            sock,
            &["migrate", &dest_addr, "--key", self.key.to_str().unwrap()],
        );
        assert!(ok, "migration failed: {err}\n{}", dest.stderr());
        assert_eq!(
            source
                .wait_exit(Duration::from_secs(30))
                .and_then(|s| s.code()),
            Some(0)
        );
        assert!(wait_for_socket(&dest_sock, READY));
        let seen = count(&dest.stdout(), "verify ok");
        assert!(
            dest.wait_for_count("verify ok", seen + 2, READY),
            "destination guest:\n{}\n{}",
            dest.stdout(),
            dest.stderr()
        );
        assert!(!dest.stdout().contains("FAILED"), "{}", dest.stdout());
        let received = dest
            .stderr()
            .lines()
            .find(|l| l.starts_with('{') && l.contains("host_pages"))
            .map(json)
            .unwrap_or(serde_json::Value::Null);
        let _ = ctl(&dest_sock, &["shutdown"]);
        dest.wait_exit(Duration::from_secs(30));
        (json(&out), received)
    }
}

/// The source holds half its pages from seed X and half from seed Y (by frame class); host
/// B runs three VMs, each holding a different part: the first the X pages of classes 0-24,
/// the second those of 25-49 (and X pages the source does not have), the third the Y pages
/// of 50-99. No one of them holds more than half; together they hold everything.
#[test]
fn destination_finds_pages_across_three_vms() {
    if require_kvm("identities_three_vms").is_none() {
        return;
    }
    let f = Fabric::new();
    let (x, y) = (0x1111, 0x2222);
    let siblings = [
        format!("passes=0 hb=500 share=25 sseed={x} seed=71"),
        format!("passes=0 hb=500 share=25 sseed=72 seed={x}"),
        format!("passes=0 hb=500 share=50 sseed=73 seed={y}"),
    ];
    let _vms: Vec<_> = siblings
        .iter()
        .enumerate()
        .map(|(i, c)| f.vm(Host::B, &format!("sibling{i}"), c))
        .collect();
    let (mut source, sock) = f.vm(
        Host::A,
        "source",
        &format!("passes=0 hb=500 share=50 sseed={x} seed={y}"),
    );
    let pages = filled_pages(&source.stdout());
    // Let the siblings' identities catch up (a few hundred ms at the default budget).
    std::thread::sleep(Duration::from_secs(3));
    let (report, received) = f.migrate(&mut source, &sock);
    let found = report["pages_found"].as_u64().unwrap();
    assert!(
        found >= pages * 97 / 100,
        "found {found} of {pages}: {report}"
    );
    let per_vm = received["host_pages"]["found_per_vm"]
        .as_object()
        .unwrap_or_else(|| panic!("no per-VM figures: {received}"));
    assert_eq!(per_vm.len(), 3, "{received}");
    for (pid, n) in per_vm {
        let n = n.as_u64().unwrap();
        assert!(
            n >= pages / 5,
            "VM {pid} gave only {n} of {pages} pages: {received}"
        );
    }
    // The siblings' identities are current and the siblings only read their memory: a
    // harvest each asked for after the copy vouches for (nearly) every page, unhashed.
    let host = &received["host_pages"];
    let by_harvest = host["confirmed_by_harvest"].as_u64().unwrap();
    assert!(
        by_harvest >= found * 9 / 10,
        "{by_harvest} of {found} pages confirmed by a harvest: {received}"
    );
    assert_eq!(host["harvests_unanswered"], 0, "{received}");
}

/// With `--hash-host-pages` the destination trusts no harvest: every page it copies from a
/// sibling is hashed, and the guest still verifies.
#[test]
fn hash_host_pages_hashes_every_copy() {
    if require_kvm("identities_hash_host_pages").is_none() {
        return;
    }
    let f = Fabric::new();
    let (_sibling, _) = f.vm(Host::B, "sibling", "passes=0 hb=500 seed=101");
    let (mut source, sock) = f.vm(Host::A, "source", "passes=0 hb=500 seed=101");
    let pages = filled_pages(&source.stdout());
    std::thread::sleep(Duration::from_secs(2));
    let (_, received) = f.migrate_with(&mut source, &sock, &["--hash-host-pages"]);
    let host = &received["host_pages"];
    assert_eq!(host["confirmed_by_harvest"], 0, "{received}");
    assert_eq!(host["harvests_asked"], 0, "{received}");
    let hashed = host["confirmed_by_hash"].as_u64().unwrap();
    assert!(
        hashed >= pages * 97 / 100,
        "{hashed} of {pages} pages hashed: {received}"
    );
}

/// A sibling at the destination with the source's pages keeps rewriting them as fast as it
/// can: pages it published and then rewrote must never be used; the guest verifies.
#[test]
fn pages_rewritten_after_publication_are_never_used() {
    if require_kvm("identities_rewritten").is_none() {
        return;
    }
    let f = Fabric::new();
    let (_sibling, _) = f.vm(Host::B, "sibling", "passes=0 hb=500 seed=81 dirty=200000");
    let (mut source, sock) = f.vm(Host::A, "source", "passes=0 hb=500 seed=81");
    let (report, received) = f.migrate(&mut source, &sock);
    eprintln!("source report {report}\ndestination {received}");
    let host = &received["host_pages"];
    let used = host["same_frame"].as_u64().unwrap() + host["elsewhere"].as_u64().unwrap();
    assert!(used > 0, "the sibling was looked at: {received}");
    // Its chunks keep changing, so no harvest can vouch for most copies: they are hashed
    // (and those rewritten meanwhile are refused), never taken on the table's word.
    let hashed = host["confirmed_by_hash"].as_u64().unwrap() + host["mismatched"].as_u64().unwrap();
    assert!(
        hashed > 0,
        "copies of a rewriting VM were hashed: {received}"
    );
}

/// A sibling holding every page is killed while the destination reads from it: the
/// migration still completes (what it could not copy comes from the source), the guest
/// verifies, and the host's registry no longer lists the dead VM.
#[test]
fn publisher_killed_mid_migration_leaves_destination_correct() {
    if require_kvm("identities_killed_publisher").is_none() {
        return;
    }
    let f = Fabric::new();
    let (mut sibling, _) = f.vm(Host::B, "sibling", "passes=0 hb=500 seed=91");
    let (mut source, sock) = f.vm(Host::A, "source", "passes=0 hb=500 seed=91");
    std::thread::sleep(Duration::from_secs(2));
    let pid = sibling.pid();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(150));
            sibling.kill();
        });
        let (report, _) = f.migrate(&mut source, &sock);
        eprintln!("report {report}");
    });
    // Any reader of the registry drops entries of processes that are gone.
    let mut cmd = f.hosts.command(Host::B, &fabvm());
    let out = cmd.args(["host", "stats", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let registry = f.hosts.runtime_dir(Host::B).join("vms");
    let left: Vec<String> = std::fs::read_dir(&registry)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !left.iter().any(|n| n.starts_with(&format!("{pid}."))),
        "dead VM still registered: {left:?}"
    );
}
