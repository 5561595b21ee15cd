"""Evaluation as a library: top-1 / top-5 accuracy, loss and forward throughput of a classifier.

    from leanvit.tasks.classification_eval import evaluate
    result = evaluate(model, loader)          # {"top1": 91.2, "top5": 99.6, "loss": 0.31, ...}

Throughput is the model's: images per second of forward passes only (data loading and transforms
excluded), timed with the device synchronized, so it compares models rather than data pipelines. Use
:mod:`leanvit.measure` for controlled speed measurements (warm-up, fixed batch, median of repeats).
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from leanvit.errors import LeanvitError
from leanvit.reduction import applied_reduction
from leanvit.utils import timed_forward

__all__ = ["evaluate", "accumulate", "strength_kwargs"]


def strength_kwargs(model: nn.Module, strength=None) -> dict:
    """Forward keyword arguments that run ``model``'s reduction at ``strength`` (empty for None)."""
    if strength is None:
        return {}
    method = applied_reduction(model)
    if method is None:
        raise LeanvitError(f"a reduction strength was given but {type(model).__name__} reduces no tokens")
    return method.forward_kwargs(method.check_strength(strength))


@torch.inference_mode()
def accumulate(model: nn.Module, loader, device="cpu", keep_rate=None, amp: bool = False, progress: bool = False,
               max_batches: Optional[int] = None, desc: str = "eval") -> Dict[str, float]:
    """Sums over ``loader`` in the model's current mode: ``images``, ``correct1``, ``correct5``, ``loss_sum``
    (cross-entropy) and ``forward_seconds``. Sums add up across processes (the training engine's sharded
    validation); :func:`evaluate` turns them into rates. ``keep_rate``: the reduction strength of this pass."""
    device = torch.device(device)
    kwargs = strength_kwargs(model, keep_rate)
    n = correct1 = correct5 = 0
    loss_sum = fwd_time = 0.0
    total = len(loader) if hasattr(loader, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    bar = tqdm(loader, total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    for i, (x, y) in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        x = x.to(device, non_blocking=True)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        logits, secs = timed_forward(model, x, device, amp, **kwargs)
        fwd_time += secs
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = logits.float()
        num_classes = logits.shape[-1]
        if int(y.max()) >= num_classes or int(y.min()) < 0:
            raise LeanvitError(f"a label ({int(y.max())}) is outside the model's {num_classes} classes")
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=-1).indices
        hit = top == y[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=-1).sum().item()
        n += x.shape[0]
        bar.set_postfix(top1=f"{100.0 * correct1 / n:.1f}")
    bar.close()
    return {"images": n, "correct1": correct1, "correct5": correct5, "loss_sum": loss_sum,
            "forward_seconds": fwd_time}


def evaluate(model: nn.Module, loader, device="cpu", keep_rate=None, amp: bool = False, progress: bool = True,
             max_batches: Optional[int] = None, desc: str = "eval") -> Dict[str, float]:
    """Evaluate a classifier on ``loader`` (batches of (images, integer labels)); the model is moved to
    ``device`` and put in eval mode.

    Args:
        keep_rate: the strength of the model's token reduction for this evaluation (EViT: keep rate;
            default: the model's own).
        amp: autocast (bfloat16 on CPU, float16 on CUDA).
        max_batches: stop after this many batches (a quick estimate).

    Returns a dict: ``top1``, ``top5`` (percent; top-k with k capped at the number of classes), ``loss``
    (mean cross-entropy), ``images``, ``img_per_s`` (forward passes only) and ``seconds`` (wall time).
    Under several processes (``torch.distributed`` initialized: the training engine's validation, each
    process holding its shard of the data) the figures are over every process's images.
    """
    t_start = time.perf_counter()
    model = model.to(torch.device(device)).eval()
    s = accumulate(model, loader, device, keep_rate, amp, progress, max_batches, desc)
    fwd, local = s["forward_seconds"], s["images"]
    s = _over_processes(s, device)
    n = s["images"]
    if n == 0:
        raise LeanvitError("the evaluation data is empty")
    return {
        "top1": 100.0 * s["correct1"] / n,
        "top5": 100.0 * s["correct5"] / n,
        "loss": s["loss_sum"] / n,
        "images": n,
        "img_per_s": local / fwd if fwd > 0 else math.inf,
        "seconds": time.perf_counter() - t_start,
    }


_SUMS = ("images", "correct1", "correct5", "loss_sum")


def _over_processes(s: Dict[str, float], device) -> Dict[str, float]:
    """The sums of every process when several evaluate their shards (the training engine's validation)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return s
    on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(s[k]) for k in _SUMS], dtype=torch.float64, device=on)
    dist.all_reduce(t)
    total = dict(zip(_SUMS, t.cpu().tolist()))
    total["images"] = int(total["images"])
    return {**s, **total}
