"""Page sharing: fabric-guided KSM (`--share`) against plain KSM (`--share=plain`).

Each run starts N test guests (`--mem M`, `seed=<unique> sseed=<common> share=P passes=0 hb=0`),
so P% of every guest's filled frames are identical across all of them, in one mode:
  guided      `--share`: only pages with a twin in another VM are marked mergeable, the first
              two copies of each before the others (KSM then merges the rest on first sight),
              and the leader runs ksmd fast until the known potential is merged, then gives the
              host its settings back
  plain-fast  `--share=plain` (all guest memory mergeable) with ksmd fixed at the rate guided
              uses at its peak (pages_to_scan = guest pages / 20 within 1,000..50,000, sleep
              10 ms), as an administrator tuning KSM by hand might
  plain       `--share=plain` with the host's ksmd settings (the kernel's defaults here: 100
              pages every 20 ms); full mode runs it once (10 x 256 MiB, 90%), with a timeout
The guests run at nice 19 (absolute): the test guest never idles (it verifies its memory in a
loop), and at nice 0 ten of them would leave ksmd (nice 5) almost no CPU on 2 cores; a host of
mostly idle serverless VMs leaves it far more.

Measured from the moment the VMs are started, polling every 0.5 s:
  converge_s   until the guests' merged pages (sum of /proc/PID/ksm_stat ksm_merging_pages +
               ksm_zero_pages) reach 99% of the target: every non-zero page with a twin, from
               `fabvm host stats` at the end (potential + duplicate pages)
  ksmd_cpu_s   CPU ksmd used until then (utime+stime of the kernel thread)
  guide_cpu_s  CPU of fabvm's `fabvm-share` threads until then (sampling, hashing, planning)
  ksmd_after_pct  ksmd's CPU (% of one core) over the STEADY seconds after that: what keeping
               the VMs merged costs from then on
  pss_mib      host memory the guests use at convergence: the sum of their PSS, which splits a
               merged page among the processes mapping it, so it counts once
KSM is reset between runs (run=2 unmerges, then the mode's settings, run=1) and the host's
settings are restored at the end. The 50- and 100-VM sets use 64 MiB guests: 100 x 256 MiB
(25 GiB before merging) does not fit this 24 GiB machine.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import common

NAME = "sharing"
KSM = "/sys/kernel/mm/ksm"
SSEED = 0x5EED
POLL = 0.5
FULL_SETS = [(10, 256), (50, 64), (100, 64)]
FULL_SHARES = [50, 90]
QUICK_SETS = [(3, 128)]
QUICK_SHARES = [90]
MODES = ["guided", "plain-fast"]
PLAIN_DEFAULT = (10, 256, 90)   # the one run at the host's own ksmd settings (full mode)
TIMEOUT = 240                   # s per run (guided and plain-fast)
PLAIN_TIMEOUT = 330             # s for the host-settings run (two passes at 5,000 pages/s)
STEADY = 10                     # s watched after convergence
LABEL = {"guided": "fabric-guided (`--share`)", "plain-fast": "plain KSM, fast scan",
         "plain": "plain KSM, host settings"}


def mix64(x):
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def shared_frames(fill_start, fill_end, share):
    """Frames of [fill_start, fill_end) from the shared seed (guest-images/README.md)."""
    return sum(1 for g in range(fill_start >> 12, fill_end >> 12) if mix64(g) % 100 < share)


def ksm_read(name):
    with open(os.path.join(KSM, name)) as f:
        return int(f.read().split()[0])


def ksm_write(name, value):
    with open(os.path.join(KSM, name), "w") as f:
        f.write(str(value))


def ksmd_pid():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "ksmd":
                    return int(pid)
        except OSError:
            pass
    raise RuntimeError("no ksmd thread (is KSM built in?)")


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(path):
    """utime + stime of a /proc stat file in seconds (0 when gone)."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def share_threads_cpu(pids, last):
    """CPU of the `fabvm-share` threads; `last` keeps each thread's latest figure, so threads of
    VMs that are gone still count."""
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().strip() == "fabvm-share":
                        last[tid] = cpu_s(f"/proc/{pid}/task/{tid}/stat")
            except OSError:
                pass
    return sum(last.values())


def proc_number(pid, name, key):
    """First number after `key` in /proc/PID/<name> (0 when absent)."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def merged_pages(pid):
    return proc_number(pid, "ksm_stat", "ksm_merging_pages") + proc_number(pid, "ksm_stat", "ksm_zero_pages")


def set_ksm(settings):
    """Unmerges everything, then applies `settings` and run=1."""
    ksm_write("run", 2)
    deadline = time.time() + 60
    while ksm_read("pages_shared") and time.time() < deadline:
        time.sleep(0.2)
    ksm_write("pages_to_scan", settings["pages_to_scan"])
    ksm_write("sleep_millisecs", settings["sleep_millisecs"])
    ksm_write("run", 1)


def nice19():
    os.setpriority(os.PRIO_PROCESS, 0, 19)


def run_one(n, mem, share, mode, host, timeout, log):
    rt = tempfile.mkdtemp(prefix="fabvm-bench-share-")
    env = dict(os.environ, FABVM_RUNTIME_DIR=rt, RUST_LOG="warn")
    fast = {"pages_to_scan": min(50000, max(1000, n * mem * 256 // 20)), "sleep_millisecs": 10}
    set_ksm(fast if mode == "plain-fast" else host)
    ksmd = ksmd_pid()
    t0 = time.time()
    ksmd0 = cpu_s(f"/proc/{ksmd}/stat")
    procs, outs = [], []
    for i in range(n):
        out = open(os.path.join(rt, f"vm{i}.out"), "w+")
        cmd = [common.FABVM, "--kernel", common.GUEST, "--mem", f"{mem}M",
               "--share" if mode == "guided" else "--share=plain",
               "--cmdline", f"seed={1000 + i} sseed={SSEED} share={share} passes=0 hb=0"]
        procs.append(common.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, preexec_fn=nice19))
        outs.append(out)
    pids = [p.pid for p in procs]
    trace, fill, t_ready, estimate, settled, guide = [], None, None, None, None, {}
    try:
        while True:
            time.sleep(POLL)
            now = time.time()
            gone = [o for p, o in zip(procs, outs) if p.poll() is not None]
            if gone:
                raise RuntimeError("a guest exited: " + open(gone[0].name).read()[-400:])
            if t_ready is None:
                texts = [open(o.name).read() for o in outs]
                if all("fabvm-guest: ready" in t for t in texts):
                    t_ready = now - t0
                    m = re.search(r"fill_start=(0x[0-9a-f]+) fill_end=(0x[0-9a-f]+)", texts[0])
                    fill = (int(m.group(1), 16), int(m.group(2), 16))
                    estimate = n * shared_frames(fill[0], fill[1], share)
            merged = sum(merged_pages(p) for p in pids)
            trace.append({"t": round(now - t0, 2), "merged": merged,
                          "pss_kib": sum(proc_number(p, "smaps_rollup", "Pss:") for p in pids),
                          "ksmd_s": round(cpu_s(f"/proc/{ksmd}/stat") - ksmd0, 2),
                          "guide_s": round(share_threads_cpu(pids, guide), 2),
                          "pages_to_scan": ksm_read("pages_to_scan")})
            if estimate and merged >= 0.99 * estimate and settled is None:
                settled = now
            if settled and now - settled >= STEADY:
                break
            if now - t0 > timeout:
                log(f"    timeout after {timeout} s: {merged} pages merged of about {estimate}")
                break
        report = subprocess.run([common.FABVM, "host", "stats", "--json"], env=env, check=True,
                                capture_output=True, text=True).stdout
        texts = [open(o.name).read() for o in outs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        for o in outs:
            o.close()
        shutil.rmtree(rt, ignore_errors=True)
    report = json.loads(report)
    target = sum(v["potential_pages"] + v["duplicate_pages"] for v in report["vms"])

    def first(frac):
        return next((row for row in trace if row["merged"] >= frac * target), None)

    fill_pages = (fill[1] - fill[0]) >> 12 if fill else None
    conv, r90 = first(0.99), first(0.90)
    end = conv or trace[-1]
    after = [row for row in trace if row["t"] >= end["t"]]
    span = after[-1]["t"] - after[0]["t"] if after else 0
    guests_mib = n * mem
    return {
        "vms": n, "mem_mib": mem, "share": share, "mode": mode,
        "ksm_settings": fast if mode == "plain-fast" else host if mode == "plain" else "leader",
        "ready_s": t_ready,
        "converge_s": conv["t"] if conv else None,
        "converge90_s": r90["t"] if r90 else None,
        "timeout_s": None if conv else timeout,
        "ksmd_cpu_s": end["ksmd_s"],
        "guide_cpu_s": end["guide_s"],
        "ksmd_after_pct": round(100 * (after[-1]["ksmd_s"] - after[0]["ksmd_s"]) / span, 1) if conv and span else None,
        "pss_mib_peak": round(max(r["pss_kib"] for r in trace) / 1024, 1),
        "pss_mib": round(end["pss_kib"] / 1024, 1),
        "pss_fraction": round(end["pss_kib"] / 1024 / guests_mib, 3),
        # Every twin merged: the guests' filled pages once each, less what merging frees.
        "ideal_fraction": round((n * fill_pages - report["host"]["saving_pages"]) / (guests_mib * 256), 3)
        if fill_pages else None,
        "merged_pages": end["merged"],
        "target_pages": target,
        "potential_pages": report["host"]["potential_pages"],
        "expected_potential_pages": estimate,
        "rmap_items": sum(v["ksm"]["rmap_items"] for v in report["vms"]),
        "host_stats_hash_ms": report["hash_ms"],
        "leader": report.get("leader"),
        "fill_pages": fill_pages,
        "guests_failed": sum("FAILED" in t for t in texts),
        "min_verify_passes": min(t.count("verify ok") for t in texts),
        "trace": trace[:: max(1, len(trace) // 300)],
    }


def run(quick=False, runs=None, log=print):
    """Every set x share x mode once (`runs` is ignored: one run of N VMs is already N samples
    of a page's fate, and a run takes up to minutes)."""
    if os.geteuid() != 0:
        raise RuntimeError("sharing needs root (KSM settings in /sys/kernel/mm/ksm)")
    if not os.path.exists(os.path.join(KSM, "run")):
        raise RuntimeError("this kernel has no KSM")
    plan = [(n, mem, share, mode) for n, mem in (QUICK_SETS if quick else FULL_SETS)
            for share in (QUICK_SHARES if quick else FULL_SHARES) for mode in MODES]
    if not quick:
        plan.append((*PLAIN_DEFAULT, "plain"))
    host = {k: ksm_read(k) for k in ("run", "pages_to_scan", "sleep_millisecs")}
    ksmd = ksmd_pid()
    ksmd_nice = os.getpriority(os.PRIO_PROCESS, ksmd) if ksmd else None
    results = []
    try:
        for n, mem, share, mode in plan:
            log(f"sharing: {n} x {mem} MiB, {share}% shared, {mode}")
            r = run_one(n, mem, share, mode, host, PLAIN_TIMEOUT if mode == "plain" else TIMEOUT, log)
            log(f"    ready {fmt(r['ready_s'])} s, converged {fmt(r['converge_s'])} s, ksmd "
                f"{fmt(r['ksmd_cpu_s'])} s, fabvm-share {fmt(r['guide_cpu_s'])} s, PSS {r['pss_mib']} MiB "
                f"({100 * r['pss_fraction']:.0f}%), merged {r['merged_pages']}/{r['target_pages']}, "
                f"potential {r['potential_pages']}/{r['expected_potential_pages']}, failed {r['guests_failed']}")
            results.append(r)
    finally:
        set_ksm(host)
        ksm_write("run", host["run"])
        if ksmd_nice is not None:  # the leader raises it while merging; a killed one may not lower it
            os.setpriority(os.PRIO_PROCESS, ksmd, ksmd_nice)
    return {"host_ksm": host, "poll_s": POLL, "results": results}


def fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report):
    lines = [
        "Page sharing: N test guests `seed=<unique> sseed=<common> share=P passes=0 hb=0` at nice 19; "
        "time from starting the VMs. Host memory = the guests' total PSS when 99% of the pages with a "
        "twin are merged (ideal: the filled pages with every twin merged, no process overhead). CPU until then: ksmd, and fabvm's sharing threads "
        f"(hashing, planning). Host ksmd settings: {report['host_ksm']['pages_to_scan']} pages / "
        f"{report['host_ksm']['sleep_millisecs']} ms.", "",
        "| VMs x MiB | shared | mode | ready (s) | merged 90% / 99% (s) | host memory, MiB (% of guests; ideal %) "
        "| ksmd CPU (s) | fabvm-share CPU (s) | ksmd after (% of a core) | potential: reported / seeds imply "
        "| guests verifying |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        conv = fmt(r["converge_s"]) if r["converge_s"] is not None else \
            f"not in {r['timeout_s']} s ({100 * r['merged_pages'] / max(1, r['target_pages']):.0f}% merged)"
        ideal = f"{100 * r['ideal_fraction']:.0f}" if r["ideal_fraction"] else "-"
        ok = "all" if not r["guests_failed"] else f"{r['guests_failed']} FAILED"
        lines.append(
            f"| {r['vms']} x {r['mem_mib']} | {r['share']}% | {LABEL[r['mode']]} | {fmt(r['ready_s'])} | "
            f"{fmt(r['converge90_s'])} / {conv} | {r['pss_mib']:.0f} ({100 * r['pss_fraction']:.0f}%; {ideal}%) | "
            f"{fmt(r['ksmd_cpu_s'])} | {fmt(r['guide_cpu_s'])} | {fmt(r['ksmd_after_pct'], 0)} | {r['potential_pages']} / "
            f"{r['expected_potential_pages']} | {ok} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import run as harness
    sys.exit(harness.main(["--only", NAME, *sys.argv[1:]]))
