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
Writes bench/results/boot.json and bench/results/boot.md and prints the table.
Usage: bench/boot.py [--runs N] [--quick]
"""
import argparse
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guest-images", "out", "test-guest.elf")
FABVM = os.path.join(ROOT, "target", "release", "fabvm")
RESULTS = os.path.join(ROOT, "bench", "results")
MEM_MIB = 128
CMDLINE = "passes=0 hb=50 fill=64"


def ensure_tools():
    """Builds fabvm and the test guest, installs QEMU from Debian when missing."""
    subprocess.run(["bash", os.path.join(ROOT, "guest-images", "build-test-guest.sh")],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "vmm", "--bin", "fabvm"],
                   check=True, cwd=ROOT)
    if shutil.which("qemu-system-x86_64") is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86"],
                       check=True, env=env, stdout=subprocess.DEVNULL)


def fabvm_cmd():
    return ([FABVM, "--kernel", GUEST, "--mem", f"{MEM_MIB}M", "--cpus", "1", "--cmdline", CMDLINE],
            dict(os.environ, RUST_LOG="fabvm::timing=info"))


def qemu_cmd():
    # QEMU's best settings for a fast start: microvm, KVM, host CPU with the TSC frequency leaf
    # (as fabvm gives), no defaults, no config file, no reboot; isa-debug-exit lets the guest exit.
    return (["qemu-system-x86_64", "-M", "microvm", "-enable-kvm",
             "-cpu", "host,+invtsc,vmware-cpuid-freq=on", "-m", f"{MEM_MIB}M", "-smp", "1",
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
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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


def summarize(samples):
    out = {}
    for key in samples[0]:
        values = sorted(s[key] for s in samples)
        out[key] = {"median": statistics.median(values), "min": values[0], "max": values[-1]}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 runs each")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    ensure_tools()
    qemu_version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    samples = {"fabvm": [], "qemu": []}
    for i in range(runs):
        for name, (cmd, env) in (("fabvm", fabvm_cmd()), ("qemu", qemu_cmd())):
            samples[name].append(run_once(name, cmd, env))
        print(f"run {i + 1}/{runs} done", file=sys.stderr)
    summary = {name: summarize(s) for name, s in samples.items()}
    kvm = "kvm_pvm (nested)" if os.path.exists("/sys/module/kvm_pvm") else "kvm"
    machine = f"{platform.node()}: {os.cpu_count()} cores, {kvm}, kernel {platform.release()}"
    report = {"machine": machine, "qemu": qemu_version, "runs": runs, "guest_cmdline": CMDLINE,
              "mem_mib": MEM_MIB, "summary": summary, "samples": samples}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "boot.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = [("VMM start to first guest exit (ms)", "first_exit_ms"),
            ("to first console byte (ms)", "first_output_ms"),
            ("to test guest ready, 64 MiB filled (ms)", "ready_ms"),
            ("VMM own memory, RSS beyond guest RAM (KiB)", "own_rss_kib")]
    lines = [f"Boot, 1 vCPU / {MEM_MIB} MiB, test guest `{CMDLINE}`, {runs} runs each, median (min-max).",
             f"Machine: {machine}; {qemu_version}.", "",
             "| metric | fabvm | QEMU microvm | fabvm/QEMU |", "|---|---|---|---|"]
    for label, key in rows:
        f, q = summary["fabvm"][key], summary["qemu"][key]
        cell = lambda s: f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"
        lines.append(f"| {label} | {cell(f)} | {cell(q)} | {f['median'] / q['median']:.2f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "boot.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
