//! virtio devices end to end with the test guest's polling drivers: a virtio-blk round trip
//! on a raw image (the image holds the guest's pattern afterwards), a read-only disk refusing
//! the write with IOERR, an rng next to a disk (second slot), a snapshot and restore of a VM
//! with a disk that keeps doing round trips, frames crossing a tap in a network namespace both ways (ARP with the host's kernel,
//! UDP counted at the tap), and bad `--disk` / `--net` input ending with one line.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fabvm_tests::netns::TapNs;
use fabvm_tests::{ctl, fabvm, lines_with, require_kvm, test_guest, wait_for_socket, Vm};

const EXIT: Duration = Duration::from_secs(60);
const DISK_BYTES: u64 = 16 << 20;
const SECTORS: u64 = DISK_BYTES / 512;

fn guest() -> String {
    test_guest().to_str().unwrap().to_string()
}

/// A zero-filled raw image of `DISK_BYTES`.
fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.raw");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(DISK_BYTES).unwrap();
    path
}

/// What the test guest writes to sector `s` in round `r` (guest-images/README.md).
fn sector_pattern(round: u64, sector: u64) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..512u64).map(|j| (j + sector + round) as u8).collect();
    let text = format!("fabvm-blk round={round} sector={sector}\n");
    bytes[..text.len()].copy_from_slice(text.as_bytes());
    bytes
}

/// Round `r`'s 4 KiB block starts at sector `(r - 1) * 8` (on a disk this size).
fn round_block(round: u64) -> (u64, Vec<u8>) {
    let first = (round - 1) * 8;
    let block = (first..first + 8)
        .flat_map(|s| sector_pattern(round, s))
        .collect();
    (first, block)
}

/// Runs the guest to its end; returns its console output. Exit 0 required.
fn run_to_end(args: &[&str]) -> String {
    let mut vm = Vm::start(args);
    let status = vm.wait_exit(EXIT).expect("fabvm did not exit");
    let out = vm.stdout();
    assert!(
        status.success(),
        "fabvm failed ({status:?}):\n{out}\nstderr: {}",
        vm.stderr()
    );
    out
}

#[test]
fn blk_round_trip_leaves_the_pattern_in_the_image() {
    if require_kvm("blk_round_trip").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path());
    let out = run_to_end(&[
        "--kernel",
        &guest(),
        "--mem",
        "128M",
        "--disk",
        disk.to_str().unwrap(),
        "--cmdline",
        "blk=2 fill=4 passes=1 hb=0",
    ]);
    let found = lines_with(&out, "fabvm-guest: blk found ");
    assert_eq!(found.len(), 1, "{out}");
    assert!(
        found[0].starts_with(&format!(
            "fabvm-guest: blk found base=0xd0000000 sectors={SECTORS} ro=0 id="
        )),
        "{out}"
    );
    assert_eq!(
        lines_with(&out, "fabvm-guest: blk ok "),
        [
            format!("fabvm-guest: blk ok sectors={SECTORS} round=1 sector=0"),
            format!("fabvm-guest: blk ok sectors={SECTORS} round=2 sector=8"),
        ],
        "{out}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    assert!(out.contains("fabvm-guest: done"), "{out}");
    // The guest's virtio_mmio.device= entry reached it and was ignored.
    assert!(
        out.contains("cmdline=blk=2 fill=4 passes=1 hb=0 virtio_mmio.device=512@0xd0000000:5"),
        "{out}"
    );

    let bytes = std::fs::read(&disk).unwrap();
    assert_eq!(bytes.len() as u64, DISK_BYTES);
    for round in [1, 2] {
        let (first, block) = round_block(round);
        let at = (first * 512) as usize;
        assert!(
            bytes[at..at + block.len()] == block[..],
            "round {round}'s block is not in the image"
        );
    }
    assert!(
        bytes[16 * 512..].iter().all(|&b| b == 0),
        "the guest wrote outside its blocks"
    );
}

#[test]
fn read_only_disk_refuses_the_write_with_ioerr() {
    if require_kvm("read_only_disk").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path());
    let ro = format!("{},ro", disk.display());
    let out = run_to_end(&[
        "--kernel",
        &guest(),
        "--mem",
        "128M",
        "--disk",
        &ro,
        "--cmdline",
        "blk=1 fill=4 passes=1 hb=0",
    ]);
    assert!(
        out.contains(&format!(
            "fabvm-guest: blk found base=0xd0000000 sectors={SECTORS} ro=1 id="
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "fabvm-guest: blk ro write=ioerr read=ok sectors={SECTORS} round=1 sector=0\n"
        )),
        "{out}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    let bytes = std::fs::read(&disk).unwrap();
    assert!(bytes.iter().all(|&b| b == 0), "a read-only disk changed");
}

#[test]
fn rng_in_the_second_slot_serves_random_bytes() {
    if require_kvm("rng").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path());
    let out = run_to_end(&[
        "--kernel",
        &guest(),
        "--mem",
        "128M",
        "--rng",
        "--disk",
        disk.to_str().unwrap(),
        "--cmdline",
        "blk=1 rng=1 fill=1 passes=1 hb=0",
    ]);
    // Disks come first whatever the order of the options, then the rng.
    assert!(
        out.contains("virtio_mmio.device=512@0xd0000000:5 virtio_mmio.device=512@0xd0001000:6\n"),
        "{out}"
    );
    assert!(out.contains("fabvm-guest: blk ok "), "{out}");
    assert!(
        out.contains("fabvm-guest: rng ok base=0xd0001000 bytes=128\n"),
        "{out}"
    );
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn restored_vm_with_a_disk_keeps_doing_round_trips() {
    if require_kvm("restored_vm_with_a_disk").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path());
    let store = dir.path().join("store");
    let sock = dir.path().join("vm.sock");
    let snap = dir.path().join("snap");
    let mut vm = Vm::start(&[
        "--kernel",
        &guest(),
        "--mem",
        "128M",
        "--disk",
        disk.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--cmdline",
        "blk=6 blkwait=400 fill=4 passes=1 hb=0",
    ]);
    assert!(wait_for_socket(&sock, EXIT), "{}", vm.stderr());
    assert!(
        vm.wait_for_all(&["round=2 sector=8"], EXIT),
        "no second round trip:\n{}\n{}",
        vm.stdout(),
        vm.stderr()
    );
    let (ok, report, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "snapshot failed: {err}");
    // One writer at a time: the original goes away before the copy starts.
    vm.kill();
    let before = vm.stdout();
    let last_before = lines_with(&before, "fabvm-guest: blk ok ").len() as u64;
    assert!(
        last_before < 6,
        "the guest finished before the snapshot: {before}"
    );
    let state = std::fs::read(snap.join("state")).unwrap();
    let needle = format!("\"path\":\"{}\"", disk.display());
    assert!(
        state.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "the snapshot does not record the disk ({report})"
    );

    // The snapshot's disk is confirmed on the command line (docs/snapshots.md).
    let mut restored = Vm::start(&[
        "--restore",
        snap.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
    ]);
    let status = restored.wait_exit(EXIT).expect("restored VM did not exit");
    let out = restored.stdout();
    assert!(
        status.success(),
        "restored VM failed ({status:?}):\n{out}\nstderr: {}",
        restored.stderr()
    );
    // Every round after the snapshot checks its own block and the one before it (written
    // before the snapshot for the first of them).
    let after = lines_with(&out, "fabvm-guest: blk ok ");
    assert!(!after.is_empty(), "no round trip after restore:\n{out}");
    assert_eq!(
        after.last().copied(),
        Some(format!("fabvm-guest: blk ok sectors={SECTORS} round=6 sector=40").as_str()),
        "{out}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    assert!(out.contains("fabvm-guest: done"), "{out}");
    let bytes = std::fs::read(&disk).unwrap();
    for round in 1..=6 {
        let (first, block) = round_block(round);
        let at = (first * 512) as usize;
        assert!(
            bytes[at..at + block.len()] == block[..],
            "round {round}'s block is not in the image"
        );
    }
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn frames_cross_a_tap_in_a_network_namespace() {
    if require_kvm("net_tap").is_none() {
        return;
    }
    let Some(ns) = TapNs::new("frames_cross_a_tap") else {
        return;
    };
    let host_mac = ns.tap_attr("address");
    let rx_before: u64 = ns.tap_attr("statistics/rx_packets").parse().unwrap();
    let receiver = ns.udp_receiver("10.0.0.1:9");
    let mut cmd = ns.command(&fabvm());
    cmd.args([
        "--kernel",
        &guest(),
        "--mem",
        "128M",
        "--net",
        "tap=vtap0,mac=52:54:00:fa:b0:01",
        "--cmdline",
        "net=1 netbench=300 fill=1 passes=1 hb=0",
    ]);
    let mut vm = Vm::start_command(&mut cmd);
    let status = vm.wait_exit(EXIT).expect("fabvm did not exit");
    let out = vm.stdout();
    assert!(
        status.success(),
        "fabvm failed ({status:?}):\n{out}\nstderr: {}",
        vm.stderr()
    );
    assert!(
        out.contains("fabvm-guest: net found base=0xd0000000 mac=52:54:00:fa:b0:01\n"),
        "{out}"
    );
    // Guest to host (ARP request) and host to guest (the host kernel's ARP reply).
    assert!(
        out.contains(&format!(
            "fabvm-guest: net ok arp_reply_from=10.0.0.1 peer_mac={host_mac} "
        )),
        "{out}"
    );
    // Every UDP frame the guest sent arrived at the host's side of the tap.
    let bench = lines_with(&out, "fabvm-guest: netbench udp ");
    assert_eq!(bench.len(), 1, "{out}");
    let frames = field(bench[0], "frames=");
    assert!(frames > 0, "{out}");
    let rx_after: u64 = ns.tap_attr("statistics/rx_packets").parse().unwrap();
    assert!(
        rx_after - rx_before > frames,
        "the tap received {} frames, the guest sent {frames} UDP frames and an ARP request",
        rx_after - rx_before
    );
    // And a socket on the host got them (as many as its buffer held), payload intact: byte k
    // of the payload is frame byte 42 + k, which the guest sets to its offset.
    let (datagrams, bad) = receiver.finish();
    eprintln!("net_tap: the guest sent {frames} UDP frames, the host's socket read {datagrams}");
    assert!(datagrams > 0, "the host's UDP socket received nothing");
    assert_eq!(bad, 0, "{bad} of {datagrams} datagrams had another payload");
}

#[test]
fn restored_vm_reattaches_its_tap() {
    if require_kvm("net_restore").is_none() {
        return;
    }
    let Some(ns) = TapNs::new("restored_vm_reattaches_its_tap") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let sock = dir.path().join("vm.sock");
    let snap = dir.path().join("snap");
    let mut cmd = ns.command(&fabvm());
    cmd.args([
        "--kernel",
        &guest(),
        "--mem",
        "128M",
        "--net",
        "tap=vtap0",
        "--api-sock",
        sock.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--cmdline",
        "net=1 fill=4 passes=0 hb=50",
    ]);
    let mut vm = Vm::start_command(&mut cmd);
    assert!(wait_for_socket(&sock, EXIT), "{}", vm.stderr());
    assert!(
        vm.wait_for_all(&["fabvm-guest: net ok ", "verify ok pass=1"], EXIT),
        "{}\n{}",
        vm.stdout(),
        vm.stderr()
    );
    let (ok, _, err) = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "snapshot failed: {err}");
    // The tap can be attached once: the original lets go of it before the restore.
    vm.kill();
    let state = std::fs::read(snap.join("state")).unwrap();
    let needle = b"\"tap\":\"vtap0\"";
    assert!(
        state.windows(needle.len()).any(|w| w == needle),
        "the snapshot does not record the tap"
    );

    let mut cmd = ns.command(&fabvm());
    cmd.args([
        "--restore",
        snap.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--net",
        "tap=vtap0",
    ]);
    let mut restored = Vm::start_command(&mut cmd);
    assert!(
        restored.wait_for_count("fabvm-guest: heartbeat", 3, EXIT),
        "restored VM does not run:\n{}\n{}",
        restored.stdout(),
        restored.stderr()
    );
    assert!(restored.stderr().is_empty(), "{}", restored.stderr());
    assert!(
        !restored.stdout().contains("FAILED"),
        "{}",
        restored.stdout()
    );
    assert_eq!(ns.tap_attr("carrier"), "1", "the restored VM holds the tap");
}

/// Runs fabvm expecting a one-line error; returns it.
fn one_line_error(mut vm: Vm) -> String {
    let status = vm.wait_exit(EXIT).expect("fabvm hung on bad input");
    let stderr = vm.stderr();
    assert!(!status.success(), "exit 0 on bad input; stderr {stderr}");
    assert_ne!(status.code(), Some(101), "panicked: {stderr}");
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got {stderr:?}");
    assert!(lines[0].starts_with("fabvm: "), "{stderr}");
    assert!(vm.stdout().is_empty(), "console output: {}", vm.stdout());
    lines[0].to_string()
}

#[test]
fn bad_disk_and_net_arguments_end_with_one_line() {
    let g = guest();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--disk", "/nonexistent/disk.raw"],
            "cannot open disk image /nonexistent/disk.raw",
        ),
        (&["--disk", "/"], "cannot open disk image /"),
        (
            &["--disk", "x.raw,readonly"],
            "unknown disk option 'readonly'",
        ),
        (&["--disk", ""], "--disk needs a path"),
        (&["--net", "vtap0"], "unknown net option 'vtap0'"),
        (&["--net", "tap="], "invalid tap name ''"),
        (&["--net", "tap=a/b"], "invalid tap name 'a/b'"),
        (
            &["--net", "tap=t0,mac=zz:00:00:00:00:00"],
            "invalid MAC address",
        ),
        (
            &["--net", "tap=t0,mac=01:00:5e:00:00:01"],
            "invalid MAC address",
        ),
        (&["--net", "mac=52:54:00:00:00:01"], "--net needs tap=NAME"),
        (
            &["--net", "tap=t0", "--net", "tap=t0"],
            "--net tap=t0 is given twice",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["--kernel", g.as_str()];
        args.extend_from_slice(extra);
        let line = one_line_error(Vm::start(&args));
        assert!(line.contains(want), "{extra:?}: {line}");
    }
}

#[test]
fn tap_without_permission_ends_with_one_line() {
    if require_kvm("tap_without_permission").is_none() {
        return;
    }
    // Root without CAP_NET_ADMIN (KVM stays usable): the kernel refuses to create the tap.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set=-net_admin", "--inh-caps=-net_admin"])
        .arg(fabvm())
        .args(["--kernel", &guest(), "--net", "tap=fabvmnoperm0"]);
    let line = one_line_error(Vm::start_command(&mut cmd));
    assert!(line.contains("cannot attach tap fabvmnoperm0"), "{line}");
}
