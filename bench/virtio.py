#!/usr/bin/env python3
"""virtio benchmark: fabvm side by side with QEMU (-M microvm, virtio-mmio) on the same test guest.

Block: the test guest's `blkbench=MS` mode on the same raw image (filled with random data
first, so reads hit allocated blocks), one request in flight, for MS ms per phase:
  seq_write / seq_read   1 MiB requests, sequential, wrapping at the end of the disk
  rand_write / rand_read 4 KiB requests at random 4 KiB-aligned offsets
The guest reports MB/s (10^6 bytes) and the mean and worst latency per request, timed with its
TSC. Both VMMs use buffered I/O on the host (fabvm: plain read/write; QEMU: its default
cache=writeback, aio=threads), so the image sits in the host's page cache: this measures the
virtio path, not the disk.

Net: the test guest's `netbench=MS` mode: it resolves the host with ARP, then transmits
1514-byte UDP frames to the host's discard port for MS ms, keeping its 16-entry transmit ring
full. The tap (in a network namespace, 10.0.0.1/24) counts what arrives; QEMU uses the same
tap with vhost off (its userspace virtio-net, as fabvm's). Guest to host only.

Each VMM runs RUNS times, alternating, at nice -15 (--nice) so that other work on a shared
machine disturbs both less. Writes bench/results/virtio.json and virtio.md.
Usage: bench/virtio.py [--runs N] [--ms MS] [--nice N] [--quick]   (root: namespaces, taps, nice)
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guest-images", "out", "test-guest.elf")
FABVM = os.path.join(ROOT, "target", "release", "fabvm")
RESULTS = os.path.join(ROOT, "bench", "results")
MEM = "256M"
IMAGE_MIB = 512
NETNS = f"fabvm-bench-{os.getpid()}"
TAP = "vtap0"
MAC = "52:54:00:fa:b0:01"
QEMU_BASE = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm",
             "-cpu", "host,-arch-capabilities,+invtsc,vmware-cpuid-freq=on", "-m", MEM, "-smp", "1",
             "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
             "-no-reboot", "-kernel", GUEST, "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
             "-global", "virtio-mmio.force-legacy=false"]


def ensure_tools():
    """Builds fabvm and the test guest, installs QEMU from Debian when missing."""
    subprocess.run(["bash", os.path.join(ROOT, "guest-images", "build-test-guest.sh")],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "vmm", "--bin", "fabvm"],
                   check=True, cwd=ROOT)
    if shutil.which("qemu-system-x86_64") is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "qemu-system-x86"], check=True, env=env, stdout=subprocess.DEVNULL)


NICE = []


def run_guest(cmd, ok_exit):
    """Runs a VM to its end; returns its console output."""
    proc = subprocess.run(NICE + cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != ok_exit or "fabvm-guest: done" not in out or "FAILED" in out:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}:\n{out}\n"
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return out


def parse(out, prefix):
    """Every `prefix NAME key=value ...` line as {NAME: {key: float}}."""
    found = {}
    for line in out.splitlines():
        if line.startswith(prefix):
            name, *fields = line[len(prefix):].split()
            found[name] = {k: float(v) for k, v in (f.split("=", 1) for f in fields)}
    return found


def make_image(path):
    with open(path, "wb") as f:
        for _ in range(IMAGE_MIB):
            f.write(os.urandom(1 << 20))


def blk_run(vmm, image, ms):
    cmdline = f"blkbench={ms} fill=1 passes=1 hb=0"
    if vmm == "fabvm":
        cmd = [FABVM, "--kernel", GUEST, "--mem", MEM, "--disk", image, "--cmdline", cmdline]
        out = run_guest(cmd, 0)
    else:
        cmd = QEMU_BASE + ["-append", cmdline,
                           "-drive", f"id=d0,file={image},format=raw,if=none",
                           "-device", "virtio-blk-device,drive=d0"]
        out = run_guest(cmd, 1)  # isa-debug-exit: status 0 -> exit code 1
    return parse(out, "fabvm-guest: blkbench ")


def ns(*args):
    subprocess.run(["ip", *args], check=True, stdout=subprocess.DEVNULL)


def tap_counter(name):
    out = subprocess.run(["ip", "netns", "exec", NETNS, "cat",
                          f"/sys/class/net/{TAP}/statistics/{name}"],
                         check=True, capture_output=True, text=True).stdout
    return int(out)


def net_run(vmm, ms):
    cmdline = f"net=1 netbench={ms} fill=1 passes=1 hb=0"
    if vmm == "fabvm":
        cmd = [FABVM, "--kernel", GUEST, "--mem", MEM, "--net", f"tap={TAP},mac={MAC}",
               "--cmdline", cmdline]
        ok = 0
    else:
        cmd = QEMU_BASE + ["-append", cmdline,
                           "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                           "-device", f"virtio-net-device,netdev=n0,mac={MAC}"]
        ok = 1
    before = tap_counter("rx_bytes")
    out = run_guest(["ip", "netns", "exec", NETNS] + cmd, ok)
    result = parse(out, "fabvm-guest: netbench ")["udp"]
    result["tap_rx_mb_s"] = (tap_counter("rx_bytes") - before) / (result["ms"] * 1000)
    return result


def summarize(samples):
    """Median, min, max of every metric of every phase."""
    out = {}
    for phase in samples[0]:
        out[phase] = {}
        for key in samples[0][phase]:
            values = sorted(s[phase][key] for s in samples)
            out[phase][key] = {"median": statistics.median(values), "min": values[0],
                               "max": values[-1]}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ms", type=int, default=2000, help="milliseconds per phase")
    parser.add_argument("--quick", action="store_true", help="3 runs of 1 s phases")
    parser.add_argument("--nice", type=int, default=-15, help="niceness of the VMMs (0: as is)")
    args = parser.parse_args()
    if args.nice:
        NICE.extend(["nice", "-n", str(args.nice)])
    runs, ms = (3, 1000) if args.quick else (args.runs, args.ms)
    ensure_tools()
    load_before = os.getloadavg()[0]
    qemu_version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    blk = {"fabvm": [], "qemu": []}
    net = {"fabvm": [], "qemu": []}
    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "target")) as tmp:
        image = os.path.join(tmp, "bench.raw")
        make_image(image)
        for i in range(runs):
            for vmm in ("fabvm", "qemu"):
                blk[vmm].append(blk_run(vmm, image, ms))
            print(f"blk run {i + 1}/{runs} done", file=sys.stderr)
    ns("netns", "add", NETNS)
    try:
        ns("-n", NETNS, "link", "set", "lo", "up")
        ns("-n", NETNS, "tuntap", "add", "dev", TAP, "mode", "tap")
        ns("-n", NETNS, "addr", "add", "10.0.0.1/24", "dev", TAP)
        ns("-n", NETNS, "link", "set", TAP, "up")
        for i in range(runs):
            for vmm in ("fabvm", "qemu"):
                net[vmm].append({"udp_tx": net_run(vmm, ms)})
            print(f"net run {i + 1}/{runs} done", file=sys.stderr)
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False)

    load_after = os.getloadavg()[0]
    summary = {"blk": {v: summarize(s) for v, s in blk.items()},
               "net": {v: summarize(s) for v, s in net.items()}}
    kvm = "kvm_pvm (nested)" if os.path.exists("/sys/module/kvm_pvm") else "kvm"
    cpu = ""
    with open("/proc/cpuinfo") as f:
        m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        cpu = m.group(1) if m else "unknown CPU"
    machine = f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {kvm}, kernel {platform.release()}"
    report = {"machine": machine, "qemu": qemu_version, "runs": runs, "ms_per_phase": ms,
              "nice": args.nice,
              "load_average": [load_before, load_after],
              "image_mib": IMAGE_MIB, "mem": MEM, "summary": summary,
              "samples": {"blk": blk, "net": net}}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "virtio.json"), "w") as f:
        json.dump(report, f, indent=2)

    def cell(s, digits=1):
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    lines = [f"virtio-mmio, test guest polling driver, 1 vCPU / {MEM}, one request in flight, "
             f"{ms} ms per phase, {runs} runs each at nice {args.nice}, median (min-max).",
             f"Machine: {machine}; {qemu_version}; load average {load_before:.1f} at the start, "
             f"{load_after:.1f} at the end.", "",
             "| block ({} MiB raw image, host page cache) | fabvm | QEMU microvm | fabvm/QEMU |"
             .format(IMAGE_MIB), "|---|---|---|---|"]
    labels = {"seq_write": "1 MiB sequential write", "seq_read": "1 MiB sequential read",
              "rand_write": "4 KiB random write", "rand_read": "4 KiB random read"}
    for phase, label in labels.items():
        for key, unit in (("mb_s", "MB/s"), ("lat_us", "mean latency µs")):
            f, q = summary["blk"]["fabvm"][phase][key], summary["blk"]["qemu"][phase][key]
            lines.append(f"| {label}, {unit} | {cell(f)} | {cell(q)} | "
                         f"{f['median'] / q['median']:.2f} |")
    lines += ["", "| net (tap, guest to host, 1514-byte UDP frames) | fabvm | QEMU microvm (vhost off) "
              "| fabvm/QEMU |", "|---|---|---|---|"]
    for key, label in (("mb_s", "guest-timed MB/s"), ("pps", "frames/s"),
                       ("tap_rx_mb_s", "MB/s counted at the tap")):
        f, q = summary["net"]["fabvm"]["udp_tx"][key], summary["net"]["qemu"]["udp_tx"][key]
        lines.append(f"| {label} | {cell(f, 0 if key == 'pps' else 1)} | "
                     f"{cell(q, 0 if key == 'pps' else 1)} | {f['median'] / q['median']:.2f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "virtio.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
