"""Registered EViT models: ``evit_deit_*`` and ``evit_deit3_*`` (timm's DeiT / DeiT III with EViT applied).

After ``import leanvit``, ``timm.create_model("evit_deit_small_patch16_224", keep_rate=0.7)`` builds the
``VisionTransformer`` of timm's ``deit_small_patch16_224`` through timm's own ``build_model_with_cfg`` and
reorganizes it (blocks 3/6/9, fused token) with :func:`leanvit.reduction.evit.apply_evit`.

Pretrained weights go through timm's machinery, exactly as for timm's own models: every EViT model has its
own pretrained cfgs (``architecture`` = the EViT name, one tag per tag of the parent, e.g.
``evit_deit_small_patch16_224.fb_in1k``) that point at the parent's weights (``hf_hub_id`` =
``timm/deit_small_patch16_224.fb_in1k``, same url, mean/std, crop_pct and input size). EViT adds no
parameter, so ``pretrained=True`` downloads the parent's weights and loads them unchanged;
``pretrained_cfg_overlay=dict(file="deit_s.pth")`` loads a local file (official DeiT / DeiT III / EViT
release files included: timm's ``checkpoint_filter_fn`` maps DeiT III's ``gamma_1/2`` layout).

The keep rate, locations and fuse flag are part of the model's ``model_args`` (the current values), so
``timm.models.save_for_hf(model, DIR)`` then ``timm.create_model("local-dir:DIR", pretrained=True)``
rebuilds the same EViT model.
"""
from __future__ import annotations

from functools import partial

from timm.models import build_model_with_cfg, generate_default_cfgs, get_arch_pretrained_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from leanvit.reduction.evit import KeepRate, apply_evit

__all__ = ["EVIT_PARENTS", "default_cfgs"]

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

_DEIT3 = dict(no_embed_class=True, init_values=1e-6)
#: the parent's architecture arguments (as timm's deit.py entrypoints pass them)
_PARENT_ARGS = {
    "deit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "deit3_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, **_DEIT3),
    "deit3_medium_patch16_224": dict(patch_size=16, embed_dim=512, depth=12, num_heads=8, **_DEIT3),
    "deit3_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DEIT3),
    "deit3_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DEIT3),
}


def _evit_cfgs() -> dict:
    """One cfg per (EViT model, parent tag): the parent's cfg (its hf_hub_id, url, data settings), default
    tag first. ``architecture`` and ``tag`` are filled in by timm's ``register_model``."""
    out = {}
    for name, parent in EVIT_PARENTS.items():
        for i, (full, cfg) in enumerate(get_arch_pretrained_cfgs(parent).items()):
            tag = full.partition(".")[2]
            d = cfg.to_dict()
            d.pop("architecture", None)
            d.pop("tag", None)
            # the parent's weights (EViT adds no parameter); the first parent tag stays the default
            out[f"{name}.{tag}{'*' if i == 0 else ''}" if tag else name] = d
    return out


default_cfgs = generate_default_cfgs(_evit_cfgs())


def _evit_vision_transformer(keep_rate: KeepRate = 0.7, locations=None, fuse: bool = True,
                             **kwargs) -> VisionTransformer:
    """timm's ``VisionTransformer(**kwargs)`` with EViT applied (the ``model_cls`` of build_model_with_cfg,
    so that pretrained loading and ``features_only`` see the EViT model)."""
    model = apply_evit(VisionTransformer(**kwargs), keep_rate=keep_rate, locations=locations, fuse=fuse)
    model.evit_args_in_model_args = True  # keep_rate/locations/fuse go into timm's model_args
    return model


def _create_evit(name: str, pretrained: bool = False, keep_rate: KeepRate = 0.7, locations=None,
                 fuse: bool = True, **kwargs) -> VisionTransformer:
    parent = EVIT_PARENTS[name]
    out_indices = kwargs.pop("out_indices", 3)
    builder = partial(_evit_vision_transformer, keep_rate=keep_rate,
                      locations=None if locations is None else list(locations), fuse=fuse)
    return build_model_with_cfg(
        builder, name, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(_PARENT_ARGS[parent], **kwargs),
    )


def _make_entrypoint(name: str, base: str):
    def entrypoint(pretrained: bool = False, keep_rate: KeepRate = 0.7, locations=None, fuse: bool = True,
                   **kwargs):
        return _create_evit(name, pretrained, keep_rate=keep_rate, locations=locations, fuse=fuse, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (f"EViT on timm's ``{base}`` (keep_rate 0.7 at blocks 3/6/9, fused, by default); "
                          f"``pretrained=True`` loads {base}'s weights.")
    globals()[name] = entrypoint
    register_model(entrypoint)


for _name, _base in EVIT_PARENTS.items():
    _make_entrypoint(_name, _base)
