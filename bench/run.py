#!/usr/bin/env python3
"""fabvm's benchmark harness: each scenario for fabvm and QEMU in one run, on the same test
guest, with medians and ranges, written as JSON, Markdown tables and PNG plots.

    python3 bench/run.py [--quick] [--only boot,snapshot,serverless,migrate,sharing,micro] [--runs N]
                         [--links loopback,1g,100m,wan] [--out DIR]

Scenarios (modules of bench/):
  boot      VMM start to first guest exit, first console byte, test guest ready, own memory
  snapshot  snapshot, restore (image built, image cached, lazy), bytes on disk; QEMU: migrate
            to a file and back
  serverless  N VMs (1, 10, 50) restored at once from one snapshot, image cold or warm, eager
            and lazy: time until all verified, total PSS against one copy; QEMU -incoming
  migrate   live migration over veth between network namespaces (loopback, tc-shaped links,
            delay from relay.py): total time, downtime, guest pause, bytes on the wire
  sharing   N test guests sharing P% of their pages: fabric-guided KSM (`--share`) against
            plain KSM: time to merge, host memory used, ksmd and fabvm CPU (root, KSM)
  micro     `cargo bench -p fabric --bench fabric` (criterion), full mode only
Full mode (the default) writes bench/results/: <scenario>.json, <scenario>.md, PNGs and a
README.md that gathers them with the machine and load. --quick (small guests, 1-3 runs,
loopback only, no micro; a few minutes, run in CI) writes target/bench-quick/ unless --out
is given. Installs what is missing: QEMU (Debian's qemu-system-x86), matplotlib (Debian's
python3-matplotlib, re-running under /usr/bin/python3 if this interpreter cannot see it, else
pip). Exits non-zero when a scenario fails or a file is missing.
"""
import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCENARIOS = ["boot", "snapshot", "serverless", "migrate", "sharing", "identities", "micro"]
QUICK_OUT = os.path.join(common.ROOT, "target", "bench-quick")


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def ensure_plotting(argv):
    """matplotlib for this interpreter: Debian's python3-matplotlib (installed when missing;
    if this interpreter is not Debian's, e.g. pyenv, re-runs the harness under
    /usr/bin/python3), else pip."""
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    system = "/usr/bin/python3"

    def rerun_under_system_python():
        if os.path.realpath(sys.executable) != os.path.realpath(system) and os.path.exists(system) and \
                subprocess.run([system, "-c", "import matplotlib"], capture_output=True).returncode == 0:
            log(f"{sys.executable} cannot import Debian's matplotlib: running under {system}")
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(system, [system, os.path.abspath(__file__), *argv])

    rerun_under_system_python()
    log("installing python3-matplotlib from Debian")
    try:
        common.apt_install("python3-matplotlib")
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"apt-get failed ({e}); trying pip")
    importlib.invalidate_caches()
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    rerun_under_system_python()
    log("installing matplotlib with pip")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=True)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def run_scenario(name, args, out, machine, argv):
    mod = importlib.import_module(name)
    import plots
    kwargs = {"links": args.links.split(",")} if name == "migrate" and args.links else {}
    load_before, start = common.load_average(), time.time()
    report = mod.run(quick=args.quick, runs=args.runs, log=log, **kwargs)
    report["meta"] = {
        "scenario": name, "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python3 bench/run.py", *argv]), "machine": machine,
        "load_before": load_before, "load_after": common.load_average(),
        "duration_s": round(time.time() - start, 1), "source": source(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
    }
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    pngs = getattr(plots, name)(report, out)
    table = mod.markdown(report)
    write(os.path.join(out, f"{name}.md"), table + "".join(f"\n![{p}]({p})\n" for p in pngs))
    log(f"{name}: done in {report['meta']['duration_s']:.0f} s\n{table}")
    return [f"{name}.json", f"{name}.md", *pngs]


def source():
    """The commit measured, and whether the VMM's sources differed from it."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=common.ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "vmm", "devices", "fabric", "Cargo.toml", "Cargo.lock")
    return head + (" with uncommitted changes to the VMM" if dirty else "")


def meta_line(meta):
    return (f"{meta['mode']} mode, {meta['date']}, commit {meta.get('source', '?')}, "
            f"{meta['duration_s']:.0f} s at nice {meta.get('nice', 0)}; load average "
            f"{'/'.join(map(str, meta['load_before']))} before, {'/'.join(map(str, meta['load_after']))} "
            f"after (1/5/15 min); `{meta['command']}`")


def write_readme(out):
    """README.md of a results folder: every scenario report found there, newest machine first."""
    reports = []
    for name in SCENARIOS:
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                report = json.load(f)
            if "meta" in report:  # reports of older harness versions have none: left out
                reports.append((name, report))
    if not reports:
        return
    m = max((r["meta"] for _, r in reports), key=lambda meta: meta["date"])["machine"]
    lines = ["# Benchmark results", "",
             "Made by `python3 bench/run.py` (see docs/benchmarks.md); each section "
             "says when and how its figures were made.", "",
             f"Machine: {common.describe_machine(m)}.", ""]
    for name, r in reports:
        with open(os.path.join(out, f"{name}.md")) as f:
            body = f.read()
        lines += [f"## {name}", "", f"Run: {meta_line(r['meta'])}.", ""]
        if r["meta"]["machine"] != m:
            lines += [f"Machine: {common.describe_machine(r['meta']['machine'])}.", ""]
        lines += [body.rstrip(), ""]
    write(os.path.join(out, "README.md"), "\n".join(lines))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small guests, few runs, loopback only")
    parser.add_argument("--full", action="store_true", help="the default: every scenario, README figures")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--runs", type=int, help="repeats per measurement (default per scenario and mode)")
    parser.add_argument("--links", help="migration links: loopback,1g,100m,wan (full mode: all)")
    parser.add_argument("--out", help=f"results folder (default bench/results, quick: {QUICK_OUT})")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick or --full, not both")
    names = args.only.split(",") if args.only else SCENARIOS
    for n in names:
        if n not in SCENARIOS:
            parser.error(f"unknown scenario {n!r} (have {','.join(SCENARIOS)})")
    out = os.path.abspath(args.out or (QUICK_OUT if args.quick else common.RESULTS))
    os.makedirs(out, exist_ok=True)
    ensure_plotting(argv)
    try:  # other work on the machine disturbs the figures less (root only; inherited)
        os.setpriority(os.PRIO_PROCESS, 0, -15)
    except OSError:
        pass
    common.ensure_tools()
    machine = common.machine()
    log(f"machine: {common.describe_machine(machine)}; results in {out}")
    failed, missing = [], []
    for name in names:
        if name == "micro" and args.quick:
            log("micro: skipped in quick mode (criterion needs minutes; run full mode)")
            continue
        try:
            files = run_scenario(name, args, out, machine, argv)
        except Exception as e:  # report it, go on with the other scenarios
            log(f"{name}: FAILED: {e}")
            failed.append(name)
            continue
        missing += [f for f in files if not os.path.exists(os.path.join(out, f))
                    or not os.path.getsize(os.path.join(out, f))]
    write_readme(out)
    if failed or missing:
        log(f"failed: {', '.join(failed) or '-'}; empty files: {', '.join(missing) or '-'}")
        return 1
    log(f"results: {out}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
