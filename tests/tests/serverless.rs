//! Serverless starts: many VMs restored from one snapshot at once build its memory image
//! once and all map that one file (eager and lazy); a restore killed while it builds the
//! image leaves nothing a later restore would use, and the next one rebuilds it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fabvm_tests::{boot_guest, count, ctl, fabvm, require_kvm, shm_dir, Vm};

const READY: Duration = Duration::from_secs(90);

/// Boots the test guest, snapshots it into `dir/snap` (pages in `dir/store`), shuts it down.
fn snapshot(dir: &Path, mem: &str, cmdline: &str) -> PathBuf {
    let sock = dir.join("src.sock");
    let mut cmd = Command::new(fabvm());
    cmd.arg("--store").arg(dir.join("store"));
    let mut vm = boot_guest(&mut cmd, &sock, mem, cmdline, READY);
    let snap = dir.join("snap");
    let (ok, _, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "snapshot: {err}");
    let (ok, _, err) = ctl(&sock, &["shutdown"]);
    assert!(ok, "{err}");
    assert_eq!(
        vm.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0)
    );
    snap
}

fn restore(snap: &Path, images: &Path, extra: &[&str]) -> Vm {
    let mut command = Command::new(fabvm());
    command
        .args(["--restore", snap.to_str().unwrap()])
        .args(extra)
        .env("FABVM_IMAGE_DIR", images)
        .env("RUST_LOG", "fabvm::timing=debug");
    Vm::start_command(&mut command)
}

/// Two verification passes after the restore: every page was read at least once.
fn wait_verified(vms: &mut [Vm]) {
    for vm in vms.iter_mut() {
        assert!(
            vm.wait_for_count("verify ok", 2, READY),
            "restored VM did not verify:\n{}\n{}",
            vm.stdout(),
            vm.stderr()
        );
        assert!(!vm.stdout().contains("FAILED"), "{}", vm.stdout());
    }
}

/// The (device, inode) of every memory image file `pid` maps.
fn mapped_images(pid: u32) -> BTreeSet<(String, String, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 6 && f[5].ends_with(".img"))
                .then(|| (f[3].to_string(), f[4].to_string(), f[5].to_string()))
        })
        .collect()
}

fn shmem_pss_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss_Shmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Starts `n` restores at once, waits for them to verify, and checks they map one image.
fn clones_share_one_image(snap: &Path, n: usize, extra: &[&str], data_mib: u64) {
    let images = shm_dir("fabvm-serverless-");
    let mut vms: Vec<Vm> = (0..n)
        .map(|_| restore(snap, images.path(), extra))
        .collect();
    wait_verified(&mut vms);
    let mut seen = BTreeSet::new();
    for vm in &vms {
        let mapped = mapped_images(vm.pid());
        assert_eq!(mapped.len(), 1, "one image per VM: {mapped:?}");
        seen.extend(mapped);
    }
    assert_eq!(seen.len(), 1, "{n} clones {extra:?} map one file: {seen:?}");
    let (_, _, path) = seen.into_iter().next().unwrap();
    assert!(path.starts_with(images.path().to_str().unwrap()), "{path}");
    let names = files(images.path());
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".img")).count(),
        1,
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    let built: usize = vms
        .iter()
        .map(|vm| count(&vm.stderr(), "image built") + count(&vm.stderr(), "lazy restore complete"))
        .sum();
    assert_eq!(built, 1, "the image is built once");
    // Every clone read all its pages: the image's pages are counted once across them.
    let pss: u64 = vms.iter().map(|vm| shmem_pss_kib(vm.pid())).sum();
    eprintln!(
        "{n} clones {extra:?}: shared PSS {} MiB for {data_mib} MiB of data",
        pss / 1024
    );
    assert!(
        pss <= data_mib * 1024 * 3 / 2,
        "{n} clones hold {pss} KiB of shared pages for {data_mib} MiB of data"
    );
    for vm in &mut vms {
        vm.kill();
    }
}

#[test]
fn concurrent_cold_restores_build_one_image_and_share_it() {
    if require_kvm("serverless_concurrent").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = snapshot(tmp.path(), "128M", "seed=11 fill=64 passes=0 hb=1000");
    clones_share_one_image(&snap, 10, &[], 64);
    clones_share_one_image(&snap, 4, &["--lazy"], 64);
}

/// Starts a restore and SIGKILLs it as soon as its temporary image appears.
fn kill_while_building(snap: &Path, images: &Path, extra: &[&str]) {
    let mut vm = restore(snap, images, extra);
    let deadline = Instant::now() + READY;
    while !files(images).iter().any(|n| n.ends_with(".tmp")) {
        assert!(
            Instant::now() < deadline,
            "no build started: {}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    vm.kill();
    let names = files(images);
    assert!(
        !names.iter().any(|n| n.ends_with(".img")),
        "a build killed half way published an image: {names:?}"
    );
}

#[test]
fn restore_killed_while_building_leaves_no_image_to_use() {
    if require_kvm("serverless_kill").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = snapshot(tmp.path(), "512M", "seed=12 passes=0 hb=1000");
    let images = shm_dir("fabvm-serverless-kill-");
    for extra in [&[][..], &["--lazy"][..]] {
        kill_while_building(&snap, images.path(), extra);
        // The next restore finds the partial file, removes it and builds the image again.
        let mut next = vec![restore(&snap, images.path(), &[])];
        wait_verified(&mut next);
        let names = files(images.path());
        assert_eq!(
            names.iter().filter(|n| n.ends_with(".img")).count(),
            1,
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
        next[0].kill();
        for name in names.iter().filter(|n| n.ends_with(".img")) {
            std::fs::remove_file(images.path().join(name)).unwrap();
        }
    }
}
