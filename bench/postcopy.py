#!/usr/bin/env python3
"""Post-copy side by side: fabvm `ctl migrate --postcopy` (one pre-copy round, then pages on
demand) against QEMU with `postcopy-ram` (`migrate-start-postcopy` after its first pass), over
a 100 Mbit/s tc tbf link between two network namespaces. Scenarios: a guest dirtying faster
than the link drains (DIRTY_RATE pages/s = 4x 100 Mbit/s), which pre-copy cannot converge
without throttling, and an idle 2 GiB guest. Per run: total time, downtime, time until every
page is at the destination (fabvm's report: postcopy.complete_ms; QEMU: total-time, which ends
when post-copy does), bytes on the wire (veth counters), pages faulted / streamed (fabvm), and
the guest's own verdict on its memory at the destination.

`python3 bench/postcopy.py [--quick] [RUNS]`: --quick is a smoke test (256 MiB guest, 32 MiB
filled, one run); the full run is 2 GiB guests, RUNS (default 2) runs a row. Results in
bench/results/postcopy.json. Run it alone on the machine."""
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
import migrate  # noqa: E402
from common import Qmp  # noqa: E402
from netns import Link, LinkPair  # noqa: E402

LINK = Link("100m-tbf", 100, 0, "100 Mbit/s tbf, no added delay")
DIRTY_RATE = 12_000  # pages/s: 47 MiB/s rewritten against 12.5 MB/s of link


def scenarios(mem_fill):
    base = f"passes=0 hb={migrate.HEARTBEAT_MS}"
    return [
        migrate.Scenario("dirty-fast", f"{mem_fill} MiB, {DIRTY_RATE} pages/s dirtied",
                         f"{base} fill={mem_fill} seed=91 dirty={DIRTY_RATE}", fill_mib=mem_fill),
        migrate.Scenario("idle", "idle (1 MiB filled)", f"{base} fill=1 seed=92", fill_mib=1),
    ]


def qemu_postcopy(net, sc, mem, work, port):
    """QEMU with postcopy-ram on both ends, switched to post-copy after its first pass."""
    caps = [{"capability": "postcopy-ram", "state": True}]
    dst_qmp, src_qmp = os.path.join(work, "dst.qmp"), os.path.join(work, "src.qmp")
    _, dst_con = migrate.start_guest(net, "dst", common.qemu_base(mem, sc.cmdline, dst_qmp, memfd=True) +
                                     ["-incoming", "defer"], work, "dst")
    q_dst = Qmp(dst_qmp)
    q_dst.call("migrate-set-capabilities", capabilities=caps)
    q_dst.call("migrate-incoming", uri=f"tcp:{net.addr('dst')}:{port}")
    _, src_con = migrate.start_guest(net, "src", common.qemu_base(mem, sc.cmdline, src_qmp, memfd=True),
                                     work, "src")
    _, i = src_con.wait("ready", 300)
    src_con.wait("heartbeat", 30, after=i)
    q = Qmp(src_qmp)
    q.call("migrate-set-capabilities", capabilities=caps)
    q.call("migrate-set-parameters", **{"downtime-limit": migrate.DOWNTIME_LIMIT_MS,
                                        "max-bandwidth": 1 << 40})
    host, cport = net.connect_port(port)
    before = net.counters()
    t0 = time.time()
    q.call("migrate", uri=f"tcp:{host}:{cport}")
    limit = migrate.timeout_for(net.link, sc, mem)
    switched = False
    while True:
        info = q.call("query-migrate")
        status = info.get("status")
        if status in ("completed", "failed", "cancelled"):
            break
        if not switched and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            q.call("migrate-start-postcopy")
            switched = True
        if time.time() - t0 > limit:
            q.call("migrate_cancel")
            return {"error": f"did not finish within {limit:.0f} s"}
        time.sleep(0.02)
    if info["status"] != "completed":
        return {"error": f"QEMU migration {info['status']}: {info.get('error-desc', '')}"}
    ram = info.get("ram", {})
    res = {"total_s": info["total-time"] / 1000, "downtime_ms": info.get("downtime"),
           "complete_s": info["total-time"] / 1000, "vmm_bytes": ram.get("transferred"),
           "postcopy_requests": ram.get("postcopy-requests"), "switched": switched}
    return migrate.after_resume(res, src_con, dst_con, t0, net, before)


def fabvm_postcopy(net, sc, mem, work, port):
    res = migrate.fabvm_migrate(net, sc, mem, work, port, ctl_args=("--postcopy",))
    pc = (res.get("report") or {}).get("postcopy") or {}
    if pc:
        res.update(complete_s=(pc["switchover_ms"] + pc["complete_ms"]) / 1000,
                   faulted=pc["faulted"], streamed=pc["streamed"], held=pc["held"])
    res.pop("report", None)
    return res


def run_row(sc, vmm, mem, runs, log):
    rows = []
    for r in range(runs):
        with tempfile.TemporaryDirectory(prefix="fabvm-pc-") as work, LinkPair(LINK, tag=f"pc{r}") as net:
            fn = fabvm_postcopy if vmm == "fabvm" else qemu_postcopy
            res = fn(net, sc, mem, work, 7300 + r)
            log(f"  {sc.name} {vmm} run {r + 1}: {json.dumps(res)}")
            rows.append(res)
        common.reap()
    return rows


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    runs = 1 if quick else int(args[0]) if args else 2
    mem, fill = ("256M", 32) if quick else ("2G", 1024)
    common.ensure_tools()
    out = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "link": LINK.label,
           "mem": mem, "quick": quick, "load_before": common.load_average(), "results": {}}
    for sc in scenarios(fill):
        for vmm in ("fabvm", "qemu-postcopy"):
            print(f"{sc.label}, {vmm}")
            out["results"][f"{sc.name}/{vmm}"] = run_row(sc, vmm, mem, runs, print)
    out["load_after"] = common.load_average()
    name = "postcopy-quick.json" if quick else "postcopy.json"
    with open(os.path.join(HERE, "results", name), "w") as f:
        json.dump(out, f, indent=1)
    for key, rows in out["results"].items():
        ok = [r for r in rows if "error" not in r]
        if not ok:
            print(f"{key}: {rows[0].get('error') if rows else 'no run'}")
            continue
        med = lambda k: sorted(r[k] for r in ok if r.get(k) is not None)[len(ok) // 2] \
            if any(r.get(k) is not None for r in ok) else None
        print(f"{key}: total {med('total_s')} s, downtime {med('downtime_ms')} ms, "
              f"all pages in {med('complete_s')} s, wire {med('wire_bytes')} B, "
              f"verified {all(r.get('verified') for r in ok)}")


if __name__ == "__main__":
    main()
