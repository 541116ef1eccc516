//! Load and chaos with nothing lost: start/stop cycles, API requests and snapshots in one
//! process, concurrent migrations on one host, `kill -9` at random points of snapshots and
//! store gc, and migration destinations killed at random points. Each check runs
//! `FABVM_SOAK_TRIALS` trials (default 5: the test run; `scripts/soak.sh` runs 100) with
//! random points from `FABVM_SOAK_SEED` (printed, so a failure can be replayed), and prints
//! one `soak:` line of figures that `scripts/soak.sh` collects into a table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fabvm_tests::{
    boot_guest, count, ctl, fabvm, free_port, require_kvm, wait_for_socket, write_test_key, Vm,
};

const READY: Duration = Duration::from_secs(90);

fn trials() -> usize {
    std::env::var("FABVM_SOAK_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// A small xorshift generator: random points that a seed replays.
struct Rng(u64);

impl Rng {
    fn new(check: &str) -> Self {
        let seed = std::env::var("FABVM_SOAK_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{check}: FABVM_SOAK_SEED={seed}");
        Rng(seed.max(1))
    }

    /// A duration uniformly in `0..max`.
    fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 % 10_000) as f64 / 10_000.0)
    }
}

/// One test's host: a runtime directory (VM registry) and a store of its own.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        Host {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(fabvm());
        cmd.env("FABVM_RUNTIME_DIR", self.path("run"))
            .env("FABVM_IMAGE_DIR", self.path("images"));
        cmd
    }

    /// Boots the test guest (64 MiB) with an API socket `NAME.sock` and `extra` options.
    fn boot(&self, name: &str, cmdline: &str, extra: &[&str]) -> (Vm, PathBuf) {
        let sock = self.path(&format!("{name}.sock"));
        let mut cmd = self.command();
        cmd.args(["--store"]).arg(self.path("store")).args(extra);
        (boot_guest(&mut cmd, &sock, "64M", cmdline, READY), sock)
    }

    /// `fabvm receive` on `addr` with `key`, serving the API at `sock` once the VM runs.
    fn receiver(&self, addr: &str, key: &Path, sock: &Path) -> Vm {
        let mut cmd = self.command();
        cmd.args(["receive", "--listen", addr, "--key"])
            .arg(key)
            .arg("--api-sock")
            .arg(sock);
        Vm::start_command(&mut cmd)
    }

    /// Entries left in the VM registry (each running VM has a `PID.json` and a `PID.ids`),
    /// after a reader (`fabvm host stats`) has dropped those of processes that are gone.
    fn registry(&self) -> Vec<String> {
        let _ = self.command().args(["host", "stats", "--json"]).output();
        std::fs::read_dir(self.path("run").join("vms"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn store(&self, op: &str) -> (bool, String) {
        let out = self
            .command()
            .args(["store", "--json", "--store"])
            .arg(self.path("store"))
            .arg(op)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }
}

/// Resident memory of process `pid`, KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn shutdown(vm: &mut Vm, sock: &Path) {
    assert!(
        wait_for_socket(sock, READY),
        "no API socket: {}",
        vm.stderr()
    );
    let (ok, _, err) = ctl(sock, &["shutdown"]);
    assert_eq!(
        vm.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0),
        "shutdown answered {ok} {err}; {}",
        vm.stderr()
    );
}

/// Waits for `n` more `verify ok` lines than the console holds now.
fn keeps_verifying(vm: &mut Vm, n: usize) -> bool {
    let seen = count(&vm.stdout(), "verify ok");
    vm.wait_for_count("verify ok", seen + n, READY) && !vm.stdout().contains("FAILED")
}

#[test]
fn start_stop_cycles_leave_nothing_behind() {
    if require_kvm("soak_start_stop").is_none() {
        return;
    }
    let host = Host::new();
    let n = trials();
    let started = Instant::now();
    for i in 0..n {
        let tap = format!("fsoak{}x{i}", std::process::id() % 10_000);
        let net = format!("tap={tap}");
        let extra: &[&str] = if i % 4 == 0 { &["--net", &net] } else { &[] };
        let (mut vm, sock) = host.boot("vm", "fill=8 hb=0", extra);
        shutdown(&mut vm, &sock);
        assert!(
            host.registry().is_empty(),
            "cycle {i}: {:?}",
            host.registry()
        );
        assert!(!sock.exists(), "cycle {i}: API socket left behind");
        if i % 4 == 0 {
            let link = Command::new("ip").args(["link", "show", &tap]).output();
            assert!(
                link.is_ok_and(|o| !o.status.success()),
                "cycle {i}: tap {tap} left behind"
            );
        }
    }
    eprintln!(
        "soak: start-stop cycles={n} leaked=0 seconds={:.0}",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn api_requests_and_snapshots_leak_no_descriptors() {
    if require_kvm("soak_fds").is_none() {
        return;
    }
    let host = Host::new();
    let (mut vm, sock) = host.boot("vm", "fill=16 hb=200", &[]);
    // One of each first: later ones must not add descriptors.
    assert!(ctl(&sock, &["stats"]).0);
    assert!(
        ctl(
            &sock,
            &["snapshot", host.path("snap-warm").to_str().unwrap()]
        )
        .0
    );
    let before = open_fds(vm.pid());
    let rss_before = rss_kib(vm.pid());
    let requests = trials() * 40;
    for i in 0..requests {
        let op = ["stats", "status", "pause", "resume"][i % 4];
        let (ok, _, err) = ctl(&sock, &[op]);
        assert!(ok, "{op}: {err}");
    }
    for i in 0..trials() {
        let dir = host.path(&format!("snap{i}"));
        let (ok, _, err) = ctl(&sock, &["snapshot", dir.to_str().unwrap()]);
        assert!(ok, "snapshot {i}: {err}");
    }
    let after = open_fds(vm.pid());
    let rss_after = rss_kib(vm.pid());
    // The guest's memory is all touched by now; what the VMM allocates per request or
    // snapshot must go back (a few MiB of allocator slack allowed).
    assert!(
        rss_after <= rss_before + 8 * 1024,
        "resident memory grew from {rss_before} to {rss_after} KiB"
    );
    assert!(
        after <= before,
        "descriptors grew from {before} to {after} over {requests} requests and {} snapshots",
        trials()
    );
    assert!(keeps_verifying(&mut vm, 1), "{}", vm.stdout());
    shutdown(&mut vm, &sock);
    eprintln!(
        "soak: api-requests={requests} snapshots={} fds-before={before} fds-after={after} rss-kib-before={rss_before} rss-kib-after={rss_after}",
        trials()
    );
}

#[test]
fn four_concurrent_migrations_on_one_host() {
    if require_kvm("soak_concurrent_migrations").is_none() {
        return;
    }
    let host = Host::new();
    let key = write_test_key(host.dir.path());
    let started = Instant::now();
    let mut sources: Vec<(Vm, PathBuf)> = (0..4)
        .map(|i| host.boot(&format!("src{i}"), &format!("fill=24 seed={i} hb=200"), &[]))
        .collect();
    let (fresh, fresh_sock) = host.boot("fresh", "fill=24 hb=200", &[]);
    let fresh_fds = open_fds(fresh.pid());
    let mut dests: Vec<(Vm, PathBuf, String)> = (0..4)
        .map(|i| {
            let addr = format!("127.0.0.1:{}", free_port());
            let sock = host.path(&format!("dst{i}.sock"));
            (host.receiver(&addr, &key, &sock), sock, addr)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let results: Vec<(bool, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .zip(&dests)
            .map(|((_, sock), (_, _, addr))| {
                let key = key.to_str().unwrap();
                s.spawn(move || {
                    let (ok, _, err) = ctl(sock, &["migrate", addr, "--key", key]);
                    (ok, err)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (ok, err)) in results.iter().enumerate() {
        assert!(ok, "migration {i}: {err}\n{}", dests[i].0.stderr());
        let status = sources[i].0.wait_exit(Duration::from_secs(30));
        assert_eq!(status.and_then(|s| s.code()), Some(0), "source {i}");
    }
    for (i, (dest, sock, _)) in dests.iter_mut().enumerate() {
        assert!(wait_for_socket(sock, READY), "destination {i}");
        assert!(
            keeps_verifying(dest, 2),
            "destination {i}:\n{}",
            dest.stdout()
        );
        let fds = open_fds(dest.pid());
        assert!(
            fds <= fresh_fds + 2,
            "destination {i} holds {fds} descriptors, a booted VM {fresh_fds}"
        );
    }
    for (dest, sock, _) in dests.iter_mut() {
        shutdown(dest, sock);
    }
    let mut fresh = fresh;
    shutdown(&mut fresh, &fresh_sock);
    assert!(host.registry().is_empty(), "{:?}", host.registry());
    eprintln!(
        "soak: concurrent-migrations=4 verified=4 leaked=0 seconds={:.0}",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn kill9_during_snapshots_and_gc_loses_nothing() {
    if require_kvm("soak_kill_snapshot").is_none() {
        return;
    }
    let host = Host::new();
    let mut rng = Rng::new("kill9_snapshot_gc");
    // How long a snapshot takes here, to spread the kills over it.
    let (mut vm, sock) = host.boot("vm", "fill=32 seed=7 hb=200", &[]);
    let t = Instant::now();
    assert!(ctl(&sock, &["snapshot", host.path("base").to_str().unwrap()]).0);
    let snapshot_time = t.elapsed().max(Duration::from_millis(50));
    shutdown(&mut vm, &sock);
    let (mut complete, mut absent, mut gc_kills) = (0, 0, 0);
    for i in 0..trials() {
        let (mut vm, sock) = host.boot("vm", &format!("fill=32 seed={} hb=200", 100 + i), &[]);
        let dir = host.path(&format!("snap{i}"));
        let kill_at = rng.below(snapshot_time.mul_f64(1.5));
        std::thread::scope(|s| {
            s.spawn(|| ctl(&sock, &["snapshot", dir.to_str().unwrap()]));
            std::thread::sleep(kill_at);
            vm.kill();
        });
        let files = std::fs::read_dir(&dir).map_or(0, |d| d.count());
        if files == 0 {
            absent += 1;
        } else {
            complete += 1;
            let (mut restored, rsock) = {
                let sock = host.path("restored.sock");
                let mut cmd = host.command();
                cmd.arg("--restore").arg(&dir).arg("--api-sock").arg(&sock);
                (Vm::start_command(&mut cmd), sock)
            };
            assert!(
                restored.wait_for_all(&["verify ok"], READY)
                    && !restored.stdout().contains("FAILED"),
                "trial {i}: snapshot killed after {kill_at:?} is neither absent nor whole:\n{}",
                restored.stderr()
            );
            shutdown(&mut restored, &rsock);
        }
        // gc, killed at a random point too; the store must verify either way.
        let mut gc = host.command();
        gc.args(["store", "--store"])
            .arg(host.path("store"))
            .arg("gc");
        let mut gc = Vm::start_command(&mut gc);
        std::thread::sleep(rng.below(Duration::from_millis(200)));
        if gc.wait_exit(Duration::ZERO).is_none() {
            gc_kills += 1;
        }
        let (ok, text) = host.store("verify");
        assert!(
            ok,
            "trial {i}: store does not verify after the kills: {text}"
        );
        assert!(host.registry().is_empty(), "{:?}", host.registry());
    }
    // The first snapshot, taken before any kill, still restores whole.
    let sock = host.path("base.sock");
    let mut cmd = host.command();
    cmd.arg("--restore")
        .arg(host.path("base"))
        .arg("--api-sock")
        .arg(&sock);
    let mut base = Vm::start_command(&mut cmd);
    assert!(keeps_verifying(&mut base, 1), "{}", base.stderr());
    shutdown(&mut base, &sock);
    eprintln!(
        "soak: kill9-snapshot trials={} complete={complete} absent={absent} torn=0 gc-killed={gc_kills} store-verified={}",
        trials(),
        trials()
    );
}

#[test]
fn destination_killed_at_random_points_leaves_the_guest_on_the_source() {
    if require_kvm("soak_kill_destination").is_none() {
        return;
    }
    let host = Host::new();
    let dest_host = Host::new();
    let key = write_test_key(host.dir.path());
    let mut rng = Rng::new("kill9_destination");
    let cmdline = "fill=48 seed=9 hb=200 dirty=2000";
    let (mut source, mut sock) = host.boot("src", cmdline, &[]);
    // How long a whole migration takes here (then the guest comes back to a new source).
    let mut migration_time = None;
    let (mut kept, mut completed) = (0, 0);
    for i in 0..trials() + 1 {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut dest = dest_host.receiver(&addr, &key, &dest_host.path("dst.sock"));
        std::thread::sleep(Duration::from_millis(200));
        let key = key.to_str().unwrap();
        let t = Instant::now();
        let Some(full) = migration_time else {
            // Trial 0 measures an undisturbed migration, then starts a new source.
            let (ok, _, err) = ctl(&sock, &["migrate", &addr, "--key", key]);
            assert!(ok, "{err}");
            migration_time = Some(t.elapsed());
            assert!(source.wait_exit(Duration::from_secs(30)).is_some());
            dest.kill();
            (source, sock) = host.boot("src", cmdline, &[]);
            continue;
        };
        let kill_at = rng.below(full);
        let ok = std::thread::scope(|s| {
            let migrating = s.spawn(|| ctl(&sock, &["migrate", &addr, "--key", key]).0);
            std::thread::sleep(kill_at);
            dest.kill();
            migrating.join().unwrap()
        });
        if ok {
            // It finished before the kill: the guest ran at the destination we killed.
            completed += 1;
            assert!(source.wait_exit(Duration::from_secs(30)).is_some());
            (source, sock) = host.boot("src", cmdline, &[]);
            continue;
        }
        kept += 1;
        assert!(
            keeps_verifying(&mut source, 1),
            "trial {i}: destination killed after {kill_at:?}: the source guest stopped:\n{}",
            source.stderr()
        );
        assert!(
            dest_host.registry().is_empty(),
            "{:?}",
            dest_host.registry()
        );
    }
    shutdown(&mut source, &sock);
    assert!(host.registry().is_empty(), "{:?}", host.registry());
    eprintln!(
        "soak: kill9-destination trials={} source-kept={kept} completed-before-kill={completed} lost=0",
        trials()
    );
}
