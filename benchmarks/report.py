"""Markdown tables and log-log plots from a results JSON."""

import math
from collections import defaultdict


def _fmt_time(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_bytes(b):
    if b is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b} B"


def _cell(r, what):
    if r["status"] != "ok":
        return r["status"]
    return _fmt_time(r["seconds"]) if what == "time" else _fmt_bytes(r["peak_bytes"])


def groups(results):
    out = defaultdict(list)
    for r in results:
        out[(r["kind"], r["mode"], r["dtype"], r["dim"])].append(r)
    return out


def markdown(data, baseline="ours:reference", fused=None):
    """One table per (kind, mode, dtype, d): rows = 2B (or B), columns = providers (time / peak
    memory), plus the fused/baseline ratios where both ran."""
    lines = [f"Machine: {data['machine'].get('cpu_model')} ({data['machine'].get('cpu_cores')} cores"
             f"{', GPU ' + data['machine']['gpu_name'] if data['machine'].get('gpu_name') else ''}), "
             f"torch {data['machine'].get('torch')}, commit {data['machine'].get('git_commit')}.", ""]
    for (kind, mode, dtype, dim), rs in sorted(groups(data["results"]).items()):
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        fused_name = fused or next((p for p in provs if p.startswith("ours:") and p != baseline), None)
        by = {(r["rows"], r["provider"]): r for r in rs}
        rows_name = "B" if kind == "clip" else "2B"
        lines.append(f"### {kind}, {mode}, {dtype}, d = {dim} ({data['device']})")
        lines.append("")
        head = [rows_name] + [f"{p} time" for p in provs] + [f"{p} peak mem" for p in provs]
        ratio = fused_name and baseline in provs and fused_name != baseline
        if ratio:
            head += [f"time {fused_name}/{baseline.split(':')[-1]}", f"memory {fused_name}/{baseline.split(':')[-1]}"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for n in sorted({r["rows"] for r in rs}):
            cells = [str(n)]
            cells += [_cell(by[(n, p)], "time") if (n, p) in by else "" for p in provs]
            cells += [_cell(by[(n, p)], "mem") if (n, p) in by else "" for p in provs]
            if ratio:
                a, b = by.get((n, fused_name)), by.get((n, baseline))
                if a and b and a["status"] == b["status"] == "ok":
                    cells.append(f"{a['seconds'] / b['seconds']:.2f}x")
                    cells.append(f"1/{b['peak_bytes'] / a['peak_bytes']:.0f}" if a["peak_bytes"] > 0 < b["peak_bytes"]
                                 else "-")
                else:
                    cells += ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(data, out_dir, prefix):
    """One PNG per (kind, mode, dtype, d): time and peak memory against 2B, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (kind, mode, dtype, dim), rs in sorted(groups(data["results"]).items()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for p in dict.fromkeys(r["provider"] for r in rs):
            ok = sorted((r["rows"], r) for r in rs if r["provider"] == p and r["status"] == "ok")
            if not ok:
                continue
            xs = [n for n, _ in ok]
            style = "-o" if p.startswith("ours:") else "--s"
            axes[0].plot(xs, [r["seconds"] for _, r in ok], style, label=p)
            axes[1].plot(xs, [max(r["peak_bytes"], 1) / 2**20 for _, r in ok], style, label=p)
            failed = [r for r in rs if r["provider"] == p and r["status"] in ("OOM", "TIMEOUT")]
            for r in failed[:1]:
                axes[0].annotate(r["status"], (xs[-1], ok[-1][1]["seconds"]), fontsize=8)
        rows_name = "B (pairs)" if kind == "clip" else "2B (anchors)"
        for ax, ylabel in zip(axes, ("median time per step (s)", "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(rows_name)
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


def headline(data, rows=8192, dim=128, kind="nt_xent", mode="forward+backward", dtype="float32",
             fused="ours:cpu", baseline="ours:reference"):
    """(time ratio, memory ratio) fused/baseline at one shape, or None."""
    by = {r["provider"]: r for r in data["results"] if (r["kind"], r["mode"], r["dtype"], r["dim"], r["rows"])
          == (kind, mode, dtype, dim, rows)}
    a, b = by.get(fused), by.get(baseline)
    if not (a and b and a["status"] == b["status"] == "ok"):
        return None
    return a["seconds"] / b["seconds"], a["peak_bytes"] / b["peak_bytes"] if b["peak_bytes"] else math.nan
