"""Throughput, latency and peak memory of models, measured the same way everywhere.

Method (as timm's and EViT's benchmarks, made robust): eval mode, ``torch.inference_mode()``, a fixed
random batch, warm-up passes, then ``repeats`` timed runs of ``steps`` forward passes each (device
synchronized around every run); the figure is the **median** run. Every result carries the device,
dtype, batch size and thread count it was measured with.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["Measurement", "measure", "interleaved_measure", "environment"]


@dataclass
class Measurement:
    img_per_s: float
    latency_ms: float  # median time of one batch
    batch_size: int
    img_size: tuple
    device: str
    dtype: str
    threads: int
    peak_mem_mb: Optional[float] = None  # CUDA only (allocator peak); None on CPU

    def as_dict(self) -> dict:
        return asdict(self)


def environment(device: str = "cpu") -> str:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return f"device={dev} ({name}), torch {torch.__version__}, threads={torch.get_num_threads()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(model: nn.Module, batch_size: int, img_size, device, dtype, in_chans: int):
    device = torch.device(device)
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch_size, in_chans, h, w, device=device, dtype=dtype)
    return model, x, device, (h, w)


def _timed_run(model, x, steps, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(x)
    _sync(device)
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
