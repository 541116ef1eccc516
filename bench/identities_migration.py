#!/usr/bin/env python3
"""The migration part of the identities benchmark alone: a 1 GiB test guest holding 512 MiB,
with nothing at the destination or a sibling holding every page there, over 10 and 1 Gbit/s,
QEMU side by side. `python3 bench/identities_migration.py [RUNS]` (default 2 runs a row);
results in bench/results/identities-migration.json with the load average before and after.
Run it alone on the machine."""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
import identities  # noqa: E402


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    common.ensure_tools()
    before = load()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = identities.migration(False, runs, print)
    out.update(started=started, load_before=before, load_after=load(), runs=runs)
    with open(os.path.join(HERE, "results", "identities-migration.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"load average before {before}, after {out['load_after']}")
    for link, d in out["links"].items():
        print(d["label"])
        for name, r in d["results"].items():
            t = r.get("total_s") or {}
            if t:
                print(f"  {name}: {t['median']:.2f} s ({t['min']:.2f}-{t['max']:.2f})")


if __name__ == "__main__":
    main()
