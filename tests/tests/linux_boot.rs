//! Debian's cloud kernel, as an ELF vmlinux (PVH entry) and as a bzImage: its own early output
//! shows the banner, exactly our command line, an e820 map matching --mem, and the initrd.
//! On kvm_pvm (guest ring 0 emulated) Linux never reaches /init, so that is the whole check
//! there; where KVM is hardware-backed the busybox init line is required too.

use std::time::Duration;

use fabvm_tests::{debian_kernel, require_kvm, Tier, Vm};

const MEM: &str = "512M";
const MEM_BYTES: u64 = 512 << 20;

fn boot_linux(kernel_name: &str, timeout: Duration) {
    let test = format!("linux_{kernel_name}");
    let Some(tier) = require_kvm(&test) else {
        return;
    };
    let dir = debian_kernel();
    let cmdline = format!("console=ttyS0 earlyprintk=serial reboot=k panic=-1 fabvm.test=poweroff fabvm.id={kernel_name}");
    let kernel = dir.join(kernel_name);
    let initrd = dir.join("initramfs.cpio.gz");
    let mut vm = Vm::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem",
        MEM,
        "--cmdline",
        &cmdline,
    ]);
    let ram_end = format!("{:#018x}] usable", MEM_BYTES - 1);
    let mut wanted = vec![
        "Linux version 6.",
        "BIOS-e820: [mem 0x0000000000100000-",
        ram_end.as_str(),
        "RAMDISK: [mem ",
    ];
    let command_line = format!("Command line: {cmdline}");
    wanted.push(&command_line);
    if tier == Tier::Hardware {
        wanted.push("fabvm-initramfs: init started");
    }
    let found = vm.wait_for_all(&wanted, timeout);
    let out = vm.stdout();
    vm.kill();
    eprintln!(
        "{test}: tier {tier:?}, {} after {:?}",
        if found {
            "all lines seen"
        } else {
            "MISSING lines"
        },
        vm.elapsed()
    );
    let missing: Vec<_> = wanted.iter().filter(|w| !out.contains(**w)).collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?} in console:\n{out}\nstderr:\n{}",
        vm.stderr()
    );
    // Exactly our command line: the line ends where ours does.
    assert!(
        out.lines()
            .any(|l| l.trim_end_matches('\r').ends_with(&command_line)),
        "command line differs:\n{out}"
    );
    // The e820 map has exactly our RAM: no usable range beyond --mem.
    for line in out
        .lines()
        .filter(|l| l.contains("BIOS-e820:") && l.contains("usable"))
    {
        let range = line
            .split("[mem ")
            .nth(1)
            .and_then(|s| s.split(']').next())
            .unwrap();
        let end = range.split('-').nth(1).unwrap();
        let end = u64::from_str_radix(end.trim_start_matches("0x"), 16).unwrap();
        assert!(end < MEM_BYTES, "e820 usable range past --mem: {line}");
    }
    if tier == Tier::Emulated {
        eprintln!("{test}: kvm_pvm tier: asserted the kernel's early output only (Linux does not reach /init here)");
    }
}

#[test]
fn linux_vmlinux_pvh_early_boot() {
    boot_linux("vmlinux", Duration::from_secs(180));
}

#[test]
fn linux_bzimage_early_boot() {
    // The bzImage decompresses itself in emulated ring 0 first: minutes on kvm_pvm.
    boot_linux("vmlinuz", Duration::from_secs(900));
}
