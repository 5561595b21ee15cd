"""Choose a speed-up with evidence: a grid of token reductions x input sizes, each point's accuracy on the
user's data, its GMACs, throughput at a large batch and batch-1 latency, the Pareto front and a choice.

    from leanvit.measure.sweep import parse_grid, run_sweep, choose, SWEEP_COLUMNS
    grid = parse_grid(["evit:1.0,0.7,0.5", "tome:0,8,16", "evit-drop:0.7"])
    result = run_sweep(lambda size: my_model_at(size), grid, data="digits", img_sizes=[None, (56, 56)])
    best = choose(result.rows, max_drop=0.5)            # fastest point within 0.5 top-1 of the baseline

Every point runs the same weights: a method is applied to a copy of the model (one copy per method and
size; its strengths are fixed-strength views, :class:`leanvit.reduction.fixed.AtStrength`). The model's task
(:class:`leanvit.tasks.Task`) supplies the configurations (:meth:`~leanvit.tasks.Task.sweep_variants`), the
evaluation data and metrics (the same images and numbers ``leanvit eval`` gives for that configuration:
top-1 for classification, mAP for detection, mIoU for segmentation; the first of its
:attr:`~leanvit.tasks.Task.sweep_columns` ranks the points) and the input it is timed on. Speed is
measured for all points in **one** interleaved run (:func:`leanvit.measure.interleaved_measure`): throughput
at ``batch_size`` and batch-1 latency (median and p90 of ``latency_repeats`` single-image calls).
``speedup`` is over the baseline: the unreduced model at its own input size.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Subset
from tqdm import tqdm

from leanvit.errors import LeanvitError
from leanvit.measure.flops import gmacs
from leanvit.measure.timing import interleaved_measure
from leanvit.models.build import BuiltModel
from leanvit.reduction import applied_reduction, get_reduction, is_none_text, parse_strengths, remove_reduction
from leanvit.tasks import Task
from leanvit.tasks.registry import DEFAULT_TASK, get_task
from leanvit.utils import model_input_size, to_2tuple

logger = logging.getLogger(__name__)

__all__ = ["SweepPoint", "SweepResult", "parse_grid", "run_sweep", "pareto_front", "choose", "apply_line",
           "plot_pareto", "SWEEP_COLUMNS", "sweep_columns"]

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
    """Runs ``model`` on its own fixed input (so points of different input sizes, and models that take a
    list of images, can be timed in one interleaved run); the input ``interleaved_measure`` passes is ignored."""

    def __init__(self, model: nn.Module, x):
        super().__init__()
        self.model = model
        self.x = x

    def forward(self, _ignored):
        return self.model(self.x)


def _to(x, device):
    return [t.to(device) for t in x] if isinstance(x, (list, tuple)) else x.to(device)


def _label(reduction: str, strength: str, hw) -> str:
    return f"{reduction} @{hw[0]}x{hw[1]}" if reduction == "none" else f"{reduction}:{strength} @{hw[0]}x{hw[1]}"


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
    return list(loader)


def _as_built(b, config):
    """``build``'s result as a :class:`BuiltModel` (a plain (model, (H, W)) pair is accepted too)."""
    if isinstance(b, BuiltModel):
        return b._replace(config=b.config if b.config is not None else config)
    model, hw = b
    return BuiltModel(model, "", to_2tuple(hw), config, None)


def sweep_columns(task: Task) -> tuple:
    """The table's columns for ``task``: its metrics (:attr:`Task.sweep_columns`), the drop in the first one,
    GMACs and the speed figures."""
    score, head, _ = task.sweep_columns[0]
    return (SWEEP_COLUMNS[:3] + tuple(task.sweep_columns) + ((f"{score}_drop", "drop", task.sweep_columns[0][2]),)
            + SWEEP_COLUMNS[6:])


def run_sweep(build: Callable[[Optional[Tuple[int, int]]], Any], grid: Sequence[SweepPoint], data,
              img_sizes: Sequence[Optional[Tuple[int, int]]] = (None,), config: Optional[dict] = None,
              batch_size: int = 64, eval_batch_size: int = 64, limit_images: Optional[int] = None, device="cpu",
              warmup: int = 2, repeats: int = 5, latency_repeats: int = 15, workers: int = 0, progress: bool = True,
              cache_mb: float = 1024, extra_models: Optional[Dict[str, nn.Module]] = None,
              task: Optional[Task] = None, variant_options: Optional[Dict[str, Any]] = None) -> SweepResult:
    """Evaluate and time every (input size, configuration) point.

    Args:
        build: ``build(img_size)`` -> a :class:`leanvit.models.build.BuiltModel` (or a (model, (H, W)) pair);
            ``None`` = the model's own size. Called once per size.
        grid: points from :func:`parse_grid`; the task turns them into configurations
            (:meth:`leanvit.tasks.Task.sweep_variants`; the unreduced model is always the first).
        data: evaluation data (evaluated as the task prepares it: :meth:`leanvit.tasks.Task.eval_data`).
        config: the training config a checkpoint records (its data options and crop ratio are used).
        batch_size: batch of the throughput measurement; eval_batch_size: of the evaluation.
        limit_images: evaluate on this many images spread over the data (a quick look).
        cache_mb: evaluation data up to this size is prepared once per input size and kept in memory.
        extra_models: other models to place among the points as they are (e.g. a fine-tuned EViT model:
            ``{"evit fine-tuned": model}``), evaluated at their own input size and strength, timed in the
            same interleaved run; their rows have ``reduction`` = the given name. A ``(model, (H, W))`` pair
            gives the input size (a dense model's is not in its config).
        variant_options: task-specific options of the configurations (a dense task's ``restore``: the
            restoration strategies to sweep), given to :meth:`leanvit.tasks.Task.sweep_variants`.
        task: the model's :class:`leanvit.tasks.Task` (default: classification); its first sweep column
            (top-1, mAP, mIoU) ranks the points.
    Returns a :class:`SweepResult`; each row has ``label, reduction, strength, value, img_size``, the task's
    metric columns (classification: ``top1, top5, loss``), ``images``, ``<metric>_drop``, ``gmacs,
    img_per_s, speedup, latency_ms, p90_ms, front`` and the setting fields."""
    task = task or get_task(DEFAULT_TASK)
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

    def eval_loader(built):
        dataset, _ = task.eval_data(built, data, "val", eval_batch_size, workers, device, check_classes=False)
        dataset = _limited(dataset, limit_images)
        return dataset, task.loader(dataset, eval_batch_size, workers, device)

    points: List[dict] = []
    own_hw = None
    bar = tqdm(total=len(sizes) * (len(grid) + 1), desc="sweep: accuracy", unit="point", disable=not progress,
               leave=False)
    for size in sizes:
        built = _as_built(build(size), config)
        hw = to_2tuple(built.img_size)
        if size is None:
            own_hw = hw
        elif hw == own_hw and any(p["hw"] == hw for p in points):
            continue
        base = built.model.eval()
        plain = remove_reduction(copy.deepcopy(base))
        dataset, loader = eval_loader(built._replace(model=plain))
        loader = _cached(loader, len(dataset), hw, cache_mb)
        for v in task.sweep_variants(base, plain, [p for p in grid if p != (None, None)], **(variant_options or {})):
            res = task.evaluate(v.model, loader, device=device, progress=False, dataset=dataset)
            point = _point(task, _label(v.reduction, v.strength, hw), v.reduction, v.strength, v.value, hw, res,
                           v.model)
            if v.restore is not None:  # a dense configuration: the method and its restoration
                point.update(method=v.method, restore=v.restore)
            points.append(point)
            bar.update()
            bar.set_postfix_str(point["label"])
        if size is None:
            for name, model in (extra_models or {}).items():
                model, mhw = model if isinstance(model, tuple) else (model, model_input_size(model))
                mhw = to_2tuple(mhw)
                ds, ld = (dataset, loader) if mhw == hw else eval_loader(built._replace(model=model, img_size=mhw))
                points.append(_extra_point(task, name, model.eval(), mhw, ld, ds, device))
    bar.close()
    rows = _timed_rows(task, points, batch_size, device, warmup, repeats, latency_repeats, progress)
    return SweepResult(rows, rows[0], dict(batch_size=batch_size, repeats=repeats, latency_repeats=latency_repeats,
                                           device=str(device), threads=torch.get_num_threads(),
                                           score=task.sweep_columns[0][0]))


def _point(task: Task, label: str, reduction: str, strength: str, value, hw, res: dict, model: nn.Module) -> dict:
    keys = [c[0] for c in task.sweep_columns] + ["loss"]
    return dict(label=label, reduction=reduction, strength=strength, value=value, hw=hw,
                img_size=f"{hw[0]}x{hw[1]}", **{k: res[k] for k in keys if k in res}, images=res["images"],
                gmacs=gmacs(model, hw, example=task.example_input(1, hw)), _model=model)


def _extra_point(task: Task, name: str, model: nn.Module, hw, loader, dataset, device) -> dict:
    """A given model among the points, at its own input size and strength."""
    res = task.evaluate(model, loader, device=device, progress=False, dataset=dataset)
    method = applied_reduction(model)
    strength = method.format_strength(method.get_strength(model)) if method else "-"
    return _point(task, f"{name} @{hw[0]}x{hw[1]}", name, strength, None, hw, res, model)


def _timed_rows(task: Task, points: List[dict], batch_size: int, device, warmup: int, repeats: int,
                latency_repeats: int, progress: bool) -> List[dict]:
    """Speed of all points in one interleaved run at ``batch_size`` and one at batch 1; the rows with
    throughput, speed-up over the first point, latency and the Pareto fronts."""
    steps = tqdm(total=2, desc="sweep: timing", unit="run", disable=not progress, leave=False)
    inputs: Dict[tuple, Any] = {}  # one random batch per (batch size, input size), shared

    def fixed(p, batch):
        key = (batch, p["hw"])
        if key not in inputs:
            inputs[key] = _to(task.example_input(batch, p["hw"]), device)
        return _FixedInput(p["_model"], inputs[key])

    big = {p["label"]: fixed(p, batch_size) for p in points}
    thr = interleaved_measure(big, batch_size=1, img_size=8, device=device, warmup=warmup, repeats=repeats)
    steps.update()
    one = {p["label"]: fixed(p, 1) for p in points}
    lat = interleaved_measure(one, batch_size=1, img_size=8, device=device, warmup=warmup, repeats=latency_repeats)
    steps.update()
    steps.close()
    baseline = points[0]
    score = task.sweep_columns[0][0]
    base_ips = batch_size / (thr[baseline["label"]].latency_ms / 1e3)
    rows = []
    for p in points:
        t, b1 = thr[p["label"]], lat[p["label"]]
        ips = batch_size / (t.latency_ms / 1e3)
        row = {k: v for k, v in p.items() if not k.startswith("_") and k != "hw"}
        if baseline.get(score) is None or p.get(score) is None:  # undefined (no ground truth): no drop either
            drop = None
        else:
            drop = baseline[score] - p[score] if task.higher_is_better else p[score] - baseline[score]
        row.update({f"{score}_drop": drop}, img_per_s=ips, speedup=ips / base_ips,
                   latency_ms=b1.latency_ms, p90_ms=b1.p90_ms, batch_size=batch_size, device=t.device, dtype=t.dtype,
                   threads=t.threads)
        rows.append(row)
    fast = pareto_front(rows, "img_per_s", higher=True, score=score, score_higher=task.higher_is_better)
    quick = pareto_front(rows, "latency_ms", higher=False, score=score, score_higher=task.higher_is_better)
    for i, row in enumerate(rows):
        row["front"] = "+".join(n for n, f in (("thr", fast), ("lat", quick)) if i in f) or "-"
    return rows


def pareto_front(rows: Sequence[dict], speed_key: str, higher: bool = True, score: str = "top1",
                 score_higher: bool = True) -> List[int]:
    """Indices of the rows no other row beats on both ``score`` (top-1, mAP, ...; ``score_higher``: more is
    better) and ``speed_key`` (``higher``: more is better, e.g. img/s; else less, e.g. latency), sorted from
    fastest to slowest."""
    def speed(r):
        return r[speed_key] if higher else -r[speed_key]

    def good(r):
        return r[score] if score_higher else -r[score]

    front = []
    scored = [(j, o) for j, o in enumerate(rows) if o.get(score) is not None]  # an undefined score: on no front
    for i, r in scored:
        dominated = any(speed(o) >= speed(r) and good(o) >= good(r)
                        and (speed(o) > speed(r) or good(o) > good(r)) for j, o in scored if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: -speed(rows[i]))


def choose(rows: Sequence[dict], max_drop: Optional[float] = None, target_speedup: Optional[float] = None,
           speed_key: str = "img_per_s", score: str = "top1", score_higher: bool = True) -> Optional[dict]:
    """The configuration to use: with ``max_drop``, the fastest point whose ``score`` (top-1, mAP, mIoU:
    the task's metric, in its own units) is at most ``max_drop`` below the baseline (and, with
    ``target_speedup`` too, at least that fast); with only ``target_speedup``, the best-scoring point at
    least that much faster. None if no point qualifies."""
    if max_drop is None and target_speedup is None:
        return None
    ok = [r for r in rows if r.get(score) is not None and r.get(f"{score}_drop") is not None
          and (max_drop is None or r[f"{score}_drop"] <= max_drop + 1e-9)
          and (target_speedup is None or r["speedup"] >= target_speedup)]
    if not ok:
        return None
    higher = speed_key != "latency_ms"

    def good(r):
        return r[score] if score_higher else -r[score]

    if max_drop is not None:
        return max(ok, key=lambda r: (r[speed_key] if higher else -r[speed_key], good(r)))
    return max(ok, key=lambda r: (good(r), r[speed_key] if higher else -r[speed_key]))


def apply_line(row: dict) -> Tuple[str, str]:
    """(command-line options, Python line) that apply the configuration of ``row``."""
    size = row["img_size"].split("x")
    size_opt = f" --img-size {size[0]}" if size[0] == size[1] else f" --img-size {size[0]} {size[1]}"
    if row["reduction"] == "none":
        return size_opt.strip(), "leanvit.reduction.remove_reduction(model)"
    if row.get("value") is None:  # a model placed among the points as it is (``extra_models``)
        return size_opt.strip(), f"# {row['reduction']}: the model as it is"
    m = get_reduction(row.get("method") or row["reduction"])
    value = row["value"]
    value_py = list(value) if isinstance(value, tuple) else value
    if row.get("restore") not in (None, "", "-", "none"):  # a dense backbone's restoration
        text = f"{m.name}:{m.format_strength(value)}"
        return (f"--reduction {text} --restore {row['restore']}{size_opt}",
                f"leanvit.dense.apply_dense_reduction(model, {text!r}, restore={row['restore']!r})")
    return (f"--reduction {m.name}:{m.format_strength(value)}{size_opt}",
            f"leanvit.apply_reduction(model, {m.name!r}, {m.knob}={value_py!r})")


def plot_pareto(rows: Sequence[dict], path, title: str = "", chosen: Optional[dict] = None, score: str = "top1",
                score_label: str = "val top-1 (%)", score_higher: bool = True) -> Path:
    """``score`` (top-1, mAP, ...) against throughput and against batch-1 latency; one colour per method,
    the Pareto front of each panel joined and ringed, the baseline a star, the chosen point (if any) a red
    square."""
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
            if r.get(score) is None:  # undefined: nothing to place
                continue
            c = f"C{methods.index(r['reduction']) % 10}"
            mk = "*" if r is rows[0] else markers[sizes.index(r["img_size"]) % len(markers)]
            ax.scatter(r[key], r[score], color=c, marker=mk, s=120 if mk == "*" else 36, zorder=3)
            text = r["strength"] if r["reduction"] != "none" else ("base" if r is rows[0] else "none")
            ax.annotate(text, (r[key], r[score]),
                        textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = pareto_front(rows, key, higher, score, score_higher)
        fx = [rows[i][key] for i in front]
        fy = [rows[i][score] for i in front]
        ax.plot(fx, fy, "-", color="0.3", lw=1.2, zorder=2, label="Pareto front")
        ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="k", lw=1.2, zorder=4)
        if chosen is not None:
            ax.scatter([chosen[key]], [chosen[score]], s=220, marker="s", facecolors="none", edgecolors="red",
                       lw=2, zorder=5, label="chosen")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(score_label)
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
