//! Tests of the Debian guest image itself, not of fabvm: the real Debian kernel with the
//! initramfs and ext4 root image that `guest-images/debian-kernel.sh` builds, booted under QEMU
//! TCG (`-M microvm,acpi=on`: virtio-mmio devices described in ACPI as `LNRO0005`, the way
//! fabvm describes them), with a virtio disk and a virtio-net backed by a tap in a network
//! namespace. On machines where fabvm cannot run Linux to /init (kvm_pvm), this is what shows
//! the image works; `linux_boot.rs` checks the same lines under fabvm where KVM is
//! hardware-backed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fabvm_tests::debian::{
    assert_lines_in_order, assert_root_image_after_boot, full_boot_cmdline, full_boot_lines,
    root_image_copy,
};
use fabvm_tests::netns::TapNs;
use fabvm_tests::{debian_kernel, qemu, Vm};

/// Generous: about 9 s here (2 cores, QEMU 7.2 TCG); a loaded machine is slower.
const EXIT: Duration = Duration::from_secs(180);

/// QEMU microvm under TCG with the kernel, initramfs, `disk` and (given a namespace) a tap.
/// microvm has no PIT, HPET or PM timer for TCG's kernel to calibrate the TSC against:
/// `tsc_early_khz` tells it, or the boot stalls.
fn qemu_command(kernel_dir: &Path, disk: &Path, ns: Option<&TapNs>, cmdline: &str) -> Command {
    let qemu = qemu();
    let mut cmd = match ns {
        Some(ns) => ns.command(&qemu),
        None => Command::new(&qemu),
    };
    let append = format!("console=ttyS0 reboot=t panic=-1 tsc_early_khz=2000000 {cmdline}");
    cmd.args(["-M", "microvm,acpi=on", "-accel", "tcg", "-cpu", "max"])
        .args([
            "-m",
            "512M",
            "-smp",
            "2",
            "-nographic",
            "-nodefaults",
            "-no-reboot",
        ])
        .args([
            "-serial",
            "stdio",
            "-global",
            "virtio-mmio.force-legacy=false",
        ])
        .arg("-kernel")
        .arg(kernel_dir.join("vmlinux"))
        .arg("-initrd")
        .arg(kernel_dir.join("initramfs.cpio.gz"))
        .args(["-append", &append])
        .arg("-drive")
        .arg(format!(
            "id=d0,file={},format=raw,if=none",
            disk.to_str().unwrap()
        ))
        .args(["-device", "virtio-blk-device,drive=d0"]);
    if ns.is_some() {
        cmd.args([
            "-netdev",
            &format!("tap,id=n0,ifname={},script=no,downscript=no", TapNs::TAP),
            "-device",
            "virtio-net-device,netdev=n0",
        ]);
    }
    cmd
}

#[test]
fn debian_image_under_qemu_tcg_mounts_root_and_pings() {
    let test = "debian_image_under_qemu_tcg";
    let kernel_dir = debian_kernel();
    let Some(ns) = TapNs::new(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let disk = root_image_copy(&kernel_dir, tmp.path());
    let rx_before: u64 = ns.tap_attr("statistics/rx_packets").parse().unwrap();
    let started = Instant::now();
    let mut vm = Vm::start_command(&mut qemu_command(
        &kernel_dir,
        &disk,
        Some(&ns),
        &full_boot_cmdline(),
    ));
    let status = vm.wait_exit(EXIT);
    let took = started.elapsed();
    let out = vm.stdout();
    eprintln!("{test}: QEMU TCG boot to power-off took {took:.1?} (status {status:?})");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "QEMU did not exit 0 within {EXIT:?} (the guest powers off when done)\nconsole:\n{out}\nstderr:\n{}",
        vm.stderr()
    );
    assert_lines_in_order(&out, &full_boot_lines());
    // virtio_mmio found both devices through ACPI (the kernel has no other way).
    assert!(
        out.contains("fabvm-initramfs: virtio devices: 2 virtio0:blk virtio1:net"),
        "virtio devices:\n{out}"
    );
    let rx_after: u64 = ns.tap_attr("statistics/rx_packets").parse().unwrap();
    assert!(
        rx_after > rx_before,
        "the tap received nothing from the guest ({rx_before} -> {rx_after} frames)"
    );
    assert_root_image_after_boot(&disk);
}

/// A root disk that is not there: the initramfs says which step failed and powers off
/// instead of hanging or panicking.
#[test]
fn debian_image_under_qemu_tcg_reports_a_missing_root() {
    let test = "debian_image_under_qemu_tcg_missing_root";
    let kernel_dir = debian_kernel();
    let tmp = tempfile::tempdir().unwrap();
    let disk = root_image_copy(&kernel_dir, tmp.path());
    let started = Instant::now();
    let mut vm = Vm::start_command(&mut qemu_command(
        &kernel_dir,
        &disk,
        None,
        "fabvm.test=poweroff fabvm.root=LABEL=no-such-disk fabvm.ip=10.0.0.2/24",
    ));
    let status = vm.wait_exit(EXIT);
    let out = vm.stdout();
    eprintln!("{test}: took {:.1?} (status {status:?})", started.elapsed());
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "QEMU did not exit 0\nconsole:\n{out}"
    );
    assert!(
        out.lines().any(|l| l
            .trim_end_matches('\r')
            .starts_with("fabvm-initramfs: FAILED root: no block device with LABEL=no-such-disk")),
        "no FAILED root line:\n{out}"
    );
    // Nothing after the failed step ran.
    assert!(
        !out.contains("fabvm-initramfs: net up") && !out.contains("fabvm-root:"),
        "steps ran after the failure:\n{out}"
    );
}
