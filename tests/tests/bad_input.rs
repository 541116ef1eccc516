//! Bad input ends with exactly one line on stderr, starting `fabvm: `, a non-zero exit, no
//! panic and no hang: bad paths, malformed kernels, bad sizes and counts, no KVM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use fabvm_tests::{expect_error, fabvm, test_guest, Vm};

fn run(args: &[&str]) -> String {
    expect_error(Vm::start(args))
}

fn guest() -> String {
    test_guest().to_str().unwrap().to_string()
}

#[test]
fn missing_kernel() {
    let line = run(&["--kernel", "/nonexistent/bzImage"]);
    assert!(
        line.contains("cannot open kernel /nonexistent/bzImage"),
        "{line}"
    );
}

#[test]
fn kernel_is_a_directory() {
    let line = run(&["--kernel", "/"]);
    assert!(line.contains("not a regular file"), "{line}");
}

#[test]
fn kernel_neither_bzimage_nor_elf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "this is not a kernel\n".repeat(100)).unwrap();
    let line = run(&["--kernel", path.to_str().unwrap()]);
    assert!(line.contains("neither a bzImage nor an ELF"), "{line}");
    std::fs::write(&path, b"").unwrap();
    let line = run(&["--kernel", path.to_str().unwrap()]);
    assert!(line.contains("neither a bzImage nor an ELF"), "{line}");
}

#[test]
fn truncated_elf_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let whole = std::fs::read(test_guest()).unwrap();
    // Cut inside the ELF header, inside the program headers, and inside each loaded segment.
    let mut cuts = vec![16, 100];
    cuts.extend(
        load_segments(&whole)
            .into_iter()
            .map(|(offset, size)| offset + size / 2),
    );
    assert!(cuts.len() >= 3, "the test guest has loadable segments");
    for cut in cuts {
        let path = dir.path().join(format!("cut{cut}.elf"));
        std::fs::write(&path, &whole[..cut]).unwrap();
        let line = run(&["--kernel", path.to_str().unwrap()]);
        assert!(
            line.contains("truncated") || line.contains("malformed"),
            "cut at {cut}: {line}"
        );
    }
}

/// (file offset, file size) of each PT_LOAD segment of a 64-bit ELF.
fn load_segments(elf: &[u8]) -> Vec<(usize, usize)> {
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == 1)
        .map(|ph| (u64_at(ph + 8), u64_at(ph + 32)))
        .filter(|&(_, size)| size > 1)
        .collect()
}

#[test]
fn truncated_bzimage() {
    // A setup header that claims 4 setup sectors, in a file shorter than that.
    let mut image = vec![0u8; 0x400];
    image[0x1f1] = 4; // setup_sects
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    image[0x211] = 1; // loadflags: LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bzImage");
    std::fs::write(&path, &image).unwrap();
    let line = run(&["--kernel", path.to_str().unwrap()]);
    assert!(
        line.contains("truncated") || line.contains("malformed"),
        "{line}"
    );
}

#[test]
fn thirty_two_bit_elf() {
    let dir = tempfile::tempdir().unwrap();
    let mut image = std::fs::read(test_guest()).unwrap();
    image[4] = 1; // ELFCLASS32
    let path = dir.path().join("guest32.elf");
    std::fs::write(&path, &image).unwrap();
    let line = run(&["--kernel", path.to_str().unwrap()]);
    assert!(line.contains("not a 64-bit x86 ELF"), "{line}");
}

#[test]
fn bad_memory_sizes() {
    let g = guest();
    let line = run(&["--kernel", &g, "--mem", "0"]);
    assert!(line.contains("--mem 0B: must be at least 16M"), "{line}");
    let line = run(&["--kernel", &g, "--mem", "abc"]);
    assert!(line.contains("'abc' is not a size"), "{line}");
    let line = run(&["--kernel", &g, "--mem", "64T"]);
    assert!(line.contains("more than this host's memory"), "{line}");
    let line = run(&["--kernel", &g, "--mem", "99999999999999999999G"]);
    assert!(line.contains("too large"), "{line}");
}

#[test]
fn bad_cpu_counts() {
    let g = guest();
    for cpus in ["0", "1000"] {
        let line = run(&["--kernel", &g, "--cpus", cpus]);
        assert!(
            line.contains(&format!("--cpus {cpus}: must be between 1 and")),
            "{line}"
        );
    }
    let line = run(&["--kernel", &g, "--cpus", "two"]);
    assert!(line.contains("--cpus"), "{line}");
}

#[test]
fn missing_initrd() {
    let line = run(&["--kernel", &guest(), "--initrd", "/nonexistent/initrd.img"]);
    assert!(
        line.contains("cannot open initrd /nonexistent/initrd.img"),
        "{line}"
    );
}

#[test]
fn initrd_larger_than_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let line = run(&[
        "--kernel",
        &guest(),
        "--mem",
        "32M",
        "--initrd",
        path.to_str().unwrap(),
    ]);
    assert!(line.contains("does not fit in guest memory"), "{line}");
}

#[test]
fn command_line_too_long() {
    let long = "x".repeat(4096);
    let line = run(&["--kernel", &guest(), "--cmdline", &long]);
    assert!(line.contains("--cmdline is 4096 bytes"), "{line}");
}

#[test]
fn no_dev_kvm() {
    if !is_root() {
        eprintln!("!!! no_dev_kvm: SKIPPED, needs root to hide /dev/kvm in a mount namespace !!!");
        return;
    }
    // A private mount namespace with an empty /dev: no /dev/kvm at all.
    let script = "mount -t tmpfs none /dev && exec \"$0\" \"$@\"";
    let g = guest();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "sh", "-c", script])
        .arg(fabvm())
        .args(["--kernel", &g]);
    let line = expect_error(Vm::start_command(&mut cmd));
    assert!(line.contains("/dev/kvm does not exist"), "{line}");
}

#[test]
fn no_permission_on_dev_kvm() {
    if !is_root() {
        eprintln!("!!! no_permission_on_dev_kvm: SKIPPED, needs root to switch to an unprivileged user !!!");
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("!!! no_permission_on_dev_kvm: SKIPPED, no /dev/kvm on this host !!!");
        return;
    }
    // The kernel must be readable by the unprivileged user; /dev/kvm is not (0600 root, or
    // 0660 root:kvm without the group).
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("guest.elf");
    std::fs::copy(test_guest(), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(fabvm())
        .args(["--kernel", path.to_str().unwrap()]);
    let line = expect_error(Vm::start_command(&mut cmd));
    assert!(line.contains("no permission to open /dev/kvm"), "{line}");
}

#[test]
fn unknown_flag() {
    let line = run(&["--kernel", &guest(), "--frobnicate"]);
    assert!(line.contains("--frobnicate"), "{line}");
}

#[test]
fn missing_required_argument_is_named() {
    let line = run(&["receive"]);
    assert!(line.contains("--listen"), "{line}");
    let line = run(&["ctl"]);
    assert!(line.contains("subcommand is missing"), "{line}");
}

/// A reader that went away (`fabvm host stats | head -c0`) ends fabvm quietly, not with a
/// panic about a broken pipe.
#[test]
fn output_to_a_closed_pipe_is_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(fabvm())
        .args(["host", "stats"])
        .env("FABVM_RUNTIME_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the read end closes before fabvm writes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
