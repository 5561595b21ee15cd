"""Applying a token reduction to a dense model (backbone, segmenter or detector) with its restoration.

    from leanvit.dense import create_segmenter, apply_dense_reduction
    seg = create_segmenter("semantic_fpn", "deit3_small_patch16_224", 150, reduction="evit:0.5")  # restore: keep
    apply_dense_reduction(seg, "tome:8", restore="unmerge")        # switch method on a built model
    apply_dense_reduction(seg, None)                               # back to the unreduced model

Only plain-ViT backbones (the simple feature pyramid) take a reduction; see :mod:`leanvit.dense.restore`
for the restoration strategies and what each costs.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction import get_reduction, parse_reduction_spec, reduction_spec

__all__ = ["reduction_options", "dense_backbone_of", "apply_dense_reduction", "dense_reduction_spec"]

# keys of a recipe's reduction mapping that schedule training rather than configure the method
_SCHEDULE_KEYS = ("start_epoch", "epochs", "ramp")


def reduction_options(reduction) -> Optional[Tuple[str, Dict[str, Any], Any]]:
    """``(method name, apply options, restore)`` from a reduction as the command line writes it
    (``"evit:0.7"``, ``"tome:8"``, ``"evit"`` for the method's default) or a mapping, as recipes and
    checkpoints write it (``{"method": "evit", "keep_rate": 0.7, "restore": "keep"}``: ``restore`` is the
    restoration strategy, None when not given; a schedule's ``start_epoch`` / ``epochs`` are ignored here).
    None for None, ``""`` or ``"none"``. One strength only: a dense model runs at one point."""
    if reduction is None or (isinstance(reduction, str) and reduction.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(reduction, str):
        method, values = parse_reduction_spec(reduction)
        if len(values) > 1:
            raise LeanvitError(f"reduction '{reduction}': give one {method.knob} for a model, not {len(values)}")
        return method.name, ({method.knob: values[0]} if values else {}), None
    if isinstance(reduction, dict):
        options = {k: v for k, v in reduction.items() if k not in _SCHEDULE_KEYS}
        name = options.pop("method", None)
        restore = options.pop("restore", None)
        if name is None:
            raise LeanvitError(f"a reduction mapping needs 'method', got {reduction!r}")
        method = get_reduction(name)
        if method.knob in options:
            options[method.knob] = method.check_strength(options[method.knob])
        return method.name, options, restore
    raise LeanvitError(f"reduction must be text such as 'evit:0.7' or a mapping, got {reduction!r}")


def dense_backbone_of(model: nn.Module):
    """The :class:`~leanvit.dense.backbones.DenseBackbone` of a backbone, segmenter or detector."""
    from leanvit.dense.backbones import DenseBackbone
    for candidate in (model, getattr(model, "backbone", None), getattr(getattr(model, "backbone", None), "body", None)):
        if isinstance(candidate, DenseBackbone):
            return candidate
    raise LeanvitError(f"{type(model).__name__} is not a leanvit dense model (no dense backbone found)")


def apply_dense_reduction(model: nn.Module, reduction, restore=None) -> nn.Module:
    """Apply ``reduction`` (text, mapping or None = remove) to the ViT of a dense ``model``, in place, with
    the restoration ``restore`` (None: the method's default); returns ``model``. A hierarchical backbone
    (Shunted, PVT v2) refuses it with a :class:`LeanvitError`."""
    dense_backbone_of(model).set_reduction(reduction, restore)
    return model


def dense_reduction_spec(model: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"method": ..., <options>, "restore": ...}`` of a dense model's reduction (None without one): what
    a checkpoint records."""
    bb = dense_backbone_of(model)
    vit = bb.model
    spec = reduction_spec(vit)
    if spec is None:
        return None
    restore = bb.restoration()
    if restore is not None:
        spec["restore"] = restore.spec()
    return spec

