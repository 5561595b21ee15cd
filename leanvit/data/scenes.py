"""Embedded scenes like the dense benchmarks: stuff and things at every scale (``--data scenes-seg`` / ``scenes-det``).

A small procedural stand-in for ADE20K (Zhou et al., "Scene Parsing through ADE20K Dataset", CVPR 2017) and
COCO (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014), built only from scikit-learn's
bundled digit scans plus procedural generation, so it needs nothing on disk.

Each image is a ``canvas_size`` px (default 256) canvas:

* **stuff**: 2 to ``max_stuff_per_image`` of ``num_stuff`` classes (default 5: sky, water, grass, wall,
  road) as large regions with irregular boundaries (the argmax of smooth random fields, perturbed at a finer
  scale), covering the whole image behind the things. Each class has its own texture statistics: colour,
  noise spectrum (grain size) and orientation/frequency of its stripes, so a region is recognised by its
  texture, not by one pixel;
* **things**: ``min_objects`` to ``max_objects`` (default 0-8) of the ten digit classes as *solid* objects
  (a real scan upscaled, thresholded, thickened and hole-filled: a region, not a stroke; its ink drawn
  darker inside), each in a random colour, drawn in order so later things occlude earlier ones and the stuff.
  Sizes follow COCO's small / medium / large groups (area below 32^2, below 96^2, above, at 640 px) scaled to
  the canvas (``canvas_size / 512``), drawn with probabilities ``small_fraction`` / ``medium_fraction`` /
  the rest (default COCO's 0.41 / 0.34 / 0.25), the largest side ``max_object_size`` (default a third of
  the canvas).

Targets (the same format as ``digits-seg`` / ``digits-det``, see :mod:`leanvit.data.dense`)
    * ``scenes-seg``: a label map: ``0 .. num_stuff - 1`` the stuff, ``num_stuff + d`` digit ``d``; every
      pixel is labelled and every class counts in ``val_miou``;
    * ``scenes-det``: the things' boxes (tight around the visible mask), labels (the digit), areas (the
      visible mask's, as COCO's) and, with ``masks: true``, instance masks. Things hidden entirely are dropped.

Determinism and split
    As for ``digits``: scans are split into train and val by *source scan*
    (:func:`leanvit.data.digits.split_indices`); every scene depends only on (seed, split, epoch, index).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torchvision import tv_tensors

from leanvit.data.dense import encode_masks
from leanvit.data.digits import random_color, resize_scan, split_scans
from leanvit.data.registry import GeneratedKind, register_dataset
from leanvit.errors import LeanvitError

__all__ = ["SceneDataset", "ScenesSegKind", "ScenesDetKind", "STUFF", "scenes_classes", "size_group",
           "size_thresholds", "render_stuff", "thing_mask"]

# name: (base colour RGB, colour jitter, grain (px, at 128 px), grain amplitude, stripe angle (deg),
#        stripe period (px, at 128 px; 0 = none), stripe amplitude)
STUFF: Dict[str, Tuple[Tuple[float, float, float], float, float, float, float, float, float]] = {
    "sky": ((0.45, 0.65, 0.95), 0.05, 12.0, 0.05, 0.0, 0.0, 0.0),
    "water": ((0.10, 0.30, 0.55), 0.05, 3.0, 0.06, 0.0, 5.0, 0.12),
    "grass": ((0.20, 0.55, 0.15), 0.05, 1.0, 0.18, 90.0, 3.0, 0.08),
    "wall": ((0.70, 0.62, 0.50), 0.05, 6.0, 0.04, 90.0, 10.0, 0.10),
    "road": ((0.35, 0.35, 0.37), 0.04, 1.0, 0.10, 45.0, 0.0, 0.0),
    "sand": ((0.80, 0.70, 0.40), 0.05, 2.0, 0.08, 30.0, 7.0, 0.07),
    "rock": ((0.45, 0.40, 0.38), 0.05, 4.0, 0.15, 135.0, 4.0, 0.10),
    "snow": ((0.92, 0.93, 0.96), 0.03, 8.0, 0.04, 60.0, 12.0, 0.05),
}
DIGIT_CLASSES = tuple(str(i) for i in range(10))
_SPLIT_CODE = {"train": 21, "val": 22}
_FILL = 0.7  # a solid digit covers about this fraction of its square


def scenes_classes(num_stuff: int = 5, target_format: str = "mask") -> List[str]:
    """The class names: the stuff, then the digits (label maps); the digits alone (boxes)."""
    digits = [f"digit_{d}" for d in DIGIT_CLASSES]
    return [*list(STUFF)[:num_stuff], *digits] if target_format == "mask" else digits


def size_thresholds(canvas_size: int) -> Tuple[float, float]:
    """COCO's small/medium and medium/large area limits (32^2, 96^2 px) scaled to a ``canvas_size`` canvas."""
    k = canvas_size / 512.0
    return (32.0 * k) ** 2, (96.0 * k) ** 2


def size_group(area: float, canvas_size: int) -> str:
    """``small``, ``medium`` or ``large``: COCO's group of an object of ``area`` px on this canvas."""
    small, medium = size_thresholds(canvas_size)
    return "small" if area < small else "medium" if area < medium else "large"


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field: ``cells`` x ``cells`` normal noise upscaled bicubically to ``size``."""
    low = rng.normal(0.0, 1.0, size=(max(2, cells), max(2, cells))).astype(np.float32)
    return np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BICUBIC))


def _texture(name: str, rng: np.random.Generator, s: int) -> np.ndarray:
    colour, jitter, grain, g_amp, angle, period, s_amp = STUFF[name]
    k = s / 128.0
    base = np.asarray(colour, np.float32) + rng.uniform(-jitter, jitter, size=3).astype(np.float32)
    noise = _smooth_field(rng, s, int(round(s / max(1.0, grain * k))))
    noise = noise / (noise.std() + 1e-6)
    tex = base + g_amp * noise[..., None]
    if period > 0:
        th = np.deg2rad(angle + rng.uniform(-10, 10))
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        wave = np.sin(2 * np.pi * (xx * np.cos(th) + yy * np.sin(th)) / (period * k) + rng.uniform(0, 2 * np.pi))
        tex = tex + s_amp * wave[..., None]
    return tex


def render_stuff(rng: np.random.Generator, canvas_size: int, classes: Sequence[int], names: Sequence[str]
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Stuff regions of ``classes`` (indices into ``names``): (image H x W x 3 float, label map H x W)."""
    s = canvas_size
    fields = np.stack([_smooth_field(rng, s, 3) + 0.25 * _smooth_field(rng, s, 10) for _ in classes])
    owner = fields.argmax(0)
    labels = np.asarray(classes, dtype=np.int64)[owner]
    img = np.zeros((s, s, 3), np.float32)
    for i, c in enumerate(classes):
        m = owner == i
        if m.any():
            img[m] = _texture(names[c], rng, s)[m]
    return img, labels


def thing_mask(scan: np.ndarray, side: int, threshold: float = 0.3) -> Tuple[np.ndarray, np.ndarray]:
    """A solid silhouette of an 8x8 scan at ``side`` px: (mask, the upscaled scan). Thresholded, thickened by
    about a tenth of the side and hole-filled, so that the object is a region, not a stroke."""
    up = resize_scan(scan, side)
    m = up > threshold
    r = max(1, side // 10)
    m = ndimage.binary_dilation(m, structure=np.ones((2 * r + 1, 2 * r + 1), bool))
    m = ndimage.binary_fill_holes(m)
    if not m.any():
        m[side // 4:side - side // 4, side // 4:side - side // 4] = True
    return m, up


class SceneDataset:
    """The embedded scenes as a dataset of (image, target).

    Args:
        split: ``train`` or ``val``.
        target_format: ``mask`` (a label map) or ``boxes`` (boxes, labels, optionally instance masks).
        transform: a dense transform called as ``transform(image, target)``.
        canvas_size: image side in px.
        num_stuff: stuff classes (the first of :data:`STUFF`), 1 to 8.
        max_stuff_per_image: most stuff classes in one image (at least 1 each image, 2 when there are 2).
        min_objects: fewest things per image.
        max_objects: most things per image.
        min_object_size: smallest side of a thing's square in px.
        max_object_size: largest side in px (0: a third of the canvas); at most ``canvas_size``.
        small_fraction: probability of a COCO-small thing (area below 32^2 at 512 px, scaled).
        medium_fraction: probability of a medium thing; large gets the rest.
        renders_per_epoch: scenes per scan per epoch (train).
        val_renders: scenes per scan in validation.
        val_fraction: fraction of the scans held out for validation.
        seed: the split and the scenes' seed.
        masks: detection targets carry instance masks too.
    """

    def __init__(self, split: str = "train", target_format: str = "mask", transform=None, canvas_size: int = 256,
                 num_stuff: int = 5, max_stuff_per_image: int = 4, min_objects: int = 0, max_objects: int = 8,
                 min_object_size: int = 6, max_object_size: int = 0, small_fraction: float = 0.41,
                 medium_fraction: float = 0.34, renders_per_epoch: int = 1, val_renders: int = 1,
                 val_fraction: float = 0.2, seed: int = 0, masks: bool = False):
        name = f"scenes-{'seg' if target_format == 'mask' else 'det'}"
        if split not in _SPLIT_CODE:
            raise LeanvitError(f"{name} has the splits train and val, not '{split}'")
        if target_format not in ("mask", "boxes"):
            raise LeanvitError(f"target_format must be mask or boxes, got {target_format!r}")
        if not 1 <= num_stuff <= len(STUFF):
            raise LeanvitError(f"scenes.num_stuff must be 1..{len(STUFF)} (stuff classes), got {num_stuff}")
        if max_stuff_per_image < 1:
            raise LeanvitError(f"scenes.max_stuff_per_image must be >= 1, got {max_stuff_per_image}")
        if canvas_size < 16:
            raise LeanvitError(f"scenes.canvas_size must be >= 16, got {canvas_size}")
        max_side = int(max_object_size) or canvas_size // 3
        if max_side > canvas_size:
            raise LeanvitError(f"scenes.max_object_size {max_object_size} is larger than the image "
                               f"(canvas_size {canvas_size})")
        if not 4 <= min_object_size <= max_side:
            raise LeanvitError(f"scenes.min_object_size {min_object_size} must be 4..max_object_size ({max_side})")
        if not min_objects <= max_objects:
            raise LeanvitError(f"scenes.min_objects {min_objects} is above max_objects {max_objects}")
        if small_fraction + medium_fraction > 1.0 + 1e-9:
            raise LeanvitError(f"scenes: impossible size mix, small_fraction {small_fraction} + medium_fraction "
                               f"{medium_fraction} > 1")
        self.area_range = self._area_ranges(canvas_size, min_object_size, max_side)
        probs = (small_fraction, medium_fraction, max(0.0, 1.0 - small_fraction - medium_fraction))
        for g, p, (lo, hi) in zip(("small", "medium", "large"), probs, self.area_range):
            if p > 0 and lo >= hi:
                raise LeanvitError(f"scenes: impossible size mix, {g} things (fraction {p:g}) cannot be drawn with "
                                   f"object sizes {min_object_size}..{max_side} px on a {canvas_size} px canvas")
        scans, labels, idx, renders = split_scans(split, renders_per_epoch, val_renders, val_fraction, seed)
        self.split, self.target_format, self.transform, self.name = split, target_format, transform, name
        self.scans, self.labels, self.source_indices = scans, labels, idx
        self.renders, self.seed, self.epoch = renders, int(seed), 0
        self.canvas_size, self.num_stuff = int(canvas_size), int(num_stuff)
        self.max_stuff = int(max_stuff_per_image)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.size_probs = np.asarray(probs, dtype=np.float64) / sum(probs)
        self.classes = scenes_classes(num_stuff, target_format)
        self.miou_classes = None  # every class counts: stuff and things
        self.with_masks = bool(masks)
        self.num_skipped = 0

    @staticmethod
    def _area_ranges(canvas_size: int, lo_side: int, hi_side: int) -> List[Tuple[float, float]]:
        """The (low, high) mask area each size group is drawn from, clipped to what the sides allow."""
        small, medium = size_thresholds(canvas_size)
        lo, hi = _FILL * lo_side ** 2, _FILL * hi_side ** 2
        return [(max(lo, a), min(hi, b)) for a, b in ((0.0, small), (small, medium), (medium, float("inf")))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.scans) * self.renders

    def scene(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[int]]:
        """(image H x W x 3 uint8, semantic label map, thing owner map (-1 stuff, else the thing's index),
        digit of each thing) of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        n, s = len(self.scans), self.canvas_size
        epoch = self.epoch if self.split == "train" else 0
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], epoch, index])
        k_stuff = int(rng.integers(min(2, self.num_stuff), min(self.max_stuff, self.num_stuff) + 1))
        stuff = sorted(int(c) for c in rng.choice(self.num_stuff, size=k_stuff, replace=False))
        canvas, sem = render_stuff(rng, s, stuff, list(STUFF))
        k = int(rng.integers(self.min_objects, self.max_objects + 1))
        picks = [index % n] + [int(j) for j in rng.integers(0, n, size=max(0, k - 1))] if k else []
        picks = [picks[j] for j in rng.permutation(len(picks))]
        owner = np.full((s, s), -1, dtype=np.int64)
        digits = []
        for t, j in enumerate(picks):
            g = int(rng.choice(3, p=self.size_probs))
            lo, hi = self.area_range[g]
            area = float(np.exp(rng.uniform(np.log(max(lo, 1.0)), np.log(hi))))
            side = int(np.clip(round(np.sqrt(area / _FILL)), 4, s))
            mask, ink = thing_mask(self.scans[j], side)
            y, x = (int(v) for v in rng.integers(0, s - side + 1, size=2))
            colour = random_color(rng, 0.2) * rng.uniform(0.55, 1.0)
            shade = colour * (1.0 - 0.5 * ink[..., None]) + rng.normal(0.0, 0.03, size=(side, side, 1))
            region = canvas[y:y + side, x:x + side]
            region[mask] = shade[mask]
            owner[y:y + side, x:x + side][mask] = t  # drawn last wins: occlusion
            digits.append(int(self.labels[j]))
        for t, d in enumerate(digits):
            sem[owner == t] = self.num_stuff + d
        canvas += rng.normal(0.0, 0.02, size=(s, s, 1)).astype(np.float32)
        img = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return img, sem, owner, digits

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.scene(index)[0], mode="RGB")

    def panoptic(self, index: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
        """Item ``index``'s panoptic segments as COCO panoptic gives them: (segment id map H x W, one entry
        per segment: ``id`` (1, 2, ...), ``category_id`` (its label in the ``scenes-seg`` label map),
        ``isthing``, ``area``, ``bbox`` (x, y, w, h)). One segment per stuff class present, one per visible
        thing."""
        _, sem, owner, digits = self.scene(index)
        ids = np.zeros(sem.shape, dtype=np.int64)
        parts = [(int(c), False, (owner < 0) & (sem == c)) for c in range(self.num_stuff)]
        parts += [(self.num_stuff + d, True, owner == t) for t, d in enumerate(digits)]
        segments = []
        for cat, isthing, m in parts:
            ys, xs = np.nonzero(m)
            if len(ys) == 0:
                continue
            sid = len(segments) + 1
            ids[m] = sid
            segments.append({"id": sid, "category_id": cat, "isthing": isthing, "area": int(len(ys)),
                             "bbox": [int(xs.min()), int(ys.min()), int(xs.max() + 1 - xs.min()),
                                      int(ys.max() + 1 - ys.min())]})
        return ids, segments

    def target(self, index: int, sem: np.ndarray, owner: np.ndarray, digits: List[int]) -> Dict[str, Any]:
        s = sem.shape
        if self.target_format == "mask":
            m = torch.from_numpy(sem)
            return {"mask": tv_tensors.Mask(m), "gt_mask": m.clone(), "image_id": index, "orig_size": s}
        boxes, labels, masks, areas = [], [], [], []
        for t, d in enumerate(digits):
            mine = owner == t
            ys, xs = np.nonzero(mine)
            if len(ys) == 0:  # hidden entirely by later things: not an object any more
                continue
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(d)
            areas.append(float(mine.sum()))
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
        img, sem, owner, digits = self.scene(index)
        target = self.target(index, sem, owner, digits)
        image = tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous())
        if self.transform is not None:
            return self.transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"SceneDataset({self.name}, split={self.split!r}, scans={len(self.scans)}, renders={self.renders}, "
                f"canvas_size={self.canvas_size}, num_stuff={self.num_stuff}, objects={self.min_objects}.."
                f"{self.max_objects}, seed={self.seed})")


class _ScenesKind(GeneratedKind):
    options_key = "scenes"
    dataset_class = SceneDataset

    def classes(self, data, split="val", options=None):
        return scenes_classes(int((options or {}).get("num_stuff", 5)), self.target_format)


class ScenesSegKind(_ScenesKind):
    """``--data scenes-seg``: stuff-and-things scenes with a per-pixel label map (recipe ``scenes:``)."""

    name = "scenes-seg"
    task = "segmentation"
    target_format = "mask"


class ScenesDetKind(_ScenesKind):
    """``--data scenes-det``: the scenes' things as boxes, labels and instance masks (recipe ``scenes:``)."""

    name = "scenes-det"
    task = "detection"
    target_format = "boxes"


register_dataset(ScenesSegKind())
register_dataset(ScenesDetKind())
