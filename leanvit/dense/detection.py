"""Detectors: torchvision's RetinaNet, FCOS, Faster R-CNN and Mask R-CNN on leanvit backbones.

Everything detection-specific (heads, losses, anchors, box coding, NMS, resizing and batching of the
images) is torchvision's; this module only puts a torchvision ``FeaturePyramidNetwork`` over a
:class:`~leanvit.dense.backbones.DenseBackbone` and picks anchors that match its strides:

- ``retinanet`` / ``fcos``: FPN levels P3-P5 from the stride 8/16/32 maps plus P6/P7 (torchvision's
  ``LastLevelP6P7`` from C5, mmdetection's ``add_extra_convs="on_input"`` as PVT v2 uses). RetinaNet anchors
  ``anchor_scale`` (4) x stride x 2^(0, 1/3, 2/3) at ratios 0.5/1/2; FCOS one point per location of size
  ``anchor_scale`` (1) x stride (torchvision's defaults for ResNet-50 FPN).
- ``fasterrcnn`` / ``maskrcnn``: FPN levels P2-P5 from the stride 4-32 maps plus max-pooled P6 for the RPN;
  anchors ``anchor_scale`` (8) x stride, ratios 0.5/1/2; RoIAlign over P2-P5.

The levels follow the backbone's maps: build it with ``out_indices`` (e.g. ``(1, 2, 3)``: strides 8/16/32)
to change them. Images go in as float tensors in [0, 1] (lists of (3, H, W), any sizes); the detector
normalizes them with the backbone's mean/std and resizes them to ``min_size``/``max_size`` (torchvision's
``GeneralizedRCNNTransform``; default 800/1333: set both to the image size for small images).

Class ids: ``num_classes`` is the number K of object classes, and labels are 0..K-1 in the targets and in
the outputs for every detector. R-CNN's class 0 is its background: ``fasterrcnn``/``maskrcnn`` are
subclasses of torchvision's that hold K+1 classes and shift labels by one on the way in and out.
"""
from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from leanvit.dense.backbones import DenseBackbone, resolve_backbone
from leanvit.errors import LeanvitError

__all__ = ["FPNBackbone", "LeanFasterRCNN", "LeanMaskRCNN", "DETECTORS", "create_detector", "detector_options"]

_log = logging.getLogger(__name__)


class FPNBackbone(nn.Module):
    """A dense backbone and a torchvision FPN over its maps: ``forward(x) -> OrderedDict`` of levels
    '0', '1', ... (then 'p6', 'p7' or 'pool'), all ``out_channels`` wide (torchvision's backbone contract)."""

    def __init__(self, body: DenseBackbone, out_channels: int = 256, extra: Optional[str] = None):
        super().__init__()
        self.body = body
        if extra == "p6p7":
            extra_block = LastLevelP6P7(body.out_channels[-1], out_channels)
        elif extra == "pool":
            extra_block = LastLevelMaxPool()
        elif extra is None:
            extra_block = None
        else:
            raise LeanvitError(f"unknown extra FPN level {extra!r}")
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        self.extra = extra
        self.strides = list(body.strides) + {"p6p7": [body.strides[-1] * 2, body.strides[-1] * 4],
                                             "pool": [body.strides[-1] * 2], None: []}[extra]
        self.level_names = [str(i) for i in range(len(body.strides))]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _shift_targets(targets, offset: int):
    if targets is None:
        return None
    return [{**t, "labels": t["labels"] + offset} if "labels" in t else t for t in targets]


class _ZeroBasedLabels:
    """R-CNN with the user's labels 0..K-1: +1 on the way in (0 is R-CNN's background), -1 on the way out."""

    def forward(self, images, targets=None):
        out = super().forward(images, _shift_targets(targets, 1))
        if isinstance(out, list):  # detections (eval mode); training returns the loss dict
            out = [{**d, "labels": d["labels"] - 1} for d in out]
        return out


class LeanFasterRCNN(_ZeroBasedLabels, FasterRCNN):
    """torchvision ``FasterRCNN`` taking and returning labels 0..K-1 (holds K+1 classes with background)."""


class LeanMaskRCNN(_ZeroBasedLabels, MaskRCNN):
    """torchvision ``MaskRCNN`` taking and returning labels 0..K-1 (holds K+1 classes with background)."""


DETECTORS: Dict[str, dict] = {
    # class, default backbone levels, extra FPN levels, anchor scale (x stride), aspect ratios, scales/level
    "retinanet": dict(cls=RetinaNet, out_indices=(1, 2, 3), extra="p6p7", anchor_scale=4.0,
                      aspect_ratios=(0.5, 1.0, 2.0), octaves=3),
    "fcos": dict(cls=FCOS, out_indices=(1, 2, 3), extra="p6p7", anchor_scale=1.0, aspect_ratios=(1.0,),
                 octaves=1),
    "fasterrcnn": dict(cls=LeanFasterRCNN, out_indices=(0, 1, 2, 3), extra="pool", anchor_scale=8.0,
                       aspect_ratios=(0.5, 1.0, 2.0), octaves=1),
    "maskrcnn": dict(cls=LeanMaskRCNN, out_indices=(0, 1, 2, 3), extra="pool", anchor_scale=8.0,
                     aspect_ratios=(0.5, 1.0, 2.0), octaves=1),
}

_OWN_OPTIONS = {"fpn_channels", "anchor_sizes", "aspect_ratios", "anchor_scale", "head_convs"}
_TRANSFORM_OPTIONS = {"size_divisible", "fixed_size"}


def detector_options(name: str) -> set:
    """The keyword arguments :func:`create_detector` gives to detector ``name`` (the rest go to the backbone)."""
    spec = _spec(name)
    names = set()
    for cls in spec["cls"].__mro__:
        if cls in (nn.Module, object) or "__init__" not in vars(cls):
            continue
        names |= {p for p in inspect.signature(cls.__init__).parameters
                  if p not in ("self", "backbone", "num_classes", "kwargs")}
        if cls in (RetinaNet, FCOS, FasterRCNN):
            break
    return names | _OWN_OPTIONS | _TRANSFORM_OPTIONS


def _spec(name: str) -> dict:
    if name not in DETECTORS:
        raise LeanvitError(f"unknown detector '{name}'; choose one of {', '.join(DETECTORS)}")
    return DETECTORS[name]


def _anchor_generator(strides: Sequence[int], spec: dict, anchor_sizes, aspect_ratios, anchor_scale):
    if anchor_sizes is None:
        scale = spec["anchor_scale"] if anchor_scale is None else float(anchor_scale)
        n = spec["octaves"]
        anchor_sizes = [tuple(scale * s * 2 ** (k / n) for k in range(n)) for s in strides]
    anchor_sizes = tuple(tuple(float(a) for a in (lvl if isinstance(lvl, (list, tuple)) else (lvl,)))
                         for lvl in anchor_sizes)
    if len(anchor_sizes) != len(strides):
        raise LeanvitError(f"anchor_sizes has {len(anchor_sizes)} levels, the FPN has {len(strides)} "
                           f"(strides {list(strides)})")
    ratios = tuple(float(r) for r in (aspect_ratios or spec["aspect_ratios"]))
    return AnchorGenerator(anchor_sizes, (ratios,) * len(anchor_sizes))


def create_detector(name: str, backbone, num_classes: int, pretrained_backbone=None, reduction=None, restore=None,
                    **kwargs) -> nn.Module:
    """A torchvision detector ``name`` (retinanet, fcos, fasterrcnn, maskrcnn) on ``backbone``.

    Args:
        backbone: a timm/leanvit model name (built with :func:`~leanvit.dense.create_backbone` at the levels
            the detector uses) or a :class:`~leanvit.dense.backbones.DenseBackbone` already built.
        num_classes: K object classes; labels 0..K-1 in targets and outputs.
        pretrained_backbone: a classification checkpoint for the backbone (classifier dropped).
        reduction: a token reduction in a plain-ViT backbone (see :func:`~leanvit.dense.create_backbone`).
        restore: its restoration strategy (see :mod:`leanvit.dense.restore`).
        kwargs: detector options (torchvision's: ``min_size``, ``max_size``, ``score_thresh``,
            ``box_score_thresh``, ``detections_per_img``, ...; leanvit's: ``fpn_channels`` (256),
            ``anchor_sizes`` (one tuple per FPN level), ``anchor_scale``, ``aspect_ratios``,
            ``head_convs`` (FCOS tower depth, 4)); every other keyword goes to the backbone
            (``img_size``, ``drop_path_rate``, ``out_indices``, ``grad_checkpointing``, model options).
    """
    spec = _spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise LeanvitError(f"num_classes must be a positive integer (object classes, no background), "
                           f"got {num_classes!r}")
    det_keys = detector_options(name)
    det_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in det_keys}
    if isinstance(backbone, str):
        kwargs.setdefault("out_indices", spec["out_indices"])
    body = resolve_backbone(backbone, pretrained_backbone, reduction=reduction, restore=restore, **kwargs)
    fpn_channels = int(det_kw.pop("fpn_channels", 256))
    fpn = FPNBackbone(body, fpn_channels, spec["extra"])
    anchors = _anchor_generator(fpn.strides, spec, det_kw.pop("anchor_sizes", None),
                                det_kw.pop("aspect_ratios", None), det_kw.pop("anchor_scale", None))
    head_convs = int(det_kw.pop("head_convs", 4))
    det_kw.setdefault("image_mean", list(body.mean))
    det_kw.setdefault("image_std", list(body.std))
    cls = spec["cls"]
    if name == "retinanet":
        model = cls(fpn, num_classes, anchor_generator=anchors, **det_kw)
    elif name == "fcos":
        if fpn_channels % 32:
            raise LeanvitError(f"fcos: fpn_channels must be a multiple of 32 (GroupNorm(32)), got {fpn_channels}")
        head = FCOSHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, num_convs=head_convs)
        model = cls(fpn, num_classes, anchor_generator=anchors, head=head, **det_kw)
    else:
        det_kw.setdefault("box_roi_pool", MultiScaleRoIAlign(fpn.level_names, 7, 2))
        if name == "maskrcnn":
            det_kw.setdefault("mask_roi_pool", MultiScaleRoIAlign(fpn.level_names, 14, 2))
        model = cls(fpn, num_classes + 1, rpn_anchor_generator=anchors, **det_kw)
    no_decay = {f"backbone.body.{n}" for n in body.no_weight_decay()}
    model.no_weight_decay = lambda: set(no_decay)  # timm's optimizers skip weight decay on these
    model.num_object_classes = num_classes
    model.detector_name = name
    _log.debug("%s on %s: FPN strides %s, %d classes", name, body.name, fpn.strides, num_classes)
    return model
