//! The test guest boots under fabvm with 1 and 2 vCPUs, fills 256 MiB, verifies, and exits 0;
//! its fixed serial lines are checked one by one.

use std::time::Duration;

use fabvm_tests::{lines_with, require_kvm, test_guest, Vm};

const PREFIX: &str = "fabvm-guest: ";

fn boot(cpus: u32, cmdline: &str) -> (String, std::process::ExitStatus) {
    let guest = test_guest();
    let cpus_arg = cpus.to_string();
    let mut vm = Vm::start(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--mem",
        "256M",
        "--cpus",
        &cpus_arg,
        "--cmdline",
        cmdline,
    ]);
    let status = vm.wait_exit(Duration::from_secs(120));
    let out = vm.stdout();
    let status = status.unwrap_or_else(|| {
        panic!(
            "guest did not finish in 120 s; console:\n{out}\nstderr:\n{}",
            vm.stderr()
        )
    });
    eprintln!("console ({:?}):\n{out}", vm.elapsed());
    assert!(
        vm.stderr().is_empty(),
        "fabvm wrote to stderr: {}",
        vm.stderr()
    );
    (out, status)
}

fn check_run(cpus: u32) {
    let cmdline = format!("cpus={cpus} passes=2 seed=7");
    let (out, status) = boot(cpus, &cmdline);
    assert!(status.success(), "exit status {status:?}");
    let lines = lines_with(&out, PREFIX);
    let boot_line = format!("{PREFIX}boot cpus={cpus} ");
    assert!(
        lines[0].starts_with(&boot_line),
        "first line: {:?}",
        lines.first()
    );
    assert!(
        lines[0].ends_with(&format!("cmdline={cmdline}")),
        "boot line: {}",
        lines[0]
    );
    let ready = lines
        .iter()
        .find(|l| l.starts_with(&format!("{PREFIX}ready ")))
        .expect("ready line");
    let pages: u64 = field(ready, "pages").parse().unwrap();
    let fill_mib: u64 = field(ready, "fill_mib").parse().unwrap();
    // 256 MiB less the guest's own first MiBs: at least 240 MiB of seeded pages.
    assert!((240..=256).contains(&fill_mib), "fill_mib={fill_mib}");
    assert_eq!(pages, fill_mib * 256, "pages vs fill_mib in {ready}");
    assert_eq!(field(ready, "cpus"), cpus.to_string());
    assert_eq!(field(ready, "seed"), "7");
    for pass in 1..=2 {
        let line = format!("{PREFIX}verify ok pass={pass}");
        assert!(lines.contains(&line.as_str()), "missing {line:?}");
    }
    assert!(!out.contains("FAILED"), "verification failed:\n{out}");
    assert_eq!(lines.last(), Some(&"fabvm-guest: done"));
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn one_vcpu_fills_256m_verifies_and_exits_0() {
    if require_kvm("one_vcpu").is_none() {
        return;
    }
    check_run(1);
}

#[test]
fn two_vcpus_fill_256m_verify_and_exit_0() {
    if require_kvm("two_vcpus").is_none() {
        return;
    }
    check_run(2);
}

#[test]
fn guest_reported_failure_ends_fabvm_non_zero() {
    if require_kvm("guest_reported_failure").is_none() {
        return;
    }
    // The guest rejects the unknown key, prints an error line and reports failure on the
    // debug-exit port: fabvm must exit non-zero with one line saying so.
    let guest = test_guest();
    let mut vm = Vm::start(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--mem",
        "64M",
        "--cmdline",
        "passes=1 bogus=1",
    ]);
    let status = vm
        .wait_exit(Duration::from_secs(60))
        .expect("guest did not stop");
    let out = vm.stdout();
    assert!(
        lines_with(&out, PREFIX)
            .iter()
            .any(|l| l.starts_with("fabvm-guest: error")),
        "no error line:\n{out}"
    );
    assert!(!out.contains("fabvm-guest: done"));
    assert_eq!(status.code(), Some(1), "stderr: {}", vm.stderr());
    assert_eq!(
        vm.stderr().trim_end(),
        "fabvm: guest reported failure (status 1 on the debug-exit port)"
    );
}
