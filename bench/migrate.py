"""Live migration benchmark: a 2 GiB test guest moved between two network namespaces.

Scenarios (same guest command lines for every VMM):
  idle        1 MiB filled, the rest never touched
  random      1 GiB of unique pages (`fill=1024`)
  sibling100  1 GiB filled; a sibling VM at the destination holds 100% of those pages
  sibling50   the same with 50% shared (`share=50`)
  dirty       1 GiB filled, DIRTY_RATE pages/s rewritten throughout
Links: loopback veth (unshaped), 1 Gbit/s + 10 ms each way, 100 Mbit/s + 50 ms, and a WAN
(50 Mbit/s + 75 ms); rates by tc tbf, delays by relay.py (netns.py).
VMMs: QEMU (precopy, one channel), QEMU with multifd, QEMU with multifd + zstd, each with
QEMU_PARAMS; fabvm (`fabvm receive` + `fabvm ctl migrate`) once the build has it.
For QEMU the sibling scenarios are the nothing-shared run (`random`): QEMU does not use
pages already at the destination, so its figures do not change.
fabvm migrates once the live identities of the source (and of the sibling) have caught up
with the fill (`ctl stats`: no stale page; a few seconds at the default budget), as for a VM
that has run for a while; `--identities off` at the source keeps them stale, so round 1
hashes memory on the spot (the identities benchmark reports both).
Per run: total time and downtime as the VMM reports them, the time from the migrate command
to the guest's first heartbeat at the destination, the guest's pause as its console shows it
(last heartbeat at the source to first at the destination), bytes on the wire (both
directions, veth counters), and whether the guest verified its memory at the destination.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import common
from common import Console, Qmp, cell, spread
from netns import Link, LinkPair

NAME = "migrate"
DIRTY_RATE = 512            # pages/s in the dirty scenario (2 MiB/s)
HEARTBEAT_MS = 10
DOWNTIME_LIMIT_MS = 100
QEMU_PARAMS = {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": 1 << 40,
               "multifd-channels": 2}

LINKS = {
    "loopback": Link("loopback", label="loopback veth, unshaped"),
    "1g": Link("1g", 1000, 10, "1 Gbit/s, 10 ms each way"),
    "100m": Link("100m", 100, 50, "100 Mbit/s, 50 ms each way"),
    "wan": Link("wan", 50, 75, "WAN: 50 Mbit/s, 75 ms each way"),
}
QEMU_CAPS = {"auto-converge": True}  # throttles the guest if it dirties faster than the link
QEMU_VARIANTS = {
    "qemu": ("QEMU", {}, {}),
    "qemu-multifd": ("QEMU multifd", {"multifd": True}, {}),
    "qemu-zstd": ("QEMU multifd+zstd", {"multifd": True}, {"multifd-compression": "zstd"}),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    cmdline: str          # the migrated guest's
    sibling: str = None   # the sibling VM's at the destination
    lacking: float = 1.0  # fraction of the filled pages the destination lacks
    fill_mib: int = 0


def scenarios(fill):
    base = f"passes=0 hb={HEARTBEAT_MS}"
    return [
        Scenario("idle", "idle (1 MiB filled)", f"{base} fill=1 seed=21", fill_mib=1),
        Scenario("random", f"{fill} MiB random", f"{base} fill={fill} seed=22", fill_mib=fill),
        Scenario("sibling100", "sibling at destination, 100% shared",
                 f"{base} fill={fill} seed=23 share=100", f"{base} fill={fill} seed=24 share=100",
                 0.0, fill),
        Scenario("sibling50", "sibling at destination, 50% shared",
                 f"{base} fill={fill} seed=25 share=50", f"{base} fill={fill} seed=26 share=50",
                 0.5, fill),
        Scenario("dirty", f"{fill} MiB, {DIRTY_RATE} pages/s dirtied",
                 f"{base} fill={fill} seed=27 dirty={DIRTY_RATE}", fill_mib=fill),
    ]


def plan(quick, runs=None, links=None):
    """What to run: guest size, scenarios, links with their VMM variants and repeats."""
    if quick:
        return {"mem": "256M", "fill": 128,
                "links": [(name, list(QEMU_VARIANTS), runs or 1) for name in links or ["loopback"]]}
    chosen = links or list(LINKS)
    repeats = {"loopback": 3, "1g": 3, "100m": 1, "wan": 1}
    # On the slow links the link, not a core, is the limit, so multifd cannot help; zstd does
    # not shrink the test guest's pages (ratio 1.00 on every link measured), so the WAN, where
    # a run takes minutes, has QEMU's one-channel row only. A full run takes about an hour.
    variants = {"loopback": list(QEMU_VARIANTS), "1g": list(QEMU_VARIANTS),
                "100m": ["qemu", "qemu-zstd"], "wan": ["qemu"]}
    return {"mem": "2G", "fill": 1024,
            "links": [(name, variants[name], runs or repeats[name]) for name in chosen]}


def timeout_for(link, sc, mem):
    """Seconds a migration may take before it counts as not converging."""
    mib = sc.fill_mib + 64
    rate = (link.rate_mbit or 4000) / 8  # MB/s
    return 90 + 4 * mib * 1.05 / rate


def start_guest(net, side, cmd, work, name, env=None):
    err = open(os.path.join(work, f"{name}.stderr"), "w")
    proc = net.spawn(side, cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env)
    return proc, Console(proc)


def after_resume(res, src_con, dst_con, t0, net, before, timeout=120):
    """Fills in what both VMMs share: first heartbeat at the destination, the pause seen on
    the console, bytes on the wire, and the guest's verdict on its memory."""
    t_hb, i = dst_con.wait("heartbeat", timeout)
    res["wire"] = net.counters() - before
    t_src, _ = src_con.last("heartbeat")
    res["to_dest_heartbeat_s"] = t_hb - t0
    res["pause_ms"] = (t_hb - t_src) * 1000 if t_src else None
    try:
        dst_con.wait("verify ", timeout, after=i)
        res["verified"] = "FAILED" not in dst_con.text()
    except RuntimeError:
        res["verified"] = False
    wire = res.pop("wire")
    res.update(wire_bytes=wire.total, wire_src_bytes=wire["src"], wire_dst_bytes=wire["dst"])
    return res


def qemu_migrate(net, sc, variant, mem, work, port):
    _, caps, params = QEMU_VARIANTS[variant]
    caps_list = [{"capability": k, "state": v} for k, v in {**QEMU_CAPS, **caps}.items()]
    dst_qmp, src_qmp = os.path.join(work, "dst.qmp"), os.path.join(work, "src.qmp")
    dst, dst_con = start_guest(net, "dst", common.qemu_base(mem, sc.cmdline, dst_qmp, memfd=True) +
                               ["-incoming", "defer"], work, "dst")
    q_dst = Qmp(dst_qmp)
    if caps_list:
        q_dst.call("migrate-set-capabilities", capabilities=caps_list)
    q_dst.call("migrate-set-parameters", **QEMU_PARAMS, **params)
    q_dst.call("migrate-incoming", uri=f"tcp:{net.addr('dst')}:{port}")
    src, src_con = start_guest(net, "src", common.qemu_base(mem, sc.cmdline, src_qmp, memfd=True), work, "src")
    _, i = src_con.wait("ready", 300)
    src_con.wait("heartbeat", 30, after=i)
    q = Qmp(src_qmp)
    if caps_list:
        q.call("migrate-set-capabilities", capabilities=caps_list)
    q.call("migrate-set-parameters", **QEMU_PARAMS, **params)
    host, cport = net.connect_port(port)
    before = net.counters()
    t0 = time.time()
    q.call("migrate", uri=f"tcp:{host}:{cport}")
    limit = timeout_for(net.link, sc, mem)
    while True:
        info = q.call("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.time() - t0 > limit:
            q.call("migrate_cancel")
            return {"error": f"did not converge within {limit:.0f} s "
                             f"({info.get('ram', {}).get('dirty-sync-count')} rounds)"}
        time.sleep(0.02)
    if info["status"] != "completed":
        return {"error": f"QEMU migration {info['status']}: {info.get('error-desc', '')}"}
    ram = info.get("ram", {})
    res = {"total_s": info["total-time"] / 1000, "downtime_ms": info.get("downtime"),
           "vmm_bytes": ram.get("transferred"), "rounds": ram.get("dirty-sync-count")}
    return after_resume(res, src_con, dst_con, t0, net, before)


def fabvm_migration_available():
    """fabvm's live migration is in the build when `fabvm receive --help` succeeds."""
    return common.fabvm_has("receive")


def find(report, *names):
    """The first of `names` found anywhere in a (nested) JSON report."""
    if isinstance(report, dict):
        for name in names:
            if name in report:
                return report[name]
        for value in report.values():
            found = find(value, *names)
            if found is not None:
                return found
    return None


# ---- HOOK: the fabvm side -------------------------------------------------------------------
# `fabvm receive --listen HOST:PORT --key K [--api-sock] [--store] --json` at the destination,
# `fabvm ctl --api-sock S --json migrate --key K HOST:PORT` at the source, whose JSON report
# gives total time, downtime, bytes and rounds (MigrationReport in vmm/src/migration/). Each
# namespace is a "host": its own store and its own registry of running VMs
# (FABVM_RUNTIME_DIR), so the receiver finds the sibling's pages there. fabvm's defaults:
# downtime budget 100 ms (as QEMU's limit here), lz4 compression, THP-backed guest RAM.
# Adjust here if the merged CLI or report differs.
def fabvm_migrate(net, sc, mem, work, port, src_args=(), ctl_args=()):
    hosts = {}
    for side in ("src", "dst"):
        d = os.path.join(work, side)
        os.makedirs(d)
        hosts[side] = (dict(os.environ, FABVM_RUNTIME_DIR=os.path.join(d, "run")),
                       os.path.join(d, "store"), os.path.join(d, "api.sock"))
    key = os.path.join(work, "migration.key")
    with open(key, "w") as f:
        f.write(os.urandom(32).hex())
    env_d, store_d, sock_d = hosts["dst"]
    env_s, store_s, sock_s = hosts["src"]
    sock_sib = os.path.join(work, "sibling.sock")
    if sc.sibling:
        _, sib_con = start_guest(net, "dst", [common.FABVM, "--kernel", common.GUEST, "--mem", mem,
                                              "--cmdline", sc.sibling, "--store", store_d,
                                              "--api-sock", sock_sib],
                                 work, "sibling", env_d)
        sib_con.wait("ready", 300)
    _, dst_con = start_guest(net, "dst", [common.FABVM, "receive", "--listen", f"{net.addr('dst')}:{port}",
                                          "--key", key, "--api-sock", sock_d, "--store", store_d, "--json"], work, "dst", env_d)
    _, src_con = start_guest(net, "src", [common.FABVM, "--kernel", common.GUEST, "--mem", mem,
                                          "--cmdline", sc.cmdline, "--api-sock", sock_s, "--store", store_s,
                                          *src_args], work, "src", env_s)
    _, i = src_con.wait("ready", 300)
    src_con.wait("heartbeat", 30, after=i)
    if "off" not in src_args:
        try:
            common.wait_identities_current(sock_s)
        except RuntimeError:
            # A guest dirtying faster than the background budget never has every identity
            # current; round 1 rehashes the stale ones.
            if "dirty=" not in sc.cmdline:
                raise
    if sc.sibling:
        common.wait_identities_current(sock_sib)
    host, cport = net.connect_port(port)
    before = net.counters()
    t0 = time.time()
    cmd = ["ip", "netns", "exec", net.ns["src"], common.FABVM, "ctl", "--api-sock", sock_s, "--json",
           "migrate", "--key", key, f"{host}:{cport}", *ctl_args]
    limit = timeout_for(net.link, sc, mem)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {limit:.0f} s"}
    if out.returncode:
        return {"error": f"fabvm ctl migrate: {out.stderr.strip()[:300]}"}
    t_end = time.time()
    report = json.loads(out.stdout) if out.stdout.strip() else {}
    total_ms = find(report, "total_ms", "total_time_ms")
    downtime_ms = find(report, "downtime_ms")
    if downtime_ms is None and find(report, "downtime_us") is not None:
        downtime_ms = find(report, "downtime_us") / 1000
    res = {"total_s": total_ms / 1000 if total_ms is not None else t_end - t0,
           "downtime_ms": downtime_ms, "vmm_bytes": find(report, "bytes_sent"),
           "rounds": len(report["rounds"]) if isinstance(report.get("rounds"), list) else find(report, "rounds"),
           "report": report}
    return after_resume(res, src_con, dst_con, t0, net, before)
# ---- end of HOOK ----------------------------------------------------------------------------


def run(quick=False, runs=None, links=None, log=print):
    p = plan(quick, runs, links)
    mem, fill = p["mem"], p["fill"]
    scs = scenarios(fill)
    fabvm_ok = fabvm_migration_available()
    if not fabvm_ok:
        log("fabvm migration not available in this build (`fabvm receive --help` fails): "
            "fabvm rows skipped")
    report = {"mem": mem, "fill_mib": fill, "dirty_rate": DIRTY_RATE, "heartbeat_ms": HEARTBEAT_MS,
              "qemu_params": QEMU_PARAMS, "fabvm_available": fabvm_ok,
              "scenarios": {s.name: {"label": s.label, "cmdline": s.cmdline, "sibling": s.sibling,
                                     "lower_bound_bytes": int(s.fill_mib * s.lacking) << 20} for s in scs},
              "links": {}}
    port = 7100
    for link_name, variants, repeats in p["links"]:
        link = LINKS[link_name]
        vmms = variants + (["fabvm"] if fabvm_ok else [])
        samples = {}  # (scenario, vmm) -> [results]
        with LinkPair(link, tag=link_name) as net:
            for r in range(repeats):
                for sc in scs:
                    for vmm in vmms:
                        if vmm != "fabvm" and sc.sibling:
                            continue  # QEMU: the same as `random`, filled in below
                        work = tempfile.mkdtemp(prefix="fabvm-bench-migrate-")
                        port += 1
                        t = time.time()
                        try:
                            if vmm == "fabvm":
                                res = fabvm_migrate(net, sc, mem, work, port)
                            else:
                                res = qemu_migrate(net, sc, vmm, mem, work, port)
                        except Exception as e:  # one failed run must not end the benchmark
                            res = {"error": str(e).strip().splitlines()[0][:300]}
                        finally:
                            net.stop_processes()
                            shutil.rmtree(work, ignore_errors=True)
                        samples.setdefault((sc.name, vmm), []).append(res)
                        status = res.get("error") or (f"{res['total_s']:.2f} s, "
                                                      f"{res['wire_bytes'] / 2**20:.0f} MiB on the wire")
                        log(f"migrate {link_name} {sc.name} {vmm} run {r + 1}/{repeats}: {status} "
                            f"({time.time() - t:.0f} s)")
        for sc in scs:
            if sc.sibling:
                for vmm in variants:
                    samples[(sc.name, vmm)] = samples.get(("random", vmm), [])
        report["links"][link_name] = {
            "label": link.describe(), "rate_mbit": link.rate_mbit, "delay_ms": link.delay_ms,
            "repeats": repeats, "vmms": vmms,
            "results": {f"{s}/{v}": {"summary": summarize_runs(rs), "runs": rs}
                        for (s, v), rs in samples.items()},
        }
    return report


def summarize_runs(runs):
    ok = [r for r in runs if "error" not in r]
    keys = ("total_s", "downtime_ms", "to_dest_heartbeat_s", "pause_ms", "wire_bytes", "vmm_bytes", "rounds")
    out = {k: spread([r.get(k) for r in ok]) for k in keys}
    out["ok"] = len(ok)
    out["verified"] = all(r.get("verified") for r in ok) if ok else None
    out["errors"] = sorted({r["error"] for r in runs if "error" in r})
    return out


VMM_LABELS = {**{k: v[0] for k, v in QEMU_VARIANTS.items()}, "fabvm": "fabvm"}


def markdown(report):
    lines = [f"Live migration of a {report['mem']} test guest (1 vCPU, heartbeat every "
             f"{report['heartbeat_ms']} ms) between two network namespaces; QEMU with "
             f"`downtime-limit` {DOWNTIME_LIMIT_MS} ms, `max-bandwidth` unlimited, 2 multifd channels. "
             "Median (min-max) over the runs; total time and downtime as each VMM reports them; "
             "pause = last heartbeat at the source to the first at the destination (console); "
             "bytes = both directions at the veth; lower bound = filled pages the destination lacks.", ""]
    if not report["fabvm_available"]:
        lines += ["fabvm migration not available in this build: fabvm rows skipped "
                  "(the harness runs them once `fabvm receive --help` succeeds).", ""]
    for link_name, L in report["links"].items():
        lines += [f"**{L['label']}** ({L['repeats']} run(s) each)", "",
                  "| scenario | VMM | total (s) | downtime (ms) | pause (ms) | to dest heartbeat (s) "
                  "| on the wire (MiB) | lower bound (MiB) | wire / bound | verified |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for sc_name, sc in report["scenarios"].items():
            bound = sc["lower_bound_bytes"]
            for vmm in L["vmms"]:
                r = L["results"].get(f"{sc_name}/{vmm}")
                if r is None:
                    continue
                s = r["summary"]
                name = VMM_LABELS[vmm] + (" (= random)" if sc["sibling"] and vmm != "fabvm" else "")
                if not s["ok"]:
                    lines.append(f"| {sc['label']} | {name} | failed: {'; '.join(s['errors'])} |||||||| |")
                    continue
                wire = s["wire_bytes"]
                wb = f"{wire['median'] / bound:.2f}" if bound else "-"
                lines.append(
                    f"| {sc['label']} | {name} | {cell(s['total_s'], 2)} | {cell(s['downtime_ms'], 0)} "
                    f"| {cell(s['pause_ms'], 0)} | {cell(s['to_dest_heartbeat_s'], 2)} "
                    f"| {cell(wire, 1, 1 / 2**20)} | {bound / 2**20:.0f} | {wb} "
                    f"| {'yes' if s['verified'] else 'NO'} |")
        if "fabvm" in L["vmms"]:
            lines += [""] + ratio_table(report, L, link_name)
        lines.append("")
    return "\n".join(lines)


def best_qemu(L, sc_name):
    """The QEMU variant with the shortest median total time in a scenario."""
    best = None
    for vmm in L["vmms"]:
        s = L["results"].get(f"{sc_name}/{vmm}", {}).get("summary")
        if vmm != "fabvm" and s and s["ok"] and (best is None or s["total_s"]["median"] < best[1]["total_s"]["median"]):
            best = (vmm, s)
    return best


# The goals, as fabvm/QEMU ratios a scenario must stay at or under. Downtime is
# judged on the guest's pause seen on its console (both VMMs measured alike); the sibling
# time goal holds on the 1 Gbit/s link.
NOTHING_SHARED = [("wire_bytes", 1.01, "bytes"), ("total_s", 1, "time")]  # 1%: framing, acks
GOALS = {"idle": NOTHING_SHARED, "random": NOTHING_SHARED, "dirty": NOTHING_SHARED,
         "sibling100": [("wire_bytes", 1 / 30, "bytes"), ("total_s", 1 / 5, "time")],
         "sibling50": []}


def verdict(sc_name, link_name, f, q):
    """'met' or what missed, for one scenario's medians."""
    missed, checked = [], 0
    for key, limit, what in GOALS.get(sc_name, []) + [("pause_ms", 1, "downtime")]:
        if sc_name == "sibling100" and key == "total_s" and link_name != "1g":
            continue
        if not f.get(key) or not q.get(key) or not q[key]["median"]:
            continue
        checked += 1
        r = f[key]["median"] / q[key]["median"]
        if r > limit:
            missed.append(f"{what} {r:.3g} > {limit:.3g}")
    return "-" if not checked else "met" if not missed else "missed: " + ", ".join(missed)


def ratio_table(report, L, link_name):
    lines = ["fabvm / best QEMU (the QEMU row with the shortest total time); goals: nothing shared "
             "(idle, random, dirty) bytes (1% slack for framing) and time <= 1; sibling 100% bytes <= 1/30 and time <= 1/5 "
             "(1 Gbit/s link); downtime (guest pause on the console) <= 1 everywhere.", "",
             "| scenario | vs | bytes | total time | downtime reported | pause | goals |",
             "|---|---|---|---|---|---|---|"]
    for sc_name, sc in report["scenarios"].items():
        f = L["results"].get(f"{sc_name}/fabvm", {}).get("summary")
        best = best_qemu(L, sc_name)
        if not f or not f["ok"] or not best:
            continue
        q = best[1]
        lines.append(f"| {sc['label']} | {VMM_LABELS[best[0]]} | {common.ratio(f['wire_bytes'], q['wire_bytes'], 3)} "
                     f"| {common.ratio(f['total_s'], q['total_s'])} | {common.ratio(f['downtime_ms'], q['downtime_ms'])} "
                     f"| {common.ratio(f['pause_ms'], q['pause_ms'])} | {verdict(sc_name, link_name, f, q)} |")
    return lines
