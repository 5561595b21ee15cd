"""Create models by name with user-facing errors (unknown names get the closest suggestions)."""
from __future__ import annotations

import difflib
from typing import Any, Dict, Optional

import timm
import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction import apply_reduction_spec, get_reduction

__all__ = ["create_model", "suggest_models", "reduction_from_options"]


def suggest_models(name: str, n: int = 5) -> list:
    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.5)


def reduction_from_options(reduction: Optional[Any] = None, keep_rate=None, locations=None) -> Optional[Dict]:
    """One reduction spec from the new ``reduction`` option or the EViT aliases ``keep_rate``/``locations``.

    ``reduction``: a dict (``{"method": "evit", "keep_rate": 0.7}``) or a method name."""
    if isinstance(reduction, str):
        reduction = {"method": reduction}
    if reduction is not None and not isinstance(reduction, dict):
        raise LeanvitError(f"reduction must be a mapping with 'method', got {reduction!r}")
    spec = dict(reduction) if reduction else None
    if keep_rate is not None or locations is not None:
        if spec is not None and spec.get("method", "evit") not in ("evit", "evit-drop"):
            raise LeanvitError(f"keep_rate/locations are EViT options; the reduction is '{spec['method']}'")
        spec = {"method": "evit", **(spec or {})}
        if keep_rate is not None:
            spec["keep_rate"] = keep_rate
        if locations is not None:
            spec["locations"] = list(locations)
    if spec is not None:
        if "method" not in spec:
            raise LeanvitError(f"a reduction needs 'method' (one of the registered methods), got {spec}")
        get_reduction(spec["method"])  # a clear error for an unknown name
    return spec


def create_model(name: str, reduction=None, img_size=None, num_classes=None, keep_rate=None, locations=None,
                 **kwargs) -> nn.Module:
    """``timm.create_model`` for leanvit and timm names, with an optional token reduction.

    ``reduction={"method": "evit", "keep_rate": 0.7}`` (or the alias ``keep_rate=0.7``) on an ``evit_*``
    model sets its options; on any other timm ViT it applies the method, so every ViT with a class token
    can be measured or trained reduced. ``pretrained=True`` goes through timm's own machinery."""
    if not timm.is_model(name):
        close = suggest_models(name)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise LeanvitError(f"unknown model '{name}'{hint}")
    if locations is not None and keep_rate is None and reduction is None:
        raise LeanvitError("EViT locations need a keep rate")
    spec = reduction_from_options(reduction, keep_rate, locations)
    if spec is not None and spec["method"] == "evit" and name.startswith("evit_"):
        kwargs.update({k: v for k, v in spec.items() if k != "method"})  # the entrypoint's own options
        spec = None
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs.setdefault("pretrained", False)
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as e:
        raise LeanvitError(f"model '{name}' does not accept these options ({e})") from None
    return apply_reduction_spec(model, spec)
