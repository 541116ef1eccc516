//! Page sharing between VMs on one host (`--share`, the kernel's KSM guided by the fabric):
//! ten 256 MiB test guests sharing 90% of their pages by seed converge to well under half of
//! their memory, the reported potential matches what the seeds imply, and every guest keeps
//! verifying; without `--share` nothing is merged and the potential is still right; `--share`
//! on a kernel without KSM is a one-line error.
//!
//! KSM's knobs are host-wide: these tests save and restore them ([`Knobs`]) and run one at a
//! time (nextest group `ksm`). Each test has a registry of its own (`FABVM_RUNTIME_DIR`), so
//! only its VMs are indexed. The VMs run at nice 19 (their guests verify memory forever, and
//! ksmd runs at nice 5), like batch VMs on a packed host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fabvm_tests::ksm::{self, Knobs};
use fabvm_tests::{count, ctl, expect_error, fabvm, require_kvm, test_guest, wait_for_socket, Vm};
use serde_json::Value;

const GUESTS: usize = 10;
const MEM_MIB: u64 = 256;
const SHARE: u64 = 90;
const READY: Duration = Duration::from_secs(120);
/// How long merging may take after the guests are ready.
const CONVERGE: Duration = Duration::from_secs(120);
/// "Well under half": once merged, the VMs' total PSS must be below this fraction of 10 x
/// guest size (90% shared implies about 0.19 plus each process's own memory).
const CONVERGED: f64 = 0.3;

/// Ten test guests, seeds 1..=10, sharing [`SHARE`]% of their pages through one shared seed.
struct Fleet {
    vms: Vec<(Vm, PathBuf)>,
    runtime: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn start(share: Option<&str>) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("run");
        let guest = test_guest();
        let mut vms = Vec::new();
        for seed in 1..=GUESTS {
            let sock = dir.path().join(format!("vm{seed}.sock"));
            let mut command = Command::new("nice");
            command
                .args(["-n", "19"])
                .arg(fabvm())
                .arg("--kernel")
                .arg(&guest)
                .args(["--mem", &format!("{MEM_MIB}M"), "--cmdline"])
                .arg(format!(
                    "seed={seed} sseed=77 share={SHARE} passes=0 hb=1000"
                ))
                .arg("--api-sock")
                .arg(&sock)
                .env("FABVM_RUNTIME_DIR", &runtime);
            if let Some(share) = share {
                command.arg(share);
            }
            vms.push((Vm::start_command(&mut command), sock));
        }
        for (i, (vm, sock)) in vms.iter_mut().enumerate() {
            assert!(
                vm.wait_for_all(&["fabvm-guest: ready"], READY) && wait_for_socket(sock, READY),
                "guest {} not ready:\n{}\n{}",
                i + 1,
                vm.stdout(),
                vm.stderr()
            );
        }
        Fleet {
            vms,
            runtime,
            _dir: dir,
        }
    }

    /// Pages of guest `i` that come from the shared seed: its potential, as the seeds imply.
    fn expected_potential(&self, i: usize) -> u64 {
        let console = self.vms[i].0.stdout();
        let (start, end) = ksm::guest_fill_range(&console).expect("info line");
        (start >> 12..end >> 12)
            .filter(|&gfn| ksm::guest_page_is_shared(gfn, SHARE))
            .count() as u64
    }

    /// The VMs' total proportional set size: host memory they use, merged pages once.
    fn pss_bytes(&self) -> u64 {
        self.vms
            .iter()
            .map(|(vm, _)| proc_number(vm.pid(), "smaps_rollup", "Pss:") << 10)
            .sum()
    }

    /// Pages of the VMs the kernel has merged (`/proc/PID/ksm_stat`).
    fn merged_pages(&self) -> u64 {
        self.vms
            .iter()
            .map(|(vm, _)| {
                proc_number(vm.pid(), "ksm_stat", "ksm_merging_pages")
                    + proc_number(vm.pid(), "ksm_stat", "ksm_zero_pages")
            })
            .sum()
    }

    /// `fabvm host stats --json` over this fleet's registry.
    fn host_stats(&self) -> Value {
        self.fabvm_json(&["host", "--json", "stats"])
    }

    fn fabvm_json(&self, args: &[&str]) -> Value {
        let out = Command::new(fabvm())
            .args(args)
            .env("FABVM_RUNTIME_DIR", &self.runtime)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fabvm {args:?}: {stderr}");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("fabvm {args:?}: {e}: {stderr}"))
    }

    /// Checks the host report's potential per VM and in total against the seeds (1%).
    fn check_potential(&self, report: &Value) -> u64 {
        let vms = report["vms"].as_array().expect("vms");
        assert_eq!(vms.len(), GUESTS, "{report}");
        let mut expected_total = 0;
        for (i, (vm, _)) in self.vms.iter().enumerate() {
            let expected = self.expected_potential(i);
            expected_total += expected;
            let entry = vms
                .iter()
                .find(|v| v["pid"].as_u64() == Some(u64::from(vm.pid())))
                .unwrap_or_else(|| panic!("guest {} missing from {report}", i + 1));
            within_one_percent(number(entry, "potential_pages"), expected, "potential");
            assert_eq!(number(entry, "pages"), MEM_MIB << 8);
        }
        within_one_percent(
            number(&report["host"], "potential_pages"),
            expected_total,
            "host potential",
        );
        expected_total
    }

    /// Waits until every guest has verified all its memory `more` more times, with no failure.
    fn keep_verifying(&mut self, more: usize) {
        for (i, (vm, _)) in self.vms.iter_mut().enumerate() {
            let done = count(&vm.stdout(), "fabvm-guest: verify ok pass=");
            assert!(
                vm.wait_for_count("fabvm-guest: verify ok pass=", done + more, READY),
                "guest {} stopped verifying:\n{}\n{}",
                i + 1,
                vm.stdout(),
                vm.stderr()
            );
            assert!(!vm.stdout().contains("FAILED"), "{}", vm.stdout());
        }
    }
}

#[test]
fn ten_guests_sharing_90_percent_converge_under_half_and_keep_verifying() {
    if require_kvm("sharing").is_none() {
        return;
    }
    let knobs = Knobs::save("sharing");
    let started = Instant::now();
    let mut fleet = Fleet::start(Some("--share"));
    let ready = started.elapsed();
    let guests_bytes = GUESTS as u64 * (MEM_MIB << 20);
    // Converged: the kernel has merged 99% of the pages the seeds share (its own counters).
    let shared: u64 = (0..GUESTS).map(|i| fleet.expected_potential(i)).sum();
    while (fleet.merged_pages() as f64) < 0.99 * shared as f64
        && started.elapsed() < ready + CONVERGE
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let converged = started.elapsed() - ready;
    let pss = fleet.pss_bytes();
    eprintln!(
        "{GUESTS} x {MEM_MIB} MiB, {SHARE}% shared: ready after {ready:?}, {} of {shared} pages \
         merged {converged:?} later, PSS {} MiB ({:.1}% of {} MiB)",
        fleet.merged_pages(),
        pss >> 20,
        100.0 * pss as f64 / guests_bytes as f64,
        guests_bytes >> 20
    );
    assert!(
        pss as f64 <= CONVERGED * guests_bytes as f64,
        "host memory did not converge under {CONVERGED} of {} MiB in {CONVERGE:?}: PSS {} MiB; \
         leader: {}",
        guests_bytes >> 20,
        pss >> 20,
        std::fs::read_to_string(fleet.runtime.join("vms/sharing.status")).unwrap_or_default()
    );

    let report = fleet.host_stats();
    let expected = fleet.check_potential(&report);
    let merged = number(&report, "merged_pages");
    assert!(
        merged as f64 >= 0.99 * expected as f64,
        "KSM merged {merged} of {expected} shared pages: {report}"
    );
    // Merging held after the report read every VM's memory (no unsharing reads).
    assert!(fleet.pss_bytes() as f64 <= CONVERGED * guests_bytes as f64);

    let (ok, out, err) = ctl(&fleet.vms[0].1, &["stats"]);
    assert!(ok, "{err}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    let sharing = &stats["sharing"];
    assert_eq!(sharing["mode"], "guided", "{stats}");
    within_one_percent(
        number(sharing, "potential_pages"),
        fleet.expected_potential(0),
        "ctl stats potential",
    );
    assert!(number(sharing, "merged_pages") > 0, "{sharing}");
    let store = fleet.fabvm_json(&["store", "--json", "stats"]);
    assert_eq!(
        number(&store["host"], "sharing_vms"),
        GUESTS as u64,
        "{store}"
    );

    fleet.keep_verifying(2);

    // Merged: the leader gives ksmd the host's settings back, its priority included.
    let status = fleet.runtime.join("vms/sharing.status");
    let deadline = Instant::now() + READY;
    let mut leader = Value::Null;
    while Instant::now() < deadline {
        leader =
            serde_json::from_slice(&std::fs::read(&status).unwrap_or_default()).unwrap_or_default();
        if leader["fast"] == false {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(leader["fast"], false, "ksmd still fast: {leader}");
    for knob in ["pages_to_scan", "sleep_millisecs"] {
        assert_eq!(ksm::read(knob), knobs.saved(knob), "{knob} not given back");
    }
    assert_eq!(
        ksm::ksmd().1,
        knobs.ksmd_nice(),
        "ksmd's nice value not given back"
    );
    eprintln!("whole test: {:?}", started.elapsed());
}

#[test]
fn without_share_nothing_is_merged_and_potential_is_still_reported() {
    if require_kvm("sharing").is_none() {
        return;
    }
    let _knobs = Knobs::save("sharing");
    // ksmd runs, fast: it would merge anything marked.
    ksm::write("pages_to_scan", 5000);
    ksm::write("sleep_millisecs", 10);
    ksm::write("run", 1);
    let fleet = Fleet::start(None);
    let scans = ksm::read("full_scans");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ksm::read("full_scans") < scans + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = fleet.host_stats();
    fleet.check_potential(&report);
    assert_eq!(number(&report, "merged_pages"), 0, "{report}");
    for vm in report["vms"].as_array().unwrap() {
        assert_eq!(vm["mode"], Value::Null, "{vm}");
    }
    let pss = fleet.pss_bytes();
    assert!(
        pss as f64 > 0.9 * (GUESTS as u64 * (MEM_MIB << 20)) as f64,
        "unshared guests use their whole memory: PSS {pss}"
    );
    let (ok, out, err) = ctl(&fleet.vms[0].1, &["stats"]);
    assert!(ok, "{err}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["sharing"]["mode"], Value::Null, "{stats}");
    assert_eq!(number(&stats["sharing"], "merged_pages"), 0);
    within_one_percent(
        number(&stats["sharing"], "potential_pages"),
        fleet.expected_potential(0),
        "ctl stats potential",
    );
}

#[test]
fn share_without_ksm_is_a_one_line_error() {
    if require_kvm("sharing").is_none() {
        return;
    }
    // A kernel without KSM, as fabvm sees it: an empty directory over /sys/kernel/mm/ksm in a
    // mount namespace of its own.
    let guest = test_guest();
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none {} && exec \"$0\" \"$@\"",
            ksm::SYSFS
        ))
        .arg(fabvm())
        .arg("--kernel")
        .arg(&guest)
        .args(["--mem", "64M", "--share"]);
    let line = expect_error(Vm::start_command(&mut command));
    assert!(line.contains("KSM"), "{line}");
    for bad in [["--share=bogus"], ["--share=guided,plain"]] {
        let line = expect_error(Vm::start(&[
            "--kernel",
            guest.to_str().unwrap(),
            "--mem",
            "64M",
            bad[0],
        ]));
        assert!(line.contains("--share"), "{line}");
    }
}

fn within_one_percent(got: u64, want: u64, what: &str) {
    let diff = got.abs_diff(want) as f64;
    assert!(
        diff <= 0.01 * want as f64,
        "{what}: reported {got}, the seeds imply {want}"
    );
}

fn number(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {value}"))
}

/// The first number after `key` in `/proc/PID/<file>` (0 when absent or gone).
fn proc_number(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join(file))
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
}
