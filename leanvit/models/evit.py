"""Registered EViT models: ``evit_deit_*`` and ``evit_deit3_*`` (timm's DeiT / DeiT III with EViT applied).

After ``import leanvit``, ``timm.create_model("evit_deit_small_patch16_224", keep_rate=0.7)`` builds timm's
``deit_small_patch16_224`` and reorganizes it (blocks 3/6/9, fused token) with
:func:`leanvit.reduction.evit.apply_evit`.
"""
from __future__ import annotations

import timm
from timm.models import register_model

from leanvit.errors import LeanvitError
from leanvit.reduction.evit import KeepRate, apply_evit

__all__ = ["EVIT_PARENTS"]

#: registered EViT name -> the timm model it reorganizes
EVIT_PARENTS = {
    "evit_deit_tiny_patch16_224": "deit_tiny_patch16_224",
    "evit_deit_small_patch16_224": "deit_small_patch16_224",
    "evit_deit_base_patch16_224": "deit_base_patch16_224",
    "evit_deit3_small_patch16_224": "deit3_small_patch16_224",
    "evit_deit3_medium_patch16_224": "deit3_medium_patch16_224",
    "evit_deit3_base_patch16_224": "deit3_base_patch16_224",
    "evit_deit3_large_patch16_224": "deit3_large_patch16_224",
}


def _make_entrypoint(name: str, base: str):
    def entrypoint(pretrained: bool = False, keep_rate: KeepRate = 0.7, locations=None, fuse: bool = True,
                   **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if not (k.startswith("pretrained_cfg") and v is None)}
        if pretrained:
            raise LeanvitError(
                f"{name}: no weights can be downloaded here; build with pretrained=False and use "
                "leanvit.load_checkpoint(model, 'file.pth') with a local checkpoint")
        model = timm.create_model(base, pretrained=False, **kwargs)
        return apply_evit(model, keep_rate=keep_rate, locations=locations, fuse=fuse)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"EViT on timm's ``{base}`` (keep_rate 0.7 at blocks 3/6/9, fused, by default)."
    globals()[name] = entrypoint
    register_model(entrypoint)


for _name, _base in EVIT_PARENTS.items():
    _make_entrypoint(_name, _base)
