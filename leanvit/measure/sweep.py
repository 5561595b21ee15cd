"""Choose a speed-up with evidence: a grid of token reductions x input sizes, each point's accuracy on the
user's data, its GMACs, throughput at a large batch and batch-1 latency, the Pareto front and a choice.

    from leanvit.measure.sweep import parse_grid, run_sweep, choose, SWEEP_COLUMNS
    grid = parse_grid(["evit:1.0,0.7,0.5", "tome:0,8,16", "evit-drop:0.7"])
    result = run_sweep(lambda size: my_model_at(size), grid, data="digits", img_sizes=[None, (56, 56)])
    best = choose(result.rows, max_drop=0.5)            # fastest point within 0.5 top-1 of the baseline

Every point runs the same weights: a method is applied to a copy of the model (one copy per method and
size; its strengths are forward-call overrides, as :class:`leanvit.measure.ReducedView`). Accuracy comes
from :func:`leanvit.evaluate.evaluate` on :func:`leanvit.data.build_eval_dataset` (the same images and
numbers ``leanvit eval`` gives for that configuration). Speed is measured for all points in **one**
interleaved run (:func:`leanvit.measure.interleaved_measure`): throughput at ``batch_size`` and batch-1
latency (median and p90 of ``latency_repeats`` single-image calls). ``speedup`` is over the baseline: the
unreduced model at its own input size.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from leanvit.data import build_eval_dataset, dataset_options
from leanvit.errors import LeanvitError
from leanvit.evaluate import evaluate
from leanvit.measure.flops import gmacs
from leanvit.measure.timing import interleaved_measure
from leanvit.reduction import applied_reduction, get_reduction, is_none_text, parse_strengths, remove_reduction
from leanvit.utils import model_input_size, to_2tuple

logger = logging.getLogger(__name__)

__all__ = ["SweepPoint", "SweepResult", "parse_grid", "run_sweep", "pareto_front", "choose", "apply_line",
           "plot_pareto", "SWEEP_COLUMNS"]

#: (method name or None, strength or None): None/None = the model without any reduction
SweepPoint = Tuple[Optional[str], Any]

SWEEP_COLUMNS = (
    ("reduction", "reduction", ""), ("strength", "strength", ""), ("img_size", "img size", ""),
    ("top1", "top-1", ".2f"), ("top5", "top-5", ".2f"), ("top1_drop", "drop", ".2f"), ("gmacs", "GMACs", ".3f"),
    ("img_per_s", "img/s", ".1f"), ("speedup", "speed-up", ".2f"), ("latency_ms", "b1 ms", ".2f"),
    ("p90_ms", "b1 p90", ".2f"), ("front", "pareto", ""),
)


@dataclass
class SweepResult:
    rows: List[dict]
    baseline: dict
    settings: Dict[str, Any] = field(default_factory=dict)


def parse_grid(specs: Sequence[str]) -> List[SweepPoint]:
    """``["evit:1.0,0.7", "tome:0,8", "none"]`` -> [("evit", 1.0), ("evit", 0.7), ("tome", 0), ("tome", 8),
    (None, None)], in order, duplicates removed."""
    out: List[SweepPoint] = []
    for text in specs:
        for part in str(text).split():
            if is_none_text(part):
                out.append((None, None))
                continue
            method, values = parse_strengths(part)
            out += [(method.name, v) for v in (values or [method.none_value])]
    return list(dict.fromkeys(out))


class _FixedInput(nn.Module):
    """Runs ``model`` at a fixed strength on its own fixed input (so points of different input sizes can be
    timed in one interleaved run); the input ``interleaved_measure`` passes is ignored."""

    def __init__(self, model: nn.Module, kwargs: dict, x: torch.Tensor):
        super().__init__()
        self.model = model
        self.kwargs = kwargs
        self.register_buffer("x", x, persistent=False)

    def forward(self, _ignored):
        return self.model(self.x, **self.kwargs)


def _label(method: Optional[str], value, hw) -> str:
    if method is None:
        return f"none @{hw[0]}x{hw[1]}"
    return f"{method}:{get_reduction(method).format_strength(value)} @{hw[0]}x{hw[1]}"


def _limited(dataset, limit: Optional[int]):
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise LeanvitError(f"`limit_images` must be >= 1, got {limit}")
    n = len(dataset)
    return Subset(dataset, [int(i * n / limit) for i in range(limit)])  # spread: every class represented


def _cached(loader, n: int, hw, cache_mb: float):
    """The loader's batches decoded once and kept in memory when they fit in ``cache_mb`` (every point is
    evaluated on the same images, so they are read and transformed once, not once per point); else the
    loader itself."""
    if n * 3 * hw[0] * hw[1] * 4 > cache_mb * 2**20:
        return loader
    return [(x, torch.as_tensor(y)) for x, y in loader]


def run_sweep(build: Callable[[Optional[Tuple[int, int]]], Tuple[nn.Module, Tuple[int, int]]],
              grid: Sequence[SweepPoint], data, img_sizes: Sequence[Optional[Tuple[int, int]]] = (None,),
              config: Optional[dict] = None, batch_size: int = 64, eval_batch_size: int = 64,
              limit_images: Optional[int] = None, device="cpu", warmup: int = 2, repeats: int = 5,
              latency_repeats: int = 15, workers: int = 0, progress: bool = True,
              cache_mb: float = 1024, extra_models: Optional[Dict[str, nn.Module]] = None) -> SweepResult:
    """Evaluate and time every (input size, reduction) point.

    Args:
        build: ``build(img_size)`` -> (model, (H, W)); ``None`` = the model's own size. Called once per size.
        grid: points from :func:`parse_grid`; the unreduced baseline at the model's own size is added.
        data: ``"digits"`` or an ImageFolder tree (evaluated as :func:`build_eval_dataset` prepares it).
        config: the training config a checkpoint records (its data options and crop ratio are used).
        batch_size: batch of the throughput measurement; eval_batch_size: of the accuracy evaluation.
        limit_images: evaluate on this many images spread over the data (a quick look).
        cache_mb: evaluation data up to this size is prepared once per input size and kept in memory.
        extra_models: other models to place among the points as they are (e.g. a fine-tuned EViT model:
            ``{"evit fine-tuned": model}``), evaluated at their own input size and strength, timed in the
            same interleaved run; their rows have ``reduction`` = the given name.
    Returns a :class:`SweepResult`; each row has ``label, reduction, strength, value, img_size, top1, top5,
    loss, images, top1_drop, gmacs, img_per_s, speedup, latency_ms, p90_ms, front`` and the setting fields."""
    if not grid:
        raise LeanvitError("the sweep grid is empty: give `reduction`, e.g. evit:1.0,0.7 tome:0,8")
    for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                    ("repeats", repeats), ("latency_repeats", latency_repeats)):
        if v < 1:
            raise LeanvitError(f"`{name}` must be >= 1, got {v}")
    device = torch.device(device)
    sizes = list(dict.fromkeys(None if s is None else to_2tuple(s) for s in img_sizes)) or [None]
    if None not in sizes:
        sizes = [None] + sizes  # the baseline lives at the model's own size

    def eval_loader(model, hw):
        dataset = _limited(build_eval_dataset(data, model, hw, config=config, options=dataset_options(data, config)),
                           limit_images)
        return dataset, DataLoader(dataset, batch_size=eval_batch_size, shuffle=False, num_workers=workers)

    points: List[dict] = []
    own_hw = None
    bar = tqdm(total=len(sizes) * (len(grid) + 1), desc="sweep: accuracy", unit="point", disable=not progress,
               leave=False)
    for size in sizes:
        base, hw = build(size)
        hw = to_2tuple(hw)
        if size is None:
            own_hw = hw
        elif hw == own_hw and any(p["hw"] == hw for p in points):
            continue
        base = base.eval()
        plain = remove_reduction(copy.deepcopy(base))
        dataset, loader = eval_loader(plain, hw)
        loader = _cached(loader, len(dataset), hw, cache_mb)
        for point in _size_points(base, plain, hw, grid, loader, device):
            points.append(point)
            bar.update()
            bar.set_postfix_str(point["label"])
        if size is None:
            for name, model in (extra_models or {}).items():
                mhw = to_2tuple(model_input_size(model))
                points.append(_extra_point(name, model.eval(), mhw, loader if mhw == hw else eval_loader(model, mhw)[1],
                                           device))
    bar.close()
    rows = _timed_rows(points, batch_size, device, warmup, repeats, latency_repeats, progress)
    return SweepResult(rows, rows[0], dict(batch_size=batch_size, repeats=repeats, latency_repeats=latency_repeats,
                                           device=str(device), threads=torch.get_num_threads()))


def _point(label: str, reduction: str, strength: str, value, hw, res: dict, model: nn.Module, kwargs: dict) -> dict:
    return dict(label=label, reduction=reduction, strength=strength, value=value, hw=hw,
                img_size=f"{hw[0]}x{hw[1]}", top1=res["top1"], top5=res["top5"], loss=res["loss"],
                images=res["images"], gmacs=gmacs(model, hw, **kwargs), _model=model, _kwargs=kwargs)


def _size_points(base: nn.Module, plain: nn.Module, hw, grid: Sequence[SweepPoint], loader, device):
    """The points of one input size, evaluated (the unreduced one first); one model copy per method, its
    strength set per call."""
    per_method: Dict[str, nn.Module] = {}
    for method, value in [(None, None)] + [p for p in grid if p != (None, None)]:
        if method is None:
            model, kwargs = plain, {}
        else:
            m = get_reduction(method)
            value = m.check_strength(value)
            if method not in per_method:
                if applied_reduction(base) is m:
                    per_method[method] = copy.deepcopy(base)
                else:
                    per_method[method] = m.apply(copy.deepcopy(plain), **{m.knob: value})
            model, kwargs = per_method[method], m.forward_kwargs(value)
        res = evaluate(model, loader, device=device, keep_rate=value if method else None, progress=False)
        strength = "-" if method is None else get_reduction(method).format_strength(value)
        yield _point(_label(method, value, hw), method or "none", strength, value, hw, res, model, kwargs)


def _extra_point(name: str, model: nn.Module, hw, loader, device) -> dict:
    """A given model among the points, at its own input size and strength."""
    res = evaluate(model, loader, device=device, progress=False)
    method = applied_reduction(model)
    strength = method.format_strength(method.get_strength(model)) if method else "-"
    return _point(f"{name} @{hw[0]}x{hw[1]}", name, strength, None, hw, res, model, {})


def _timed_rows(points: List[dict], batch_size: int, device, warmup: int, repeats: int, latency_repeats: int,
                progress: bool) -> List[dict]:
    """Speed of all points in one interleaved run at ``batch_size`` and one at batch 1; the rows with
    throughput, speed-up over the first point, latency and the Pareto fronts."""
    steps = tqdm(total=2, desc="sweep: timing", unit="run", disable=not progress, leave=False)
    inputs: Dict[tuple, torch.Tensor] = {}  # one random batch per (batch size, input size), shared

    def fixed(p, batch):
        x = inputs.setdefault((batch, p["hw"]), torch.randn(batch, 3, *p["hw"]))
        return _FixedInput(p["_model"], p["_kwargs"], x)

    big = {p["label"]: fixed(p, batch_size) for p in points}
    thr = interleaved_measure(big, batch_size=1, img_size=8, device=device, warmup=warmup, repeats=repeats)
    steps.update()
    one = {p["label"]: fixed(p, 1) for p in points}
    lat = interleaved_measure(one, batch_size=1, img_size=8, device=device, warmup=warmup, repeats=latency_repeats)
    steps.update()
    steps.close()
    baseline = points[0]
    base_ips = batch_size / (thr[baseline["label"]].latency_ms / 1e3)
    rows = []
    for p in points:
        t, l = thr[p["label"]], lat[p["label"]]
        ips = batch_size / (t.latency_ms / 1e3)
        row = {k: v for k, v in p.items() if not k.startswith("_") and k != "hw"}
        row.update(top1_drop=baseline["top1"] - p["top1"], img_per_s=ips, speedup=ips / base_ips,
                   latency_ms=l.latency_ms, p90_ms=l.p90_ms, batch_size=batch_size, device=t.device, dtype=t.dtype,
                   threads=t.threads)
        rows.append(row)
    fast = pareto_front(rows, "img_per_s", higher=True)
    quick = pareto_front(rows, "latency_ms", higher=False)
    for i, row in enumerate(rows):
        row["front"] = "+".join(n for n, f in (("thr", fast), ("lat", quick)) if i in f) or "-"
    return rows


def pareto_front(rows: Sequence[dict], speed_key: str, higher: bool = True) -> List[int]:
    """Indices of the rows no other row beats on both top-1 and ``speed_key`` (``higher``: more is
    better, e.g. img/s; else less, e.g. latency), sorted from fastest to slowest."""
    def speed(r):
        return r[speed_key] if higher else -r[speed_key]

    front = []
    for i, r in enumerate(rows):
        dominated = any(speed(o) >= speed(r) and o["top1"] >= r["top1"]
                        and (speed(o) > speed(r) or o["top1"] > r["top1"]) for j, o in enumerate(rows) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: -speed(rows[i]))


def choose(rows: Sequence[dict], max_drop: Optional[float] = None, target_speedup: Optional[float] = None,
           speed_key: str = "img_per_s") -> Optional[dict]:
    """The configuration to use: with ``max_drop``, the fastest point whose top-1 is at most ``max_drop``
    points below the baseline (and, with ``target_speedup`` too, at least that fast); with only
    ``target_speedup``, the most accurate point at least that much faster. None if no point qualifies."""
    if max_drop is None and target_speedup is None:
        return None
    ok = [r for r in rows if (max_drop is None or r["top1_drop"] <= max_drop + 1e-9)
          and (target_speedup is None or r["speedup"] >= target_speedup)]
    if not ok:
        return None
    higher = speed_key != "latency_ms"
    if max_drop is not None:
        return max(ok, key=lambda r: (r[speed_key] if higher else -r[speed_key], r["top1"]))
    return max(ok, key=lambda r: (r["top1"], r[speed_key] if higher else -r[speed_key]))


def apply_line(row: dict) -> Tuple[str, str]:
    """(command-line options, Python line) that apply the configuration of ``row``."""
    size = row["img_size"].split("x")
    size_opt = f" --img-size {size[0]}" if size[0] == size[1] else f" --img-size {size[0]} {size[1]}"
    if row["reduction"] == "none":
        return size_opt.strip(), "leanvit.reduction.remove_reduction(model)"
    if row.get("value") is None:  # a model placed among the points as it is (``extra_models``)
        return size_opt.strip(), f"# {row['reduction']}: the model as it is"
    m = get_reduction(row["reduction"])
    value = row["value"]
    value_py = list(value) if isinstance(value, tuple) else value
    return (f"--reduction {m.name}:{m.format_strength(value)}{size_opt}",
            f"leanvit.apply_reduction(model, {m.name!r}, {m.knob}={value_py!r})")


def plot_pareto(rows: Sequence[dict], path, title: str = "", chosen: Optional[dict] = None) -> Path:
    """Top-1 against throughput and against batch-1 latency; one colour per method, the Pareto front of
    each panel joined and ringed, the baseline a star, the chosen point (if any) a red square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["reduction"] for r in rows))
    sizes = list(dict.fromkeys(r["img_size"] for r in rows))
    markers = "osD^v<>ph"
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.2))
    batch = rows[0].get("batch_size", "?")
    for ax, key, higher, xlabel in ((axes[0], "img_per_s", True, f"throughput (img/s, batch {batch})"),
                                    (axes[1], "latency_ms", False, "batch-1 latency (ms, median)")):
        for r in rows:
            c = f"C{methods.index(r['reduction']) % 10}"
            mk = "*" if r is rows[0] else markers[sizes.index(r["img_size"]) % len(markers)]
            ax.scatter(r[key], r["top1"], color=c, marker=mk, s=120 if mk == "*" else 36, zorder=3)
            text = r["strength"] if r["reduction"] != "none" else ("base" if r is rows[0] else "none")
            ax.annotate(text, (r[key], r["top1"]),
                        textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = pareto_front(rows, key, higher)
        fx = [rows[i][key] for i in front]
        fy = [rows[i]["top1"] for i in front]
        ax.plot(fx, fy, "-", color="0.3", lw=1.2, zorder=2, label="Pareto front")
        ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="k", lw=1.2, zorder=4)
        if chosen is not None:
            ax.scatter([chosen[key]], [chosen["top1"]], s=220, marker="s", facecolors="none", edgecolors="red",
                       lw=2, zorder=5, label="chosen")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=f"C{i % 10}", marker="o", ls="", label=m) for i, m in enumerate(methods)]
    if len(sizes) > 1:
        handles += [plt.Line2D([], [], color="0.4", marker=markers[i % len(markers)], ls="", label=s)
                    for i, s in enumerate(sizes)]
    handles += axes[0].get_legend_handles_labels()[0]
    axes[0].legend(handles=handles, fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
