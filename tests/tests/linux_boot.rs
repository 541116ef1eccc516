//! Debian's cloud kernel, as an ELF vmlinux (PVH entry) and as a bzImage, with the busybox
//! initramfs, the ext4 root image on `--disk` and a virtio-net on a tap in a network namespace
//! (all from `guest-images/debian-kernel.sh`). Two tiers:
//! - everywhere: the kernel's own early output shows the banner, exactly our command line, an
//!   e820 map matching --mem, the initrd, our ACPI tables (RSDP, XSDT, FACP, DSDT, APIC with our
//!   OEM id) and both vCPUs, which this kernel (no MP-table parsing) finds only through the
//!   MADT; the DSDT lists three virtio-mmio devices (disk, net, rng) and the command line
//!   carries their `virtio_mmio.device=` entries.
//! - where KVM is hardware-backed: the whole boot. virtio_mmio finds the three devices through
//!   ACPI (this kernel has no other way), the initramfs mounts the root disk, brings up the
//!   network and pings the host's end of the tap, switches to the root disk, whose init writes
//!   to it and powers off; fabvm exits 0 and the image is a clean ext4 holding that write.
//!
//! On kvm_pvm (guest ring 0 emulated, about 1 MIPS) Linux never reaches /init, so the first
//! tier is the whole check there, and the test says so loudly; the image itself is then shown
//! to work by `debian_image.rs` (the same kernel and images under QEMU TCG).
//! ACPI power-off (what Linux's `poweroff` ends in) is checked with a tiny guest of our own.

use std::time::Duration;

use fabvm_tests::debian::{
    assert_lines_in_order, assert_root_image_after_boot, full_boot_cmdline, full_boot_lines,
    root_image_copy,
};
use fabvm_tests::netns::TapNs;
use fabvm_tests::{debian_kernel, fabvm, require_kvm, Tier, Vm};

const MEM: &str = "512M";
const MEM_BYTES: u64 = 512 << 20;
const CPUS: &str = "2";
/// The ACPI tables Linux must list, each with our OEM id.
const ACPI_TABLES: [&str; 5] = ["RSDP", "XSDT", "FACP", "DSDT", "APIC"];
/// From the last line asserted to fabvm's exit after the guest's power-off.
const POWER_OFF: Duration = Duration::from_secs(60);

fn boot_linux(kernel_name: &str, timeout: Duration) {
    let test = format!("linux_{kernel_name}");
    let Some(tier) = require_kvm(&test) else {
        return;
    };
    match tier {
        Tier::Emulated => eprintln!(
            "!!! {test}: EMULATED TIER (kvm_pvm): Linux cannot reach /init here; asserting the \
             kernel's early lines only, not the root disk, network and ping (see debian_image.rs \
             for the image under QEMU TCG) !!!"
        ),
        Tier::Hardware => eprintln!(
            "=== {test}: HARDWARE TIER: full boot, root disk, network and ping asserted ==="
        ),
    }
    let dir = debian_kernel();
    let Some(ns) = TapNs::new(&test) else {
        return;
    };
    let cmdline = format!(
        "console=ttyS0 earlyprintk=serial reboot=k panic=-1 fabvm.id={kernel_name} {}",
        full_boot_cmdline()
    );
    let kernel = dir.join(kernel_name);
    let initrd = dir.join("initramfs.cpio.gz");
    let tmp = tempfile::tempdir().unwrap();
    let disk = root_image_copy(&dir, tmp.path());
    let net = format!("tap={},mac=52:54:00:fa:b0:10", TapNs::TAP);
    let mut vm = Vm::start_command(ns.command(&fabvm()).args([
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem",
        MEM,
        "--cpus",
        CPUS,
        "--cmdline",
        &cmdline,
        "--disk",
        disk.to_str().unwrap(),
        "--net",
        &net,
        "--rng",
    ]));
    let ram_end = format!("{:#018x}] usable", MEM_BYTES - 1);
    let mut wanted: Vec<String> = [
        "Linux version 6.",
        "BIOS-e820: [mem 0x0000000000100000-",
        ram_end.as_str(),
        "RAMDISK: [mem ",
        // The RSDP where we put it (also found through PVH start_info / the zero page).
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 FABVM )",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        // The IOAPIC's id follows the vCPUs' APIC ids.
        "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    wanted.extend(ACPI_TABLES.iter().map(|sig| format!("ACPI: {sig} 0x")));
    // Disk, net, rng: slots 0, 1, 2 (IRQs 5, 6, 7).
    let command_line = format!(
        "Command line: {cmdline} virtio_mmio.device=512@0xd0000000:5 \
         virtio_mmio.device=512@0xd0001000:6 virtio_mmio.device=512@0xd0002000:7"
    );
    wanted.push(command_line.clone());
    if tier == Tier::Hardware {
        wanted.extend(full_boot_lines());
    }
    let wanted_refs: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let found = vm.wait_for_all(&wanted_refs, timeout);
    let status = if tier == Tier::Hardware && found {
        vm.wait_exit(POWER_OFF)
    } else {
        vm.kill();
        None
    };
    let out = vm.stdout();
    eprintln!(
        "{test}: tier {tier:?}, {} after {:?}",
        if found {
            "all lines seen"
        } else {
            "MISSING lines"
        },
        vm.elapsed()
    );
    let missing: Vec<_> = wanted
        .iter()
        .filter(|w| !out.contains(w.as_str()))
        .collect();
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
    // Every table carries our OEM id, and ACPICA found nothing to complain about.
    for sig in ACPI_TABLES {
        let prefix = format!("ACPI: {sig} 0x");
        let line = out.lines().find(|l| l.contains(&prefix)).unwrap();
        assert!(line.contains("FABVM"), "table without our OEM id: {line}");
    }
    for line in out.lines() {
        assert!(
            !line.contains("ACPI BIOS Error")
                && !line.contains("ACPI Error")
                && !line.contains("[Firmware Bug]"),
            "ACPI complaint: {line}\n{out}"
        );
    }
    match tier {
        Tier::Hardware => {
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(0),
                "fabvm did not exit 0 within {POWER_OFF:?} of the guest's last line\n\
                 console:\n{out}\nstderr:\n{}",
                vm.stderr()
            );
            assert_lines_in_order(&out, &full_boot_lines());
            // All three found through ACPI (the numbering follows the kernel's probe order).
            let line = out
                .lines()
                .find(|l| l.contains("fabvm-initramfs: virtio devices: "))
                .unwrap_or_default();
            assert!(
                line.contains("virtio devices: 3 ")
                    && [":blk", ":net", ":rng"].iter().all(|t| line.contains(t)),
                "virtio devices:\n{out}"
            );
            assert_root_image_after_boot(&disk);
            eprintln!("=== {test}: HARDWARE TIER passed: root disk mounted, host pinged, clean power-off ===");
        }
        Tier::Emulated => eprintln!(
            "!!! {test}: EMULATED TIER (kvm_pvm) passed: the kernel's early lines only; root disk, \
             network and ping NOT checked under fabvm on this machine !!!"
        ),
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

/// A 64-bit ELF whose code does what ACPICA does to enter S5 on a hardware-reduced platform:
/// clear WAK_STS in the sleep status register, then write SLP_TYP = 5 with SLP_EN to the sleep
/// control register (ports from the FADT: 0x601 and 0x600). Then it halts for good: only the
/// power-off can end the VM.
fn s5_guest() -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x66, 0xba, 0x01, 0x06, // mov dx, 0x601
        0xb0, 0x80,             // mov al, 0x80 (WAK_STS)
        0xee,                   // out dx, al
        0x66, 0xba, 0x00, 0x06, // mov dx, 0x600
        0xb0, 0x34,             // mov al, SLP_EN | 5 << 2
        0xee,                   // out dx, al
        0xf4,                   // hlt
        0xeb, 0xfd,             // jmp hlt
    ];
    let (ehdr, phdr) = (64u16, 56u16);
    let offset = u64::from(ehdr + phdr);
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01");
    elf.resize(16, 0);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // x86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // version
    elf.extend_from_slice(&LOAD.to_le_bytes()); // entry
    elf.extend_from_slice(&u64::from(ehdr).to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    for half in [ehdr, phdr, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [
        offset,
        LOAD,
        LOAD,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

#[test]
fn acpi_s5_powers_off_with_exit_0() {
    if require_kvm("acpi_s5_powers_off_with_exit_0").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("s5.elf");
    std::fs::write(&kernel, s5_guest()).unwrap();
    // A reset or triple fault would exit 0 too: fabvm's info log names the stop reason.
    let mut vm = Vm::start_command(
        std::process::Command::new(fabvm())
            .args(["--kernel", kernel.to_str().unwrap(), "--mem", "64M"])
            .env("RUST_LOG", "info"),
    );
    let status = vm.wait_exit(Duration::from_secs(60));
    let stderr = vm.stderr();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "fabvm did not power off: stdout {:?} stderr {stderr:?}",
        vm.stdout()
    );
    assert!(stderr.contains("PowerOff"), "stopped otherwise: {stderr}");
}
