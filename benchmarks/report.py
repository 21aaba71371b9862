"""Markdown tables and log-log plots from a results JSON (``python -m benchmarks`` writes both)."""

import importlib.util
from collections import defaultdict

from . import cases

# The materialising baselines the fused loss is compared with, where they ran.
BASELINES = ("ours:reference", "materialised:fp32", "materialised:bf16")
FAILED = ("OOM", "TIMEOUT")


def fmt_time(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(b):
    if b is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b} B"


def _cell(r, what):
    if r["status"] != "ok":
        return r["status"]
    return fmt_time(r["seconds"]) if what == "time" else fmt_bytes(r["peak_bytes"])


def _ratios(fused, base):
    """(time, memory) cells of fused/base: "0.43x" and "1/42"."""
    if not (fused and base and fused["status"] == base["status"] == "ok"):
        return ["-", "-"]
    both_measured = fused["peak_bytes"] > 0 < base["peak_bytes"]
    memory = f"1/{base['peak_bytes'] / fused['peak_bytes']:.0f}" if both_measured else "-"
    return [f"{fused['seconds'] / base['seconds']:.2f}x", memory]


def _load(m):
    """The sentence on the load average (1, 5, 15 min) at the start and the end of the run, if recorded."""
    def fmt(avg):
        return "/".join(f"{a:.1f}" for a in avg)

    if not m.get("load_average"):
        return ""
    end = f", {fmt(m['load_average_finished'])} at the end" if m.get("load_average_finished") else ""
    return f" Load average (1/5/15 min) {fmt(m['load_average'])} at the start{end}."


def groups(results):
    out = defaultdict(list)
    for r in results:
        out[(r["kind"], r["mode"], r["dtype"], r["dim"])].append(r)
    return out


def _rows_label(kind):
    return cases.CASES[kind].rows_label if kind in cases.CASES else "rows"


def markdown(data):
    """One table per (kind, mode, dtype, d): rows = sizes, columns = providers (time, then peak
    memory), then the first fused backend's time and memory against each materialising baseline."""
    m = data["machine"]
    lines = [f"Machine: {m.get('cpu_model')} ({m.get('cpu_cores')} cores"
             f"{', GPU ' + m['gpu_name'] if m.get('gpu_name') else ''}), "
             f"torch {m.get('torch')}, commit {m.get('git_commit')}.{_load(m)}", ""]
    for (kind, mode, dtype, dim), rs in sorted(groups(data["results"]).items()):
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        fused = next((p for p in provs if p.startswith("ours:") and p not in BASELINES), None)
        bases = [b for b in BASELINES if b in provs] if fused else []
        by = {(r["rows"], r["provider"]): r for r in rs}
        lines += [f"### {kind}, {mode}, {dtype}, d = {dim} ({data['device']})", ""]
        head = [_rows_label(kind)] + [f"{p} time" for p in provs] + [f"{p} peak mem" for p in provs]
        for b in bases:
            head += [f"time {fused}/{b.removeprefix('ours:')}", f"memory {fused}/{b.removeprefix('ours:')}"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for n in sorted({r["rows"] for r in rs}):
            cells = [str(n)]
            cells += [_cell(by[(n, p)], "time") if (n, p) in by else "" for p in provs]
            cells += [_cell(by[(n, p)], "mem") if (n, p) in by else "" for p in provs]
            for b in bases:
                cells += _ratios(by.get((n, fused)), by.get((n, b)))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def can_plot():
    """Whether matplotlib is installed (the plots need it; JSON and markdown do not)."""
    return importlib.util.find_spec("matplotlib") is not None


def plots(data, out_dir, prefix):
    """One PNG per (kind, mode, dtype, d): time and peak memory against the size, log-log. A
    provider that ran out of memory or time is marked at the first size that failed (a dotted
    vertical line in its colour, labelled OOM/TIMEOUT), not at the last one that fitted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (kind, mode, dtype, dim), rs in sorted(groups(data["results"]).items()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        any_memory = False  # a log axis needs a positive value: without one the memory panel stays linear
        for i, p in enumerate(dict.fromkeys(r["provider"] for r in rs)):
            series = sorted((r for r in rs if r["provider"] == p), key=lambda r: r["rows"])
            ok = [r for r in series if r["status"] == "ok"]
            failed = next((r for r in series if r["status"] in FAILED), None)
            style, color = ("-o" if p.startswith("ours:") else "--s"), palette[i % len(palette)]
            if ok:
                xs = [r["rows"] for r in ok]
                axes[0].plot(xs, [r["seconds"] for r in ok], style, label=p, color=color)
                measured = [r for r in ok if r["peak_bytes"] > 0]  # 0: below what RSS resolves
                any_memory = any_memory or bool(measured)
                axes[1].plot([r["rows"] for r in measured], [r["peak_bytes"] / 2**20 for r in measured], style,
                             label=p, color=color)
            if failed:
                for ax in axes:
                    ax.axvline(failed["rows"], ls=":", lw=1.2, color=color,
                               label=None if ok else f"{p} ({failed['status']})")
                    ax.annotate(f"{p}: {failed['status']}", (failed["rows"], 0.98),
                                xycoords=ax.get_xaxis_transform(), rotation=90, va="top", ha="right",
                                fontsize=7, color=color)
        for ax, ylabel, log in zip(axes, ("median time per step (s)", "peak extra memory (MiB)"), (True, any_memory)):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log" if log else "linear")
            ax.set_xlabel(_rows_label(kind))
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{kind} {mode}, {dtype}, d={dim}, {data['device']}"
                     f" ({data['machine'].get('gpu_name') or data['machine'].get('cpu_model')})")
        fig.tight_layout()
        name = f"{prefix}_{kind}_{mode.replace('+', '_')}_{dtype}_d{dim}.png"
        fig.savefig(f"{out_dir}/{name}", dpi=110)
        plt.close(fig)
        written.append(name)
    return written
