//! The Debian guest built by `guest-images/debian-kernel.sh` booted all the way: what its
//! command line asks for (root disk, network, ping), the fixed lines its initramfs and root
//! image print (guest-images/README.md), and checks of the root image after the guest ran.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::netns::TapNs;

/// The guest's address on the tap's /24.
pub const GUEST_IP: &str = "10.0.0.2";

/// Command-line keys the initramfs reads: find the root disk by its label, configure the first
/// virtio-net interface, ping the host's end of the tap, power off when done.
pub fn full_boot_cmdline() -> String {
    format!(
        "fabvm.test=poweroff fabvm.root=auto fabvm.ip={GUEST_IP}/24 fabvm.peer={}",
        TapNs::HOST_IP
    )
}

/// The fixed lines of a full boot with [`full_boot_cmdline`], in the order they must appear
/// (a line may carry more after these prefixes). The virtio devices line is checked
/// separately, since it depends on the VMM.
pub fn full_boot_lines() -> Vec<String> {
    vec![
        "fabvm-initramfs: init started".into(),
        "fabvm-initramfs: modules loaded".into(),
        "fabvm-initramfs: virtio devices: ".into(),
        "fabvm-initramfs: root mounted /dev/vda ext4 rw".into(),
        format!("fabvm-initramfs: net up eth0 {GUEST_IP}/24 mac "),
        format!("fabvm-initramfs: ping ok {}", TapNs::HOST_IP),
        "fabvm-initramfs: switch_root /dev/vda".into(),
        "fabvm-root: init started on /dev/vda rw".into(),
        "fabvm-root: disk write ok boots=1".into(),
        "fabvm-root: poweroff".into(),
    ]
}

/// Asserts that each of `lines` starts a console line, in this order, and that no
/// `FAILED` line was printed.
pub fn assert_lines_in_order(out: &str, lines: &[String]) {
    let console: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    for l in &console {
        assert!(
            !(l.starts_with("fabvm-") && l.contains("FAILED")),
            "the guest reported a failure: {l}\nconsole:\n{out}"
        );
    }
    let mut at = 0;
    for want in lines {
        let Some(i) = console[at..]
            .iter()
            .position(|l| l.starts_with(want.as_str()))
        else {
            panic!("missing (or out of order) {want:?} in console:\n{out}");
        };
        at += i + 1;
    }
}

/// A private, writable copy of the root image in `dir` (the guest writes to it).
pub fn root_image_copy(kernel_dir: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join("root.ext4");
    std::fs::copy(kernel_dir.join("root.ext4"), &copy).expect("copy root.ext4");
    copy
}

/// After a full boot: the image is a clean ext4 (the guest remounted it read-only before
/// powering off) and holds the one line the root's init appended to /var/log/fabvm-boots.
pub fn assert_root_image_after_boot(image: &Path) {
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("run e2fsck (Debian package e2fsprogs)");
    assert!(
        fsck.status.success(),
        "root image not clean after the guest powered off: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /var/log/fabvm-boots"])
        .arg(image)
        .output()
        .expect("run debugfs (Debian package e2fsprogs)");
    let boots = String::from_utf8_lossy(&cat.stdout);
    let lines: Vec<&str> = boots.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("boot "),
        "/var/log/fabvm-boots on the image: {boots:?}"
    );
}
