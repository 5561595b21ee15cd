"""Embedded dense data: the digits made into multi-object scenes (``--data digits-det`` / ``digits-seg``).

Each image is a ``canvas_size`` px (default 96) cluttered canvas, drawn as :mod:`leanvit.data.digits`
draws its canvases (dark noisy background of random level and tint, dim fragments of other scans as
distractors), holding 1 to ``max_objects`` (default 4) real scikit-learn digit scans, each upscaled to a
random size between ``min_digit`` and ``max_digit`` px (default 12-40) and drawn at a random place in a
random colour. Placements overlapping an earlier digit by more than ``max_overlap`` (IoU) are redrawn, so
digits rarely hide each other. Objects of very different sizes share one image: what Shunted attention
(several token-aggregation rates in one layer) is made for.

Targets
    * ``digits-det``: a tight box around each digit's ink (pixels where its upscaled scan is above
      ``ink_threshold``; its area for COCO's small/medium/large split is the box's, since a digit's thin
      ink would make nearly every digit "small"), its label (the digit, 0..9) and, with the option
      ``masks: true`` (Mask R-CNN), its instance mask;
    * ``digits-seg``: a label map: 0 background, 1 + digit where a digit's ink is (the digit drawn last
      wins where two overlap). ``val_miou`` is the mean IoU over the ten digit classes; ``val_miou_all``
      also counts the background.

Determinism and split
    As for ``digits``: scans are split into train and val by *source scan* (same ``seed``/``val_fraction``
    split as :func:`leanvit.data.digits.split_indices`); every scene depends only on (seed, split, epoch,
    index). Item ``i`` shows scan ``i % num_scans`` plus others of the same split; training scenes change
    with :meth:`set_epoch`, validation scenes never do.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from leanvit.data.dense import encode_masks
from leanvit.data.digits import random_color, resize_scan, split_scans
from leanvit.data.registry import GeneratedKind, register_dataset
from leanvit.errors import LeanvitError

__all__ = ["DigitScenes", "render_scene", "DigitsDetKind", "DigitsSegKind", "DIGIT_CLASSES", "scene_classes"]

DIGIT_CLASSES = tuple(str(i) for i in range(10))
_SPLIT_CODE = {"train": 11, "val": 12}


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_scene(scans: List[np.ndarray], rng: np.random.Generator, others: np.ndarray, canvas_size: int = 96,
                 min_digit: int = 12, max_digit: int = 40, num_fragments: int = 6, noise: float = 0.06,
                 ink_threshold: float = 0.3, max_overlap: float = 0.2
                 ) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, int, int, int]]]:
    """A scene of ``scans`` (each 8x8 in [0, 1]) with distractors cut from ``others``.

    Returns (image H x W x 3 uint8, owner map H x W int64: -1 background else the index into ``scans``
    of the digit whose ink is there, placement squares (x0, y0, x1, y1)). All randomness from ``rng``."""
    s = canvas_size
    bg = rng.uniform(0.0, 0.15) * random_color(rng, 0.6)
    canvas = np.broadcast_to(bg, (s, s, 3)).copy()
    canvas += rng.normal(0.0, noise, size=(s, s, 1)).astype(np.float32)
    for _ in range(num_fragments):  # dim quarter-scan fragments of other digits, of varied size
        other = others[rng.integers(len(others))]
        r0, c0 = rng.integers(0, 5, size=2)
        fs = int(rng.integers(max(2, min_digit // 2), max(3, max_digit // 2) + 1))
        piece = resize_scan(other[r0:r0 + 4, c0:c0 + 4], fs) * rng.uniform(0.25, 0.5)
        y, x = rng.integers(0, s - fs + 1, size=2)
        region = canvas[y:y + fs, x:x + fs]
        np.maximum(region, piece[..., None] * random_color(rng, 0.3), out=region)
    owner = np.full((s, s), -1, dtype=np.int64)
    placed: List[Tuple[int, int, int, int]] = []
    for k, scan in enumerate(scans):
        size = int(rng.integers(min_digit, max_digit + 1))
        for _ in range(20):  # redraw placements that would hide an earlier digit
            y, x = (int(v) for v in rng.integers(0, s - size + 1, size=2))
            box = (x, y, x + size, y + size)
            if all(_iou(box, p) <= max_overlap for p in placed):
                break
        placed.append(box)
        shape = resize_scan(scan, size)
        ink = shape * rng.uniform(0.75, 1.0)
        region = canvas[y:y + size, x:x + size]
        np.maximum(region, ink[..., None] * random_color(rng, 0.4), out=region)
        mine = shape > ink_threshold
        owner[y:y + size, x:x + size][mine] = k  # drawn last wins where inks overlap
    img = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return img, owner, placed


TARGET_FORMATS = ("boxes", "mask")


def scene_classes(target_format: str) -> List[str]:
    """The class names of the scenes: the digits, with a ``background`` first for label maps."""
    return ["background", *DIGIT_CLASSES] if target_format == "mask" else list(DIGIT_CLASSES)


class DigitScenes:
    """The embedded scenes as a dataset of (image, target), the targets detection's or segmentation's.

    Args:
        split: ``train`` or ``val``.
        target_format: ``boxes`` (boxes, labels, optionally instance masks) or ``mask`` (a label map); see
            :mod:`leanvit.data.dense` for the sample format.
        transform: a dense transform called as ``transform(image, target)``
            (:func:`leanvit.data.dense.detection_transform` / ``segmentation_transform``); without one the
            image is a ``tv_tensors.Image`` (uint8).
        renders_per_epoch: scenes per scan per epoch (train).
        val_renders: scenes per scan in validation.
        canvas_size: see :func:`render_scene`, as for ``min_digit``, ``max_digit``, ``max_objects``,
            ``num_fragments``, ``noise``, ``ink_threshold`` and ``max_overlap``.
    """

    def __init__(self, split: str = "train", target_format: str = "boxes", transform: Optional[Callable] = None,
                 canvas_size: int = 96, min_digit: int = 12, max_digit: int = 40, min_objects: int = 1,
                 max_objects: int = 4, num_fragments: int = 6, noise: float = 0.06, ink_threshold: float = 0.3,
                 max_overlap: float = 0.2, renders_per_epoch: int = 1, val_renders: int = 1,
                 val_fraction: float = 0.2, seed: int = 0, masks: bool = False):
        if split not in _SPLIT_CODE:
            raise LeanvitError(f"digits-{'det' if target_format == 'boxes' else 'seg'} has the splits train and val, "
                               f"not '{split}'")
        if target_format not in TARGET_FORMATS:
            raise LeanvitError(f"target_format must be {' or '.join(TARGET_FORMATS)}, got {target_format!r}")
        if not 4 <= min_digit <= max_digit <= canvas_size:
            raise LeanvitError(f"need 4 <= min_digit <= max_digit <= canvas_size, got {min_digit}, {max_digit}, "
                               f"{canvas_size}")
        if not 1 <= min_objects <= max_objects:
            raise LeanvitError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        scans, labels, idx, renders = split_scans(split, renders_per_epoch, val_renders, val_fraction, seed)
        self.split, self.target_format, self.transform = split, target_format, transform
        self.scans, self.labels, self.source_indices = scans, labels, idx
        self.renders, self.seed, self.epoch = renders, int(seed), 0
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.render_kwargs = dict(canvas_size=int(canvas_size), min_digit=int(min_digit), max_digit=int(max_digit),
                                  num_fragments=int(num_fragments), noise=float(noise),
                                  ink_threshold=float(ink_threshold), max_overlap=float(max_overlap))
        self.classes = scene_classes(target_format)
        # label maps: mIoU over the digits (the background is trained on, reported in val_miou_all)
        self.miou_classes = list(range(1, 11)) if target_format == "mask" else None
        self.with_masks = bool(masks)  # detection: instance masks too (Mask R-CNN)
        self.num_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.scans) * self.renders

    def scene(self, index: int) -> Tuple[Image.Image, List[int], np.ndarray]:
        """(PIL image, digit of each object, owner map) of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        n = len(self.scans)
        epoch = self.epoch if self.split == "train" else 0
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], epoch, index])
        k = int(rng.integers(self.min_objects, self.max_objects + 1))
        picks = [index % n] + [int(j) for j in rng.integers(0, n, size=k - 1)]
        order = rng.permutation(k)  # the item's own scan is not always drawn first
        picks = [picks[j] for j in order]
        img, owner, _ = render_scene([self.scans[j] for j in picks], rng, self.scans, **self.render_kwargs)
        return Image.fromarray(img, mode="RGB"), [int(self.labels[j]) for j in picks], owner

    def image(self, index: int) -> Image.Image:
        return self.scene(index)[0]

    def target(self, index: int, owner: np.ndarray, digits: List[int]) -> Dict[str, Any]:
        s = owner.shape
        if self.target_format == "mask":
            lab = np.zeros(s, dtype=np.int64)
            for k, d in enumerate(digits):
                lab[owner == k] = d + 1
            m = torch.from_numpy(lab)
            return {"mask": tv_tensors.Mask(m), "gt_mask": m.clone(), "image_id": index, "orig_size": s}
        boxes, labels, masks, areas = [], [], [], []
        for k, d in enumerate(digits):
            mine = owner == k
            ys, xs = np.nonzero(mine)
            if len(ys) == 0:  # fully hidden by later digits (rare): not an object any more
                continue
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(d)
            areas.append(float((xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())))
            masks.append(mine)
        b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        lab = torch.tensor(labels, dtype=torch.int64)
        t = {"boxes": tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=s), "labels": lab,
             "image_id": index, "orig_size": s, "gt_boxes": b.clone(), "gt_labels": lab.clone(),
             "gt_area": torch.tensor(areas, dtype=torch.float32),
             "gt_iscrowd": torch.zeros(len(lab), dtype=torch.int64)}
        if self.with_masks:
            m = np.stack(masks) if masks else np.zeros((0, *s), dtype=bool)
            t["masks"] = tv_tensors.Mask(torch.from_numpy(m.astype(np.uint8)))
            t["gt_segms"] = encode_masks(m)
        return t

    def __getitem__(self, index: int):
        img, digits, owner = self.scene(index)
        target = self.target(index, owner, digits)
        image = tv_tensors.Image(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous())
        if self.transform is not None:
            return self.transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"DigitScenes(split={self.split!r}, target_format={self.target_format!r}, "
                f"scans={len(self.scans)}, "
                f"renders={self.renders}, {', '.join(f'{k}={v}' for k, v in self.render_kwargs.items())}, "
                f"seed={self.seed})")


class _DigitScenesKind(GeneratedKind):
    options_key = "digits_dense"
    dataset_class = DigitScenes

    def classes(self, data, split="val", options=None):
        return scene_classes(self.target_format)


class DigitsDetKind(_DigitScenesKind):
    """``--data digits-det``: scenes with boxes, labels and instance masks (options: recipe ``digits_dense:``)."""

    name = "digits-det"
    task = "detection"
    target_format = "boxes"


class DigitsSegKind(_DigitScenesKind):
    """``--data digits-seg``: scenes with per-pixel digit labels (options: recipe ``digits_dense:``)."""

    name = "digits-seg"
    task = "segmentation"
    target_format = "mask"


register_dataset(DigitsDetKind())
register_dataset(DigitsSegKind())
