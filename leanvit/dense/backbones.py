"""Multi-scale backbones for dense prediction: a list of NCHW maps, their channels and strides.

Two kinds, both over timm models (so leanvit's own, timm's, and checkpoints of either work):

- **Hierarchical models** (``shunted_t/s/b``, timm ``pvt_v2_*``, any timm model with
  ``forward_intermediates``): timm's ``features_only=True`` feature getter, stages at strides 4/8/16/32;
  ``out_indices`` picks the stages (0-3).
- **Plain ViTs** (timm ``vit_*``, ``deit_*``, ``deit3_*``, leanvit's ``evit_*``; the RoPE ViTs of timm
  ``Eva``: DINOv3 ``vit_*_dinov3``, EVA-02 ``eva02_*``): a ViTDet-style simple
  feature pyramid (Li et al. 2022) from the last block's map at stride 16 (after the final norm):
  two 2x deconvolutions (stride 4), one deconvolution (stride 8), the map itself (16), 2x max-pooling (32).
  The ViT runs with ``dynamic_img_size=True`` and ``dynamic_img_pad=True``, so any input size works
  (padded to a multiple of the patch), the position embedding being interpolated.
  ``reduction="evit:0.5"`` / ``"tome:8"`` (or a mapping) runs the ViT with a token reduction, and
  ``restore=`` picks how the last block's full token map is restored (``keep``, ``reactivate``, ``fused``
  for EViT; ``unmerge``, ``reactivate`` for ToMe): see :mod:`leanvit.dense.restore`. Hierarchical
  backbones refuse a reduction.

A classification checkpoint (``pretrained=PATH``) loads into the underlying timm model with the
classifier dropped; keys the backbone does not have (classifier, pruned layers) are counted and
skipped, a backbone weight the checkpoint lacks is an error naming it (``allow_missing=True`` loads
what fits). ``grad_checkpointing=True`` recomputes each block in the backward pass (timm's
``set_grad_checkpointing``), for large inputs.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from leanvit.checkpoints import load_checkpoint
from leanvit.dense.reduction import reduction_options
from leanvit.dense.restore import Restore, parse_restore, restoration_for, restored_tokens
from leanvit.errors import LeanvitError
from leanvit.models import create_model
from leanvit.reduction import apply_reduction, apply_reduction_spec, reduction_spec, remove_reduction

__all__ = ["resolve_backbone", "DenseBackbone", "FeatureBackbone", "SimpleFeaturePyramid", "create_backbone",
           "is_plain_vit", "load_pretrained"]

_log = logging.getLogger(__name__)

SFP_STRIDES = (4, 8, 16, 32)
#: the plain (single-scale) ViT classes: timm's ViT / DeiT / DeiT III and its RoPE ViTs (EVA-02, DINOv3)
PLAIN_VITS = (VisionTransformer, Eva)


class DenseBackbone(nn.Module):
    """Base class: ``forward(x) -> [maps]``, with ``out_channels``, ``strides``, ``mean``/``std`` (the
    normalization of the underlying classification model) and ``model`` (the underlying timm model)."""

    out_channels: List[int]
    strides: List[int]
    name: str

    @property
    def model(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def mean(self) -> tuple:
        return tuple((getattr(self.model, "pretrained_cfg", None) or {}).get("mean", (0.485, 0.456, 0.406)))

    @property
    def std(self) -> tuple:
        return tuple((getattr(self.model, "pretrained_cfg", None) or {}).get("std", (0.229, 0.224, 0.225)))

    def no_weight_decay(self) -> set:
        """Names (relative to this backbone) of the underlying model's ``no_weight_decay`` parameters."""
        fn = getattr(self.model, "no_weight_decay", None)
        names = set(fn()) if callable(fn) else set()
        prefix = next(n for n, m in self.named_modules() if m is self.model)
        own = {n for n, _ in self.named_parameters()}
        return {f"{prefix}.{n}" for n in names if f"{prefix}.{n}" in own}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not hasattr(self.model, "set_grad_checkpointing"):
            raise LeanvitError(f"{self.name} does not support gradient checkpointing")
        self.model.set_grad_checkpointing(enable)

    def set_reduction(self, reduction, restore=None) -> None:
        """Run with a token reduction (``"evit:0.7"``, ``"tome:8"``, a mapping; None removes it) restored by
        ``restore``. Only plain-ViT backbones take one."""
        if reduction_options(reduction) is not None or parse_restore(restore) is not None:
            raise LeanvitError(
                f"{self.name}: token reduction needs a plain ViT backbone (timm VisionTransformer or Eva); "
                f"{self.name} is hierarchical: its attention already aggregates keys and values spatially (Shunted, "
                "PVT v2) and it has no class token or flat token sequence for EViT / ToMe")

    def restoration(self) -> Optional[Restore]:
        """The restoration strategy in effect (None without a reduction)."""
        return None

    def extra_repr(self) -> str:
        return f"name={self.name}, out_channels={self.out_channels}, strides={self.strides}"


class FeatureBackbone(DenseBackbone):
    """A hierarchical timm model through ``features_only=True`` (timm's feature getter)."""

    def __init__(self, name: str, out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs):
        super().__init__()
        self.name = name
        try:
            try:
                self.body = create_model(name, features_only=True, feature_cls="getter",
                                         out_indices=tuple(out_indices), **kwargs)
            except LeanvitError as e:
                if "img_size" not in kwargs or "'img_size'" not in str(e):
                    raise
                # size-agnostic hierarchical models without the option (timm's pvt_v2): nothing to set
                kwargs.pop("img_size")
                self.body = create_model(name, features_only=True, feature_cls="getter",
                                         out_indices=tuple(out_indices), **kwargs)
        except (IndexError, AssertionError) as e:
            raise LeanvitError(f"{name}: bad out_indices {tuple(out_indices)} ({e})") from None
        self.out_channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())

    @property
    def model(self) -> nn.Module:
        return self.body.model

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.body(x))


def is_plain_vit(name: str) -> bool:
    """Whether timm model ``name`` is a plain (single-scale) ViT, built here with a simple feature pyramid."""
    if not timm.is_model(name):
        return False
    with torch.device("meta"):
        try:
            m = timm.create_model(name, pretrained=False)
        except Exception:  # some entrypoints cannot build on the meta device: look at the name
            return name.startswith(("vit_", "deit", "evit_"))
    return isinstance(m, PLAIN_VITS)


class SimpleFeaturePyramid(DenseBackbone):
    """ViTDet's simple feature pyramid on a timm ViT: strides 4/8/16/32 from the last block's map.

    Channels: D/4 at stride 4, D/2 at 8, D at 16 and 32 (D = the ViT width), as in ViTDet before its
    per-level 1x1/3x3 convolutions (the FPN of the detector/segmenter plays that part).
    ``out_indices`` picks levels among the four (0: stride 4 ... 3: stride 32)."""

    def __init__(self, name: str, out_indices: Sequence[int] = (0, 1, 2, 3), reduction=None, restore=None,
                 **kwargs):
        super().__init__()
        self.name = name
        self.restore: Optional[Restore] = None
        kwargs.setdefault("dynamic_img_size", True)
        kwargs.setdefault("dynamic_img_pad", True)  # any input size: padded to a multiple of the patch
        self.vit = create_model(name, num_classes=0, **kwargs)
        if not isinstance(self.vit, PLAIN_VITS):
            raise LeanvitError(f"{name} is not a plain timm ViT (VisionTransformer or Eva)")
        if getattr(self.vit, "global_pool", "") == "map" or not hasattr(self.vit, "patch_embed"):
            raise LeanvitError(f"{name}: unsupported ViT layout for a feature pyramid")
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices) or len(set(out_indices)) != len(out_indices):
            raise LeanvitError(f"{name}: out_indices must be distinct levels among 0-3 (strides 4/8/16/32), "
                               f"got {out_indices}")
        self.out_indices = tuple(sorted(out_indices))
        patch = self.vit.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if patch != 16:
            _log.info("%s: patch %d, pyramid strides are %s", name, patch, [patch * s // 16 for s in SFP_STRIDES])
        d = self.vit.embed_dim
        self.levels = nn.ModuleDict()
        for i in self.out_indices:
            if i == 0:
                m = nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, 2), LayerNorm2d(d // 2), nn.GELU(),
                                  nn.ConvTranspose2d(d // 2, d // 4, 2, 2))
            elif i == 1:
                m = nn.ConvTranspose2d(d, d // 2, 2, 2)
            elif i == 2:
                m = nn.Identity()
            else:
                m = nn.MaxPool2d(2, 2)
            self.levels[str(i)] = m
        widths = {0: d // 4, 1: d // 2, 2: d, 3: d}
        self.out_channels = [widths[i] for i in self.out_indices]
        self.strides = [patch * SFP_STRIDES[i] // 16 for i in self.out_indices]
        if reduction is not None or restore is not None:
            self.set_reduction(reduction, restore)

    @property
    def model(self) -> nn.Module:
        return self.vit

    def set_reduction(self, reduction, restore=None) -> None:
        options = reduction_options(reduction)
        if restore is None and options is not None:
            restore = options[2]  # a mapping's own "restore"
        restore = parse_restore(restore)
        before = reduction_spec(self.vit)
        if options is None:
            if restore is not None and before is None:
                raise LeanvitError(f"restore '{restore}' needs a reduction (e.g. reduction='evit:0.7')")
            if reduction is not None:  # an explicit "none": back to the unreduced ViT
                remove_reduction(self.vit)
        else:
            apply_reduction(self.vit, options[0], **options[1])
        try:
            restoration_for(self.vit, restore)  # a strategy of this method, within the depth
        except LeanvitError:
            remove_reduction(self.vit)
            apply_reduction_spec(self.vit, before)
            raise
        self.restore = restore

    def restoration(self) -> Optional[Restore]:
        return restoration_for(self.vit, self.restore)

    def _last_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map (B, C, H, W) after the final norm, restored to every patch."""
        H, W = self.vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        tokens = restored_tokens(self.vit, x, self.restore)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, H, W)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        m = self._last_map(x)
        return [self.levels[str(i)](m) for i in self.out_indices]


def load_pretrained(backbone: DenseBackbone, path, allow_missing: bool = False) -> Dict[str, int]:
    """Load a classification checkpoint into ``backbone``'s timm model, the classifier dropped.

    Returns counts ``loaded``, ``skipped`` (classifier and keys the backbone no longer has), ``missing``;
    logs them. A backbone weight missing from the checkpoint is an error unless ``allow_missing``."""
    model = backbone.model
    result = load_checkpoint(model, path, strict=False, ignore_classifier=True)
    own = model.state_dict()
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    skipped = list(result.skipped_keys) + list(result.unexpected_keys)
    loaded = len(own) - len(result.missing_keys)
    if loaded == 0:
        raise LeanvitError(f"checkpoint {path} has no weight of the {backbone.name} backbone "
                           f"(its keys look like {', '.join(skipped[:4])}): a checkpoint of another model?")
    if missing and not allow_missing:
        shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
        raise LeanvitError(f"checkpoint {path} does not fit the {backbone.name} backbone: missing keys: {shown}")
    counts = {"loaded": loaded, "skipped": len(skipped), "missing": len(missing)}
    _log.info("%s backbone: loaded %d tensors from %s; skipped %d (classifier, unused: %s); missing %d",
              backbone.name, loaded, path, len(skipped), ", ".join(skipped[:4]) or "none", len(missing))
    return counts


def create_backbone(name: str, out_indices: Optional[Sequence[int]] = None, pretrained=None,
                    grad_checkpointing: bool = False, allow_missing: bool = False, reduction=None, restore=None,
                    **kwargs) -> DenseBackbone:
    """A multi-scale backbone for timm model ``name``.

    Args:
        out_indices: levels to return, 0-3 = strides 4/8/16/32 (default: all four).
        reduction: a token reduction for a plain-ViT backbone: text as the command line writes it
            (``"evit:0.7"``, ``"tome:8"``) or a mapping (``{"method": "evit", "keep_rate": 0.7}``).
        restore: how the full token map is restored: ``keep`` (EViT's default), ``reactivate`` (or
            ``{"name": "reactivate", "blocks": N}``), ``fused``; ``unmerge`` (ToMe's default), ``reactivate``.
        pretrained: a classification checkpoint (path or already-read dict) loaded with the classifier
            dropped; the counts are in ``backbone.load_report``. ``True`` goes through timm's own
            ``pretrained=True`` machinery instead (hub ids etc.).
        grad_checkpointing: recompute blocks in the backward pass (memory for large inputs).
        kwargs: the timm model's own options (``img_size``, ``drop_path_rate``, ``depths``, ``embed_dims``...);
            ``img_size`` is dropped for hierarchical models that have no such option (timm's ``pvt_v2_*``).
    """
    if not isinstance(name, str) or not name:
        raise LeanvitError(f"backbone must be a model name, got {name!r}")
    out_indices = (0, 1, 2, 3) if out_indices is None else tuple(int(i) for i in out_indices)
    if pretrained is True:
        kwargs["pretrained"] = True
    try:
        if is_plain_vit(name):
            bb = SimpleFeaturePyramid(name, out_indices, reduction=reduction, restore=restore, **kwargs)
        else:
            bb = FeatureBackbone(name, out_indices, **kwargs)
            bb.set_reduction(reduction, restore)  # refuses any
    except RuntimeError as e:
        if "features_only" in str(e) or "feature" in str(e).lower():
            raise LeanvitError(f"{name} cannot serve as a multi-scale backbone ({e})") from None
        raise
    bb.load_report = None
    if pretrained is not None and pretrained is not True and pretrained is not False:
        bb.load_report = load_pretrained(bb, pretrained, allow_missing=allow_missing)
    if grad_checkpointing:
        bb.set_grad_checkpointing(True)
    return bb


def resolve_backbone(backbone, pretrained=None, reduction=None, restore=None, **kwargs) -> DenseBackbone:
    """A backbone for a detector or segmenter: built from a model name (``kwargs`` are its options), or a
    built :class:`DenseBackbone` used as it is (``pretrained`` weights loaded into it, ``reduction`` /
    ``restore`` applied to it, if given)."""
    if isinstance(backbone, str):
        return create_backbone(backbone, pretrained=pretrained, reduction=reduction, restore=restore, **kwargs)
    if not isinstance(backbone, DenseBackbone):
        raise LeanvitError(f"backbone must be a model name or a leanvit.dense backbone, got {type(backbone).__name__}")
    if kwargs:
        raise LeanvitError(f"backbone options {sorted(kwargs)} need a backbone name, not a built backbone")
    if pretrained is not None:
        backbone.load_report = load_pretrained(backbone, pretrained)
    if reduction is not None or restore is not None:
        backbone.set_reduction(reduction, restore)
    return backbone
