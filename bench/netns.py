"""Two hosts on one machine: network namespaces joined by a veth pair, a shaped link.

    with LinkPair(Link("1g-10ms", rate_mbit=1000, delay_ms=10)) as net:
        net.spawn("dst", [...])            # a process inside the destination namespace
        port = net.connect_port(7000)      # what the source dials: the relay when delayed
        before = net.counters()            # bytes each side has put on the wire
        ...
        wire = net.counters() - before

The source namespace holds `veth-src` (10.99.0.1/24), the destination `veth-dst`
(10.99.0.2/24). Rate limits are `tc` token-bucket filters (tbf) on both interfaces'
egress. This kernel has no netem, so delay comes from `relay.py` running in the source
namespace: the source dials 127.0.0.1:<port> there and the relay forwards over the veth to
the destination, holding each chunk D ms in each direction (round trip 2D) without
reducing the bandwidth. Namespace names carry the harness's pid; everything started in
them is killed and the namespaces are removed on exit, including on errors and signals.
"""
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import common

SRC_ADDR, DST_ADDR = "10.99.0.1", "10.99.0.2"
RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")
_live = []  # LinkPairs not yet torn down, for atexit and signals


@dataclass(frozen=True)
class Link:
    """A link between the two namespaces: rate in Mbit/s (None: unshaped veth) and one-way
    delay in ms added by the relay (0: no relay)."""
    name: str
    rate_mbit: float = None
    delay_ms: float = 0
    label: str = ""

    def describe(self):
        if self.label:
            return self.label
        rate = "unshaped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        return f"veth, {rate}" + (f", {self.delay_ms:g} ms each way" if self.delay_ms else "")


class Counters(dict):
    """tx bytes per side; subtracting gives the bytes of an interval."""

    def __sub__(self, other):
        return Counters({k: self[k] - other[k] for k in self})

    @property
    def total(self):
        return sum(self.values())


def _run(*cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


class LinkPair:
    """Source and destination namespaces for one link; a context manager."""

    def __init__(self, link, tag="0"):
        self.link = link
        self.ns = {"src": f"fabvm-bench-{os.getpid()}-{tag}-src",
                   "dst": f"fabvm-bench-{os.getpid()}-{tag}-dst"}
        self.dev = {"src": "veth-src", "dst": "veth-dst"}
        self.procs = []
        self.relay = None

    def __enter__(self):
        _live.append(self)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _create(self):
        src, dst = self.ns["src"], self.ns["dst"]
        _run("ip", "netns", "add", src)
        _run("ip", "netns", "add", dst)
        _run("ip", "link", "add", "veth-src", "netns", src, "type", "veth",
             "peer", "name", "veth-dst", "netns", dst)
        for side, addr in (("src", SRC_ADDR), ("dst", DST_ADDR)):
            ns, dev = self.ns[side], self.dev[side]
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if self.link.rate_mbit:
                # Burst: at least 10 ms of data at the rate (and two 64 KiB segments), so the
                # bucket does not throttle below the rate; queue: 50 ms at the rate.
                rate_bytes = self.link.rate_mbit * 1e6 / 8
                burst = int(max(rate_bytes / 100, 131072))
                limit = int(max(rate_bytes * 0.05, 2 * burst))
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", f"{self.link.rate_mbit:g}mbit", "burst", str(burst), "limit", str(limit))

    def spawn(self, side, cmd, **kwargs):
        """Starts `cmd` inside one side's namespace; it is killed on close()."""
        proc = common.popen(["ip", "netns", "exec", self.ns[side], *cmd], **kwargs)
        self.procs.append(proc)
        return proc

    def addr(self, side):
        return SRC_ADDR if side == "src" else DST_ADDR

    def connect_port(self, port):
        """Where the source dials to reach DST_ADDR:port: directly, or through a relay that
        adds the link's delay (started on first use, one per destination port)."""
        if not self.link.delay_ms:
            return (DST_ADDR, port)
        rate = (self.link.rate_mbit or 10000) * 1e6 / 8
        cap = int(max(4 << 20, 2 * rate * self.link.delay_ms / 1000))
        relay_port = port + 1000
        proc = self.spawn("src", [sys.executable, RELAY, "--listen", f"127.0.0.1:{relay_port}",
                                  "--to", f"{DST_ADDR}:{port}", "--delay-ms", str(self.link.delay_ms),
                                  "--max-buffer", str(cap)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"relay did not start: {line}{proc.stderr.read()}")
        return ("127.0.0.1", relay_port)

    def counters(self):
        """Bytes each side's interface has transmitted (read from its namespace's sysfs)."""
        out = Counters()
        for side in ("src", "dst"):
            path = f"/sys/class/net/{self.dev[side]}/statistics/tx_bytes"
            out[side] = int(_run("ip", "netns", "exec", self.ns[side], "cat", path))
        return out

    def stop_processes(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        self.procs = []

    def close(self):
        self.stop_processes()
        for ns in self.ns.values():
            # A namespace goes away once nothing holds it; the veth goes with it.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self in _live:
            _live.remove(self)


def _cleanup():
    for pair in list(_live):
        pair.close()


common.at_cleanup(_cleanup)


def measure_throughput(pair, seconds=3.0, port=5201):
    """Sends bulk data source -> destination for `seconds`; returns (Mbit/s, round trip ms)
    as the harness sees them (a self-check of the shaping and the relay)."""
    code = ("import socket,sys,time\n"
            "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "s.bind((sys.argv[1],int(sys.argv[2])));s.listen();print('up',flush=True)\n"
            "c,_=s.accept();c.recv(1);c.sendall(b'x');n=0\n"
            "while True:\n b=c.recv(1<<20)\n if not b: break\n n+=len(b)\n"
            "print(n,flush=True)\n")
    sink = pair.spawn("dst", [sys.executable, "-c", code, DST_ADDR, str(port)],
                      stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().startswith("up")
    host, cport = pair.connect_port(port)
    code = ("import socket,sys,time\n"
            "c=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n"
            "t=time.time();c.sendall(b'p');c.recv(1);rtt=time.time()-t\n"
            "buf=b'\\x55'*(1<<20);end=time.time()+float(sys.argv[3]);t=time.time();n=0\n"
            "while time.time()<end: c.sendall(buf);n+=len(buf)\n"
            "c.shutdown(socket.SHUT_WR);c.recv(1);print(n,time.time()-t,rtt)\n")
    out = pair.spawn("src", [sys.executable, "-c", code, host, str(cport), str(seconds)],
                     stdout=subprocess.PIPE, text=True)
    sent, elapsed, rtt = out.stdout.readline().split()
    received = int(sink.stdout.readline())
    return received * 8 / float(elapsed) / 1e6, float(rtt) * 1000


if __name__ == "__main__":
    # Self-check: python3 bench/netns.py RATE_MBIT DELAY_MS (0 for none)
    rate = float(sys.argv[1]) or None if len(sys.argv) > 1 else None
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0
    with LinkPair(Link("check", rate, delay)) as net:
        before = net.counters()
        t = time.time()
        mbit, rtt = measure_throughput(net)
        wire = net.counters() - before
        print(f"{net.link.describe()}: {mbit:.0f} Mbit/s, first round trip {rtt:.1f} ms, "
              f"wire src->dst {wire['src'] / 1e6:.1f} MB, dst->src {wire['dst'] / 1e6:.2f} MB "
              f"in {time.time() - t:.1f} s")
