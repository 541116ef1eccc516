#!/usr/bin/env python3
"""Serverless starts: N VMs started at the same moment from one snapshot, fabvm against QEMU.

A 256 MiB test guest holding 128 MiB of unique data (`fill=128`) is snapshotted once. Then,
for N in 1, 10 and 50 (`--quick`: 1 and 4), RUNS times each, N restores are spawned at once:
  fabvm  eager_cold / eager_warm / lazy_cold / lazy_warm: `fabvm --restore` (`--lazy`),
         with no memory image on the host (cold: the N processes build it once between
         them) or with it built (warm)
  QEMU   N × `qemu -incoming exec:cat FILE` of QEMU's own snapshot of the same guest
         (QMP `migrate` to a file, taken paused), each continued once loaded
and measured:
  all_verified_ms  spawn of the first to the moment every VM has printed two `verify ok`
                   lines after the restore (each read its whole memory at least once)
  pss_mib          total PSS of the N processes then (shared pages counted once overall),
                   and pss_ratio = pss_mib / the guest's data (128 MiB; the ideal is ~1: one
                   copy of the data, plus each VMM's few MiB)
  first_exit_ms    (N = 1, fabvm) spawn to the vCPU's first exit from the guest, from
                   fabvm's `fabvm::timing` log: restore to the guest's next instruction
A scenario of the harness (bench/run.py); `bench/serverless.py [--runs N] [--quick]` is
`bench/run.py --only serverless [...]`.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import common
from common import FABVM, Console, Qmp, fabvm_ctl, ratio, summarize

NAME = "serverless"
MEM = "256M"
DATA_MIB = 128
CMDLINE = f"seed=21 fill={DATA_MIB} passes=0 hb=1000"
FIRST_EXIT = re.compile(r"vcpu 0 first exit at ([0-9.]+)")


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_all(procs, start):
    """Time from `start` until each console has two `verify ok` lines; total PSS then."""
    consoles = [Console(p) for p in procs]
    for c in consoles:
        _, i = c.wait("verify ok", timeout=300)
        c.wait("verify ok", timeout=300, after=i + 1)
    done = time.time()
    return {"all_verified_ms": (done - start) * 1000,
            "pss_mib": sum(pss_kib(p.pid) for p in procs) / 1024}


def fabvm_snapshot(work):
    store, sock = os.path.join(work, "store"), os.path.join(work, "src.sock")
    proc = common.popen([FABVM, "--kernel", common.GUEST, "--mem", MEM, "--cmdline", CMDLINE,
                         "--api-sock", sock, "--store", store],
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    Console(proc).wait("verify ok pass=1")
    fabvm_ctl(sock, "snapshot", os.path.join(work, "snap"))
    fabvm_ctl(sock, "shutdown")
    proc.wait(30)
    return os.path.join(work, "snap")


def fabvm_clones(snap, n, lazy, images):
    env = dict(os.environ, FABVM_IMAGE_DIR=images, RUST_LOG="fabvm::timing=info")
    extra = ["--lazy"] if lazy else []
    start = time.time()
    procs = [common.popen([FABVM, "--restore", snap, *extra], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n)]
    result = wait_all(procs, start)
    if n == 1:
        procs[0].kill()
        procs[0].wait()
        m = FIRST_EXIT.search(procs[0].stderr.read().decode(errors="replace"))
        if m:
            result["first_exit_ms"] = (float(m.group(1)) - start) * 1000
    common.reap()
    return result


QEMU_CPU = ["host,-arch-capabilities"]  # the -cpu QEMU runs with (common.qemu_base; see qemu_snapshot)


def qemu_cmd(qsock):
    cmd = common.qemu_base(MEM, CMDLINE, qsock)
    cmd[cmd.index("-cpu") + 1] = QEMU_CPU[0]
    return cmd


def qemu_snapshot(work):
    """QEMU's snapshot of the guest. Some nested hosts refuse QEMU's `-cpu host` (KVM rejects
    MSR_IA32_ARCH_CAPABILITIES, QEMU aborts): then `host,-arch-capabilities`, recorded."""
    try:
        return qemu_snapshot_with(work)
    except RuntimeError:
        common.reap()
        QEMU_CPU[0] = "host,-arch-capabilities"
        return qemu_snapshot_with(work)


def qemu_snapshot_with(work):
    state, qsock = os.path.join(work, "qemu.state"), os.path.join(work, "qmp.sock")
    if os.path.exists(qsock):
        os.unlink(qsock)
    proc = common.popen(qemu_cmd(qsock), stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    Console(proc).wait("verify ok pass=1")
    q = Qmp(qsock)
    q.call("stop")
    q.call("migrate", uri=f"exec:cat > {state}")
    while q.call("query-migrate").get("status") not in ("completed", "failed"):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    return state


def qemu_clones(state, n, work):
    socks = [os.path.join(work, f"q{i}.sock") for i in range(n)]
    start = time.time()
    procs = [common.popen(qemu_cmd(s) + ["-incoming", f"exec:cat {state}"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for s in socks]
    for s in socks:  # the snapshot was taken paused: continue each once loaded
        q = Qmp(s, timeout=120)
        while q.call("query-status")["status"] == "inmigrate":
            time.sleep(0.002)
        q.call("cont")
        q.close()
    result = wait_all(procs, start)
    common.reap()
    for s in socks:
        if os.path.exists(s):
            os.unlink(s)
    return result


def shm_tmp(prefix):
    return tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


def run(quick=False, runs=None, log=print):
    """N = 1, 10, 50 (1 and 4 in quick mode), `runs` times each (3; 1 quick)."""
    counts = [1, 4] if quick else [1, 10, 50]
    runs = runs or (1 if quick else 3)
    work = tempfile.mkdtemp(prefix="fabvm-bench-serverless-")
    report = {"runs": runs, "guest_cmdline": CMDLINE, "mem": MEM, "data_mib": DATA_MIB, "counts": {}}
    try:
        snap, state = fabvm_snapshot(work), qemu_snapshot(work)
        report["qemu_cpu"] = QEMU_CPU[0]
        for n in counts:
            samples = {k: [] for k in ("eager_cold", "eager_warm", "lazy_cold", "lazy_warm", "qemu")}
            for i in range(runs):
                for lazy in (False, True):
                    kind = "lazy" if lazy else "eager"
                    images = shm_tmp("fabvm-bench-images-")
                    try:
                        samples[f"{kind}_cold"].append(fabvm_clones(snap, n, lazy, images))
                        samples[f"{kind}_warm"].append(fabvm_clones(snap, n, lazy, images))
                    finally:
                        shutil.rmtree(images, ignore_errors=True)
                samples["qemu"].append(qemu_clones(state, n, work))
                log(f"serverless N={n} run {i + 1}/{runs} done")
            for s in samples.values():
                for sample in s:
                    sample["pss_ratio"] = sample["pss_mib"] / DATA_MIB
            report["counts"][str(n)] = {"summary": {k: summarize(s) for k, s in samples.items()},
                                        "samples": samples}
    finally:
        common.reap()
        shutil.rmtree(work, ignore_errors=True)
    return report


def markdown(report):
    lines = [f"Serverless starts: N VMs restored at once from one snapshot of a {report['mem']} test guest "
             f"holding {report['data_mib']} MiB of unique data (`{report['guest_cmdline']}`), "
             f"{report['runs']} run(s) each, median (min-max). Time: spawn to every VM having verified "
             "its memory; PSS: total of the N processes, and its ratio to the guest's data "
             f"(ideal: ~1, one copy). QEMU ran with `-cpu {report.get('qemu_cpu', 'host')}`.", "",
             "| N | start | all verified (ms) | vs QEMU | total PSS (MiB) | PSS / data | vs QEMU |",
             "|---|---|---|---|---|---|---|"]
    for n, entry in report["counts"].items():
        s = entry["summary"]
        q = s["qemu"]
        for kind in ("eager_cold", "eager_warm", "lazy_cold", "lazy_warm", "qemu"):
            f = s[kind]
            label = "QEMU -incoming" if kind == "qemu" else f"fabvm {kind.replace('_', ', ')}"
            lines.append(f"| {n} | {label} | {common.cell(f['all_verified_ms'])} | "
                         f"{ratio(f['all_verified_ms'], q['all_verified_ms'])} | {common.cell(f['pss_mib'])} | "
                         f"{common.cell(f['pss_ratio'], 2)} | {ratio(f['pss_mib'], q['pss_mib'])} |")
        for kind in ("eager", "lazy"):
            c, w = s[f"{kind}_cold"]["all_verified_ms"], s[f"{kind}_warm"]["all_verified_ms"]
            lines.append(f"| {n} | {kind}: cold / warm | | {ratio(c, w)} | | | |")
    one = report["counts"].get("1", {}).get("summary", {})
    for kind in ("eager_warm", "lazy_warm"):
        fe = one.get(kind, {}).get("first_exit_ms")
        if fe:
            lines.append("")
            lines.append(f"Restore to the guest's next instruction ({kind.replace('_', ', ')}, N=1; spawn to "
                         f"the vCPU's first exit): {common.cell(fe)} ms")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import run as harness
    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
