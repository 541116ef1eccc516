#!/usr/bin/env python3
"""Restore across the cluster (issue 13, "Measured" 2): host B restores a snapshot whose
pages are all on host C and partly on host A, pulling only what its empty store lacks from
the hosts whose summaries claim them. Bytes from each host, time, and the lower bound.

Layout (the drain benchmark's, `cluster_drain.Star`): hosts h0 = B, h1 = A, h2 = C in network
namespaces on a bridge, each link shaped to --rate-mbit; etcd in the switch namespace; agents
(`fabvm host serve --store`) on A and C. C snapshots a test guest (--mem, --fill MiB filled,
--share % of its pages from a shared class) into its store; A snapshots a sibling of the
same class into its own, so A holds about --share % of the pages. B runs
`fabvm --restore SNAP --store EMPTY --etcd URL --key KEY --json` and must end with the guest
verifying all its memory. Figures: the restore's pull report (pages and bytes per host, time)
and each host's transmitted bytes on its link during the restore.

    /usr/bin/python3 bench/cluster_restore.py            # 1 GiB guest, 512 MiB filled, 50%, 3 runs
    /usr/bin/python3 bench/cluster_restore.py --quick    # smoke test: 128 MiB, 32 MiB filled, 1 run

Results: bench/results/cluster-restore.{json,md}. Needs root, etcd and the release fabvm.
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
from cluster_drain import (SWITCH_ADDR, Star, cluster_cmd, kill_registered, prepare,  # noqa: E402
                           start_agent, start_etcd, write_report)
from common import Console, spread  # noqa: E402

B, A, C = 0, 1, 2
NAMES = {B: "B", A: "A", C: "C"}


def host_tx(star, i):
    return int(subprocess.run(["ip", "netns", "exec", star.ns[i], "cat",
                               "/sys/class/net/eth0/statistics/tx_bytes"],
                              capture_output=True, text=True, check=True).stdout)


def restore_once(a, work):
    key = os.path.join(work, "key")
    with open(key, "w") as f:
        f.write(os.urandom(32).hex())
    etcd = f"http://{SWITCH_ADDR}:2379"
    runtimes = [os.path.join(work, f"h{i}", "run") for i in range(3)]
    common.at_cleanup(lambda: kill_registered(runtimes))
    etcd_dir = tempfile.mkdtemp(prefix="fabvm-cr-etcd-", dir="/dev/shm")
    common.at_cleanup(lambda: shutil.rmtree(etcd_dir, ignore_errors=True))
    with Star(a.rate_mbit) as star:
        try:
            return restore_in(a, work, key, etcd, star, etcd_dir)
        finally:
            kill_registered(runtimes)
            star.close()
            shutil.rmtree(etcd_dir, ignore_errors=True)


def restore_in(a, work, key, etcd, star, etcd_dir):
    start_etcd(star, etcd, etcd_dir, work)
    env = []
    for i in range(3):
        os.makedirs(os.path.join(work, f"h{i}", "run"), exist_ok=True)
        env.append(dict(os.environ, FABVM_RUNTIME_DIR=os.path.join(work, f"h{i}", "run"),
                        FABVM_IMAGE_DIR=os.path.join(work, f"h{i}", "images")))

    def snapshot(i, seed, snap):
        """Boots a guest on host i, snapshots it into the host's store, stops it."""
        sock = os.path.join(work, f"g{i}.sock")
        cmdline = f"passes=0 hb=100 fill={a.fill} seed={seed} share={a.share} sseed=177"
        proc = star.spawn(star.ns[i], [common.FABVM, "--kernel", common.GUEST, "--mem", a.mem,
                                       "--cmdline", cmdline, "--api-sock", sock, "--store",
                                       os.path.join(work, f"h{i}", "store")],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=open(os.path.join(work, f"g{i}.stderr"), "w"), env=env[i])
        Console(proc).wait("ready", 600)
        common.fabvm_ctl(sock, "snapshot", snap)
        proc.kill()
        proc.wait(30)

    snap = os.path.join(work, "snap")
    snapshot(C, 51, snap)
    snapshot(A, 52, os.path.join(work, "sibling"))
    for i in (A, C):
        start_agent(star, i, key, etcd, work, env[i])
    deadline = time.time() + 300
    while True:
        ok, hosts, err = cluster_cmd(star, key, etcd, "hosts")
        seen = {h["name"]: h for h in hosts.get("hosts", [])}
        if ok and all(seen.get(f"h{i}", {}).get("summary_generation", 0) > 0 for i in (A, C)):
            break
        if time.time() > deadline:
            raise RuntimeError(f"agents never published summaries: {hosts} {err}")
        time.sleep(1)
    before = {i: host_tx(star, i) for i in (B, A, C)}
    t0 = time.time()
    proc = star.spawn(star.ns[B], [common.FABVM, "--restore", snap, "--store",
                                   os.path.join(work, "h0", "store"), "--etcd", etcd, "--key", key,
                                   "--json"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=open(os.path.join(work, "restore.stderr"), "w"), env=env[B])
    con = Console(proc)
    con.wait("heartbeat", 600)
    started = time.time() - t0
    wire = {NAMES[i]: host_tx(star, i) - before[i] for i in (B, A, C)}
    con.wait("verify ok", 600)
    proc.kill()
    proc.wait(30)
    report = None
    with open(os.path.join(work, "restore.stderr")) as f:
        for line in f:
            try:
                report = json.loads(line).get("pull") or report
            except ValueError:
                pass
    if report is None:
        raise RuntimeError("the restore printed no pull report")
    by_name = {f"h{i}": NAMES[i] for i in (A, C)}
    return {"start_s": started, "pull_ms": report["ms"], "wanted": report["wanted"],
            "fetched": report["fetched"], "missing": report["missing"], "wire_bytes": wire,
            "hosts": {by_name.get(h["name"], h["name"]): {k: h[k] for k in ("asked", "pages", "misses", "bytes")}
                      for h in report["hosts"]}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 128M guest, 32 MiB filled, 1 run")
    p.add_argument("--mem", default="1G")
    p.add_argument("--fill", type=int, default=512, help="MiB the guest fills")
    p.add_argument("--share", type=int, default=50, help="%% of the pages A's sibling holds too")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rate-mbit", type=float, default=1000)
    p.add_argument("--fabvm", help="fabvm binary [default: target/release/fabvm]")
    p.add_argument("--out", default=common.RESULTS)
    a = p.parse_args()
    prepare(a, "cluster_restore")
    load_before = common.load_average()
    runs = []
    for r in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="fabvm-cr-") as work:
            res = restore_once(a, work)
        print(f"run {r + 1}: guest running after {res['start_s']:.2f} s, pull {res['pull_ms'] / 1000:.2f} s, "
              f"{res['fetched']}/{res['wanted']} pages, A {res['hosts'].get('A', {}).get('pages', 0)}, "
              f"C {res['hosts'].get('C', {}).get('pages', 0)}, wire {res['wire_bytes']}", file=sys.stderr, flush=True)
        runs.append(res)
    report = {
        "model": {k: v for k, v in vars(a).items() if k not in ("out", "quick", "fabvm")},
        "quick": a.quick, "runs": runs,
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": load_before,
                 "load_after": common.load_average(), "command": " ".join(sys.argv),
                 "machine": common.machine()},
    }
    name = "cluster-restore" + ("-quick" if a.quick else "")
    write_report(a.out, name, report, markdown(report))


def markdown(r):
    m, runs = r["model"], r["runs"]
    mib = 2 ** 20
    lines = [f"Restore on B of a snapshot taken on C ({m['mem']}, {m['fill']} MiB filled; A holds a sibling's "
             f"snapshot sharing {m['share']}% of its pages), links {m['rate_mbit']:g} Mbit/s, B's store empty; "
             f"median (min-max) over {len(runs)} run(s); {r['meta']['date']}, load average "
             f"{' '.join(map(str, r['meta']['load_before']))} before, "
             f"{' '.join(map(str, r['meta']['load_after']))} after.", "",
             "| | median (min-max) |", "|---|---|"]

    def row(label, values, fmt):
        s = spread(values)
        lines.append(f"| {label} | {fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])}) |")
    row("pages B lacked (distinct, non-zero)", [x["wanted"] for x in runs], lambda v: f"{v:.0f}")
    for h in ("A", "C"):
        row(f"pages from {h}", [x["hosts"].get(h, {}).get("pages", 0) for x in runs], lambda v: f"{v:.0f}")
        row(f"sent by {h} on its link (MiB)", [x["wire_bytes"][h] / mib for x in runs], lambda v: f"{v:.1f}")
    row("pages missing", [x["missing"] for x in runs], lambda v: f"{v:.0f}")
    row("pull time (s)", [x["pull_ms"] / 1000 for x in runs], lambda v: f"{v:.2f}")
    row("restore started to the guest's first heartbeat (s)", [x["start_s"] for x in runs], lambda v: f"{v:.2f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
