"""PNG plots of each scenario's report (matplotlib, Agg). Bars are medians, whiskers the
range over the runs; fabvm is blue, QEMU shades of orange."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"fabvm": "#1f77b4", "qemu": "#ff7f0e", "qemu-multifd": "#d62728", "qemu-zstd": "#8c564b"}
plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.axisbelow": True})


def _bar(ax, x, s, width, color, label=None, scale=1.0, fmt="{:.0f}", hatch=None):
    """One bar for a spread (median, whiskers min-max) with its value on top."""
    if not s:
        return
    m = s["median"] * scale
    err = [[m - s["min"] * scale], [s["max"] * scale - m]]
    ax.bar(x, m, width, color=color, label=label, hatch=hatch, edgecolor="white" if hatch else None,
           yerr=err if s["n"] > 1 else None, capsize=2, error_kw={"elinewidth": 0.8})
    ax.annotate(fmt.format(m), (x, s["max"] * scale), textcoords="offset points", xytext=(0, 2),
                ha="center", va="bottom", fontsize=6.5)


def runs(n):
    return f"{n} run" + ("s" if n != 1 else "") + (" each" if n != 1 else "")


def _save(fig, out, name):
    path = os.path.join(out, name)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return name


def boot(report, out):
    s = report["summary"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    metrics = [("first guest exit", "first_exit_ms"), ("first console byte", "first_output_ms"),
               ("ready (64 MiB filled)", "ready_ms")]
    for i, (_, key) in enumerate(metrics):
        _bar(ax, i - 0.2, s["fabvm"][key], 0.4, COLORS["fabvm"], "fabvm" if i == 0 else None, fmt="{:.1f}")
        _bar(ax, i + 0.2, s["qemu"][key], 0.4, COLORS["qemu"], "QEMU microvm" if i == 0 else None, fmt="{:.1f}")
        r = s["fabvm"][key]["median"] / s["qemu"][key]["median"]
        ax.text(i, -0.16, f"fabvm/QEMU {r:.2f}", transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
    ax.set_xticks(range(len(metrics)), [m[0] for m in metrics])
    ax.set_ylabel("ms from process spawn")
    ax.set_title(f"Start, 1 vCPU / {report['mem_mib']} MiB test guest ({runs(report['runs'])})")
    ax.legend(loc="upper left")
    f, q = s["fabvm"]["own_rss_kib"], s["qemu"]["own_rss_kib"]
    _bar(ax2, 0, f, 0.6, COLORS["fabvm"], scale=1 / 1024, fmt="{:.1f}")
    _bar(ax2, 1, q, 0.6, COLORS["qemu"], scale=1 / 1024, fmt="{:.1f}")
    ax2.set_xticks([0, 1], ["fabvm", "QEMU"])
    ax2.set_ylabel("MiB")
    ax2.set_title("VMM own memory (RSS\nbeyond guest RAM)")
    ax2.text(0.5, -0.16, f"fabvm/QEMU {f['median'] / q['median']:.2f}", transform=ax2.get_xaxis_transform(),
             ha="center", fontsize=8)
    return [_save(fig, out, "boot.png")]


def snapshot(report, out):
    sizes = list(report["sizes"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.8), squeeze=False)
    for ax, mem in zip(axes[0], sizes):
        s = report["sizes"][mem]["summary"]
        f, q = s["fabvm"], s["qemu"]
        bars = [("fabvm snapshot", f["snapshot_ms"], "fabvm"), ("QEMU snapshot", q["snapshot_ms"], "qemu"),
                ("fabvm second snapshot", f["snapshot_again_ms"], "fabvm"),
                ("fabvm restore, image built", f["restore_cold_ms"], "fabvm"),
                ("fabvm restore, image cached", f["restore_warm_ms"], "fabvm"),
                ("fabvm restore, lazy", f["restore_lazy_ms"], "fabvm"), ("QEMU restore", q["restore_ms"], "qemu")]
        for i, (label, sp, vmm) in enumerate(bars):
            m = sp["median"]
            ax.barh(i, m, color=COLORS[vmm], xerr=[[m - sp["min"]], [sp["max"] - m]] if sp["n"] > 1 else None,
                    capsize=2, error_kw={"elinewidth": 0.8})
            ax.annotate(f"{m:.0f} ms" if m >= 10 else f"{m:.1f} ms", (sp["max"], i), textcoords="offset points",
                        xytext=(3, 0), va="center", fontsize=7)
        ax.set_yticks(range(len(bars)), [b[0] for b in bars])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(1, ax.get_xlim()[1] * 4)
        ax.set_xlabel("ms (log scale); restore = spawn to the guest's next heartbeat")
        ax.set_title(f"{mem} guest, memory full of unique pages ({runs(report['runs'])})")
    fig.tight_layout()
    return [_save(fig, out, "snapshot.png")]


def serverless(report, out):
    counts = list(report["counts"])
    kinds = ["eager_cold", "eager_warm", "lazy_cold", "lazy_warm", "qemu"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        color = COLORS["qemu"] if kind == "qemu" else COLORS["fabvm"]
        alpha = 1.0 if kind in ("qemu", "eager_warm") else 0.45 + 0.15 * k
        for ax, key in zip(axes, ("all_verified_ms", "pss_ratio")):
            xs = [i + (k - len(kinds) / 2) * width for i in range(len(counts))]
            ms = [(report["counts"][n]["summary"][kind].get(key) or {}).get("median", 0) for n in counts]
            ax.bar(xs, ms, width, color=color, alpha=min(alpha, 1.0), label=kind.replace("_", ", "))
    for ax, label in zip(axes, ("ms until every VM verified its memory", "total PSS / the guest's data")):
        ax.set_xticks(range(len(counts)), [f"N={n}" for n in counts])
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"N VMs restored at once from one snapshot ({runs(report['runs'])})")
    fig.tight_layout()
    return [_save(fig, out, "serverless.png")]


def migrate(report, out):
    import migrate as mig
    names = []
    scs = report["scenarios"]
    for link_name, L in report["links"].items():
        vmms = L["vmms"]
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        panels = [("total time (s), as the VMM reports it", "total_s", 1, "{:.1f}"),
                  ("downtime (ms), as the VMM reports it", "downtime_ms", 1, "{:.0f}"),
                  ("guest pause on its console (ms)", "pause_ms", 1, "{:.0f}"),
                  ("bytes on the wire (MiB, veth, both directions)", "wire_bytes", 1 / 2**20, "{:.0f}")]
        width = 0.8 / len(vmms)
        for ax, (title, key, scale, fmt) in zip(axes.flat, panels):
            for j, vmm in enumerate(vmms):
                for i, sc in enumerate(scs):
                    r = L["results"].get(f"{sc}/{vmm}")
                    if not r or not r["summary"]["ok"]:
                        continue
                    copied = scs[sc]["sibling"] and vmm != "fabvm"
                    _bar(ax, i - 0.4 + width * (j + 0.5), r["summary"][key], width, COLORS[vmm],
                         mig.VMM_LABELS[vmm] if i == 0 else None, scale, fmt, "//" if copied else None)
            if key == "wire_bytes":
                for i, sc in enumerate(scs):
                    b = scs[sc]["lower_bound_bytes"] * scale
                    ax.hlines(b, i - 0.45, i + 0.45, colors="black", linewidth=1.5,
                              label="lower bound" if i == 0 else None)
            ax.set_title(title)
            ax.set_xticks(range(len(scs)), [s.replace("sibling", "sibling ") + ("%" if "sibling" in s else "")
                                            for s in scs], fontsize=8)
            ax.set_ylim(top=ax.get_ylim()[1] * 1.12)
        handles, labels = axes[1][1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, -0.03))
        note = "" if report["fabvm_available"] else " - fabvm migration not in this build yet"
        fig.suptitle(f"Live migration, {report['mem']} test guest, {L['label']} ({runs(L['repeats'])}){note}\n"
                     "hatched: QEMU's sibling bars repeat its `random` run (it cannot use pages at the destination)",
                     fontsize=10)
        fig.tight_layout()
        names.append(_save(fig, out, f"migrate-{link_name}.png"))
    return names


def micro(report, out):
    bytes_ = [b for b in report["benches"] if b.get("unit") == "GiB/s"]
    elems = [b for b in report["benches"] if b.get("unit") == "elements/s"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * max(len(bytes_), len(elems)) + 1.5),
                             gridspec_kw={"width_ratios": [3, 2]})
    for ax, rows, scale, xlabel in ((axes[0], bytes_, 1, "GiB/s (one iteration's bytes / median time)"),
                                    (axes[1], elems, 1e-6, "million per second (dirty pages for manifest_update)")):
        for i, b in enumerate(rows):
            v = b["value"] * scale
            ax.barh(i, v, color=COLORS["fabvm"] if "memcpy" not in b["id"] else "#7f7f7f",
                    xerr=[[v - b["value_lo"] * scale], [b["value_hi"] * scale - v]], capsize=2)
            ax.annotate(f"{v:.2f}", (b["value_hi"] * scale, i), textcoords="offset points", xytext=(3, 0),
                        va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [b["id"] for b in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_xlim(right=ax.get_xlim()[1] * 1.15)
    axes[0].set_title("fabric throughput (grey: memcpy for comparison)")
    axes[1].set_title("per element")
    fig.tight_layout()
    return [_save(fig, out, "micro.png")]


SHARE_COLORS = {"guided": "#1f77b4", "plain-fast": "#ff7f0e", "plain": "#8c564b"}
SHARE_LABELS = {"guided": "fabric-guided (--share)", "plain-fast": "plain KSM, fast scan",
                "plain": "plain KSM, host settings"}


def sharing(report, out):
    """Per set of VMs and share: time to merge 99%, host memory used, CPU spent, per mode."""
    results = report["results"]
    groups = []
    for r in results:
        key = (r["vms"], r["mem_mib"], r["share"])
        if key not in groups:
            groups.append(key)
    modes = [m for m in SHARE_COLORS if any(r["mode"] == m for r in results)]
    width = 0.8 / len(modes)
    labelled = set()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, key in enumerate(groups):
        for j, mode in enumerate(modes):
            r = next((r for r in results if (r["vms"], r["mem_mib"], r["share"]) == key and r["mode"] == mode), None)
            if r is None:
                continue
            x = i + (j - (len(modes) - 1) / 2) * width
            label = None if mode in labelled else SHARE_LABELS[mode]
            labelled.add(mode)
            conv = r["converge_s"] if r["converge_s"] is not None else r["timeout_s"]
            axes[0].bar(x, conv, width, color=SHARE_COLORS[mode], label=label,
                        hatch=None if r["converge_s"] is not None else "//", edgecolor="white")
            axes[0].annotate(f"{conv:.0f}" + ("" if r["converge_s"] is not None else "+"), (x, conv),
                             textcoords="offset points", xytext=(0, 2), ha="center", fontsize=6.5)
            axes[1].bar(x, 100 * r["pss_fraction"], width, color=SHARE_COLORS[mode])
            if r.get("ideal_fraction"):
                axes[1].plot([x - width / 2, x + width / 2], [100 * r["ideal_fraction"]] * 2, color="black", lw=1)
            axes[2].bar(x, r["ksmd_cpu_s"], width, color=SHARE_COLORS[mode])
            axes[2].bar(x, r["guide_cpu_s"], width, bottom=r["ksmd_cpu_s"], color=SHARE_COLORS[mode],
                        alpha=0.45, hatch="..", edgecolor="white")
    ticks = [f"{n}x{m}M\n{s}%" for n, m, s in groups]
    for ax in axes:
        ax.set_xticks(range(len(groups)), ticks, fontsize=7.5)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.08)
    axes[0].set_ylabel("s from VM start")
    axes[0].set_title("Time until 99% of twins merged\n(hatched: not reached by the timeout)")
    axes[0].legend(loc="upper left", fontsize=7.5)
    axes[1].set_ylabel("% of the guests' memory")
    axes[1].set_title("Host memory used (PSS) when merged\n(line: filled pages, every twin merged)")
    axes[2].set_ylabel("CPU s")
    axes[2].set_title("CPU until then: ksmd (solid)\n+ fabvm-share threads (dotted)")
    return [_save(fig, out, "sharing.png")]


def identities(report, out):
    """Migration time per link and scenario, fabvm with and without live identities against
    QEMU; and the background thread's CPU by dirty rate."""
    m = report["migration"]
    colors = {**COLORS, "fabvm-off": "#aec7e8"}
    fig, axes = plt.subplots(1, len(m["links"]) + 1, figsize=(4.5 * (len(m["links"]) + 1), 3.6))
    for ax, (link_name, L) in zip(axes, m["links"].items()):
        vmms = L["vmms"]
        width = 0.8 / len(vmms)
        for i, sc in enumerate(("random", "sibling100")):
            for j, vmm in enumerate(vmms):
                s = L["results"].get(f"{sc}/{vmm}")
                if s and s["ok"]:
                    _bar(ax, i + (j - (len(vmms) - 1) / 2) * width, s["total_s"], width, colors.get(vmm, "#999"),
                         label=vmm if i == 0 else None, fmt="{:.2f}")
        ax.set_xticks([0, 1], ["nothing at destination", "sibling holds every page"])
        ax.set_ylabel("total time (s)")
        ax.set_title(L["label"], fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[-1]
    rows = report["background"]["rows"]
    ax.bar(range(len(rows)), [r["cpu_percent"] for r in rows], color=COLORS["fabvm"])
    ax.set_xticks(range(len(rows)), [f"{r['dirty_rate']:,}" for r in rows])
    ax.set_xlabel("pages rewritten per second")
    ax.set_ylabel("identity thread CPU (% of a core)")
    ax.set_title("background cost", fontsize=9)
    return [_save(fig, out, "identities.png")]
