"""Live page identities: what keeping them current costs, and what it buys.

Parts (each side by side with QEMU where QEMU has an equivalent):
  migration   a 1 GiB test guest holding 512 MiB of data moved between two network
              namespaces on a 10 Gbit/s and a 1 Gbit/s link (tc tbf, no added delay), with
              nothing at the destination (`random`) and with a sibling holding every page
              (`sibling100`); each "host" has its own runtime directory and store. fabvm
              runs twice: as built (live identities) and with `--identities off` at the
              source (round 1 hashes every stale page on the spot: the way identities were
              computed before). QEMU: one channel and multifd.
  snapshot    a 2 GiB guest, 1 GiB filled, rewriting pages so that about 1% of its memory
              changes between snapshots 2.5 s apart: the guest's pause per snapshot. QEMU:
              the pause of stop + migrate to a file (it has no incremental snapshot).
  background  CPU the background identity thread uses (% of one core) and how many pages
              are stale, sampled every 250 ms, for an idle guest and guests rewriting 1k,
              10k and 100k pages/s (1 GiB guest, 512 MiB filled, default budget).
  sharing     guided KSM sharing of 10 x 256 MiB guests sharing 90% (bench/sharing.py's
              run), whose plan now reads the published identities instead of hashing.
"""
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import common
import migrate
from common import Console, Qmp, spread
from netns import Link, LinkPair

NAME = "identities"
LINKS = {
    "10g": Link("10g", 10000, 0, "10 Gbit/s tbf, no added delay"),
    "1g": Link("1gb", 1000, 0, "1 Gbit/s tbf, no added delay"),
    "loopback": Link("loopback", label="loopback veth, unshaped"),
}
VMMS = ["qemu", "qemu-multifd", "fabvm", "fabvm-off"]
DIRTY_RATES = [0, 1000, 10000, 100000]


def migration(quick, runs, log):
    mem, fill = ("256M", 64) if quick else ("1G", 512)
    links = ["loopback"] if quick else ["10g", "1g"]
    vmms = ["qemu", "fabvm", "fabvm-off"] if quick else VMMS
    scs = [s for s in migrate.scenarios(fill) if s.name in ("random", "sibling100")]
    out = {"mem": mem, "fill_mib": fill, "links": {}}
    port = 7300
    for link_name in links:
        link = LINKS[link_name]
        samples = {}
        with LinkPair(link, tag=f"id{link_name}") as net:
            for r in range(runs):
                for sc in scs:
                    for vmm in vmms:
                        if vmm.startswith("qemu") and sc.sibling:
                            continue  # QEMU does not use pages at the destination: = random
                        work = tempfile.mkdtemp(prefix="fabvm-bench-ids-")
                        port += 1
                        try:
                            if vmm == "fabvm":
                                res = migrate.fabvm_migrate(net, sc, mem, work, port)
                            elif vmm == "fabvm-off":
                                res = migrate.fabvm_migrate(net, sc, mem, work, port,
                                                            src_args=["--identities", "off"])
                            else:
                                res = migrate.qemu_migrate(net, sc, vmm, mem, work, port)
                        except Exception as e:  # one failed run must not end the benchmark
                            res = {"error": str(e).strip().splitlines()[0][:300]}
                        finally:
                            net.stop_processes()
                            shutil.rmtree(work, ignore_errors=True)
                        res.pop("report", None)
                        samples.setdefault(f"{sc.name}/{vmm}", []).append(res)
                        log(f"identities migration {link_name} {sc.name} {vmm} run {r + 1}/{runs}: "
                            + (res.get("error") or f"{res['total_s']:.2f} s, {res['wire_bytes'] / 2**20:.1f} MiB"))
        for vmm in vmms:
            if vmm.startswith("qemu"):
                samples[f"sibling100/{vmm}"] = samples.get(f"random/{vmm}", [])
        out["links"][link_name] = {"label": link.describe(), "vmms": vmms,
                                   "results": {k: migrate.summarize_runs(v) for k, v in samples.items()}}
    return out


def snapshot(quick, runs, log):
    mem, fill, dirty = ("256M", 128, 270) if quick else ("2G", 1024, 2100)
    cmdline = f"passes=0 hb=100 seed=11 fill={fill} dirty={dirty}"
    work = tempfile.mkdtemp(prefix="fabvm-bench-ids-snap-")
    try:
        env = dict(os.environ, FABVM_RUNTIME_DIR=os.path.join(work, "run"))
        sock, store = os.path.join(work, "vm.sock"), os.path.join(work, "store")
        proc = common.popen([common.FABVM, "--kernel", common.GUEST, "--mem", mem, "--cmdline", cmdline,
                             "--api-sock", sock, "--store", store], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        Console(proc).wait("verify ok pass=1", 300)
        snaps = []
        for i in range(2 if quick else 2 + 2 * runs):
            if i:
                time.sleep(2.5)
            rep = common.fabvm_ctl(sock, "snapshot", os.path.join(work, f"snap{i}"))
            snaps.append({k: rep.get(k) for k in ("pause_ms", "total_ms", "hash_ms", "store_ms",
                                                  "rehashed_pages", "copied_pages", "new_pages", "pages")})
            log(f"identities snapshot {i}: pause {rep.get('pause_ms', 0):.1f} ms, "
                f"{rep.get('copied_pages')} pages changed, total {rep.get('total_ms', 0):.0f} ms")
        common.fabvm_ctl(sock, "shutdown")
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        qemu = []
        for _ in range(1 if quick else runs):
            qemu.append(qemu_pause(mem, cmdline, work))
        later = snaps[1:]
        return {"mem": mem, "fill_mib": fill, "dirty_rate": dirty, "snapshots": snaps,
                "pause_ms": spread([s["pause_ms"] for s in later]),
                "changed_fraction": spread([s["copied_pages"] / s["pages"] for s in later]),
                "first_pause_ms": snaps[0]["pause_ms"],
                "qemu_pause_ms": spread(qemu)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def qemu_pause(mem, cmdline, work):
    state, qsock = os.path.join(work, "qemu.state"), os.path.join(work, "qmp.sock")
    proc = common.popen(common.qemu_base(mem, cmdline, qsock), stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    Console(proc).wait("verify ok pass=1", 300)
    q = Qmp(qsock)
    start = time.time()
    q.call("stop")
    q.call("migrate", uri=f"exec:cat > {state}")
    while q.call("query-migrate").get("status") not in ("completed", "failed"):
        time.sleep(0.005)
    pause = (time.time() - start) * 1000
    proc.kill()
    proc.wait()
    for p in (state, qsock):
        if os.path.exists(p):
            os.unlink(p)
    return pause


def background(quick, log):
    mem, fill, secs = ("256M", 64, 3) if quick else ("1G", 512, 8)
    rates = [0, 10000] if quick else DIRTY_RATES
    rows = []
    for rate in rates:
        work = tempfile.mkdtemp(prefix="fabvm-bench-ids-bg-")
        try:
            env = dict(os.environ, FABVM_RUNTIME_DIR=os.path.join(work, "run"))
            sock = os.path.join(work, "vm.sock")
            proc = common.popen([common.FABVM, "--kernel", common.GUEST, "--mem", mem, "--cmdline",
                                 f"passes=0 hb=0 seed=3 fill={fill} dirty={rate}", "--api-sock", sock],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
            Console(proc).wait("ready", 300)
            time.sleep(1.0)  # the fill's pages hashed
            first = common.fabvm_ctl(sock, "stats")["identities"]
            t0, stale = time.time(), []
            while time.time() - t0 < secs:
                time.sleep(0.25)
                stale.append(common.fabvm_ctl(sock, "stats")["identities"]["stale"])
            last = common.fabvm_ctl(sock, "stats")["identities"]
            wall = time.time() - t0
            common.fabvm_ctl(sock, "shutdown")
            proc.wait(30)
            row = {"dirty_rate": rate, "cpu_percent": 100 * (last["cpu_ms"] - first["cpu_ms"]) / 1000 / wall,
                   "stale_mean": statistics.mean(stale), "stale_max": max(stale),
                   "rehashed_per_s": (last["rehashed_pages"] - first["rehashed_pages"]) / wall,
                   "harvested_per_s": None, "budget_percent": last["budget_percent"],
                   "period_ms": last["harvest_period_ms"], "pages": last["pages"]}
            rows.append(row)
            log(f"identities background {rate} pages/s: {row['cpu_percent']:.1f}% of a core, "
                f"stale mean {row['stale_mean']:.0f} max {row['stale_max']}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"mem": mem, "fill_mib": fill, "seconds": secs, "rows": rows}


def sharing(log):
    import sharing as sh
    host = {k: sh.ksm_read(k) for k in ("run", "pages_to_scan", "sleep_millisecs")}
    try:
        return sh.run_one(10, 256, 90, "guided", host, sh.TIMEOUT, log)
    finally:
        sh.set_ksm(host)
        sh.ksm_write("run", host["run"])


def run(quick=False, runs=None, log=print):
    runs = runs or (1 if quick else 3)
    report = {"migration": migration(quick, runs, log), "snapshot": snapshot(quick, runs, log),
              "background": background(quick, log)}
    if not quick and os.geteuid() == 0 and os.path.exists("/sys/kernel/mm/ksm/run"):
        try:
            report["sharing"] = sharing(log)
        except Exception as e:
            report["sharing"] = {"error": str(e)[:300]}
    return report


def best_qemu(L, sc):
    """(variant, summary) of the QEMU run with the shortest median total time in `sc`."""
    rows = [(v, L["results"].get(f"{sc}/{v}")) for v in L["vmms"] if v.startswith("qemu")]
    rows = [(v, s) for v, s in rows if s and s["ok"]]
    return min(rows, key=lambda r: r[1]["total_s"]["median"], default=None)


LABELS = {"qemu": "QEMU", "qemu-multifd": "QEMU multifd", "fabvm": "fabvm (live identities)",
          "fabvm-off": "fabvm, --identities off at the source"}


def markdown(report):
    m = report["migration"]
    lines = [f"**Migration**, {m['mem']} guest with {m['fill_mib']} MiB of data; median (min-max); "
             "time as each VMM reports it; bytes at the veth, both directions.", ""]
    for link_name, L in m["links"].items():
        lines += [f"{L['label']}:", "", "| scenario | VMM | total (s) | vs best QEMU | pause (ms) | on the wire (MiB) | verified |",
                  "|---|---|---|---|---|---|---|"]
        for sc in ("random", "sibling100"):
            best = best_qemu(L, sc)
            for vmm in L["vmms"]:
                s = L["results"].get(f"{sc}/{vmm}")
                if not s:
                    continue
                if not s["ok"]:
                    lines.append(f"| {sc} | {LABELS[vmm]} | failed: {'; '.join(s['errors'])} | | | | |")
                    continue
                vs = common.ratio(s["total_s"], best[1]["total_s"]) if best and vmm.startswith("fabvm") else ""
                lines.append(f"| {sc} | {LABELS[vmm]}{' (= random)' if sc == 'sibling100' and vmm.startswith('qemu') else ''} "
                             f"| {common.cell(s['total_s'], 2)} | {vs} | {common.cell(s['pause_ms'], 0)} "
                             f"| {common.cell(s['wire_bytes'], 1, 1 / 2**20)} | {'yes' if s['verified'] else 'NO'} |")
        lines.append("")
    s = report["snapshot"]
    lines += [f"**Snapshot pause**, {s['mem']} guest, {s['fill_mib']} MiB filled, rewriting {s['dirty_rate']} pages/s, "
              f"snapshots 2.5 s apart (changed between snapshots: {100 * s['changed_fraction']['median']:.2f}% of memory): "
              f"fabvm {common.cell(s['pause_ms'], 1)} ms (first snapshot {s['first_pause_ms']:.0f} ms), "
              f"QEMU stop + migrate to a file {common.cell(s['qemu_pause_ms'], 0)} ms "
              f"(ratio {common.ratio(s['pause_ms'], s['qemu_pause_ms'], 3)}).", ""]
    b = report["background"]
    lines += [f"**Background cost**, {b['mem']} guest, {b['fill_mib']} MiB filled, sampled every 250 ms for "
              f"{b['seconds']} s, budget {b['rows'][0]['budget_percent']:g}% of a core, harvest every "
              f"{b['rows'][0]['period_ms']} ms:", "",
              "| pages/s rewritten | CPU (% of a core) | pages rehashed/s | stale pages, mean | stale pages, max |",
              "|---|---|---|---|---|"]
    for r in b["rows"]:
        lines.append(f"| {r['dirty_rate']} | {r['cpu_percent']:.1f} | {r['rehashed_per_s']:.0f} "
                     f"| {r['stale_mean']:.0f} | {r['stale_max']} |")
    if "sharing" in report:
        r = report["sharing"]
        lines += ["", "**Guided sharing**, 10 x 256 MiB, 90% shared: " +
                  (r["error"] if "error" in r else
                   f"merged 99% after {r['converge_s']} s (90%: {r['converge90_s']} s), host memory "
                   f"{100 * r['pss_fraction']:.0f}% of the guests', fabvm-share CPU {r['guide_cpu_s']} s, "
                   f"potential {r['potential_pages']} / {r['expected_potential_pages']}")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys
    import run as harness
    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
