"""The embedded scenes (:mod:`leanvit.data.scenes`) measured and written to disk.

* :func:`scene_statistics`: class pixel frequencies, the things' size histogram (COCO's small / medium /
  large, scaled to the canvas) and the perfect-logit bound: the mIoU of the best logits a head can give at
  an output stride (each stride x stride cell predicts its own label frequencies, bilinearly upsampled and
  argmaxed, as leanvit's segmenters upsample their logits).
* :func:`write_ade20k`: the scenes as an ADE20K folder (Zhou et al., CVPR 2017: ``images/{training,
  validation}/*.jpg`` and ``annotations/{training,validation}/*.png``, label 0 = "other", class c stored as
  c + 1, with an ``objectInfo150.csv`` naming the classes), read back by leanvit's ADE20K loader
  (:mod:`leanvit.data.segmentation`) as the same label maps.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from leanvit.data.scenes import SceneDataset, size_group
from leanvit.errors import LeanvitError

__all__ = ["scene_statistics", "perfect_logit_miou", "write_ade20k"]

_ADE_CLASSES = 150
_MARK = ".leanvit-scenes"  # written into every folder write_ade20k fills


def perfect_logit_miou(label_maps: Sequence[np.ndarray], num_classes: int, stride: int) -> float:
    """mIoU (over the classes present) of perfect logits at output ``stride`` against ``label_maps``."""
    if int(stride) < 1:
        raise LeanvitError(f"stride must be a positive integer, got {stride!r}")
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for lab in label_maps:
        t = torch.from_numpy(np.asarray(lab, dtype=np.int64))
        onehot = F.one_hot(t, num_classes).permute(2, 0, 1).float().unsqueeze(0)
        freq = F.avg_pool2d(onehot, int(stride), ceil_mode=True)
        up = F.interpolate(freq, size=t.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        cm += torch.bincount((t * num_classes + up).flatten(), minlength=num_classes * num_classes)
    cm = cm.reshape(num_classes, num_classes).double()
    inter, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    present = gt > 0
    return float((inter[present] / (gt + pred - inter)[present]).mean())


def scene_statistics(split: str = "val", num_images: Optional[int] = None, strides: Sequence[int] = (4, 8, 16, 32),
                     **options: Any) -> Dict[str, Any]:
    """The statistics of the scenes ``split`` (the first ``num_images``, default all).

    Args:
        split: ``train`` or ``val``.
        num_images: how many scenes to measure (default: the whole split).
        strides: the output strides of the perfect-logit bound.
        options: :class:`leanvit.data.scenes.SceneDataset` options (``canvas_size``, ``num_stuff``, ...).

    Returns:
        ``images``; ``class_frequency`` (class name -> fraction of the pixels); ``stuff_fraction`` (of the
        pixels); ``things`` (visible instances); ``sizes`` (``small`` / ``medium`` / ``large`` -> fraction
        of the instances, by visible mask area as COCO's); ``objects_per_image``; ``perfect_logit_miou``
        (stride -> mIoU of perfect logits at that stride).
    """
    ds = SceneDataset(split=split, target_format="mask", **options)
    n = len(ds) if num_images is None else min(int(num_images), len(ds))
    k = len(ds.classes)
    counts = np.zeros(k, dtype=np.int64)
    sizes = {"small": 0, "medium": 0, "large": 0}
    maps = []
    for i in range(n):
        _, sem, owner, digits = ds.scene(i)
        counts += np.bincount(sem.ravel(), minlength=k)
        for t in range(len(digits)):
            area = int((owner == t).sum())
            if area:
                sizes[size_group(area, ds.canvas_size)] += 1
        maps.append(sem)
    things = sum(sizes.values())
    total = max(1, int(counts.sum()))
    return {
        "images": n,
        "class_frequency": {c: float(counts[j] / total) for j, c in enumerate(ds.classes)},
        "stuff_fraction": float(counts[:ds.num_stuff].sum() / total),
        "things": things,
        "sizes": {g: (v / things if things else 0.0) for g, v in sizes.items()},
        "objects_per_image": things / max(1, n),
        "perfect_logit_miou": {int(s): perfect_logit_miou(maps, k, int(s)) for s in strides},
    }


def _check_target(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise LeanvitError(f"{root} exists and is not a folder; the scenes are written into a new or empty folder")
    if root.is_dir() and any(root.iterdir()) and not (root / _MARK).is_file():
        raise LeanvitError(f"{root} is not empty and holds no scenes written by leanvit; refusing to overwrite it")


def write_ade20k(root, num_train: int = 64, num_val: int = 32, **options: Any) -> Path:
    """Write scenes as an ADE20K folder that ``--data ROOT`` (the ADE20K loader) reads back.

    Args:
        root: the folder: new, empty, or one this function wrote before (its files are replaced).
        num_train: training scenes (the first of the train split).
        num_val: validation scenes.
        options: :class:`leanvit.data.scenes.SceneDataset` options.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    _check_target(root)
    for split, folder, n in (("train", "training", num_train), ("val", "validation", num_val)):
        ds = SceneDataset(split=split, target_format="mask", **options)
        if not 1 <= int(n) <= len(ds):
            raise LeanvitError(f"the {split} split has {len(ds)} scenes; cannot write {n}")
        im_dir, an_dir = root / "images" / folder, root / "annotations" / folder
        for d, ext in ((im_dir, ".jpg"), (an_dir, ".png")):
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob(f"scenes_{split}_*{ext}"):  # an earlier write's scenes: replaced, not mixed in
                old.unlink()
        for i in range(int(n)):
            img, sem, _, _ = ds.scene(i)
            stem = f"scenes_{split}_{i:06d}"
            Image.fromarray(img, mode="RGB").save(im_dir / f"{stem}.jpg", quality=95)
            Image.fromarray((sem + 1).astype(np.uint8), mode="L").save(an_dir / f"{stem}.png")
    names = ds.classes + [f"unused_{j}" for j in range(len(ds.classes) + 1, _ADE_CLASSES + 1)]
    with (root / "objectInfo150.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Idx", "Ratio", "Train", "Val", "Name"])
        for j, name in enumerate(names, start=1):
            w.writerow([j, 0, 0, 0, name])
    (root / _MARK).write_text(f"{ds.name} {ds.classes}\n", encoding="utf-8")
    return root
