"""Applying a token reduction to a dense model (backbone, segmenter or detector) with its restoration.

    from leanvit.dense import create_segmenter, apply_dense_reduction
    seg = create_segmenter("semantic_fpn", "deit3_small_patch16_224", 150, reduction="evit:0.5")  # restore: keep
    apply_dense_reduction(seg, "tome:8", restore="unmerge")        # switch method on a built model
    apply_dense_reduction(seg, None)                               # back to the unreduced model

Only plain-ViT backbones (the simple feature pyramid) take a reduction; see :mod:`leanvit.dense.restore`
for the restoration strategies and what each costs.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction import ReductionSpec, get_reduction, reduction_spec
from leanvit.reduction.fixed import AtStrength
from leanvit.reduction.restore import Restore, parse_restore, reduction_with_restorations, restoration_for

__all__ = ["reduction_options", "dense_backbone_of", "apply_dense_reduction", "dense_reduction_spec", "ReducedDense",
           "dense_variants", "BackbonePart"]

_log = logging.getLogger(__name__)

# keys of a recipe's reduction mapping that schedule training rather than configure the method
_SCHEDULE_KEYS = ("start_epoch", "epochs")


def reduction_options(reduction) -> Optional[Tuple[str, Dict[str, Any], Any]]:
    """``(method name, apply options, restore)`` from a reduction in any form
    :meth:`leanvit.reduction.ReductionSpec.parse` reads: text as the command line writes it (``"evit:0.7"``,
    ``"tome:8"``, ``"evit"`` for the method's default), a mapping as recipes and checkpoints write it
    (``{"method": "evit", "keep_rate": 0.7, "restore": "keep"}``), or a spec. ``restore`` is the mapping's
    restoration strategy (None when not given); a training schedule's ``start_epoch`` / ``epochs`` are
    ignored here. None for no reduction. One strength only: a dense model runs at one point."""
    spec = ReductionSpec.parse(reduction, what="reduction")
    if spec is None:
        return None
    options = {k: v for k, v in spec.kwargs().items() if k not in _SCHEDULE_KEYS}
    restore = options.pop("restore", None)
    return spec.method, options, restore


def dense_backbone_of(model: nn.Module):
    """The :class:`~leanvit.dense.backbones.DenseBackbone` of a backbone, segmenter or detector."""
    for candidate in (model, getattr(model, "backbone", None), getattr(getattr(model, "backbone", None), "body", None)):
        if callable(getattr(candidate, "set_reduction", None)) and callable(getattr(candidate, "restoration", None)):
            return candidate  # a DenseBackbone (not imported: the backbones import this module)
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



class ReducedDense(AtStrength):
    """A dense ``model`` run at one reduction strength and restoration (both set before every forward, so one
    model serves several points of a sweep, interleaved); other attributes are the model's."""

    def __init__(self, model: nn.Module, method: str, value, restore):
        super().__init__(model, method, value)
        self.restore = parse_restore(restore)

    def set_point(self) -> None:
        dense_backbone_of(self.model).restore = self.restore
        super().set_point()


def dense_variants(model: nn.Module, grid, restores=None):
    """``(method, value, restore, ReducedDense)`` for every point ``(method, value)`` of ``grid`` and every
    restoration of ``restores`` that applies to the method (default: all of them), one model copy per
    method (the unreduced ``model`` copied and reduced). Restorations that cannot apply to a method (e.g.
    ``unmerge`` with EViT, or ``reactivate`` with no block after EViT's last reorganization) are skipped for it,
    with a log line; a restoration of ``restores`` that applies to none of the grid's methods (or an empty
    grid) raises a :class:`LeanvitError` naming it before any point is yielded."""
    import copy
    per_method: Dict[str, nn.Module] = {}
    for method, value in grid:
        name = get_reduction(method).name
        if name not in per_method:
            per_method[name] = apply_dense_reduction(copy.deepcopy(model), {"method": name,
                                                                           get_reduction(name).knob: value})
    wanted = None if restores is None else [parse_restore(r) for r in restores]
    if wanted and not per_method:
        raise LeanvitError(f"restore '{wanted[0]}' needs a reduction (e.g. evit:0.7 or tome:8)")
    fits: Dict[str, list] = {}  # method -> its restorations, in order
    errors: Dict[Restore, LeanvitError] = {}
    for name, reduced in per_method.items():
        vit = dense_backbone_of(reduced).model
        fits[name] = []
        for restore in (wanted or [Restore(n) for n in reduction_with_restorations(vit).restorations]):
            try:
                restoration_for(vit, restore)
            except LeanvitError as e:
                errors.setdefault(restore, e)
                _log.info("%s with restore %s skipped (%s)", name, restore, e)
                continue
            fits[name].append(restore)
    for restore in wanted or []:
        if restore in errors and not any(restore in f for f in fits.values()):
            raise LeanvitError(str(errors[restore]))
    for method, value in grid:
        name = get_reduction(method).name
        for restore in fits[name]:
            yield name, value, restore, ReducedDense(per_method[name], name, value, restore)


class BackbonePart(nn.Module):
    """The part of a dense model before its head, at the same configuration as the model: the input's
    preparation (a segmenter's normalization; a torchvision detector's resizing, normalization and padding)
    and the dense backbone's maps. Timed beside the whole model, it gives the head's share of the time
    (1 - backbone / whole). ``model``: a segmenter, a detector or a :class:`ReducedDense` view of one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        view = self.model
        inner = view.model if isinstance(view, ReducedDense) else view
        backbone = dense_backbone_of(inner)
        if isinstance(view, ReducedDense):  # the view's point, as its forward sets it
            view.set_point()
        transform = getattr(inner, "transform", None)
        if callable(transform):  # torchvision's GeneralizedRCNNTransform
            x = transform(list(x))[0].tensors
        elif getattr(inner, "normalize", False):
            x = (x - inner.pixel_mean.to(x.dtype)) / inner.pixel_std.to(x.dtype)
        return backbone(x)
