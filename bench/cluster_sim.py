#!/usr/bin/env python3
"""Utilization simulation (issue 13, "Measured" 3): how far does faster live migration let a
cluster raise its utilization? The claim to test: from about 40% to about 90%.

Model (every assumption is a flag; the defaults are stated in the report):
- H hosts of capacity 1 (one resource, "demand": think CPU). VMs of 1, 2 or 4 GiB; a VM's
  mean demand is proportional to its memory times U(0.5, 1.5), scaled so the cluster's mean
  demand is the target utilization u; placed first-fit-decreasing by mean demand.
- Each VM's demand is its mean times exp(Y - s^2/2), Y a mean-reverting (Ornstein-Uhlenbeck)
  process with stationary deviation s (--sigma) and time constant tau (--tau): bursts that
  last minutes. Optionally a cluster-wide factor of the same kind (--common).
- A reactive balancer, every second: a host above --trigger of capacity (and not already
  sending a VM) migrates one VM away: the one with the shortest migration among those whose
  demand brings it under the trigger (else the most demanding), to the least loaded host
  that stays under --headroom with it (and is not already receiving). One migration out and
  one in per host at a time (the host's link). A migration of a VM with M GiB takes
  t0 + M x t_per_GiB; its demand stays on the source until it ends.
- SLO: a host may be over capacity for at most W seconds (--window) in a row; every second
  beyond that counts as a violation. A utilization is achievable when violations are at most
  --slo of host-seconds.
- Achievable utilization: the highest u on a grid (step --step) meeting the SLO, for each
  migration speed; speeds swept from 0.25 to 32 s/GiB, and the measured ones marked:
  QEMU (best variant) and fabvm with nothing, half and all of the VM's pages at the
  destination, from bench/results/migrate.json (1 Gbit/s link): t0 = the idle guest's time,
  t_per_GiB = (time for 1 GiB filled - t0).

Output: bench/results/cluster-sim.{json,md,png}. Usage:
    /usr/bin/python3 bench/cluster_sim.py [--hosts 20] [--hours 1] [--seeds 2] [--quick]
CPU only (numpy), a few minutes at the defaults.
"""
import argparse
import json
import os
import sys
import time

try:
    import numpy as np
except ImportError:  # pyenv without numpy: Debian's python has it (as bench/run.py does)
    if os.path.exists("/usr/bin/python3") and os.path.realpath(sys.executable) != "/usr/bin/python3":
        os.execv("/usr/bin/python3", ["/usr/bin/python3", os.path.abspath(__file__), *sys.argv[1:]])
    raise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
SIZES_GIB = np.array([1.0, 2.0, 4.0])


def measured_speeds(path, link):
    """(label, t0 s, s per GiB) from a migrate benchmark report, or the figures of the
    2026-12-07 run when it is absent."""
    try:
        with open(path) as f:
            rep = json.load(f)
        res = rep["links"][link]["results"]
        fill_gib = rep["fill_mib"] / 1024

        def t(key):
            return res[key]["summary"]["total_s"]["median"]
        qemus = [v for v in ("qemu", "qemu-multifd", "qemu-zstd") if f"random/{v}" in res]
        best = min(qemus, key=lambda v: t(f"random/{v}"))
        out = [(f"QEMU ({best}), full copy", t(f"idle/{best}"),
                (t(f"random/{best}") - t(f"idle/{best}")) / fill_gib)]
        idle = t("idle/fabvm")
        for label, key in (("fabvm, no page at destination", "random/fabvm"),
                           ("fabvm, half the pages at destination", "sibling50/fabvm"),
                           ("fabvm, all pages at destination", "sibling100/fabvm")):
            out.append((label, idle, max(t(key) - idle, 0.0) / fill_gib))
        return out, f"{os.path.relpath(path, ROOT)} ({rep['meta']['date']}, link {link})"
    except (OSError, KeyError, ValueError) as e:
        print(f"cluster_sim: {path}: {e}; using the 2026-12-07 figures", file=sys.stderr)
        return [("QEMU (qemu-multifd), full copy", 2.71, 8.05),
                ("fabvm, no page at destination", 0.21, 8.97),
                ("fabvm, half the pages at destination", 0.21, 5.67),
                ("fabvm, all pages at destination", 0.21, 1.15)], "built-in figures"


def simulate(u, t0, per_gib, a, seed):
    """Violating host-seconds fraction and migrations per host-hour at utilization u."""
    rng = np.random.default_rng(seed)
    H = a.hosts
    # VMs: enough for u with ~a.vms_per_host per host.
    n = int(H * a.vms_per_host)
    mem = rng.choice(SIZES_GIB, size=n, p=[0.4, 0.4, 0.2])
    mean = mem * rng.uniform(0.5, 1.5, size=n)
    mean *= u * H / mean.sum()
    # First-fit decreasing onto the least loaded host.
    host = np.empty(n, dtype=np.int64)
    load = np.zeros(H)
    for v in np.argsort(-mean):
        h = int(np.argmin(load))
        host[v] = h
        load[h] += mean[v]
    dt = 1.0
    k = dt / a.tau
    noise = a.sigma * np.sqrt(1 - (1 - k) ** 2)
    y = rng.normal(0, a.sigma, size=n)
    c = rng.normal(0, a.common) if a.common > 0 else 0.0
    cnoise = a.common * np.sqrt(1 - (1 - k) ** 2)
    steps = int(a.hours * 3600)
    migrating = {}  # vm -> (dst, end)
    out_busy = np.zeros(H, dtype=bool)
    in_busy = np.zeros(H, dtype=bool)
    over_for = np.zeros(H)
    violations = 0
    moves = 0
    for t in range(steps):
        y = y * (1 - k) + noise * rng.standard_normal(n)
        if a.common > 0:
            c = c * (1 - k) + cnoise * rng.standard_normal()
        demand = mean * np.exp(y - a.sigma ** 2 / 2 + c - a.common ** 2 / 2)
        for v, (dst, end) in list(migrating.items()):
            if end <= t:
                out_busy[host[v]] = False
                in_busy[dst] = False
                host[v] = dst
                del migrating[v]
        load = np.bincount(host, weights=demand, minlength=H)
        over = load > 1.0
        over_for = np.where(over, over_for + dt, 0.0)
        violations += int(np.count_nonzero(over_for > a.window))
        # Reactive balancing, the most loaded first.
        projected = load.copy()
        for v, (dst, _) in migrating.items():
            projected[dst] += demand[v]
        for h in np.argsort(-load) if np.isfinite(per_gib) else ():
            if load[h] <= a.trigger:
                break
            if out_busy[h]:
                continue
            mine = np.flatnonzero((host == h))
            mine = np.array([v for v in mine if v not in migrating], dtype=np.int64)
            if mine.size == 0:
                continue
            excess = load[h] - a.trigger
            enough = mine[demand[mine] >= excess]
            v = int(enough[np.argmin(mem[enough])]) if enough.size else int(mine[np.argmax(demand[mine])])
            ok = (~in_busy) & (projected + demand[v] <= a.headroom)
            ok[h] = False
            if not ok.any():
                continue
            dst = int(np.flatnonzero(ok)[np.argmin(projected[ok])])
            migrating[v] = (dst, t + t0 + mem[v] * per_gib)
            out_busy[h] = True
            in_busy[dst] = True
            projected[dst] += demand[v]
            moves += 1
    return violations / (steps * H), moves / (H * a.hours)


def achievable(t0, per_gib, a):
    """Highest utilization on the grid meeting the SLO (averaged over seeds; found by
    bisection, violations growing with utilization), and the figures at each one tried."""
    grid = []
    u = a.start
    while u <= a.stop + 1e-9:
        grid.append(round(u, 3))
        u += a.step
    tried = []

    def ok(i):
        runs = [simulate(grid[i], t0, per_gib, a, seed) for seed in range(a.seeds)]
        viol = float(np.mean([r[0] for r in runs]))
        rate = float(np.mean([r[1] for r in runs]))
        tried.append({"u": grid[i], "violations": viol, "migrations_per_host_hour": rate})
        return viol <= a.slo

    lo, hi = -1, len(grid)  # grid[lo] meets the SLO (or none does), grid[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return (grid[lo] if lo >= 0 else 0.0), sorted(tried, key=lambda t: t["u"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=20)
    p.add_argument("--vms-per-host", type=float, default=12)
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--sigma", type=float, default=0.5, help="VM demand: stationary deviation of log")
    p.add_argument("--tau", type=float, default=300, help="VM demand: time constant, s")
    p.add_argument("--common", type=float, default=0.0, help="cluster-wide factor's deviation of log")
    p.add_argument("--trigger", type=float, default=0.95, help="host load that starts a migration")
    p.add_argument("--headroom", type=float, default=0.95, help="most load a destination takes on")
    p.add_argument("--windows", default="10,30", help="SLO windows W, s (comma-separated)")
    p.add_argument("--slo", type=float, default=0.001, help="violating host-seconds allowed")
    p.add_argument("--start", type=float, default=0.2)
    p.add_argument("--stop", type=float, default=0.98)
    p.add_argument("--step", type=float, default=0.02)
    p.add_argument("--link", default="1g", help="link of the migrate benchmark to read")
    p.add_argument("--quick", action="store_true", help="10 hosts, 10 minutes, 1 seed (a smoke test)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the output files (a sensitivity run)")
    a = p.parse_args()
    if a.quick:
        a.hosts, a.hours, a.seeds, a.windows = 10, 1 / 6, 1, "10"
    speeds, source = measured_speeds(os.path.join(RESULTS, "migrate.json"), a.link)
    sweep = [0.25, 0.5, 1, 2, 4, 8, 16, 32]
    windows = [float(w) for w in a.windows.split(",")]
    started = time.time()
    name = "cluster-sim" + (f"-{a.tag}" if a.tag else "")
    report = {"model": {k: v for k, v in vars(a).items() if k not in ("out", "quick", "tag")},
              "measured_from": source, "windows": {}}
    for w in windows:
        a.window = w
        curve = []
        for x in sweep:
            best, tried = achievable(0.2, x, a)
            curve.append({"s_per_gib": x, "t0_s": 0.2, "utilization": best, "tried": tried})
            print(f"W={w:g}s  {x:6.2f} s/GiB: {best:.2f}", file=sys.stderr, flush=True)
        points = []
        for label, t0, x in [("no migration (static placement)", 0.0, float("inf"))] + speeds:
            best, tried = achievable(t0, x, a)
            points.append({"label": label, "t0_s": t0, "s_per_gib": x, "utilization": best, "tried": tried})
            print(f"W={w:g}s  {label}: {x:.2f} s/GiB + {t0:.2f} s: {best:.2f}", file=sys.stderr, flush=True)
            if not np.isfinite(x):
                points[-1]["s_per_gib"] = None
        report["windows"][str(w)] = {"sweep": curve, "measured": points}
    report["duration_s"] = round(time.time() - started, 1)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, name + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(a.out, name + ".md"), "w") as f:
        f.write(markdown(report))
    plot(report, os.path.join(a.out, name + ".png"))
    print(markdown(report))


def markdown(r):
    m = r["model"]
    lines = [
        "Utilization simulation (bench/cluster_sim.py): highest mean utilization meeting the SLO, by migration speed.",
        "",
        f"Model: {m['hosts']} hosts of capacity 1, {m['vms_per_host']:g} VMs per host (1/2/4 GiB), demand "
        f"log-OU (deviation {m['sigma']}, time constant {m['tau']:g} s, cluster-wide {m['common']}); "
        f"reactive balancer (migrate at load > {m['trigger']}, destinations kept under {m['headroom']}, one "
        f"migration in and out per host at a time); SLO: overload beyond W seconds in a row at most "
        f"{m['slo']:.1%} of host-seconds; {m['hours']:g} h simulated, {m['seeds']} seed(s); utilization grid step "
        f"{m['step']}. Measured speeds from {r['measured_from']}.",
        "",
    ]
    for w, d in r["windows"].items():
        lines += [f"**W = {float(w):g} s**", "", "| migration | t0 (s) | s/GiB | achievable utilization |",
                  "|---|---|---|---|"]
        for p in d["measured"]:
            x = "-" if p["s_per_gib"] is None else f"{p['s_per_gib']:.2f}"
            lines.append(f"| {p['label']} | {p['t0_s']:.2f} | {x} | {p['utilization']:.2f} |")
        lines.append("| sweep: " + ", ".join(f"{c['s_per_gib']:g} s/GiB → {c['utilization']:.2f}"
                                                for c in d["sweep"]) + " | | | |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(r, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("cluster_sim: no matplotlib: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osD^v"
    for i, (w, d) in enumerate(r["windows"].items()):
        xs = [c["s_per_gib"] for c in d["sweep"]]
        ys = [c["utilization"] * 100 for c in d["sweep"]]
        line, = ax.plot(xs, ys, "-", label=f"sweep, SLO window {float(w):g} s")
        for j, p in enumerate(d["measured"]):
            if p["s_per_gib"] is None:
                ax.axhline(p["utilization"] * 100, color=line.get_color(), ls=":", lw=1,
                           label="no migration" if i == 0 else None)
                continue
            ax.plot(p["s_per_gib"], p["utilization"] * 100, markers[j % len(markers)], color=line.get_color(),
                    label=p["label"] if i == 0 else None, markerfacecolor="none" if "QEMU" in p["label"] else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("migration time per GiB of guest data (s), log scale")
    ax.set_ylabel("achievable mean utilization (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Utilization a reactive balancer sustains within the SLO")
    ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
