"""Create models by name with user-facing errors (unknown names get the closest suggestions)."""
from __future__ import annotations

import difflib

import timm
import torch.nn as nn

from leanvit.errors import LeanvitError

__all__ = ["create_model", "model_input_size", "suggest_models"]


def suggest_models(name: str, n: int = 5) -> list:
    names = timm.list_models()
    return difflib.get_close_matches(name, names, n=n, cutoff=0.5)


def create_model(name: str, keep_rate=None, img_size=None, num_classes=None, locations=None, **kwargs) -> nn.Module:
    """``timm.create_model`` for leanvit and timm names, never touching the network.

    ``keep_rate`` on an ``evit_*`` model sets its keep rate; on a plain timm ViT it applies EViT
    with ``locations`` (default: the EViT rule for its depth), so any timm ViT with a class token can
    be measured or trained reorganized.
    """
    import leanvit  # noqa: F401  (registers the leanvit models)

    if not timm.is_model(name):
        close = suggest_models(name)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise LeanvitError(f"unknown model '{name}'{hint}")
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    is_evit = name.startswith("evit_")
    if keep_rate is not None and is_evit:
        kwargs["keep_rate"] = keep_rate
    if locations is not None and is_evit:
        kwargs["locations"] = locations
    elif locations is not None and keep_rate is None:
        raise LeanvitError("EViT locations need a keep rate")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise LeanvitError(f"model '{name}' does not accept these options ({e})") from None
    if keep_rate is not None and not is_evit:
        from leanvit.evit import apply_evit

        model = apply_evit(model, keep_rate=keep_rate, locations=locations)
    return model


def model_input_size(model: nn.Module, img_size=None) -> tuple:
    """(H, W) the model expects: ``img_size`` if given, else from the model or its pretrained cfg."""
    if img_size is not None:
        return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        return tuple(pe.img_size)
    size = getattr(model, "img_size", None)
    if size is not None:
        return (size, size) if isinstance(size, int) else tuple(size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224))[-2:])
