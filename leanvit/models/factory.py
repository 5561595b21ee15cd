"""Create models by name with user-facing errors (unknown names get the closest suggestions)."""
from __future__ import annotations

import difflib

import timm
import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction.spec import ReductionSpec

__all__ = ["create_model", "suggest_models"]


def suggest_models(name: str, n: int = 5) -> list:
    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.5)


def create_model(name: str, reduction=None, img_size=None, num_classes=None, keep_rate=None, locations=None,
                 **kwargs) -> nn.Module:
    """``timm.create_model`` for leanvit and timm names, with an optional token reduction.

    ``reduction``: anything :meth:`leanvit.reduction.ReductionSpec.parse` reads (``"evit:0.7"``,
    ``{"method": "evit", "keep_rate": 0.7}``, a :class:`ReductionSpec`; or the older ``keep_rate=0.7``
    / ``locations``). On an ``evit_*`` model EViT's settings are the entrypoint's own options; on any other
    timm ViT the method is applied, so every ViT with a class token can be measured or trained reduced.
    ``pretrained=True`` goes through timm's own machinery."""
    if not timm.is_model(name):
        close = suggest_models(name)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise LeanvitError(f"unknown model '{name}'{hint}")
    if locations is not None and keep_rate is None and reduction is None:
        raise LeanvitError("EViT locations need a keep rate")
    spec = ReductionSpec.parse(reduction, keep_rate, locations)
    if spec is not None and spec.method == "evit" and name.startswith("evit_"):
        kwargs.update(spec.kwargs())  # the entrypoint's own options
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
    return model if spec is None else spec.apply(model)
