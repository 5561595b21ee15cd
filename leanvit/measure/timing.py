"""Throughput and latency of models, measured the same way everywhere.

Method (as timm's and EViT's benchmarks, made robust): eval mode, ``torch.inference_mode()``, a fixed
random batch, warm-up passes, then ``repeats`` timed runs of ``steps`` forward passes each (device
synchronized around every run); the figure is the **median** run. Several models are timed interleaved
(A B C A B C ...) so that slow drifts of a shared machine spread evenly over them. Every result carries
the device, dtype, batch size and thread count it was measured with.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

from leanvit.utils import sync_device, to_2tuple

__all__ = ["Measurement", "measure", "interleaved_measure"]


@dataclass
class Measurement:
    img_per_s: float
    latency_ms: float  # median time of one batch
    batch_size: int
    img_size: tuple
    device: str
    dtype: str
    threads: int
    peak_mem_mb: Optional[float] = None  # set by measure() on CUDA; see memory.forward_peak_memory_mb
    p90_ms: Optional[float] = None       # 90th percentile time of one batch


def prepare_model_input(model: nn.Module, batch_size: int, img_size, device, dtype, in_chans: int):
    """``model`` on ``device`` in eval mode and a random input batch for it: (model, x, device, (H, W))."""
    device = torch.device(device)
    h, w = to_2tuple(img_size)
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


def _p90(times) -> float:
    ts = sorted(times)
    return ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))]


def _measurement(times, batch_size, hw, device, dtype, peak=None) -> Measurement:
    t = statistics.median(times)
    return Measurement(batch_size / t, t * 1e3, batch_size, hw, str(device), str(dtype).replace("torch.", ""),
                       torch.get_num_threads(), peak, _p90(times) * 1e3)


@torch.inference_mode()
def measure(model: nn.Module, batch_size: int = 32, img_size=224, device="cpu", dtype=torch.float32,
            warmup: int = 2, repeats: int = 5, steps: int = 1, in_chans: int = 3) -> Measurement:
    """Median time per batch of ``model`` over ``repeats`` runs of ``steps`` forwards each."""
    model, x, device, hw = prepare_model_input(model, batch_size, img_size, device, dtype, in_chans)
    for _ in range(warmup):
        model(x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [_timed_run(model, x, steps, device) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return _measurement(times, batch_size, hw, device, dtype, peak)


def balanced_orders(n: int) -> List[List[int]]:
    """Orders of ``n`` runs in which each run directly follows each other one equally often (a Williams
    Latin square: ``n`` rows for even ``n``, those and their mirror images for odd ``n``).

    Timing a round in these orders means no model is always timed right after the same other one, whose
    leftovers (busy threads, a cold cache) would then always land on it."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(j + i) % n for j in first] for i in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


@torch.inference_mode()
def interleaved_measure(models: dict, batch_size: int = 32, img_size=224, device="cpu", dtype=torch.float32,
                        warmup: int = 2, repeats: int = 5, steps: int = 1, in_chans: int = 3) -> dict:
    """Like :func:`measure` for several models, with their timed runs interleaved, in a different order
    every round (:func:`balanced_orders`).

    Interleaving spreads slow drifts of a shared machine (other processes, clock changes) evenly over
    the models, so the ratios between them are fairer than from back-to-back measurements. Changing the
    order makes each model follow each other one equally often: a runtime that leaves threads busy after its run
    (onnxruntime spinning, OpenMP wait policies) then slows every model alike, not always the same one."""
    prepared = {}
    dev, hw = torch.device(device), to_2tuple(img_size)
    for name, model in models.items():
        m, x, dev, hw = prepare_model_input(model, batch_size, img_size, device, dtype, in_chans)
        for _ in range(warmup):
            m(x)
        prepared[name] = (m, x)
    times = {name: [] for name in models}
    names = list(prepared)
    orders = balanced_orders(len(names))
    for i in range(repeats):
        for j in orders[i % len(orders)]:
            m, x = prepared[names[j]]
            times[names[j]].append(_timed_run(m, x, steps, dev))
    return {name: _measurement(ts, batch_size, hw, dev, dtype) for name, ts in times.items()}
