"""Semantic segmentation heads on leanvit backbones: Semantic FPN (PVT/Shunted), UperNet (DeiT III) and the
linear decoder of plain-ViT segmenters (Segmenter, SETR-naive).

- ``semantic_fpn`` (Kirillov et al. 2019, the semantic branch of Panoptic FPN; the head PVT, PVT v2 and
  Shunted report on ADE20K): a torchvision ``FeaturePyramidNetwork`` (lateral 1x1 + output 3x3 convs,
  ``fpn_channels`` = 256) over the stride 4-32 maps; from each level, [3x3 conv, GroupNorm, ReLU, 2x
  bilinear upsampling] repeated until stride 4 (the stride-4 level: one conv, no upsampling), the branches
  summed, dropout 0.1, a 1x1 classifier (``channels`` = 128 as mmsegmentation's ``FPNHead``). GroupNorm as
  Panoptic FPN (``norm="gn"``, default: small per-device batches); ``norm="bn"``: BatchNorm, as
  mmsegmentation's ``FPNHead`` config that PVT's code uses (SyncBN there).
- ``upernet`` (Xiao et al. 2018; mmsegmentation's ``UPerHead``, the head of DeiT III's ADE20K runs, XCiT
  config): a pyramid pooling module (scales 1/2/3/6) on the last map, lateral 1x1 convs, top-down fusion,
  3x3 output convs, all levels upsampled to the first and concatenated, a 3x3 fusion conv, dropout 0.1 and
  a 1x1 classifier; conv + BatchNorm + ReLU (``channels`` = 512). The auxiliary FCN head of those
  configs is not built.

``forward(x)`` takes float images in [0, 1], like torchvision's detectors (one convention for every dense
model: the data transforms do not normalize), normalizes them with the backbone's mean/std
(``normalize=False``: the caller does) and returns logits (B, K, H, W) upsampled (bilinear) to the input
resolution.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from leanvit.dense.backbones import DenseBackbone, resolve_backbone
from leanvit.dense.fused_fpn import FusedFinestLevel
from leanvit.errors import LeanvitError

__all__ = ["SemanticFPNHead", "UperNetHead", "LinearHead", "MaskTransformerHead", "Segmenter", "SEGMENTERS",
           "create_segmenter"]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout: oneDNN's convolutions, GroupNorm and bilinear upsampling on CPU run
    faster in it than in NCHW (no reorder of every map); values are unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


# the finest map's pixels from which the fused finest level (leanvit.dense.fused_fpn) is used
_FUSED_MIN_PIXELS = 32 * 32


def _gn(channels: int) -> nn.GroupNorm:
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


class SemanticFPNHead(nn.Module):
    """FPN neck + Panoptic-FPN semantic branch; returns logits at the finest stride."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int,
                 fpn_channels: int = 256, channels: int = 128, dropout: float = 0.1, norm: str = "gn"):
        super().__init__()
        if norm not in ("gn", "bn"):
            raise LeanvitError(f"semantic_fpn norm must be 'gn' (GroupNorm) or 'bn' (BatchNorm), got {norm!r}")
        norm_layer = _gn if norm == "gn" else nn.BatchNorm2d
        self.fpn = FeaturePyramidNetwork(list(in_channels), fpn_channels)
        base = strides[0]
        self.branches = nn.ModuleList()
        for s in strides:
            n_up = int(round(math.log2(s / base)))
            layers: List[nn.Module] = []
            for k in range(max(1, n_up)):
                layers.append(Conv2dNormActivation(fpn_channels if k == 0 else channels, channels, 3,
                                                   norm_layer=norm_layer, activation_layer=nn.ReLU, bias=False))
                if n_up > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.branches.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        first = self.branches[0][0]
        convs = (self.fpn.inner_blocks[0][0], self.fpn.layer_blocks[0][0], first[0])
        fusable = len(strides) > 1 and len(self.branches[0]) == 1 and FusedFinestLevel.applies(*convs)
        self._fused = FusedFinestLevel(*convs) if fusable else None

    def _use_fused(self, feats: List[torch.Tensor]) -> bool:
        """Inference (no autograd, eager) on maps large enough for the composed convolutions to pay, the
        finest map exactly twice the next one (odd sizes: the published path)."""
        if self._fused is None or torch.is_grad_enabled() or self.fpn.extra_blocks is not None:
            return False
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # export / compile trace the published graph
            return False
        (h, w), (h2, w2) = feats[0].shape[-2:], feats[1].shape[-2:]
        return h == 2 * h2 and w == 2 * w2 and h * w >= _FUSED_MIN_PIXELS and min(h, w) >= 8

    def _levels(self, feats: List[torch.Tensor]):
        """The FPN's outputs and the finest branch's output; with the fused path, the FPN's finest output is
        never formed (the finest branch's convolution is computed from the FPN's inputs directly)."""
        if not self._use_fused(feats):
            levels = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
            return levels, self.branches[0](levels[0])
        fpn = self.fpn  # torchvision's FeaturePyramidNetwork.forward, stopped before the finest level
        inner = fpn.get_result_from_inner_blocks(feats[-1], -1)
        levels = [fpn.get_result_from_layer_blocks(inner, -1)]
        for idx in range(len(feats) - 2, 0, -1):
            lateral = fpn.get_result_from_inner_blocks(feats[idx], idx)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            levels.insert(0, fpn.get_result_from_layer_blocks(inner, idx))
        y = self._fused(feats[0], inner)
        for layer in list(self.branches[0][0])[1:]:  # the finest branch's norm and ReLU
            y = layer(y)
        return [None] + levels, y

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        feats = [_channels_last(f) for f in feats]
        levels, out = self._levels(feats)
        # Bilinear 2x upsampling is linear, so the branches of the coarser levels are summed at stride
        # 2 x base and upsampled once (the sum of upsampled maps is the upsampled sum): one upsampling
        # and one addition at the finest stride instead of one per level. A branch whose 2x size misses
        # the finest map (odd sizes) takes its own path as before.
        pending = None
        for branch, f in zip(self.branches[1:], levels[1:]):
            if len(branch) > 1 and isinstance(branch[-1], nn.Upsample):
                y = branch[:-1](f)
                if tuple(2 * n for n in y.shape[-2:]) == tuple(out.shape[-2:]):
                    pending = y if pending is None else pending + y
                    continue
                y = branch[-1](y)
            else:
                y = branch(f)
            if y.shape[-2:] != out.shape[-2:]:  # odd sizes: 2x upsampling does not land exactly
                y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + y
        if pending is not None:
            out = out + F.interpolate(pending, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(out))


def _cbr(cin: int, cout: int, k: int) -> nn.Module:
    return Conv2dNormActivation(cin, cout, k, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, bias=False)


class UperNetHead(nn.Module):
    """UperNet: PPM on the last map + FPN fusion of all maps; returns logits at the finest stride."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = list(in_channels)
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _cbr(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.bottleneck = _cbr(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_cbr(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_cbr(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = _cbr(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @staticmethod
    def _up(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        feats = [_channels_last(f) for f in feats]
        top = feats[-1]
        psp = self.bottleneck(torch.cat([top] + [self._up(p(top), top) for p in self.ppm], dim=1))
        laterals = [conv(f) for conv, f in zip(self.lateral, feats[:-1])] + [psp]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + self._up(laterals[i], laterals[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [self._up(o, outs[0]) for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))


class LinearHead(nn.Module):
    """Segmenter's linear decoder: one 1x1 convolution on a single map (optional dropout before it).

    ``subpixel`` = r > 1 makes that one linear map predict an r x r block of logits per token (K r^2 outputs,
    rearranged by pixel shuffle, Shi et al. 2016), so the logits come out at the patch stride / r before the
    final bilinear upsampling. It stays one linear layer per token, as MAE's decoder predicts a patch's pixels
    from its token (He et al. 2022): the token, not the head, has to know where the ink lies inside its patch.
    With thin structures (strokes narrower than a patch) the patch stride bounds what the plain decoder can
    draw; ``subpixel`` lifts that bound at K r^2 C multiply-adds per token."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, dropout: float = 0.0, subpixel: int = 1):
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 1:
            raise LeanvitError(f"the linear head takes one map (the patch-stride level, out_indices=(2,)), "
                               f"the backbone gives {len(in_channels)} (channels {in_channels})")
        if isinstance(subpixel, bool) or not isinstance(subpixel, int) or subpixel < 1:
            raise LeanvitError(f"linear head: subpixel must be a positive integer (1: logits at the patch "
                               f"stride), got {subpixel!r}")
        self.subpixel = subpixel
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.classifier = nn.Conv2d(in_channels[0], num_classes * subpixel ** 2, 1)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        logits = self.classifier(self.dropout(_channels_last(feats[-1])))
        if self.subpixel > 1:
            logits = F.pixel_shuffle(logits, self.subpixel)
        return logits


class MaskTransformerHead(nn.Module):
    """Segmenter's mask transformer (Strudel et al., ICCV 2021, Sec. 3.2): the patch tokens, projected to
    the decoder's width, and K learned class embeddings go through its transformer blocks together; the
    masks are the scalar products of the L2-normalized patch and class embeddings (each through its own
    square projection), normalized (LayerNorm) over the classes, one map per class at the patch stride.

    Options (named apart from the backbone's ``depth`` / ``num_heads``): ``decoder_depth`` (2),
    ``decoder_dim`` (0: the encoder's width), ``decoder_heads`` (0: heads of 64 channels), ``decoder_mlp_ratio``
    (4), ``decoder_drop_path``, ``dropout``; the defaults are Segmenter's. It costs ``decoder_depth`` ViT
    blocks over N + K tokens: a token reduction in the backbone does not shrink it (it decodes the restored
    full map)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, decoder_dim: int = 0, decoder_depth: int = 2,
                 decoder_heads: int = 0, decoder_mlp_ratio: float = 4.0, decoder_drop_path: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 1:
            raise LeanvitError(f"the mask transformer takes one map (the patch-stride level, out_indices=(2,)), "
                               f"the backbone gives {len(in_channels)} (channels {in_channels})")
        dim = int(decoder_dim) or in_channels[0]
        num_heads = int(decoder_heads) or max(1, dim // 64)
        depth = int(decoder_depth)
        if depth < 1 or dim % num_heads:
            raise LeanvitError(f"mask transformer: need decoder_depth >= 1 and decoder_dim divisible by "
                               f"decoder_heads, got {depth}, {dim}, {num_heads}")
        self.num_classes = num_classes
        self.proj_in = nn.Linear(in_channels[0], dim)
        self.class_embed = nn.Parameter(torch.zeros(1, num_classes, dim))
        rates = torch.linspace(0, decoder_drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, num_heads, decoder_mlp_ratio, qkv_bias=True, proj_drop=dropout,
                                          drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Linear(dim, dim, bias=False)
        self.proj_classes = nn.Linear(dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(self._init)
        nn.init.trunc_normal_(self.class_embed, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        return {"class_embed"}

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        b, _, h, w = x.shape
        k = self.num_classes
        x = torch.cat([self.proj_in(x.flatten(2).transpose(1, 2)), self.class_embed.expand(b, -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        patches = F.normalize(self.proj_patch(x[:, :-k]), dim=-1)
        classes = F.normalize(self.proj_classes(x[:, -k:]), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, K)
        return masks.transpose(1, 2).reshape(b, k, h, w)


class Segmenter(nn.Module):
    """A backbone and a head; ``forward(x)`` -> logits (B, K, H, W) at the input resolution."""

    def __init__(self, backbone: DenseBackbone, head: nn.Module, num_classes: int, name: str,
                 normalize: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.segmenter_name = name
        self.normalize = normalize
        self.register_buffer("pixel_mean", torch.tensor(backbone.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(backbone.std).view(1, -1, 1, 1), persistent=False)

    @property
    def mean(self) -> tuple:
        return self.backbone.mean

    @property
    def std(self) -> tuple:
        return self.backbone.std

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set:
        """The backbone's no-weight-decay parameters (position embeddings, tokens), for timm's optimizers."""
        own = getattr(self.head, "no_weight_decay", None)
        return ({f"backbone.{n}" for n in self.backbone.no_weight_decay()}
                | {f"head.{n}" for n in (own() if callable(own) else ())})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise LeanvitError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if self.normalize:
            x = (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        logits = self.head(self.backbone(x))
        # the input of the final upsampling made channels-last contiguous: on CPU, bilinear upsampling of 150
        # class maps to 512 x 512 took 14 ms so (batch 1; 34 ms at batch 4), 35 ms (139 ms) from NCHW and 243 ms
        # from a channels-last *view* of a batch of one (a transposed token sequence), which PyTorch's kernel
        # does not take as channels-last. The logits come out channels-last; their values are unchanged.
        return F.interpolate(_channels_last(logits), size=x.shape[-2:], mode="bilinear", align_corners=False)


SEGMENTERS = ("semantic_fpn", "upernet", "linear", "mask_transformer")
_HEAD_OPTIONS = {"semantic_fpn": {"fpn_channels", "channels", "dropout", "norm"},
                 "upernet": {"channels", "pool_scales", "dropout"},
                 "linear": {"dropout", "subpixel"},
                 "mask_transformer": {"decoder_dim", "decoder_depth", "decoder_heads", "decoder_mlp_ratio",
                                      "decoder_drop_path", "dropout"}}
# the patch-stride map only: the other pyramid levels are never computed
_DEFAULT_LEVELS = {"linear": (2,), "mask_transformer": (2,)}
_SEGMENTER_OPTIONS = {"normalize"}


def create_segmenter(name: str, backbone, num_classes: int, pretrained_backbone=None, reduction=None, restore=None,
                     **kwargs) -> Segmenter:
    """A semantic segmenter ``name`` (``semantic_fpn``, ``upernet``, ``linear``, ``mask_transformer``) on
    ``backbone``.

    Args:
        backbone: a timm/leanvit model name or a built :class:`~leanvit.dense.backbones.DenseBackbone`
            (stride 4-32 maps; fewer levels work, the finest one sets the head's output stride; ``linear`` and
            ``mask_transformer`` take exactly one map and build a named backbone with ``out_indices=(2,)``, the
            patch stride).
        num_classes: K classes; logits (B, K, H, W).
        pretrained_backbone: a classification checkpoint for the backbone (classifier dropped).
        reduction: a token reduction in a plain-ViT backbone (see :func:`~leanvit.dense.create_backbone`).
        restore: its restoration strategy (see :mod:`leanvit.dense.restore`).
        kwargs: head options (``channels``, ``fpn_channels`` and ``norm`` (gn | bn) for semantic_fpn,
            ``pool_scales`` for upernet, ``decoder_*`` for mask_transformer, ``dropout``), ``normalize`` (True:
            inputs in [0, 1]); the rest go to the backbone (``img_size``, ``drop_path_rate``, ``out_indices``,
            ``grad_checkpointing``, model options).
    """
    if name not in SEGMENTERS:
        raise LeanvitError(f"unknown segmenter '{name}'; choose one of {', '.join(SEGMENTERS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise LeanvitError(f"num_classes must be a positive integer, got {num_classes!r}")
    head_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _HEAD_OPTIONS[name]}
    normalize = bool(kwargs.pop("normalize", True))
    if isinstance(backbone, str) and name in _DEFAULT_LEVELS:
        kwargs.setdefault("out_indices", _DEFAULT_LEVELS[name])
    body = resolve_backbone(backbone, pretrained_backbone, reduction=reduction, restore=restore, **kwargs)
    if name == "semantic_fpn":
        head = SemanticFPNHead(body.out_channels, body.strides, num_classes, **head_kw)
    elif name == "linear":
        head = LinearHead(body.out_channels, num_classes, **head_kw)
    elif name == "mask_transformer":
        head = MaskTransformerHead(body.out_channels, num_classes, **head_kw)
    else:
        head = UperNetHead(body.out_channels, num_classes, **head_kw)
    return Segmenter(body, head, num_classes, name, normalize=normalize)
