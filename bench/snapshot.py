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
         restore_lazy_ms  `--restore --lazy`: no image, pages fetched from the store on first
                       touch (userfaultfd) and the rest prefetched behind
         store_bytes   bytes on disk of the store vs raw guest memory
  QEMU   snapshot_ms   QMP `migrate` to `file:` (QEMU >= 8) or `exec:cat>` (paused first, so
                       the file is a consistent snapshot, as fabvm's), multifd off, zero-page
                       detection on (QEMU's default)
         restore_ms    spawn of `qemu -incoming` from the file to the guest's next heartbeat
         file_bytes    size of QEMU's state file
Writes bench/results/snapshot.json and .md and prints the table.
Usage: bench/snapshot.py [--runs N] [--quick]
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot import ROOT, GUEST, FABVM, RESULTS, ensure_tools  # noqa: E402

CMDLINE = "passes=0 hb=1"


class Console:
    """Reads a process's stdout without blocking and timestamps lines as they arrive."""

    def __init__(self, proc):
        self.proc, self.buf = proc, b""
        os.set_blocking(proc.stdout.fileno(), False)

    def wait(self, needle, timeout=120, after=0):
        """Returns the time `needle` first appears at or past byte `after`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                chunk = None
            if chunk:
                self.buf += chunk
            if needle.encode() in self.buf[after:]:
                return time.time()
            if chunk is None:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.0005)
        raise RuntimeError(f"no {needle!r}: {self.buf[-500:]!r} {self.proc.stderr.read()[-500:] if self.proc.poll() is not None else ''}")


def fabvm_ctl(sock, *args):
    out = subprocess.run([FABVM, "ctl", "--api-sock", sock, "--json", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def du(path):
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True).stdout.split()[0])


def fabvm_run(mem, work):
    store, sock = os.path.join(work, "store"), os.path.join(work, "vm.sock")
    proc = subprocess.Popen([FABVM, "--kernel", GUEST, "--mem", mem, "--cmdline", CMDLINE,
                             "--api-sock", sock, "--store", store],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    Console(proc).wait("verify ok pass=1")
    first = fabvm_ctl(sock, "snapshot", os.path.join(work, "snap"))
    second = fabvm_ctl(sock, "snapshot", os.path.join(work, "snap2"))
    fabvm_ctl(sock, "shutdown")
    proc.wait(30)
    result = {"snapshot_ms": first["total_ms"], "snapshot_again_ms": second["total_ms"],
              "store_bytes": du(store)}
    for kind, extra in (("cold", []), ("warm", []), ("lazy", ["--lazy"])):
        start = time.time()
        r = subprocess.Popen([FABVM, "--restore", os.path.join(work, "snap"), "--api-sock", sock, *extra],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        result[f"restore_{kind}_ms"] = (Console(r).wait("heartbeat") - start) * 1000
        r.kill()
        r.wait()
    return result


def qmp(sock_path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(500):
        try:
            s.connect(sock_path)
            break
        except OSError:
            time.sleep(0.01)
    f = s.makefile("rw")
    f.readline()

    def call(cmd, **args):
        f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                if "error" in msg:
                    raise RuntimeError(msg)
                return msg["return"]
    call("qmp_capabilities")
    return call


def qemu_base(mem, qmp_sock):
    # No +invtsc here: QEMU refuses to migrate (snapshot) a VM with it; the guest then times
    # itself against the PIT, which only affects its boot, not what is measured.
    return ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host",
            "-m", mem, "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", GUEST, "-append", CMDLINE,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-qmp", f"unix:{qmp_sock},server=on,wait=off"]


def qemu_run(mem, work):
    state, qsock = os.path.join(work, "qemu.state"), os.path.join(work, "qmp.sock")
    proc = subprocess.Popen(qemu_base(mem, qsock), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    Console(proc).wait("verify ok pass=1")
    call = qmp(qsock)
    start = time.time()
    call("stop")
    call("migrate", uri=f"exec:cat > {state}")
    while call("query-migrate").get("status") not in ("completed", "failed"):
        time.sleep(0.005)
    result = {"snapshot_ms": (time.time() - start) * 1000, "file_bytes": os.path.getsize(state)}
    proc.kill()
    proc.wait()
    os.unlink(qsock)
    start = time.time()
    r = subprocess.Popen(qemu_base(mem, qsock) + ["-incoming", f"exec:cat {state}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The snapshot was taken paused, so QEMU restores it paused: continue it once loaded.
    call = qmp(qsock)
    while call("query-status")["status"] == "inmigrate":
        time.sleep(0.001)
    call("cont")
    result["restore_ms"] = (Console(r).wait("heartbeat") - start) * 1000
    r.kill()
    r.wait()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    ensure_tools()
    sizes = ["256M"] if args.quick else ["256M", "2G"]
    runs = 1 if args.quick else args.runs
    report = {"runs": runs, "sizes": {}}
    for mem in sizes:
        samples = {"fabvm": [], "qemu": []}
        for i in range(runs):
            for name, fn in (("fabvm", fabvm_run), ("qemu", qemu_run)):
                work = tempfile.mkdtemp(prefix=f"fabvm-bench-{name}-")
                try:
                    samples[name].append(fn(mem, work))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            print(f"{mem} run {i + 1}/{runs}", file=sys.stderr)
        report["sizes"][mem] = {
            name: {k: statistics.median(s[k] for s in rows) for k in rows[0]} for name, rows in samples.items()
        }
        report["sizes"][mem]["samples"] = samples
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "snapshot.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"Snapshot and restore, test guest `{CMDLINE}` (memory filled with unique pages), "
             f"{runs} run(s) each, medians.", "",
             "| guest | metric | fabvm | QEMU | fabvm/QEMU |", "|---|---|---|---|---|"]
    for mem, r in report["sizes"].items():
        f, q = r["fabvm"], r["qemu"]
        rows = [("snapshot (ms)", f["snapshot_ms"], q["snapshot_ms"]),
                ("second snapshot of the same VM (ms)", f["snapshot_again_ms"], None),
                ("restore to next heartbeat, image built (ms)", f["restore_cold_ms"], q["restore_ms"]),
                ("restore to next heartbeat, image cached (ms)", f["restore_warm_ms"], q["restore_ms"]),
                ("restore to next heartbeat, lazy (ms)", f["restore_lazy_ms"], q["restore_ms"]),
                ("bytes on disk (MiB)", f["store_bytes"] / 2**20, q["file_bytes"] / 2**20)]
        for label, a, b in rows:
            ratio = f"{a / b:.2f}" if b else "-"
            lines.append(f"| {mem} | {label} | {a:.1f} | {'-' if b is None else f'{b:.1f}'} | {ratio} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "snapshot.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
