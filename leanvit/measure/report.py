"""Result tables, CSV files and bar plots of measurements (shared by bench, demo and sweep)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Sequence, Tuple

__all__ = ["format_table", "BENCH_COLUMNS", "RUNTIME_COLUMNS", "LATENCY_COLUMNS", "HEAD_COLUMNS", "write_csv",
           "plot_benchmark"]


def format_table(rows: List[dict], columns: Sequence[Tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are (key, header, format spec); None values print as n/a."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, spec in columns:
            v = r.get(key)
            line.append("n/a" if v is None else (format(v, spec) if spec else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, line in enumerate(cells):
        parts = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(parts).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


BENCH_COLUMNS = (
    ("model", "model", ""), ("reduction", "reduction", ""), ("strength", "strength", ""),
    ("img_size", "img size", ""),
    ("params_m", "params (M)", ".2f"), ("gmacs", "GMACs", ".3f"), ("img_per_s", "img/s", ".1f"),
    ("latency_ms", "ms/batch", ".2f"), ("peak_mem_mb", "peak mem (MiB)", ".1f"), ("speedup", "speed-up", ".2f"),
)


#: extra columns of ``leanvit bench --runtime ...`` and of the batch-1 latency pass
RUNTIME_COLUMNS = (("runtime", "runtime", ""), ("setup_s", "compile/export (s)", ".1f"))
LATENCY_COLUMNS = (("lat1_ms", "b1 ms (median)", ".2f"), ("lat1_p90_ms", "b1 ms (p90)", ".2f"))
#: the part before the head timed beside the whole model (``benchmark_models(..., backbones=...)``)
HEAD_COLUMNS = (("backbone_ms", "backbone ms", ".2f"), ("head_share", "head share", ".0%"))


def write_csv(rows: List[dict], path) -> Path:
    """Rows as CSV (known columns first, then any extra fields; None as empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["model", "reduction", "strength", "keep_rate", "img_size", "batch_size", "params_m", "gmacs",
            "img_per_s", "latency_ms", "p90_ms", "peak_mem_mb", "speedup", "device", "dtype", "threads"]
    keys += [k for r in rows for k in r if k not in keys and k != "label"]
    keys = list(dict.fromkeys(keys))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r[k]))
                        for k in keys})
    return path


def _short(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.2g}"


def plot_benchmark(rows: List[dict], path, title: str = "") -> Path:
    """Horizontal bars of img/s per configuration (speed-up annotated) and, where known, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [r["label"] for r in rows]
    has_mem = any(r.get("peak_mem_mb") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(12 if has_mem else 7.5, 0.45 * len(rows) + 1.6),
                             squeeze=False, sharey=True)
    y = list(range(len(rows)))[::-1]
    colors = [f"C{sorted(set(r['model'] for r in rows), key=[q['model'] for q in rows].index).index(r['model']) % 10}"
              for r in rows]
    ax = axes[0][0]
    ips = [r["img_per_s"] for r in rows]
    ax.barh(y, ips, color=colors)
    for yi, r in zip(y, rows):
        ax.text(r["img_per_s"], yi, f" {_short(r['img_per_s'])} ({r['speedup']:.2f}x)", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("images / s (higher is better)")
    ax.set_xlim(0, max(ips) * 1.35)
    if has_mem:
        ax = axes[0][1]
        mem = [r.get("peak_mem_mb") or 0.0 for r in rows]
        ax.barh(y, mem, color=colors)
        for yi, r in zip(y, rows):
            v = r.get("peak_mem_mb")
            ax.text(v or 0.0, yi, " n/a" if v is None else f" {_short(v)}", va="center", fontsize=8)
        ax.set_xlabel("peak memory of a forward pass (MiB, lower is better)")
        ax.set_xlim(0, max(mem) * 1.25 or 1.0)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


