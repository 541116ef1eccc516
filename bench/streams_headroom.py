#!/usr/bin/env python3
"""Whether parallel streams could help here (issue 12, point 4): one TCP connection's rate
over the benchmark's unshaped veth (python, 4 MiB writes, 4 GiB) and both cores' use during
it, against fabvm migrating a 1 GiB guest holding 512 MiB of unique pages over the same veth,
with both cores' use sampled every 100 ms during the migration (two runs). Parallel streams
pay where one connection or one core is the limit; this shows which limit binds.
`python3 bench/streams_headroom.py`; prints JSON. Run it alone on the machine."""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import migrate  # noqa: E402
from identities import LINKS  # noqa: E402
from netns import LinkPair  # noqa: E402



def cpu_times():
    """(all, idle) jiffies of every CPU together, from /proc/stat."""
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    return sum(v), v[3] + v[4]


class Sampler(threading.Thread):
    """Both cores' busy fraction every 100 ms until `stop`."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = False
        self.samples = []

    def run(self):
        t0, i0 = cpu_times()
        while not self.stop:
            time.sleep(0.1)
            t1, i1 = cpu_times()
            if t1 > t0:
                self.samples.append(1 - (i1 - i0) / (t1 - t0))
            t0, i0 = t1, i1

    def finish(self):
        self.stop = True
        self.join()
        return self.samples


RECV = """import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
c, _ = s.accept()
m = memoryview(bytearray(1 << 20))
while c.recv_into(m):
    pass
"""
SEND = """import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
b, n, t = b"x" * (4 << 20), 0, time.time()
while n < (4 << 30):
    c.sendall(b)
    n += len(b)
c.close()
print(n / (time.time() - t) / 1e6)
"""


def main():
    common.ensure_tools()
    out = {"load_before": common.load_average()}
    with LinkPair(LINKS["loopback"], tag="streams") as net:
        rp = net.spawn("dst", ["python3", "-c", RECV, net.addr("dst"), "7400"])
        time.sleep(0.5)
        smp = Sampler()
        smp.start()
        s = subprocess.run(["ip", "netns", "exec", net.ns["src"], "python3", "-c", SEND, net.addr("dst"),
                            "7400"], capture_output=True, text=True, check=True)
        busy = smp.finish()
        out["tcp_one_stream_MBps"] = float(s.stdout.strip())
        out["tcp_cpu_busy"] = sum(busy) / max(1, len(busy))
        rp.wait(10)
        sc = [x for x in migrate.scenarios(512) if x.name == "random"][0]
        orig = subprocess.run
        for run in range(2):
            smp = Sampler()

            def sampled(cmd, *a, **k):
                if isinstance(cmd, list) and "migrate" in cmd:
                    smp.start()
                    try:
                        return orig(cmd, *a, **k)
                    finally:
                        smp.finish()
                return orig(cmd, *a, **k)
            migrate.subprocess.run = sampled
            try:
                r = migrate.fabvm_migrate(net, sc, "1G", tempfile.mkdtemp(prefix="fabvm-streams-"), 7500 + run)
            finally:
                migrate.subprocess.run = orig
            net.stop_processes()
            b = smp.samples
            row = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
            row["cpu_busy_mean"] = sum(b) / max(1, len(b))
            row["cpu_busy_min"] = round(min(b), 2) if b else None
            out[f"fabvm_run{run}"] = row
    out["load_after"] = common.load_average()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
