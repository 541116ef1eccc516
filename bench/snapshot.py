#!/usr/bin/env python3
"""Snapshot and restore benchmark: fabvm side by side with QEMU on the same test guest.

For each guest size (256 MiB and 2 GiB; `--quick`: 256 MiB only), the test guest fills its
memory with unique pages and keeps verifying (heartbeat every 1 ms). Then, RUNS times each:
  fabvm  snapshot_ms   `fabvm ctl snapshot` into a fresh store (the report's total_ms; the
                       guest is paused throughout), and a second snapshot of the same VM
                       (only dirty pages rehashed, only new pages stored)
         restore_cold_ms  spawn of `fabvm --restore` to the guest's next heartbeat, memory
                       image built from the store first
         restore_warm_ms  the same with the image already built (the common case: many VMs
                       from one snapshot)
         restore_lazy_ms  `--restore --lazy`: no image yet; the guest starts on the image while
                       it is built (pages it touches first are fetched first, userfaultfd)
         store_bytes   bytes on disk of the store vs raw guest memory
  QEMU   snapshot_ms   QMP `migrate` to `file:` (QEMU >= 8) or `exec:cat>` (paused first, so
                       the file is a consistent snapshot, as fabvm's), multifd off, zero-page
                       detection on (QEMU's default)
         restore_ms    spawn of `qemu -incoming` from the file to the guest's next heartbeat
         file_bytes    size of QEMU's state file
A scenario of the harness (bench/run.py); `bench/snapshot.py [--runs N] [--quick]` is
`bench/run.py --only snapshot [...]`.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import common
from common import FABVM, GUEST, Console, Qmp, du, fabvm_ctl, ratio, summarize

NAME = "snapshot"
CMDLINE = "passes=0 hb=1"


def fabvm_run(mem, work):
    store, sock = os.path.join(work, "store"), os.path.join(work, "vm.sock")
    proc = common.popen([FABVM, "--kernel", GUEST, "--mem", mem, "--cmdline", CMDLINE,
                             "--api-sock", sock, "--store", store],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    Console(proc).wait("verify ok pass=1")
    first = fabvm_ctl(sock, "snapshot", os.path.join(work, "snap"))
    second = fabvm_ctl(sock, "snapshot", os.path.join(work, "snap2"))
    fabvm_ctl(sock, "shutdown")
    proc.wait(30)
    result = {"snapshot_ms": first["total_ms"], "snapshot_again_ms": second["total_ms"],
              "store_bytes": du(store)}
    # Memory images go to a directory of this run (tmpfs, as fabvm's default), removed after;
    # the lazy restore gets an empty one, so it starts before the image exists.
    images = tempfile.mkdtemp(prefix="fabvm-bench-images-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        for kind, extra in (("cold", []), ("warm", []), ("lazy", ["--lazy"])):
            if kind == "lazy":
                shutil.rmtree(images, ignore_errors=True)
                os.makedirs(images, mode=0o700)
            env = dict(os.environ, FABVM_IMAGE_DIR=images)
            start = time.time()
            r = common.popen([FABVM, "--restore", os.path.join(work, "snap"), "--api-sock", sock, *extra],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            result[f"restore_{kind}_ms"] = (Console(r).wait("heartbeat")[0] - start) * 1000
            r.kill()
            r.wait()
    finally:
        shutil.rmtree(images, ignore_errors=True)
    return result


def qemu_run(mem, work):
    state, qsock = os.path.join(work, "qemu.state"), os.path.join(work, "qmp.sock")
    proc = common.popen(common.qemu_base(mem, CMDLINE, qsock), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    Console(proc).wait("verify ok pass=1")
    q = Qmp(qsock)
    start = time.time()
    q.call("stop")
    q.call("migrate", uri=f"exec:cat > {state}")
    while q.call("query-migrate").get("status") not in ("completed", "failed"):
        time.sleep(0.005)
    result = {"snapshot_ms": (time.time() - start) * 1000, "file_bytes": os.path.getsize(state)}
    proc.kill()
    proc.wait()
    os.unlink(qsock)
    start = time.time()
    r = common.popen(common.qemu_base(mem, CMDLINE, qsock) + ["-incoming", f"exec:cat {state}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The snapshot was taken paused, so QEMU restores it paused: continue it once loaded.
    q = Qmp(qsock)
    while q.call("query-status")["status"] == "inmigrate":
        time.sleep(0.001)
    q.call("cont")
    result["restore_ms"] = (Console(r).wait("heartbeat")[0] - start) * 1000
    r.kill()
    r.wait()
    return result


def run(quick=False, runs=None, log=print):
    """256 MiB and 2 GiB guests (256 MiB only in quick mode), `runs` times each (5; 1 quick)."""
    sizes = ["256M"] if quick else ["256M", "2G"]
    runs = runs or (1 if quick else 5)
    report = {"runs": runs, "guest_cmdline": CMDLINE, "sizes": {}}
    for mem in sizes:
        samples = {"fabvm": [], "qemu": []}
        for i in range(runs):
            for name, fn in (("fabvm", fabvm_run), ("qemu", qemu_run)):
                work = tempfile.mkdtemp(prefix=f"fabvm-bench-{name}-")
                try:
                    samples[name].append(fn(mem, work))
                finally:
                    common.reap()
                    shutil.rmtree(work, ignore_errors=True)
            log(f"snapshot {mem} run {i + 1}/{runs} done")
        report["sizes"][mem] = {"summary": {name: summarize(s) for name, s in samples.items()},
                                "samples": samples}
    return report


def rows(report, mem):
    """(label, fabvm spread, QEMU spread or None, unit scale) of one guest size."""
    s = report["sizes"][mem]["summary"]
    f, q = s["fabvm"], s["qemu"]
    return [("snapshot (ms)", f["snapshot_ms"], q["snapshot_ms"], 1),
            ("second snapshot of the same VM (ms)", f["snapshot_again_ms"], None, 1),
            ("restore to next heartbeat, image built (ms)", f["restore_cold_ms"], q["restore_ms"], 1),
            ("restore to next heartbeat, image cached (ms)", f["restore_warm_ms"], q["restore_ms"], 1),
            ("restore to next heartbeat, lazy (ms)", f["restore_lazy_ms"], q["restore_ms"], 1),
            ("bytes on disk (MiB)", f["store_bytes"], q["file_bytes"], 1 / 2**20)]


def markdown(report):
    lines = [f"Snapshot and restore, test guest `{report['guest_cmdline']}` (memory filled with unique "
             f"pages), {report['runs']} run(s) each, median (min-max).", "",
             "| guest | metric | fabvm | QEMU | fabvm/QEMU |", "|---|---|---|---|---|"]
    for mem in report["sizes"]:
        for label, f, q, scale in rows(report, mem):
            lines.append(f"| {mem} | {label} | {common.cell(f, 1, scale)} | {common.cell(q, 1, scale)} "
                         f"| {ratio(f, q)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import run as harness
    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
