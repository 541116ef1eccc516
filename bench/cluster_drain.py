#!/usr/bin/env python3
"""Cluster drain benchmark (issue 13, "Measured" 2): four hosts in network namespaces on
1 Gbit/s links; host h0 runs four test guests and is drained (`fabvm cluster drain h0`).
Total time and bytes on the wire with overlap-aware placement, against random placement
(`--placement random`), and against QEMU (the sum of four per-VM migrations of the same
guests over the same link; QEMU does not use pages already at the destination).

Layout: namespaces h0..h3 (10.98.0.1-4) joined through a bridge in a fifth namespace, the
"switch" (10.98.0.254), which also runs etcd and the operator's `fabvm cluster` commands.
Each host's link is shaped to --rate-mbit (tc tbf, both directions). Every host has its own
VM registry (FABVM_RUNTIME_DIR), store and agent (`fabvm host serve`). The four guests on h0
fill --fill MiB each; guest i shares --share % of its pages with a sibling running on host
1 + (i mod 3) (the test guest's shared class: same `sseed`), so the host holding a guest's
pages differs per guest, and random placement often misses it. Bytes on the wire: the sum
of every host's transmitted bytes (host side of its link) during the drain.

    /usr/bin/python3 bench/cluster_drain.py --quick      # smoke test: 128 MiB guests, 32 MiB filled
    /usr/bin/python3 bench/cluster_drain.py              # full: 2 GiB guests, 1 GiB filled, 3 runs

Results: bench/results/cluster-drain.{json,md}. Needs root, etcd, qemu-system-x86 (unless
--no-qemu) and the release fabvm (`cargo build --release`; or --fabvm PATH).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import Console, spread  # noqa: E402

HOSTS = 4
SWITCH_ADDR = "10.98.0.254"
AGENT_PORT = 7100


def addr(i):
    return f"10.98.0.{i + 1}"


def run(*cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


class Star:
    """HOSTS namespaces joined by a bridge in a switch namespace; a context manager that
    removes everything (processes first) on exit."""

    def __init__(self, rate_mbit):
        tag = f"{os.getpid()}"
        self.sw = f"fabvm-cd-{tag}-sw"
        self.ns = [f"fabvm-cd-{tag}-h{i}" for i in range(HOSTS)]
        self.rate = rate_mbit
        self.procs = []

    def __enter__(self):
        common.at_cleanup(self.close)
        try:
            run("ip", "netns", "add", self.sw)
            run("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
            run("ip", "-n", self.sw, "addr", "add", f"{SWITCH_ADDR}/24", "dev", "br0")
            run("ip", "-n", self.sw, "link", "set", "br0", "up")
            run("ip", "-n", self.sw, "link", "set", "lo", "up")
            for i, ns in enumerate(self.ns):
                run("ip", "netns", "add", ns)
                run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}",
                    "netns", self.sw)
                run("ip", "-n", ns, "addr", "add", f"{addr(i)}/24", "dev", "eth0")
                for n, dev in ((ns, "eth0"), (self.sw, f"p{i}")):
                    run("ip", "-n", n, "link", "set", dev, "up")
                    if self.rate:
                        rate_bytes = self.rate * 1e6 / 8
                        burst = int(max(rate_bytes / 100, 131072))
                        limit = int(max(rate_bytes * 0.05, 2 * burst))
                        run("ip", "netns", "exec", n, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                            "rate", f"{self.rate:g}mbit", "burst", str(burst), "limit", str(limit))
                run("ip", "-n", self.sw, "link", "set", f"p{i}", "master", "br0")
                run("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def spawn(self, ns, cmd, **kwargs):
        proc = common.popen(["ip", "netns", "exec", ns, *cmd], **kwargs)
        self.procs.append(proc)
        return proc

    def tx_bytes(self):
        return sum(int(run("ip", "netns", "exec", ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes"))
                   for ns in self.ns)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []
        for ns in [*self.ns, self.sw]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def guest_cmdline(i, fill, share, hb):
    # Guest i's shared class is that of its sibling's host (1 + i mod 3).
    return f"passes=0 hb={hb} fill={fill} seed={200 + i} share={share} sseed={0xA0 + 1 + i % 3}"


def sibling_cmdline(host, fill, share, hb):
    return f"passes=0 hb={hb} fill={fill} seed={300 + host} share={share} sseed={0xA0 + host}"


def cluster_cmd(star, key, etcd, *args, timeout=3600):
    out = subprocess.run(["ip", "netns", "exec", star.sw, common.FABVM, "cluster", "--etcd", etcd,
                          "--key", key, "--json", *args], capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.stdout) if out.stdout.strip() else {}
    return out.returncode == 0, report, out.stderr.strip()


def drain_once(a, placement, seed, work):
    """Sets up the four hosts, drains h0 with `placement`; returns the figures."""
    key = os.path.join(work, "key")
    with open(key, "w") as f:
        f.write(os.urandom(32).hex())
    etcd = f"http://{SWITCH_ADDR}:2379"
    runtimes = [os.path.join(work, f"h{i}", "run") for i in range(HOSTS)]
    # The VMs the agents received are theirs, not the harness's: killed by pid at the end.
    common.at_cleanup(lambda: kill_registered(runtimes))
    # etcd's data on tmpfs (fsyncs on a busy disk make lease grants take seconds).
    etcd_dir = tempfile.mkdtemp(prefix="fabvm-cd-etcd-", dir="/dev/shm")
    common.at_cleanup(lambda: shutil.rmtree(etcd_dir, ignore_errors=True))
    with Star(a.rate_mbit) as star:
        try:
            return drain_in(a, placement, seed, work, key, etcd, star, etcd_dir)
        finally:
            kill_registered(runtimes)
            star.close()
            shutil.rmtree(etcd_dir, ignore_errors=True)


def kill_registered(runtimes):
    """Kills the VMs registered in the hosts' VM registries and the receivers the agents
    started (their pids are in the registries, `recv-*.sock` owners are found by name)."""
    pids = set()
    for run_dir in runtimes:
        for name in os.listdir(os.path.join(run_dir, "vms")) if os.path.isdir(os.path.join(run_dir, "vms")) else []:
            if name.endswith(".json") and name[:-5].isdigit():
                pids.add(int(name[:-5]))
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if b"receive" in cmd and any(r.encode() in arg for r in runtimes for arg in cmd):
                pids.add(int(proc))
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def start_etcd(star, etcd, etcd_dir, work):
    """A single-node etcd in the switch namespace, its data in `etcd_dir`."""
    star.spawn(star.sw, ["etcd", "--name", "cd", "--data-dir", os.path.join(etcd_dir, "data"),
                         "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
                         "--listen-peer-urls", f"http://{SWITCH_ADDR}:2380",
                         "--initial-advertise-peer-urls", f"http://{SWITCH_ADDR}:2380",
                         "--initial-cluster", f"cd=http://{SWITCH_ADDR}:2380",
                         "--auto-compaction-retention=5m"],
               stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "etcd.log"), "w"))


def start_agent(star, i, key, etcd, work, env):
    """Host i's agent (`fabvm host serve`) over its store, summaries refreshed every second."""
    star.spawn(star.ns[i], [common.FABVM, "host", "serve", "--name", f"h{i}", "--listen",
                            f"{addr(i)}:{AGENT_PORT}", "--key", key, "--etcd", etcd, "--store",
                            os.path.join(work, f"h{i}", "store"), "--refresh", "1",
                            "--publish-every", "1"],
               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
               stderr=open(os.path.join(work, f"agent{i}.log"), "w"), env=env)


def drain_in(a, placement, seed, work, key, etcd, star, etcd_dir):
    """drain_once's body, inside the namespaces."""
    start_etcd(star, etcd, etcd_dir, work)
    env, socks, consoles = [], [], []
    for i in range(HOSTS):
        d = os.path.join(work, f"h{i}")
        os.makedirs(os.path.join(d, "run"), exist_ok=True)
        env.append(dict(os.environ, FABVM_RUNTIME_DIR=os.path.join(d, "run")))

    def guest(i, name, cmdline):
        sock = os.path.join(work, f"{name}.sock")
        err = open(os.path.join(work, f"{name}.stderr"), "w")
        proc = star.spawn(star.ns[i], [common.FABVM, "--kernel", common.GUEST, "--mem", a.mem,
                                       "--cmdline", cmdline, "--api-sock", sock, "--store",
                                       os.path.join(work, f"h{i}", "store")],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env[i])
        con = Console(proc)
        con.wait("ready", 600)
        return sock, con

    for h in range(1, HOSTS):
        socks.append(guest(h, f"sibling{h}", sibling_cmdline(h, a.fill, a.share, a.hb))[0])
    for i in range(a.vms):
        sock, con = guest(0, f"vm{i}", guest_cmdline(i, a.fill, a.share, a.hb))
        socks.append(sock)
        consoles.append(con)
    for i in range(HOSTS):
        start_agent(star, i, key, etcd, work, env[i])
    for sock in socks:
        common.wait_identities_current(sock, timeout=300)
    # The summaries have caught up when an overlap plan finds each guest's pages.
    deadline = time.time() + 300
    while True:
        ok, plan, err = cluster_cmd(star, key, etcd, "drain", "h0", "--dry-run")
        moves = plan.get("moves", [])
        if ok and len(moves) == a.vms and all(m["held"] >= a.share / 100 * 0.8 for m in moves):
            break
        if time.time() > deadline:
            raise RuntimeError(f"summaries never caught up: {plan} {err}")
        time.sleep(1)
    before = star.tx_bytes()
    t0 = time.time()
    args = ["drain", "h0", "--placement", placement] + (["--seed", str(seed)] if seed is not None else [])
    ok, report, err = cluster_cmd(star, key, etcd, *args)
    wall = time.time() - t0
    wire = star.tx_bytes() - before
    verified = 0
    for m in report.get("moves", []):
        if m.get("ok") and m.get("console"):
            verified += wait_console(m["console"], "verify ok", 300)
    return {"ok": ok, "error": None if ok else err, "wall_s": wall, "wire_bytes": wire,
            "vmm_bytes": report.get("bytes"), "migrations_ms": report.get("ms"),
            "moved": report.get("moved"), "verified": verified,
            "moves": [{k: m.get(k) for k in ("pid", "to", "held", "bytes", "ms", "ok", "error")}
                      for m in report.get("moves", [])]}


def wait_console(path, needle, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            text = ""
        if "FAILED" in text:
            return 0
        if needle in text:
            return 1
        time.sleep(0.2)
    return 0


def qemu_sum(a, work, run):
    """The four guests migrated one by one by QEMU over one link of the same rate."""
    import migrate
    from netns import Link, LinkPair
    total_s, wire, runs = 0.0, 0, []
    for i in range(a.vms):
        sc = migrate.Scenario(f"vm{i}", f"guest {i}", guest_cmdline(i, a.fill, a.share, a.hb),
                              fill_mib=a.fill)
        d = os.path.join(work, f"qemu{run}-{i}")
        os.makedirs(d)
        with LinkPair(Link("cd", a.rate_mbit, 0), tag=f"cd{i}") as net:
            res = migrate.qemu_migrate(net, sc, "qemu", a.mem, d, 7300 + i)
        if "error" in res:
            raise RuntimeError(f"QEMU migration of guest {i}: {res['error']}")
        runs.append(res)
        total_s += res["total_s"]
        wire += res["wire_bytes"]
    return {"total_s": total_s, "wire_bytes": wire, "verified": sum(bool(r.get("verified")) for r in runs)}


def prepare(a, name):
    """Applies --quick (128 MiB guests, 32 MiB filled, one run) and --fabvm; exits with one
    line without root or a tool."""
    if a.quick:
        a.mem, a.fill, a.runs = "128M", 32, 1
    if a.fabvm:
        common.FABVM = os.path.abspath(a.fabvm)
    if os.geteuid() != 0:
        sys.exit(f"{name}: needs root (network namespaces)")
    for tool in ("etcd", common.FABVM):
        if not shutil.which(tool):
            sys.exit(f"{name}: {tool} not found")


def write_report(out, name, report, text):
    """Writes `out/name.json` (the report) and `out/name.md` (its table), prints the table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, name + ".md"), "w") as f:
        f.write(text)
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 128M guests, 32 MiB filled, 1 run")
    p.add_argument("--mem", default="2G")
    p.add_argument("--fill", type=int, default=1024, help="MiB each guest fills")
    p.add_argument("--share", type=int, default=80, help="%% of a guest's pages its sibling holds")
    p.add_argument("--vms", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rate-mbit", type=float, default=1000)
    p.add_argument("--hb", type=int, default=100)
    p.add_argument("--no-qemu", action="store_true")
    p.add_argument("--fabvm", help="fabvm binary [default: target/release/fabvm]")
    p.add_argument("--out", default=common.RESULTS)
    a = p.parse_args()
    prepare(a, "cluster_drain")
    started = time.time()
    load_before = common.load_average()
    results = {"overlap": [], "random": []}
    for r in range(a.runs):
        for placement in ("overlap", "random"):
            with tempfile.TemporaryDirectory(prefix="fabvm-cd-") as work:
                res = drain_once(a, placement, 1000 + r if placement == "random" else None, work)
            print(f"run {r + 1} {placement}: {res['wall_s']:.2f} s, {res['wire_bytes'] / 2**20:.1f} MiB, "
                  f"moved {res['moved']}, verified {res['verified']}", file=sys.stderr, flush=True)
            results[placement].append(res)
    qemu = None
    if not a.no_qemu:
        with tempfile.TemporaryDirectory(prefix="fabvm-cd-q-") as work:
            qemu = [qemu_sum(a, work, r) for r in range(a.runs)]
            for r, q in enumerate(qemu):
                print(f"run {r + 1} qemu: {q['total_s']:.2f} s, {q['wire_bytes'] / 2**20:.1f} MiB, "
                      f"verified {q['verified']}", file=sys.stderr, flush=True)
    report = {
        "model": {k: v for k, v in vars(a).items() if k not in ("out", "quick", "fabvm")},
        "quick": a.quick,
        "summary": {pl: {"wall_s": spread([x["wall_s"] for x in rs]),
                         "wire_bytes": spread([x["wire_bytes"] for x in rs])} for pl, rs in results.items()},
        "runs": results,
        "qemu": qemu and {"total_s": spread([q["total_s"] for q in qemu]),
                          "wire_bytes": spread([q["wire_bytes"] for q in qemu]), "runs": qemu},
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "duration_s": round(time.time() - started),
                 "load_before": load_before, "load_after": common.load_average(),
                 "command": " ".join(sys.argv), "machine": common.machine()},
    }
    name = "cluster-drain" + ("-quick" if a.quick else "")
    write_report(a.out, name, report, markdown(report))


def markdown(r):
    m = r["model"]
    s = r["summary"]
    lines = [f"Drain of a host running {m['vms']} test guests ({m['mem']}, {m['fill']} MiB filled, {m['share']}% "
             f"of each guest's pages held by a sibling on one of the three other hosts), links {m['rate_mbit']:g} "
             f"Mbit/s; median (min-max) over {m['runs']} run(s); {r['meta']['date']}, load average "
             f"{' '.join(map(str, r['meta']['load_before']))} before, {' '.join(map(str, r['meta']['load_after']))} after.", "",
             "| | total time (s) | on the wire (MiB) |", "|---|---|---|"]

    def row(label, t, b):
        lines.append(f"| {label} | {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f}) | "
                     f"{b['median'] / 2**20:.1f} ({b['min'] / 2**20:.1f}-{b['max'] / 2**20:.1f}) |")
    row("fabvm drain, overlap-aware placement", s["overlap"]["wall_s"], s["overlap"]["wire_bytes"])
    row("fabvm drain, random placement", s["random"]["wall_s"], s["random"]["wire_bytes"])
    if r["qemu"]:
        row("QEMU, sum of per-VM migrations", r["qemu"]["total_s"], r["qemu"]["wire_bytes"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
