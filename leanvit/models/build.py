"""A model ready for evaluation, benchmarking, export or pictures, from a registered name and/or a checkpoint
(a ``leanvit train`` checkpoint records its model: name, options and token reduction)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from leanvit.checkpoints import load_checkpoint, read_checkpoint, state_dict_from
from leanvit.errors import LeanvitError
from leanvit.models.factory import create_model
from leanvit.reduction.registry import applied_reduction, remove_reduction
from leanvit.reduction.spec import ReductionSpec, is_none_text
from leanvit.utils import Size, check_input_size, img_size_arg, model_input_size, to_2tuple

__all__ = ["BuiltModel", "build_model", "checkpoint_num_classes", "recorded_spec", "recorded_config",
           "describe_model"]

_CLASSIFIER_KEYS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "head.l.weight")


def checkpoint_num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """Number of classes of the classifier stored in a state dict, if recognizable."""
    for k in _CLASSIFIER_KEYS:
        v = state_dict.get(k)
        if v is not None and v.ndim == 2:
            return int(v.shape[0])
    return None


def recorded_spec(obj) -> Optional[dict]:
    """The model spec a leanvit training checkpoint (already read) records (``{"name", "kwargs", ...}``)."""
    if isinstance(obj, dict):
        spec = obj.get("model_spec")
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            return spec
    return None


def recorded_config(checkpoint) -> Optional[dict]:
    """The training config a ``leanvit train`` checkpoint file records (None without a checkpoint or one)."""
    if checkpoint is None:
        return None
    obj = read_checkpoint(checkpoint)
    cfg = obj.get("config") if isinstance(obj, dict) else None
    return cfg if isinstance(cfg, dict) else None


def _checkpoint_input_size(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Optional[tuple]:
    """The (H, W) a ViT checkpoint was trained at, from its position embedding, where it differs from
    ``model``'s (square grids only; None when unknown or equal)."""
    pos = state_dict.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    pe = getattr(model, "patch_embed", None)
    if pos is None or own is None or pos.ndim != 3 or getattr(pe, "grid_size", None) is None:
        return None
    gh, gw = pe.grid_size
    prefix = own.shape[1] - gh * gw  # position embeddings of class/distillation tokens, if the model has them
    n = pos.shape[1] - prefix
    side = math.isqrt(max(n, 0))
    if side < 1 or side * side != n or (side, side) == (gh, gw):
        return None
    ph, pw = to_2tuple(pe.patch_size)
    return side * ph, side * pw


def _create(name: str, **kwargs) -> nn.Module:
    try:
        return create_model(name, **kwargs)
    except LeanvitError:
        raise
    except (RuntimeError, ValueError, AssertionError) as e:  # e.g. an input size timm cannot build
        opts = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
        raise LeanvitError(f"cannot build {name} ({opts}): {e}") from None


#: model options that change the architecture a registered name stands for, and how descriptions show them
_ARCH_OPTIONS = (("embed_dim", "embed"), ("embed_dims", "dims"), ("depth", "depth"), ("depths", "depths"),
                 ("num_heads", "heads"), ("patch_size", "patch"), ("mlp_ratio", "mlp ratio"))


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return "/".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_model(name: str, model: Optional[nn.Module] = None, kwargs: Optional[dict] = None) -> str:
    """How logs and reports name a model as built. The registered name when the model is that architecture
    (``deit3_small_patch16_224 (22.06M params)``); when ``kwargs`` change the architecture, the family and what
    was changed (``deit3 (embed 96, depth 4, heads 3, patch 8; 0.47M params)``), so that a small model built
    from a larger one's name does not read as the larger one."""
    changed = [f"{label} {_fmt(kwargs[key])}" for key, label in _ARCH_OPTIONS if (kwargs or {}).get(key) is not None]
    params = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params" if model is not None else ""
    if not changed:
        return f"{name} ({params})" if params else name
    return f"{name.split('_')[0]} ({', '.join(changed)}{'; ' + params if params else ''})"


class BuiltModel(NamedTuple):
    model: nn.Module
    name: str
    img_size: Tuple[int, int]     # (H, W) to evaluate at
    config: Optional[dict]        # the training settings a ``leanvit train`` checkpoint records
    checkpoint: Optional[dict]    # the whole checkpoint as read (None without one)

    @property
    def description(self) -> str:
        """:func:`describe_model` with the options the checkpoint recorded."""
        spec = recorded_spec(self.checkpoint)
        kwargs = spec.get("kwargs") if spec is not None and spec["name"] == self.name else None
        return describe_model(self.name, self.model, kwargs if isinstance(kwargs, dict) else None)


def build_model(name: Optional[str] = None, checkpoint=None, reduction: Any = None,
                img_size: Optional[Size] = None, num_classes: Optional[int] = None,
                data_classes: Optional[int] = None) -> BuiltModel:
    """A model ready for evaluation, benchmarking or visualization (eval mode, weights loaded strictly).

    Args:
        name: a registered model name; may be None with a checkpoint written by ``leanvit train``, which
            records its model (``model_spec``: name, options and token reduction).
        checkpoint: a local file (see :func:`leanvit.load_checkpoint`), read once.
        reduction: applied on top, in any form :meth:`leanvit.reduction.ReductionSpec.parse` reads
            (``"evit:0.7"``, ``{"method": "evit", "keep_rate": 0.7}``, a spec). It replaces a recorded
            reduction; for the same method, the recorded options it does not set are kept (e.g. the layers
            EViT was trained to reorganize at). ``"none"`` (``"off"``, ``"-"``): no reduction, even where the
            checkpoint records one.
        img_size: int or (H, W); default: the recorded one, else the size of the checkpoint's position
            embedding, else the model's own.
        num_classes: default: the checkpoint's classifier, else the recorded one, else ``data_classes``.
    """
    if img_size is not None:
        img_size = img_size_arg(img_size)
    if num_classes is not None and num_classes < 1:
        raise LeanvitError(f"`num_classes` must be >= 1, got {num_classes}")
    opts: Dict[str, Any] = {}
    sd = obj = recorded = None
    if checkpoint is not None:
        obj = read_checkpoint(checkpoint)
        spec = recorded_spec(obj)
        if name is None:
            if spec is None:
                raise LeanvitError(f"{checkpoint} does not record its model; name it with `model`")
            name = spec["name"]
        if spec is not None and spec["name"] == name:
            opts = {k: v for k, v in dict(spec.get("kwargs") or {}).items() if k != "pretrained"}
            in_kwargs = opts.pop("reduction", None)
            recorded = ReductionSpec.parse(spec.get("reduction") or in_kwargs, keep_rate=opts.pop("keep_rate", None),
                                           locations=opts.pop("locations", None))
        sd = state_dict_from(obj, checkpoint)
        if num_classes is None:
            num_classes = checkpoint_num_classes(sd)
    elif name is None:
        raise LeanvitError("name a model with `model` (or give a `checkpoint` written by leanvit train)")
    if num_classes is None and opts.get("num_classes") is None:
        num_classes = data_classes
    unreduced = is_none_text(reduction)  # explicitly none: not the recorded one either
    reduction = ReductionSpec.parse(reduction)
    if reduction is not None and recorded is not None and recorded.method == reduction.method:
        reduction = replace(reduction, options={**recorded.options, **reduction.options})  # e.g. trained layers
    if reduction is None and not unreduced:
        reduction = recorded
    if reduction is not None:
        opts["reduction"] = reduction
    for key, value in (("img_size", img_size), ("num_classes", num_classes)):
        if value is not None:
            opts[key] = value
    try:
        model = _create(name, **opts)
    except LeanvitError:
        if "img_size" not in opts:
            raise
        model = _create(name, **{k: v for k, v in opts.items() if k != "img_size"})
        if hasattr(model, "patch_embed"):  # a ViT that cannot take this size: the first error says why
            raise
    if sd is not None and img_size is None:
        trained = _checkpoint_input_size(sd, model)
        if trained is not None:  # e.g. a 384 px checkpoint: evaluate at the size it was trained at
            opts["img_size"] = trained
            model = _create(name, **opts)
    if unreduced and applied_reduction(model) is not None:  # e.g. an evit_* model: built with EViT
        remove_reduction(model)
    hw = model_input_size(model, opts.get("img_size"))
    check_input_size(model, hw)
    method = applied_reduction(model)
    if method is not None and reduction is not None and method.knob in reduction.to_dict():
        method.check_runs_as_given(model, reduction.to_dict()[method.knob])  # never recorded as something else
    config = None
    if checkpoint is not None:
        load_checkpoint(model, sd, strict=True, name=str(checkpoint))
        config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    return BuiltModel(model.eval(), name, hw, config, obj if isinstance(obj, dict) else None)
