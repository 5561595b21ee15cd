"""Dense prediction on leanvit backbones: object detection and semantic segmentation.

- :func:`create_backbone` -> a module returning a list of NCHW maps (``out_channels``, ``strides``):
  ``shunted_t/s/b`` and timm ``pvt_v2_*`` stages (strides 4/8/16/32), any timm ViT (``deit3_*``,
  ``vit_*``, ``evit_*``) through a ViTDet-style simple feature pyramid from the last block's map.
- :func:`create_detector` -> a torchvision detection model (``retinanet``, ``fcos``, ``fasterrcnn``,
  ``maskrcnn``) with a torchvision FPN over the backbone maps. Class ids are the dataset's, 0..K-1, in the
  targets and in the outputs, for every detector (R-CNN's background class is handled inside).
- :func:`create_segmenter` -> ``semantic_fpn`` or ``upernet``; ``forward(x)`` returns logits
  (B, K, H, W) at the input resolution.
"""
from __future__ import annotations

from typing import List

__all__ = ["create_backbone", "create_detector", "create_segmenter", "list_detectors", "list_segmenters",
           "DETECTORS", "SEGMENTERS"]

DETECTORS = ("retinanet", "fcos", "fasterrcnn", "maskrcnn")
SEGMENTERS = ("semantic_fpn", "upernet")


def list_detectors() -> List[str]:
    return list(DETECTORS)


def list_segmenters() -> List[str]:
    return list(SEGMENTERS)


def create_backbone(name, **kwargs):
    """A multi-scale backbone by timm model name (see the module docstring)."""
    raise NotImplementedError("leanvit.dense.create_backbone: in progress (issue #10 part A)")


def create_detector(name, backbone, num_classes, pretrained_backbone=None, **kwargs):
    """A torchvision detector ``name`` on ``backbone`` (a name or a module from :func:`create_backbone`).

    ``num_classes``: the number of object classes K (no background); labels are 0..K-1 in and out.
    ``pretrained_backbone``: a classification checkpoint loaded into the backbone, classifier dropped.
    Train mode: ``model(images, targets) -> dict of losses``; eval: ``model(images) -> [dict(boxes,
    labels, scores[, masks])]``."""
    raise NotImplementedError("leanvit.dense.create_detector: in progress (issue #10 part A)")


def create_segmenter(name, backbone, num_classes, pretrained_backbone=None, **kwargs):
    """A semantic segmenter ``name`` on ``backbone``; ``forward(x)`` -> logits (B, K, H, W)."""
    raise NotImplementedError("leanvit.dense.create_segmenter: in progress (issue #10 part A)")
