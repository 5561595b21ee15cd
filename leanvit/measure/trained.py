"""Benchmark configurations of a trained checkpoint (``leanvit bench --models runs/x/best.pth``).

    from leanvit.measure import benchmark_models
    from leanvit.measure.trained import checkpoint_configurations
    configs, parts = checkpoint_configurations("runs/seg/best.pth", [("evit", 0.7), ("tome", 8)], ["keep", "unmerge"])
    rows = benchmark_models(configs, batch_size=8, backbones=parts)   # rows with the head's share

The checkpoint's task (:mod:`leanvit.tasks`) loads the model as ``leanvit eval`` does and turns the reduction
grid into configurations as ``leanvit sweep`` does (:meth:`~leanvit.tasks.Task.sweep_variants`: the unreduced
model first, then every point; a detection or segmentation model's with each restoration of its backbone's
token map), all sharing the checkpoint's weights. Where the task has a part before the head
(:meth:`~leanvit.tasks.Task.backbone_part`), it is returned too, to be timed beside the whole model.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from leanvit.measure.benchmark import keep_rate_column
from leanvit.reduction import applied_reduction, get_reduction, is_none_text, remove_reduction
from leanvit.tasks import task_of_checkpoint
from leanvit.utils import to_2tuple

__all__ = ["checkpoint_configurations", "own_reduction"]


def own_reduction(model: nn.Module) -> Optional[Tuple[str, Any]]:
    """(method name, strength) of the token reduction ``model`` (or a module inside it, e.g. a dense
    model's ViT) runs, or None."""
    for m in model.modules():
        method = applied_reduction(m)
        if method is not None:
            return method.name, method.get_strength(m)
    return None


def checkpoint_configurations(path, reductions: Sequence[Tuple[Optional[str], Any]] = (),
                              restores: Optional[Sequence[str]] = None,
                              img_sizes: Sequence[Optional[Tuple[int, int]]] = (None,),
                              notes: Optional[List[str]] = None,
                              ) -> Tuple[Dict[str, Tuple[nn.Module, tuple, dict]], Dict[str, nn.Module]]:
    """``(configs, parts)`` for :func:`leanvit.measure.benchmark_models` (``models=configs, backbones=parts``).

    Args:
        path: a checkpoint written by ``leanvit train`` (any task) or a classifier's weights.
        reductions: (method, strength) pairs, e.g. ``[("evit", 0.7), ("tome", 8)]``; (None, None) is ignored
            (the unreduced model is always measured). The reduction the checkpoint was trained with, if any,
            is added as a point.
        restores: a dense model's restoration strategies to measure for each method (``keep``,
            ``reactivate:2``, ``unmerge``, ...; default: every strategy of the method). One that applies to
            no method of the grid, or any with a classifier, is a :class:`~leanvit.errors.LeanvitError`.
        img_sizes: input sizes, None = the checkpoint's own (a dense checkpoint takes only its own).
        notes: given a list, a model that takes no token reduction (a hierarchical backbone) is measured
            unreduced and a note says so (as :func:`leanvit.measure.build_configurations` does for names);
            without one, that is a :class:`~leanvit.errors.LeanvitError`.

    ``configs`` maps a label (``"PATH evit/keep 0.7 @HxW"``) to ``(model, (H, W), fields)``, the unreduced
    model first for every size; ``fields`` has ``model`` (the path: speed-ups are over its unreduced row),
    ``task``, ``reduction``, ``strength``, ``keep_rate``. ``parts`` maps labels to the part before the head.
    """
    task = task_of_checkpoint(path)
    grid: List[Tuple[str, Any]] = []
    for method, value in reductions:
        if method is not None and not is_none_text(method):  # the unreduced model is always measured
            m = get_reduction(method)
            grid.append((m.name, m.check_strength(m.none_value if value is None else value)))
    options = {"restore": list(restores)} if restores else {}
    configs: Dict[str, Tuple[nn.Module, tuple, dict]] = {}
    parts: Dict[str, nn.Module] = {}
    for size in img_sizes:
        built = task.load_model(path, None, None, None if size is None else to_2tuple(size))
        model = built.model.eval()
        hw = to_2tuple(built.img_size)
        own = own_reduction(model)
        points = list(dict.fromkeys(grid + ([own] if own is not None else [])))
        if points and notes is not None and not task.can_reduce(model):
            notes.append(f"{path} ({built.name}) takes no token reduction: measured once, without one")
            points, options = [], {}
        plain = remove_reduction(copy.deepcopy(model))
        for v in task.sweep_variants(model, plain, points, **options):
            shown = "" if v.value is None else f" {v.reduction} {v.strength}"
            label = f"{path}{shown} @{hw[0]}x{hw[1]}"
            method = v.method or (v.reduction if v.value is not None else None)
            configs[label] = (v.model, hw, dict(model=str(path), task=task.name,
                                                reduction=v.reduction if v.value is not None else "-",
                                                strength=v.strength,
                                                keep_rate=keep_rate_column(method or "-", v.strength)))
            part = task.backbone_part(v.model)
            if part is not None:
                parts[label] = part
    return configs, parts
