"""What dense (detection / segmentation) datasets share: the sample format, the transforms and the collate.

Sample format (every dense dataset kind returns ``(image, target)``):

* detection: ``image`` a ``tv_tensors.Image``; ``target`` a dict with ``boxes`` (``tv_tensors.BoundingBoxes``,
  XYXY, pixels), ``labels`` (int64, 0..K-1, as :func:`leanvit.dense.create_detector` takes them for
  every detector), optionally ``masks`` (``tv_tensors.Mask``, N x H x W instance masks, for Mask R-CNN),
  ``image_id`` (int), ``orig_size`` (H, W before any transform) and the ground truth for evaluation in the
  original image's coordinates, which the transforms leave alone (plain tensors): ``gt_boxes``,
  ``gt_labels``, ``gt_area``, ``gt_iscrowd`` and, with masks, ``gt_segms`` (one COCO RLE per object,
  :func:`encode_masks`; a list, which the transforms pass by);
* segmentation: ``image`` a ``tv_tensors.Image``; ``target`` a dict with ``mask`` (``tv_tensors.Mask``,
  H x W int64 class indices, :data:`IGNORE_INDEX` = not counted), ``image_id``, ``orig_size`` and, for
  evaluation, ``gt_mask`` (the untransformed label map).

Augmentations are torchvision ``transforms.v2`` on ``tv_tensors``: they move boxes and masks with the
image (resize keeping the aspect ratio, random horizontal flip, random crop for segmentation,
:class:`~torchvision.transforms.v2.SanitizeBoundingBoxes` to drop boxes a transform made empty); there is
no hand-written box arithmetic here.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from leanvit.errors import LeanvitError

__all__ = ["IGNORE_INDEX", "SkipCounter", "detection_transform", "segmentation_transform",
           "collate_detection", "collate_segmentation", "DenseTransform", "encode_masks"]

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


class SkipCounter:
    """Counts of what a dense dataset dropped, clipped or kept as a negative, reported once per run.

    ``counts``: reason -> number; :meth:`report` logs one line per reason (and returns them)."""

    def __init__(self, where: str = ""):
        self.where = where
        self.counts: Dict[str, int] = {}

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + int(n)

    def lines(self) -> List[str]:
        where = f" in {self.where}" if self.where else ""
        return [f"{n} {reason}{where}" for reason, n in self.counts.items()]

    def report(self) -> List[str]:
        """Log the counts (once per split: the datasets call this when they load; INFO, so that under
        torchrun only rank 0 prints them)."""
        lines = self.lines()
        for line in lines:
            log.info(f"note: {line}")
        return lines


class DenseTransform:
    """A ``transforms.v2`` pipeline applied to (image, target); the image is made a ``tv_tensors.Image``."""

    def __init__(self, ops: Sequence[Any]):
        self.pipeline = v2.Compose(list(ops))

    def __call__(self, image, target):
        if not isinstance(image, tv_tensors.Image):
            image = tv_tensors.Image(v2.functional.pil_to_tensor(image) if not torch.is_tensor(image) else image)
        return self.pipeline(image, target)

    def __repr__(self) -> str:
        return f"DenseTransform({self.pipeline})"


def _resize_op(min_size: Optional[int], max_size: Optional[int]):
    """Resize the shorter side to ``min_size`` with the longer side at most ``max_size`` (aspect kept)."""
    if not min_size:
        return None
    if max_size and max_size <= min_size:
        # torchvision needs max_size > size; a square cap is the shorter side itself
        return v2.Resize(int(min_size), antialias=True)
    return v2.Resize(int(min_size), max_size=int(max_size) if max_size else None, antialias=True)


def detection_transform(train: bool, min_size: Optional[int] = None, max_size: Optional[int] = None,
                        hflip: float = 0.5) -> DenseTransform:
    """Detection: (train) random horizontal flip; resize keeping the aspect ratio (shorter side ``min_size``,
    longer at most ``max_size``; none when ``min_size`` is None); drop boxes left with no area; float [0, 1]
    images (torchvision detectors normalize inside the model)."""
    ops: List[Any] = []
    if train and hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=float(hflip)))
    r = _resize_op(min_size, max_size)
    if r is not None:
        ops.append(r)
    ops += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0),
            v2.ToDtype(torch.float32, scale=True)]
    return DenseTransform(ops)


def segmentation_transform(train: bool, min_size: Optional[int] = None, max_size: Optional[int] = None,
                           crop_size: Optional[int] = None, hflip: float = 0.5,
                           scale_range: Tuple[float, float] = (0.5, 2.0)) -> DenseTransform:
    """Segmentation as mmseg's ADE20K pipeline does it: (train) resize the shorter side to a random
    ``min_size`` x ``scale_range`` (aspect kept), random ``crop_size`` crop (padded with the ignore label
    where the image is smaller), random horizontal flip; (eval) resize the shorter side to ``min_size``
    (the label map the metric uses stays at the original size in ``gt_mask``). Float images in [0, 1]: the
    segmenters of :mod:`leanvit.dense` normalize inside, as torchvision's detectors do."""
    ops: List[Any] = []
    if train:
        if min_size:
            lo, hi = (int(round(min_size * s)) for s in scale_range)
            ops.append(v2.RandomResize(max(1, lo), max(lo + 1, hi), antialias=True) if hi > lo
                       else v2.Resize(int(min_size), antialias=True))
        if crop_size:
            ops.append(v2.RandomCrop(int(crop_size), pad_if_needed=True,
                                     fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX, "others": 0}))
        if hflip > 0:
            ops.append(v2.RandomHorizontalFlip(p=float(hflip)))
    else:
        r = _resize_op(min_size, max_size)
        if r is not None:
            ops.append(r)
    ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    return DenseTransform(ops)


def collate_detection(batch):
    """(list of images, list of targets): torchvision detectors take images of different sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _pad_to(t: torch.Tensor, h: int, w: int, value) -> torch.Tensor:
    return F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value)


def collate_segmentation(batch, size_divisor: int = 32):
    """(images B x 3 x H x W, targets): images zero-padded (bottom/right) to the batch's largest size rounded
    up to ``size_divisor``; the label maps stay in the targets (:func:`stack_masks` pads them with
    :data:`IGNORE_INDEX` for the loss)."""
    images, targets = zip(*batch)
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    d = max(1, int(size_divisor))
    h, w = -(-h // d) * d, -(-w // d) * d
    x = torch.stack([_pad_to(im.as_subclass(torch.Tensor), h, w, 0.0) for im in images])
    return x, list(targets)


def stack_masks(targets: Sequence[Dict[str, Any]], h: int, w: int) -> torch.Tensor:
    """The targets' ``mask`` label maps padded with the ignore label to (h, w) and stacked: B x H x W int64."""
    return torch.stack([_pad_to(t["mask"].as_subclass(torch.Tensor).long(), h, w, IGNORE_INDEX)
                        for t in targets])


def encode_masks(masks) -> List[Dict[str, Any]]:
    """COCO run-length encodings of binary masks (N x H x W, any integer or bool type)."""
    from pycocotools import mask as mask_utils

    m = np.asarray(masks, dtype=np.uint8)
    if m.ndim != 3:
        raise LeanvitError(f"masks must be N x H x W, got shape {m.shape}")
    if len(m) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
