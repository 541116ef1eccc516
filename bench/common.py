"""What every benchmark scenario shares: paths, tools, the machine, consoles, QMP, statistics."""
import atexit
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guest-images", "out", "test-guest.elf")
FABVM = os.path.join(ROOT, "target", "release", "fabvm")
RESULTS = os.path.join(ROOT, "bench", "results")
QEMU = "qemu-system-x86_64"


_children = []   # processes started by the harness, killed when it exits
_cleanups = []   # further clean-ups (network namespaces), run after the children are gone


def popen(cmd, **kwargs):
    """subprocess.Popen, with the process killed when the harness exits (also on errors,
    Ctrl-C, SIGTERM and SIGHUP)."""
    proc = subprocess.Popen(cmd, **kwargs)
    _children[:] = [p for p in _children if p.poll() is None] + [proc]
    return proc


def at_cleanup(fn):
    _cleanups.append(fn)


def reap():
    """Kills every process the harness started that still runs."""
    for proc in _children:
        if proc.poll() is None:
            proc.kill()
    for proc in _children:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    _children.clear()


def _cleanup():
    reap()
    for fn in reversed(_cleanups):
        fn()


def _on_signal(signum, frame):
    sys.exit(128 + signum)  # unwinds, then atexit runs _cleanup


atexit.register(_cleanup)
for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


def apt_install(*packages):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def ensure_tools():
    """Builds fabvm and the test guest, installs QEMU from Debian when missing."""
    subprocess.run(["bash", os.path.join(ROOT, "guest-images", "build-test-guest.sh")],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "vmm", "--bin", "fabvm"],
                   check=True, cwd=ROOT)
    if shutil.which(QEMU) is None:
        apt_install("qemu-system-x86")


def qemu_version():
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0]


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def machine():
    """The machine a run is on, for every report."""
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    kvm = "kvm_pvm (nested, shadow paging)" if os.path.exists("/sys/module/kvm_pvm") else \
        "kvm_intel" if os.path.exists("/sys/module/kvm_intel") else \
        "kvm_amd" if os.path.exists("/sys/module/kvm_amd") else "kvm"
    return {"host": platform.node(), "cores": os.cpu_count(), "cpu": cpu,
            "mem_gib": round(mem_gib, 1), "kvm": kvm, "kernel": platform.release(),
            "qemu": qemu_version()}


def describe_machine(m):
    return (f"{m['host']}: {m['cores']} cores ({m['cpu']}), {m['mem_gib']:g} GiB, {m['kvm']}, "
            f"kernel {m['kernel']}; {m['qemu']}")


def spread(values):
    """Median and range of a list of numbers (None entries dropped); None when empty."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return {"median": statistics.median(values), "min": values[0], "max": values[-1], "n": len(values)}


def summarize(samples):
    """Per key of a list of dicts: spread of the values."""
    return {key: spread([s.get(key) for s in samples]) for key in samples[0]} if samples else {}


def cell(s, digits=1, scale=1.0):
    """'median (min-max)' for a spread, '-' for none, just the median for one sample."""
    if not s:
        return "-"
    f = f"{{:.{digits}f}}"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f.format(s["median"] * scale)
    return f"{f.format(s['median'] * scale)} ({f.format(s['min'] * scale)}-{f.format(s['max'] * scale)})"


def ratio(a, b, digits=2):
    if not a or not b or not b["median"]:
        return "-"
    return f"{a['median'] / b['median']:.{digits}f}"


class Console:
    """Reads a process's stdout on a thread and keeps each line with its arrival time."""

    def __init__(self, proc):
        self.proc = proc
        self.lines = []  # (time, text)
        self.first_byte = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        buf = b""
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            now = time.time()
            with self.cond:
                if chunk and self.first_byte is None:
                    self.first_byte = now
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self.lines.append((now, line.decode(errors="replace")))
                if not chunk:
                    if buf:
                        self.lines.append((now, buf.decode(errors="replace")))
                    self.lines.append((now, None))  # end of output
                self.cond.notify_all()
            if not chunk:
                return

    def wait(self, needle, timeout=120, after=0):
        """Returns (time, index) of the first line at or past index `after` containing
        `needle` (a string or compiled regex)."""
        match = needle.search if hasattr(needle, "search") else (lambda s: needle in s)
        deadline = time.time() + timeout
        i = after
        with self.cond:
            while True:
                while i < len(self.lines):
                    t, text = self.lines[i]
                    if text is None:
                        raise RuntimeError(f"output ended before {needle!r}:\n{self.tail()}")
                    if match(text):
                        return t, i
                    i += 1
                left = deadline - time.time()
                if left <= 0:
                    raise RuntimeError(f"no {needle!r} within {timeout} s:\n{self.tail()}")
                self.cond.wait(left)

    def last(self, needle):
        """Time and text of the last line so far containing `needle`, or (None, None)."""
        with self.cond:
            for t, text in reversed(self.lines):
                if text is not None and needle in text:
                    return t, text
        return None, None

    def count(self):
        with self.cond:
            return len(self.lines)

    def text(self):
        with self.cond:
            return "\n".join(t for _, t in self.lines if t is not None)

    def tail(self, n=15):
        return "\n".join(self.text().splitlines()[-n:])


class Qmp:
    """A QMP client on a Unix socket: call(command, **arguments) returns `return` or raises."""

    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.time() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rw")
        self.file.readline()
        self.call("qmp_capabilities")

    def call(self, cmd, **args):
        self.file.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError(f"QMP connection closed during {cmd}")
            msg = json.loads(line)
            if "error" in msg:
                raise RuntimeError(f"QMP {cmd}: {msg['error'].get('desc', msg)}")
            if "return" in msg:
                return msg["return"]

    def close(self):
        self.sock.close()


def qemu_base(mem, cmdline, qmp_sock, cpus=1, memfd=False):
    """QEMU's command for the test guest with its best settings for these benchmarks:
    microvm, KVM, the host CPU, no default devices or config, console on stdout, QMP.
    `memfd`: guest RAM from a memfd (no transparent huge pages), QEMU's best for migration
    here (see migrate.py)."""
    # No +invtsc: QEMU refuses to migrate or save a VM with it; the guest then calibrates its
    # TSC against the PIT, which costs a little at boot and nothing afterwards.
    # -arch-capabilities: QEMU 7.2 sets MSR 0x10a from `-cpu host`, which this host's KVM
    # (kvm_pvm on 6.18) refuses, and then aborts at start.
    machine = ["-M", "microvm,memory-backend=ram", "-object", f"memory-backend-memfd,id=ram,size={mem}"] \
        if memfd else ["-M", "microvm"]
    return [QEMU, *machine, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-smp", str(cpus),
            "-m", mem, "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", GUEST, "-append", cmdline,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-qmp", f"unix:{qmp_sock},server=on,wait=off"]


def fabvm_ctl(sock, *args, timeout=600):
    out = subprocess.run([FABVM, "ctl", "--api-sock", sock, "--json", *args], capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"fabvm ctl {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def wait_identities_current(sock, timeout=60):
    """Waits until a fabvm VM's live identities have caught up with its writes (`ctl stats`:
    no stale page), as for a VM that has run a few seconds since it last filled memory.
    Returns the seconds waited."""
    t0 = time.time()
    while True:
        stale = fabvm_ctl(sock, "stats").get("identities", {}).get("stale")
        if stale == 0:
            return time.time() - t0
        if time.time() - t0 > timeout:
            raise RuntimeError(f"identities still {stale} pages stale after {timeout} s")
        time.sleep(0.1)


def fabvm_has(subcommand):
    """Whether this build of fabvm has a subcommand (`fabvm SUB --help` succeeds)."""
    try:
        return subprocess.run([FABVM, subcommand, "--help"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def du(path):
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True).stdout.split()[0])


def mib(s):
    """'2G' / '256M' -> MiB."""
    m = re.fullmatch(r"(\d+)([MG])", s)
    return int(m.group(1)) * (1024 if m.group(2) == "G" else 1)
