#!/usr/bin/env python3
"""Page sharing benchmark: fabric-guided KSM against plain KSM on N test guests.

Each run starts N test guests (`--mem M`, `seed=<unique> share=P sseed=<common> hb=0`), so
P% of every guest's filled frames are identical across all of them, with one sharing mode:
  guided      `--share` (guided): only pages with twins are marked mergeable, in two stages,
              and ksmd runs fast until the known potential is merged, then back to the
              host's settings
  plain       `--share=plain`: all guest memory mergeable, ksmd at the host's settings
              (the kernel's defaults here: 100 pages every 20 ms)
  plain-fast  `--share=plain` with ksmd fixed at the rate guided uses at its peak
              (pages_to_scan = marked pages / 20, sleep 10 ms), as an administrator might
The guests run at nice 19: the test guest never idles (it spins verifying its memory), and
at nice 0 ten of them would leave ksmd (nice 5) almost no CPU on a 2-core machine; a host of
mostly idle serverless VMs leaves it much more.

Measured, polling every 0.5 s from the moment the VMs are started:
  converge_s       until the guests' merged pages (sum of /proc/PID/ksm_stat
                   ksm_merging_pages + ksm_zero_pages) reach 99% of the target: every
                   non-zero page that has a twin (from `fabvm host stats` at the end:
                   potential + duplicate pages; zero pages the guest never touched hold no
                   memory, so they are not part of it)
  ksmd_cpu_s       CPU ksmd used until then (/proc/<ksmd>/stat utime+stime); ksmd scans every
                   mergeable area on the host, other processes' included
  guide_cpu_s      CPU of fabvm's sharing threads (`fabvm-share`: sampling, hashing,
                   planning) until then
  steady_ksmd_pct  ksmd's CPU use (% of one core) over STEADY seconds after convergence
  pss_mib          host memory used by the guests: the sum of their PSS, which splits each
                   merged page among the processes mapping it (so it is counted once);
                   MemAvailable moves with everything else on the host and is only recorded
KSM is reset between runs (`run=2` unmerges everything, then the host's settings); the
host's KSM settings are restored at the end (run included).
Writes bench/results/sharing.json and bench/results/sharing.md.
Usage: bench/sharing.py [--vms 10] [--mem 256] [--shares 50,90] [--modes guided,plain-fast,plain]
                        [--scale 50:128] [--timeout 600] [--steady 30] [--quick]
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guest-images", "out", "test-guest.elf")
FABVM = os.path.join(ROOT, "target", "release", "fabvm")
RESULTS = os.path.join(ROOT, "bench", "results")
KSM = "/sys/kernel/mm/ksm"
SSEED = 0x5EED
POLL = 0.5

MASK = (1 << 64) - 1


def mix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def shared_frames(fill_start, fill_end, share):
    """Frames of [fill_start, fill_end) in the shared class (guest-images/README.md)."""
    return sum(1 for g in range(fill_start >> 12, fill_end >> 12) if mix64(g) % 100 < share)


def ksm_read(name):
    with open(os.path.join(KSM, name)) as f:
        return int(f.read().split()[0])


def ksm_write(name, value):
    with open(os.path.join(KSM, name), "w") as f:
        f.write(str(value))


def ksmd_pid():
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "ksmd":
                        return int(pid)
            except OSError:
                pass
    raise SystemExit("sharing.py: no ksmd thread (is KSM built in?)")


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(path):
    """utime + stime of /proc/.../stat in seconds (0 when gone)."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def share_threads_cpu(pids):
    total = 0.0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().strip() != "fabvm-share":
                        continue
            except OSError:
                continue
            total += cpu_s(f"/proc/{pid}/task/{tid}/stat")
    return total


def ksm_stat(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                parts = line.replace(":", " ").split()
                if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                    out[parts[0]] = int(parts[1])
    except OSError:
        pass
    return out


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def reset_ksm(settings):
    """Unmerges everything, then the given settings, then run=1."""
    ksm_write("run", 2)
    deadline = time.time() + 60
    while ksm_read("pages_shared") and time.time() < deadline:
        time.sleep(0.2)
    ksm_write("pages_to_scan", settings["pages_to_scan"])
    ksm_write("sleep_millisecs", settings["sleep_millisecs"])
    ksm_write("run", 1)


def run_one(n, mem, share, mode, host, timeout, steady, log):
    rt = tempfile.mkdtemp(prefix="fabvm-bench-share-")
    env = dict(os.environ, FABVM_RUNTIME_DIR=rt)
    fast = {"pages_to_scan": min(50000, max(1000, n * mem * 256 // 20)), "sleep_millisecs": 10}
    reset_ksm(fast if mode == "plain-fast" else host)
    share_arg = "--share" if mode == "guided" else "--share=plain"
    ksmd = ksmd_pid()
    avail0 = mem_available_kib()
    t0 = time.time()
    ksmd0 = cpu_s(f"/proc/{ksmd}/stat")
    procs, outs = [], []
    for i in range(n):
        out = open(os.path.join(rt, f"vm{i}.out"), "w+")
        cmd = ["nice", "-n", "19", FABVM, "--kernel", GUEST, "--mem", f"{mem}M", share_arg,
               "--cmdline", f"seed={1000 + i} share={share} sseed={SSEED} hb=0"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL))
        outs.append(out)
    pids = [p.pid for p in procs]
    trace, info, t_ready = [], None, None
    last_change, last_merged, settled_at = t0, -1, None
    estimate = None
    try:
        while True:
            time.sleep(POLL)
            now = time.time()
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a guest exited: " + open(outs[[p.poll() is not None for p in procs].index(True)].name).read()[-500:])
            if t_ready is None:
                texts = [open(o.name).read() for o in outs]
                if all("fabvm-guest: ready" in t for t in texts):
                    t_ready = now - t0
                    m = re.search(r"fill_start=(0x[0-9a-f]+) fill_end=(0x[0-9a-f]+)", texts[0])
                    info = (int(m.group(1), 16), int(m.group(2), 16))
                    estimate = n * shared_frames(info[0], info[1], share)
            stats = [ksm_stat(p) for p in pids]
            merged = sum(s.get("ksm_merging_pages", 0) + s.get("ksm_zero_pages", 0) for s in stats)
            row = {
                "t": round(now - t0, 2),
                "merged": merged,
                "pss_kib": sum(pss_kib(p) for p in pids),
                "ksmd_s": round(cpu_s(f"/proc/{ksmd}/stat") - ksmd0, 2),
                "guide_s": round(share_threads_cpu(pids), 2),
                "pages_to_scan": ksm_read("pages_to_scan"),
                "full_scans": ksm_read("full_scans"),
                "avail_kib": mem_available_kib(),
            }
            trace.append(row)
            if merged != last_merged:
                if last_merged < 0 or abs(merged - last_merged) > max(50, merged // 1000):
                    last_change = now
                last_merged = merged
            # Stop once merged reached the seeds' estimate and held STEADY s, or at the timeout.
            if estimate and merged >= 0.99 * estimate and settled_at is None:
                settled_at = now
            if settled_at and now - settled_at >= steady and now - last_change >= 2:
                break
            if now - t0 > timeout:
                log(f"    timeout after {timeout} s: merged {merged} of about {estimate}")
                break
        report = json.loads(subprocess.run([FABVM, "host", "stats", "--json"], env=env,
                                           capture_output=True, check=True, text=True).stdout)
        texts = [open(o.name).read() for o in outs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        for o in outs:
            o.close()
        if os.environ.get("FABVM_BENCH_KEEP"):
            log(f"    kept {rt}")
        else:
            shutil.rmtree(rt, ignore_errors=True)
    failed = [t for t in texts if "FAILED" in t]
    verify_ok = min(t.count("verify ok") for t in texts)
    target = sum(v["potential_pages"] + v["duplicate_pages"] for v in report["vms"])

    def first(frac):
        for row in trace:
            if row["merged"] >= frac * target:
                return row
        return None

    conv = first(0.99)
    r90 = first(0.90)
    steady_pct = None
    if conv is not None:
        window = [row for row in trace if conv["t"] <= row["t"] <= conv["t"] + steady]
        if len(window) >= 2 and window[-1]["t"] > window[0]["t"]:
            steady_pct = 100 * (window[-1]["ksmd_s"] - window[0]["ksmd_s"]) / (window[-1]["t"] - window[0]["t"])
    end = conv or trace[-1]
    result = {
        "vms": n, "mem_mib": mem, "share": share, "mode": mode,
        "ready_s": t_ready,
        "converge_s": conv["t"] if conv else None,
        "converge90_s": r90["t"] if r90 else None,
        "ksmd_cpu_s": end["ksmd_s"],
        "guide_cpu_s": end["guide_s"],
        "steady_ksmd_pct": steady_pct,
        "pss_mib_at_ready": None,
        "pss_mib": round(end["pss_kib"] / 1024, 1),
        "pss_mib_end": round(trace[-1]["pss_kib"] / 1024, 1),
        "avail_delta_mib": round((avail0 - end["avail_kib"]) / 1024, 1),
        "merged_pages": trace[-1]["merged"],
        "target_pages": target,
        "merged_fraction": round(trace[-1]["merged"] / target, 4) if target else None,
        "potential_pages": report["host"]["potential_pages"],
        "expected_potential_pages": estimate,
        "rmap_items": sum(v["ksm"]["rmap_items"] for v in report["vms"]),
        "host_stats_hash_ms": report["hash_ms"],
        "leader": report.get("leader"),
        "guests_failed": len(failed),
        "min_verify_passes": verify_ok,
        "trace": trace[:: max(1, len(trace) // 400)],
    }
    if t_ready is not None:
        ready_rows = [row for row in trace if row["t"] >= t_ready]
        if ready_rows:
            result["pss_mib_at_ready"] = round(ready_rows[0]["pss_kib"] / 1024, 1)
    return result


def fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


LABEL = {
    "guided": "fabric-guided (`--share`)",
    "plain": "plain KSM, host settings",
    "plain-fast": "plain KSM, fixed fast scan",
}


def markdown(results, machine, command):
    lines = [
        f"Page sharing, test guests `seed=<unique> share=P sseed=<common> hb=0`, nice 19. Command: `{command}`.",
        f"Machine: {machine}.",
        "",
        "| VMs x MiB | share | mode | ready (s) | converged 90% / 99% (s) | ksmd CPU to 99% (s) | fabvm-share CPU (s) | ksmd after (% of a core) | PSS at ready / converged (MiB) | merged / target pages | KSM rmap items | potential / seeds imply |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['vms']} x {r['mem_mib']} | {r['share']}% | {LABEL[r['mode']]} | {fmt(r['ready_s'])} | "
            f"{fmt(r['converge90_s'])} / {fmt(r['converge_s'])} | {fmt(r['ksmd_cpu_s'])} | {fmt(r['guide_cpu_s'])} | "
            f"{fmt(r['steady_ksmd_pct'])} | {fmt(r['pss_mib_at_ready'], 0)} / {fmt(r['pss_mib'], 0)} | "
            f"{r['merged_pages']} / {r['target_pages']} | {r['rmap_items']} | "
            f"{r['potential_pages']} / {r['expected_potential_pages']} |")
    return "\n".join(lines) + "\n"


def machine_line():
    cores = os.cpu_count()
    kvm = "kvm_pvm (nested)" if os.path.exists("/sys/module/kvm_pvm") else "KVM"
    load = os.getloadavg()
    return (f"{platform.node() and 'vm'}: {cores} cores, {kvm}, kernel {platform.release()}, "
            f"load average at start {load[0]:.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--mem", type=int, default=256, help="MiB per guest")
    ap.add_argument("--shares", default="50,90")
    ap.add_argument("--modes", default="guided,plain-fast,plain")
    ap.add_argument("--scale", default="", help="extra VMS:MIB sets, e.g. 50:128,100:128")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--steady", type=float, default=30)
    ap.add_argument("--quick", action="store_true", help="3 guests of 128 MiB, 90%%, guided and plain-fast")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("sharing.py: needs root (KSM settings in /sys/kernel/mm/ksm)")
    if not os.path.exists(os.path.join(KSM, "run")):
        raise SystemExit("sharing.py: this kernel has no KSM")
    subprocess.run(["bash", os.path.join(ROOT, "guest-images", "build-test-guest.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "vmm", "--bin", "fabvm"], check=True,
                   cwd=ROOT)
    sets = [(args.vms, args.mem)]
    shares = [int(s) for s in args.shares.split(",")]
    modes = args.modes.split(",")
    if args.quick:
        sets, shares, modes = [(3, 128)], [90], ["guided", "plain-fast"]
    for item in filter(None, args.scale.split(",")):
        v, m = item.split(":")
        sets.append((int(v), int(m)))
    host = {k: ksm_read(k) for k in ("run", "pages_to_scan", "sleep_millisecs")}
    machine = machine_line()
    command = "python3 bench/sharing.py " + " ".join(sys.argv[1:])
    results = []

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        for n, mem in sets:
            for share in shares:
                for mode in modes:
                    log(f"{n} x {mem} MiB, {share}%, {mode}")
                    r = run_one(n, mem, share, mode, host, args.timeout, args.steady, log)
                    log(f"    ready {fmt(r['ready_s'])} s, converged {fmt(r['converge_s'])} s, ksmd "
                        f"{fmt(r['ksmd_cpu_s'])} s, guide {fmt(r['guide_cpu_s'])} s, PSS {r['pss_mib']} MiB, "
                        f"merged {r['merged_pages']}/{r['target_pages']}, potential {r['potential_pages']}"
                        f"/{r['expected_potential_pages']}, failed {r['guests_failed']}")
                    results.append(r)
    finally:
        ksm_write("run", 2)
        deadline = time.time() + 60
        while ksm_read("pages_shared") and time.time() < deadline:
            time.sleep(0.2)
        ksm_write("pages_to_scan", host["pages_to_scan"])
        ksm_write("sleep_millisecs", host["sleep_millisecs"])
        ksm_write("run", host["run"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sharing.json"), "w") as f:
        json.dump({"machine": machine, "command": command, "results": results}, f, indent=1)
    md = markdown(results, machine, command)
    with open(os.path.join(args.out, "sharing.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
