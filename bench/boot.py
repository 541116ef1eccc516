#!/usr/bin/env python3
"""Boot benchmark: fabvm side by side with QEMU (-M microvm) on the same test guest.

For 1 vCPU / 128 MiB, each VMM is started RUNS times, alternating, and measured from the moment
just before the process is spawned:
  first_exit_ms   to the guest's first exit to the VMM (first guest instructions have run):
                  fabvm logs it (RUST_LOG=fabvm::timing=info), QEMU traces it (-trace kvm_run_exit)
  first_output_ms to the first byte on the serial console (the guest's boot line)
  ready_ms        to the test guest's `ready` line (memory filled)
  own_rss_kib     the VMM's own memory: RSS less the RSS of the mapping that backs guest RAM,
                  read from /proc/PID/smaps after the first verification pass
A scenario of the harness (bench/run.py); `bench/boot.py [--runs N] [--quick]` is
`bench/run.py --only boot [...]`.
"""
import os
import re
import select
import subprocess
import sys
import time

import common
from common import FABVM, GUEST, cell, ratio, summarize

NAME = "boot"
MEM_MIB = 128
CMDLINE = "passes=0 hb=50 fill=64"


def fabvm_cmd():
    return ([FABVM, "--kernel", GUEST, "--mem", f"{MEM_MIB}M", "--cpus", "1", "--cmdline", CMDLINE],
            dict(os.environ, RUST_LOG="fabvm::timing=info"))


def qemu_cmd():
    # QEMU's best settings for a fast start: microvm, KVM, host CPU with the TSC frequency leaf
    # (as fabvm gives), no defaults, no config file, no reboot; isa-debug-exit lets the guest exit.
    return (["qemu-system-x86_64", "-M", "microvm", "-enable-kvm",
             "-cpu", "host,-arch-capabilities,+invtsc,vmware-cpuid-freq=on", "-m", f"{MEM_MIB}M", "-smp", "1",
             "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
             "-kernel", GUEST, "-append", CMDLINE,
             "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
             "-trace", "kvm_run_exit", "-msg", "timestamp=on"], dict(os.environ))


def own_rss_kib(pid):
    """RSS of everything but the largest mapping (guest RAM), in KiB."""
    total, largest = 0, (0, 0)  # (size, rss) of the biggest mapping
    size = rss = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                if size is not None:
                    total += rss
                    largest = max(largest, (size, rss))
                size = rss = 0
            elif line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    if size is not None:
        total += rss
        largest = max(largest, (size, rss))
    if largest[0] < MEM_MIB * 1024:
        raise RuntimeError(f"no guest RAM mapping found in pid {pid}")
    return total - largest[1]


def run_once(name, cmd, env):
    start = time.time()
    proc = common.popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = b"", b""
    first_output = ready = None
    deadline = start + 60
    while time.time() < deadline:
        readable, _, _ = select.select([proc.stdout, proc.stderr], [], [], 0.5)
        now = time.time()
        for stream in readable:
            chunk = os.read(stream.fileno(), 65536)
            if stream is proc.stdout:
                if chunk and first_output is None:
                    first_output = now
                out += chunk
                if ready is None and b"fabvm-guest: ready" in out:
                    ready = now
            else:
                err += chunk
        if b"verify ok pass=1" in out:
            break
        if proc.poll() is not None:
            break
    rss = own_rss_kib(proc.pid) if proc.poll() is None else None
    proc.kill()
    rest_out, rest_err = proc.communicate()
    out, err = out + rest_out, err + rest_err
    text = err.decode(errors="replace")
    m = re.search(r"first exit at (\d+\.\d+)", text) if name == "fabvm" else \
        re.search(r"^\d+@(\d+\.\d+):kvm_run_exit", text, re.M)
    if None in (first_output, ready, rss) or m is None:
        raise RuntimeError(f"{name} run incomplete:\n{out.decode(errors='replace')}\n{text[-2000:]}")
    return {
        "first_exit_ms": (float(m.group(1)) - start) * 1000,
        "first_output_ms": (first_output - start) * 1000,
        "ready_ms": (ready - start) * 1000,
        "own_rss_kib": rss,
    }


def run(quick=False, runs=None, log=print):
    """Alternates fabvm and QEMU `runs` times (15; 3 in quick mode)."""
    runs = runs or (3 if quick else 15)
    samples = {"fabvm": [], "qemu": []}
    for i in range(runs):
        for name, (cmd, env) in (("fabvm", fabvm_cmd()), ("qemu", qemu_cmd())):
            samples[name].append(run_once(name, cmd, env))
        log(f"boot run {i + 1}/{runs} done")
    return {"runs": runs, "guest_cmdline": CMDLINE, "mem_mib": MEM_MIB,
            "summary": {name: summarize(s) for name, s in samples.items()}, "samples": samples}


ROWS = [("VMM start to first guest exit (ms)", "first_exit_ms"),
        ("to first console byte (ms)", "first_output_ms"),
        ("to test guest ready, 64 MiB filled (ms)", "ready_ms"),
        ("VMM own memory, RSS beyond guest RAM (KiB)", "own_rss_kib")]


def markdown(report):
    summary = report["summary"]
    lines = [f"Boot, 1 vCPU / {report['mem_mib']} MiB, test guest `{report['guest_cmdline']}`, "
             f"{report['runs']} runs each, median (min-max).", "",
             "| metric | fabvm | QEMU microvm | fabvm/QEMU |", "|---|---|---|---|"]
    for label, key in ROWS:
        f, q = summary["fabvm"][key], summary["qemu"][key]
        lines.append(f"| {label} | {cell(f)} | {cell(q)} | {ratio(f, q)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import run as harness
    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
