"""Dense prediction on leanvit backbones: object detection and semantic segmentation.

- :func:`create_backbone` -> a module returning a list of NCHW maps (``out_channels``, ``strides``):
  ``shunted_t/s/b`` and timm ``pvt_v2_*`` stages (strides 4/8/16/32, timm ``features_only``), any timm
  ViT (``deit3_*``, ``vit_*``, ``evit_*``) through a ViTDet-style simple feature pyramid from the last
  block's map. ``pretrained=PATH`` loads a classification checkpoint, classifier dropped.
- :func:`create_detector` -> a torchvision detection model (``retinanet``, ``fcos``, ``fasterrcnn``,
  ``maskrcnn``) with a torchvision FPN over the backbone maps. Class ids are the dataset's, 0..K-1, in the
  targets and in the outputs, for every detector (R-CNN's background class is handled inside).
  Train: ``model(images, targets) -> dict of losses``; eval: ``model(images) -> [dict(boxes, labels,
  scores[, masks])]``; images are lists of float (3, H, W) tensors in [0, 1].
- :func:`create_segmenter` -> ``semantic_fpn``, ``upernet`` or ``linear``; ``forward(x)`` takes a (B, 3, H, W) float
  batch in [0, 1] and returns logits (B, K, H, W) at the input resolution.

Each takes ``reduction=`` (``"evit:0.7"``, ``"tome:8"`` or a mapping) for a plain-ViT backbone and ``restore=``
(how the full token map comes back: :mod:`leanvit.dense.restore`); :func:`apply_dense_reduction` changes it
on a built model.

Every dense model takes images in [0, 1] and normalizes them itself with the backbone's mean/std.
"""
from __future__ import annotations

from typing import List

from leanvit.dense.backbones import DenseBackbone, create_backbone, load_pretrained
from leanvit.dense.detection import DETECTORS as _DETECTOR_SPECS
from leanvit.dense.detection import create_detector, detector_options
from leanvit.dense.reduction import apply_dense_reduction, dense_reduction_spec
from leanvit.dense.restore import DEFAULT_RESTORE, RESTORATIONS, Restore, parse_restore
from leanvit.dense.segmentation import SEGMENTERS, Segmenter, create_segmenter

__all__ = ["create_backbone", "create_detector", "create_segmenter", "list_detectors", "list_segmenters",
           "detector_options", "load_pretrained", "DenseBackbone", "Segmenter", "DETECTORS", "SEGMENTERS",
           "apply_dense_reduction", "dense_reduction_spec", "Restore", "parse_restore", "RESTORATIONS",
           "DEFAULT_RESTORE"]

DETECTORS = tuple(_DETECTOR_SPECS)


def list_detectors() -> List[str]:
    return list(DETECTORS)


def list_segmenters() -> List[str]:
    return list(SEGMENTERS)
