"""Throughput, latency and peak memory of models, measured the same way everywhere.

Method (as timm's and EViT's benchmarks, made robust): eval mode, ``torch.inference_mode()``, a fixed
random batch, warm-up passes, then ``repeats`` timed runs of ``steps`` forward passes each (device
synchronized around every run); the figure is the **median** run. Every result carries the device,
dtype, batch size and thread count it was measured with.

Python (models you already have)::

    from leanvit.bench import benchmark_models, format_table, BENCH_COLUMNS, write_csv, plot_benchmark
    rows = benchmark_models({"DeiT-T": deit, "EViT-T 0.7": (evit, (224, 224))}, batch_size=32)
    print(format_table(rows, BENCH_COLUMNS)); write_csv(rows, "bench.csv"); plot_benchmark(rows, "bench.png")

Command line::

    leanvit bench --models deit_small_patch16_224,shunted_t --keep-rates none,0.7,0.5 --img-sizes 224
"""
from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from leanvit.errors import LeanvitError

__all__ = ["Measurement", "measure", "interleaved_measure", "environment", "forward_peak_memory_mb", "format_table",
           "benchmark_models", "build_configurations", "write_csv", "plot_benchmark", "check_input_size",
           "resolve_device"]


@dataclass
class Measurement:
    img_per_s: float
    latency_ms: float  # median time of one batch
    batch_size: int
    img_size: tuple
    device: str
    dtype: str
    threads: int
    peak_mem_mb: Optional[float] = None  # set by measure() on CUDA; see forward_peak_memory_mb

    def as_dict(self) -> dict:
        return asdict(self)


def environment(device: str = "cpu") -> str:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return f"device={dev} ({name}), torch {torch.__version__}, threads={torch.get_num_threads()}"


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(model: nn.Module, batch_size: int, img_size, device, dtype, in_chans: int):
    device = torch.device(device)
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch_size, in_chans, h, w, device=device, dtype=dtype)
    return model, x, device, (h, w)


def _timed_run(model, x, steps, device) -> float:
    sync_device(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(x)
    sync_device(device)
    return (time.perf_counter() - t0) / steps


@torch.inference_mode()
def measure(model: nn.Module, batch_size: int = 32, img_size=224, device="cpu", dtype=torch.float32,
            warmup: int = 2, repeats: int = 5, steps: int = 1, in_chans: int = 3) -> Measurement:
    """Median time per batch of ``model`` over ``repeats`` runs of ``steps`` forwards each."""
    model, x, device, hw = _prepare(model, batch_size, img_size, device, dtype, in_chans)
    for _ in range(warmup):
        model(x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [_timed_run(model, x, steps, device) for _ in range(repeats)]
    t = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Measurement(batch_size / t, t * 1e3, batch_size, hw, str(device), str(dtype).replace("torch.", ""),
                       torch.get_num_threads(), peak)


@torch.inference_mode()
def interleaved_measure(models: dict, batch_size: int = 32, img_size=224, device="cpu", dtype=torch.float32,
                        warmup: int = 2, repeats: int = 5, steps: int = 1, in_chans: int = 3) -> dict:
    """Like :func:`measure` for several models, with their timed runs interleaved (A B C A B C ...).

    Interleaving spreads slow drifts of a shared machine (other processes, clock changes) evenly over
    the models, so the ratios between them are fairer than from back-to-back measurements."""
    prepared = {}
    for name, model in models.items():
        m, x, dev, hw = _prepare(model, batch_size, img_size, device, dtype, in_chans)
        for _ in range(warmup):
            m(x)
        prepared[name] = (m, x)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, (m, x) in prepared.items():
            times[name].append(_timed_run(m, x, steps, dev))
    out = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        out[name] = Measurement(batch_size / t, t * 1e3, batch_size, hw, str(dev),
                                str(dtype).replace("torch.", ""), torch.get_num_threads(), None)
    return out


# ---------------------------------------------------------------------------------------------
# Peak memory of one forward pass
class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that operators create and that are still alive; keeps the peak.

    As a ``TorchDispatchMode`` it sees every operator's outputs; each new storage is counted once (views
    share it) and uncounted when it is freed (a weak reference's callback). Storages in ``ignore`` (the
    model's weights and the input) are not counted."""

    def __init__(self, ignore=()):
        super().__init__()
        self.ignore = set(ignore)
        self.seen = WeakIdKeyDictionary()
        self.refs = set()
        self.current = 0
        self.peak = 0

    def _freed(self, nbytes: int, ref) -> None:
        self.current -= nbytes
        self.refs.discard(ref)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st in self.seen or st.data_ptr() in self.ignore:
                continue
            n = st.nbytes()
            self.seen[st] = n
            self.refs.add(weakref.ref(st, lambda ref, n=n: self._freed(n, ref)))
            self.current += n
            self.peak = max(self.peak, self.current)
        return out


@torch.inference_mode()
def forward_peak_memory_mb(model: nn.Module, batch_size: int = 32, img_size=224, device="cpu",
                           dtype=torch.float32, in_chans: int = 3) -> Optional[float]:
    """Memory one inference forward pass needs on top of the loaded model and its input, in MiB.

    CUDA: the allocator's peak during the pass minus what was allocated before it.
    Other devices (CPU): the peak total size of the tensors the pass creates (activations, attention
    outputs, logits) that are alive at the same time, counted operator by operator; exact and
    repeatable, but scratch buffers a kernel allocates internally and frees before returning are not
    seen (process RSS would be too noisy on a shared machine to compare models)."""
    model, x, device, _ = _prepare(model, batch_size, img_size, device, dtype, in_chans)
    if device.type == "cuda":
        model(x)  # first-call allocations (cuBLAS workspaces, lazy init) are not the forward's working memory
        sync_device(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(x)
        sync_device(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    owned = [*model.parameters(), *model.buffers(), x]
    with _LiveTensorBytes(ignore={t.untyped_storage().data_ptr() for t in owned}) as counter:
        model(x)
    return counter.peak / 2**20


# ---------------------------------------------------------------------------------------------
# Tables of configurations (used by `leanvit bench` and `leanvit demo`)
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
    ("model", "model", ""), ("keep_rate", "keep", ""), ("img_size", "img size", ""),
    ("params_m", "params (M)", ".2f"), ("gmacs", "GMACs", ".3f"), ("img_per_s", "img/s", ".1f"),
    ("latency_ms", "ms/batch", ".2f"), ("peak_mem_mb", "peak mem (MiB)", ".1f"), ("speedup", "speed-up", ".2f"),
)


class _KeepRateView(nn.Module):
    """An EViT model run at a fixed keep rate; shares the weights with ``model``."""

    def __init__(self, model: nn.Module, keep_rate: float):
        super().__init__()
        self.model = model
        self.rate = keep_rate

    def forward(self, x):
        return self.model(x, keep_rate=self.rate)


def _hw_str(hw) -> str:
    return f"{hw[0]}x{hw[1]}"


def _as_config(label: str, value, img_size) -> Tuple[nn.Module, tuple, dict]:
    from leanvit.factory import model_input_size

    if isinstance(value, nn.Module):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value or not isinstance(value[0], nn.Module):
        raise LeanvitError(f"benchmark_models: '{label}' must map to a model, (model, (H, W)) or "
                           "(model, (H, W), extra fields)")
    model = value[0]
    hw = value[1] if len(value) > 1 and value[1] is not None else None
    if hw is None:
        inner = model.model if isinstance(model, _KeepRateView) else model
        hw = model_input_size(inner, img_size)
    hw = (hw, hw) if isinstance(hw, int) else tuple(int(v) for v in hw)
    extra = dict(value[2]) if len(value) > 2 and value[2] else {}
    return model, hw, extra


def benchmark_models(models: Dict[str, object], batch_size: int = 32, device="cpu", dtype=torch.float32,
                     warmup: int = 2, repeats: int = 5, memory: bool = True, progress: bool = True,
                     img_size=None) -> List[dict]:
    """Measure several ready-made models; returns one row (a dict) per model, in order.

    Args:
        models: maps a label to a model, to ``(model, (H, W))`` or to ``(model, (H, W), extra)`` where
            ``extra`` is a dict of fields copied into the row (e.g. ``model``, ``keep_rate``). Without a
            size, ``img_size`` (int or (H, W)) is used, else the model's own input size.
        batch_size, device, dtype, warmup, repeats: as :func:`measure`; models of the same input size are
            timed interleaved (:func:`interleaved_measure`), the median of ``repeats`` runs is reported.
        memory: also measure the peak memory of one forward pass (:func:`forward_peak_memory_mb`).

    Each row has ``label, model, keep_rate, img_size ("HxW"), batch_size, params_m, gmacs, img_per_s,
    latency_ms, peak_mem_mb, speedup, device, dtype, threads``; ``speedup`` is img/s over the first
    configuration of the same ``model`` and input size (e.g. its keep rate 1.0 row). Models are left in
    eval mode on ``device`` in ``dtype``."""
    from tqdm import tqdm

    from leanvit.flops import gmacs

    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise LeanvitError(f"benchmark_models: need batch_size >= 1, repeats >= 1, warmup >= 0 "
                           f"(got {batch_size}, {repeats}, {warmup})")
    if not models:
        raise LeanvitError("benchmark_models: no models given")
    configs = {label: _as_config(label, v, img_size) for label, v in models.items()}
    rows = []
    by_size: Dict[tuple, List[str]] = {}
    for label, (_, hw, _) in configs.items():
        by_size.setdefault(hw, []).append(label)
    steps = tqdm(total=len(configs) * (2 if memory else 1) + len(by_size), desc="bench", unit="step",
                 disable=not progress, leave=False)
    info = {}
    for label, (model, hw, extra) in configs.items():
        model.eval()
        info[label] = dict(params_m=sum(p.numel() for p in model.parameters()) / 1e6, gmacs=gmacs(model, hw))
        steps.update()
    results = {}
    for hw, labels in by_size.items():
        res = interleaved_measure({k: configs[k][0] for k in labels}, batch_size=batch_size, img_size=hw,
                                  device=device, dtype=dtype, warmup=warmup, repeats=repeats)
        results.update(res)
        steps.update()
    base: Dict[tuple, float] = {}
    for label, (model, hw, extra) in configs.items():
        m = results[label]
        if memory:
            m.peak_mem_mb = forward_peak_memory_mb(model, batch_size, hw, device, dtype)
            steps.update()
        row = dict(label=label, **extra)
        row.setdefault("model", label)
        row.setdefault("keep_rate", _keep_str(model))
        ref = base.setdefault((row["model"], hw), m.img_per_s)
        row.update(img_size=_hw_str(hw), batch_size=batch_size, **info[label], img_per_s=m.img_per_s,
                   latency_ms=m.latency_ms, peak_mem_mb=m.peak_mem_mb, speedup=m.img_per_s / ref,
                   device=m.device, dtype=m.dtype, threads=m.threads)
        rows.append(row)
    steps.close()
    return rows


def _keep_str(model: nn.Module) -> str:
    """How a row shows a model's keep rate: '-' (no EViT), '0.7' or per location '0.9/0.8/0.7'."""
    from leanvit.evit import is_evit

    if isinstance(model, _KeepRateView):
        shown = model.rate
    elif is_evit(model):
        shown = model.keep_rate
    else:
        return "-"
    return f"{shown:g}" if isinstance(shown, (int, float)) else "/".join(f"{v:g}" for v in shown)


def check_input_size(model: nn.Module, hw, flag: str = "--img-size") -> None:
    """A clear error when a patch model cannot take an (H, W) input (smaller than one patch)."""
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return
    ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
    if hw[0] < ps[0] or hw[1] < ps[1]:
        raise LeanvitError(f"{flag} {hw[0]}x{hw[1]} is smaller than the model's {ps[0]}x{ps[1]} px patches")


def _can_reorganize(model: nn.Module) -> bool:
    from leanvit.evit import is_evit

    if is_evit(model):
        return True
    return (all(hasattr(model, a) for a in ("blocks", "patch_embed", "_pos_embed"))
            and getattr(model, "cls_token", None) is not None)


def build_configurations(model_names: Sequence[str], keep_rates: Sequence[Optional[float]] = (None,),
                         img_sizes: Sequence[Optional[tuple]] = (None,), num_classes: Optional[int] = None,
                         notes: Optional[list] = None) -> Dict[str, Tuple[nn.Module, tuple, dict]]:
    """Models for every (image size, model, keep rate), ready for :func:`benchmark_models`.

    A keep rate of None measures the model as built (EViT models at their own rate, others unmodified);
    a number runs an EViT model at that rate or applies EViT to a plain timm ViT. Models that cannot be
    reorganized (no class-token ViT) are measured once, as built, and a note says so."""
    import copy

    from leanvit.evit import apply_evit, is_evit
    from leanvit.factory import model_input_size
    from leanvit.reorg import check_keep_rate

    rates = [None if r is None else check_keep_rate(r) for r in keep_rates]
    notes = [] if notes is None else notes
    configs: Dict[str, Tuple[nn.Module, tuple, dict]] = {}
    for size in img_sizes:
        for name in model_names:
            model = _create_at_size(name, size, num_classes)
            hw = model_input_size(model, size)
            wanted = rates
            if not _can_reorganize(model) and any(r is not None for r in rates):
                notes.append(f"{name} is not a ViT with a class token: measured once, without a keep rate")
                wanted = [None]
            vanilla = None in wanted and not is_evit(model)
            base = copy.deepcopy(model) if vanilla and len(wanted) > 1 else model
            if any(r is not None for r in wanted) and not is_evit(base):
                base = apply_evit(base, keep_rate=1.0)
            for r in wanted:
                m = (model if vanilla else base) if r is None else _KeepRateView(base, r)
                keep = _keep_str(m)
                label = f"{name} keep {keep} @{_hw_str(hw)}" if keep != "-" else f"{name} @{_hw_str(hw)}"
                if label not in configs:  # e.g. 'none' and the EViT model's own rate: measured once
                    configs[label] = (m, hw, dict(model=name, keep_rate=keep))
    return configs


def _create_at_size(name: str, size, num_classes):
    from leanvit.factory import create_model

    if size is None:
        return create_model(name, num_classes=num_classes)
    try:
        model = create_model(name, img_size=size, num_classes=num_classes)
    except LeanvitError:
        model = create_model(name, num_classes=num_classes)
        if hasattr(model, "patch_embed"):  # a model with a fixed input size that cannot change it
            raise
        return model  # convolutional models take any input size as they are
    except (RuntimeError, ValueError, AssertionError) as e:
        raise LeanvitError(f"{name} cannot be built for input size {size[0]}x{size[1]}: {e}") from None
    check_input_size(model, size, "--img-sizes")
    return model


def write_csv(rows: List[dict], path) -> Path:
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["model", "keep_rate", "img_size", "batch_size", "params_m", "gmacs", "img_per_s", "latency_ms",
            "peak_mem_mb", "speedup", "device", "dtype", "threads"]
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


# ---------------------------------------------------------------------------------------------
# `leanvit bench`
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _split(values: Optional[Sequence[str]]) -> List[str]:
    return [v.strip() for s in (values or []) for v in s.split(",") if v.strip()]


def parse_keep_rates(values: Optional[Sequence[str]]) -> List[Optional[float]]:
    from leanvit.reorg import check_keep_rate

    out = []
    for v in _split(values):
        out.append(None if v.lower() in ("none", "-", "off") else check_keep_rate(v, "--keep-rates value"))
    return out or [None]


def parse_img_sizes(values: Optional[Sequence[str]]) -> List[Optional[tuple]]:
    out = []
    for v in _split(values):
        parts = v.lower().split("x")
        try:
            hw = tuple(int(p) for p in parts)
        except ValueError:
            hw = ()
        if len(hw) == 1:
            hw = hw * 2
        if len(hw) != 2 or min(hw) < 1:
            raise LeanvitError(f"--img-sizes: expected S or HxW (e.g. 224 or 256x320), got '{v}'")
        out.append(hw)
    return out or [None]


def resolve_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LeanvitError(f"unknown device '{name}' (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LeanvitError("--device cuda: no CUDA device is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LeanvitError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) available")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise LeanvitError("--device mps: MPS is not available here")
    elif dev.type != "cpu":
        raise LeanvitError(f"unsupported device '{name}' (use cpu, cuda or cuda:N)")
    return dev


def _busy_note(device: torch.device) -> Optional[str]:
    """A warning when other processes already keep the CPU cores busy (timings will not be stable)."""
    import os

    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < 0.75 * cores:
        return None
    return (f"the machine is busy (load {load:.1f} on {cores} cores): timings vary with the other work; "
            "compare configurations from one run (they are interleaved) or use --threads 1")


def add_arguments(p) -> None:
    p.add_argument("--models", nargs="+", required=True, metavar="M1,M2",
                   help="model names, comma- or space-separated (e.g. deit_small_patch16_224,shunted_t)")
    p.add_argument("--keep-rates", nargs="+", default=None, metavar="R",
                   help="EViT keep rates, e.g. none,1.0,0.7 ('none' = the model as built); applied to ViTs only")
    p.add_argument("--img-sizes", nargs="+", default=None, metavar="S",
                   help="input sizes, e.g. 224,288 or 256x320 (default: each model's own)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="default float32")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes before timing (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--output", default="leanvit_bench", metavar="DIR",
                   help="folder for bench.csv and bench.png (default ./leanvit_bench)")


def run(args) -> int:
    models = _split(args.models)
    if not models:
        raise LeanvitError("--models: name at least one model")
    keep_rates = parse_keep_rates(args.keep_rates)
    img_sizes = parse_img_sizes(args.img_sizes)
    for flag, v, lo in (("--batch-size", args.batch_size, 1), ("--warmup", args.warmup, 0),
                        ("--repeats", args.repeats, 1), ("--threads", args.threads or 1, 1)):
        if v < lo:
            raise LeanvitError(f"{flag} must be >= {lo}, got {v}")
    device = resolve_device(args.device)
    dtype = _DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise LeanvitError(f"--output {out} exists and is not a folder")
    notes: list = []
    configs = build_configurations(models, keep_rates, img_sizes, args.num_classes, notes)
    dtype_name = str(dtype).replace("torch.", "")
    header = (f"{environment(str(device))} | dtype={dtype_name} | batch={args.batch_size} | "
              f"warmup={args.warmup}, median of {args.repeats} interleaved runs")
    print(header, flush=True)
    busy = _busy_note(device)
    for n in notes + ([busy] if busy else []):
        print(f"note: {n}")
    rows = benchmark_models(configs, batch_size=args.batch_size, device=device, dtype=dtype, warmup=args.warmup,
                            repeats=args.repeats, memory=not args.no_memory)
    print(format_table(rows, BENCH_COLUMNS))
    if not args.no_memory:
        print("peak mem: " + ("CUDA allocator peak of one forward pass minus what was allocated before it"
                              if device.type == "cuda" else
                              "peak size of the tensors alive together during one forward pass "
                              "(activations on top of the loaded model; kernel scratch buffers not counted)"))
    print("speed-up: img/s over the same model's first configuration at the same image size")
    csv_path = write_csv(rows, out / "bench.csv")
    png_path = plot_benchmark(rows, out / "bench.png", title=header)
    print(f"wrote {csv_path} and {png_path}")
    return 0
