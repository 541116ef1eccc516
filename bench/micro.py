"""Microbenchmarks of the memory fabric: `cargo bench -p fabric --bench fabric` (criterion),
collected from target/criterion/<group>/<bench>/new/{estimates,benchmark}.json.

Every benchmark the run wrote is collected (new groups, e.g. protocol encode/decode, appear
without changes here). Time per iteration is criterion's median estimate with its 95%
confidence interval; throughput is bytes (GiB/s) or elements (per second) per iteration.
Full mode only: criterion needs a few minutes.
"""
import glob
import json
import os
import subprocess
import time

from common import ROOT

NAME = "micro"
CRITERION = os.path.join(ROOT, "target", "criterion")
COMMAND = ["cargo", "bench", "--quiet", "-p", "fabric", "--bench", "fabric"]


def run(quick=False, runs=None, log=print):
    start = time.time()
    subprocess.run(COMMAND, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    benches = []
    for est_path in sorted(glob.glob(os.path.join(CRITERION, "*", "**", "new", "estimates.json"),
                                     recursive=True)):
        if os.path.getmtime(est_path) < start:
            continue  # from an earlier run of a benchmark that no longer exists
        new = os.path.dirname(est_path)
        with open(est_path) as f:
            est = json.load(f)["median"]
        with open(os.path.join(new, "benchmark.json")) as f:
            meta = json.load(f)
        ns = est["point_estimate"]
        lo, hi = est["confidence_interval"]["lower_bound"], est["confidence_interval"]["upper_bound"]
        entry = {"id": meta["full_id"], "group": meta["group_id"], "ns": ns, "ns_lo": lo, "ns_hi": hi}
        throughput = meta.get("throughput") or {}
        if "Bytes" in throughput:
            per = throughput["Bytes"]
            entry.update(unit="GiB/s", per_iter=per,
                         value=per / ns * 1e9 / 2**30, value_lo=per / hi * 1e9 / 2**30,
                         value_hi=per / lo * 1e9 / 2**30)
        elif "Elements" in throughput:
            per = throughput["Elements"]
            entry.update(unit="elements/s", per_iter=per, value=per / ns * 1e9,
                         value_lo=per / hi * 1e9, value_hi=per / lo * 1e9, ns_per_element=ns / per)
        benches.append(entry)
    log(f"micro: {len(benches)} criterion benchmarks collected")
    return {"command": " ".join(COMMAND), "benches": benches}


def fmt_time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f} {unit}"
    return f"{ns:.0f} ns"


def markdown(report):
    lines = [f"Microbenchmarks (`{report['command']}`, criterion): median time per iteration "
             "(95% confidence interval) and throughput.", "",
             "| benchmark | time per iteration | throughput |", "|---|---|---|"]
    for b in report["benches"]:
        if b.get("unit") == "GiB/s":
            tp = f"{b['value']:.2f} GiB/s ({b['per_iter'] / 1024:g} KiB per iteration)"
        elif b.get("unit"):
            tp = f"{b['value'] / 1e6:.2f} M/s, {b['ns_per_element'] / 1000:.2f} us each"
        else:
            tp = "-"
        lines.append(f"| {b['id']} | {fmt_time(b['ns'])} ({fmt_time(b['ns_lo'])}-{fmt_time(b['ns_hi'])}) "
                     f"| {tp} |")
    return "\n".join(lines) + "\n"
