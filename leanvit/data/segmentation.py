"""Semantic segmentation data on disk: the ADE20K layout and a generic images/ + masks/ layout.

ADE20K (``--data DIR`` with ``DIR/images/{training,validation}/*.jpg`` and
``DIR/annotations/{training,validation}/*.png``; ``ADEChallengeData2016`` as released)
    Label maps hold 0 for "other" and 1..150 for the classes; as mmsegmentation's ``reduce_zero_label``,
    0 becomes the ignore label (255) and c becomes c - 1, so the model predicts 150 classes. Class names
    come from ``objectInfo150.csv`` when the folder has it (else ``class_1`` ... ``class_150``).

Generic (``--data DIR`` with ``DIR/images/{train,val}/`` and ``DIR/masks/{train,val}/``)
    A mask is a single-channel PNG named like its image (same stem) holding class indices 0..K-1, 255 =
    ignore. The classes are the lines of ``DIR/classes.txt`` (line i names label i); without that file
    K is the largest label found in the masks + 1 (the masks are scanned once).

Checked before training starts, each a one-line error naming the file: an image without a mask, a
mask whose size differs from its image's, a mask that is not single-channel, a mask PIL cannot read whole
(not an image, truncated: each mask file is verified, ``classes.txt`` or not), an image PIL cannot
identify, a ``classes.txt`` that is not UTF-8, an empty split; when an item is read: an image truncated
after its header, mask values outside the label set. (``check_sizes: false`` skips the per-file checks.)
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from leanvit.data.dense import IGNORE_INDEX
from leanvit.data.folder import IMG_EXTENSIONS, load_image
from leanvit.data.registry import DatasetKind, register_dataset
from leanvit.errors import LeanvitError

__all__ = ["SegmentationFolder", "ADE20KKind", "MaskFolderKind", "ADE20K_CLASSES"]

log = logging.getLogger(__name__)

ADE20K_CLASSES = 150
_ADE_SPLITS = {"train": "training", "val": "validation"}


def _images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _open(path: Path, what: str) -> Image.Image:
    """``Image.open`` with a one-line error naming the file (not an image PIL knows, unreadable)."""
    try:
        return Image.open(path)
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise LeanvitError(f"cannot read {what} {path}: {e}") from None


def _read_mask(path: Path) -> np.ndarray:
    """A mask's pixels (truncated or corrupt files: a one-line error naming the file)."""
    try:
        with _open(path, "mask") as m:
            return np.array(m)
    except (OSError, ValueError, SyntaxError) as e:
        raise LeanvitError(f"cannot read mask {path}: {e}") from None


def _mask_mode_ok(mode: str) -> bool:
    return mode in ("L", "P", "I", "I;16", "1")


class SegmentationFolder:
    """Pairs of (image, label map) as (image, target) (see :mod:`leanvit.data.dense` for the format).

    Args:
        image_dir: the split's image folder.
        mask_dir: the split's mask folder (masks matched to images by relative path and stem).
        classes: class names (label i = classes[i]).
        reduce_zero_label: ADE20K's convention (0 -> ignore, c -> c - 1).
        transform: a dense transform ``transform(image, target)``.
    """

    def __init__(self, image_dir, mask_dir, classes: List[str], reduce_zero_label: bool = False, transform=None,
                 check_sizes: bool = True):
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        self.classes = list(classes)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.transform = transform
        self.miou_classes = None  # every class counts
        self.num_skipped = 0
        images = _images(self.image_dir)
        if not images:
            raise LeanvitError(f"{self.image_dir} holds no images ({', '.join(IMG_EXTENSIONS)})")
        masks = {}
        for p in _images(self.mask_dir):
            masks.setdefault(str(p.relative_to(self.mask_dir).with_suffix("")), p)
        self.samples: List[Tuple[Path, Path]] = []
        for im in images:
            key = str(im.relative_to(self.image_dir).with_suffix(""))
            if key not in masks:
                raise LeanvitError(f"image {im} has no mask in {self.mask_dir} (expected {key}.png)")
            self.samples.append((im, masks[key]))
        if check_sizes:
            for im, m in self.samples:
                with _open(im, "image") as a, _open(m, "mask") as b:
                    if a.size != b.size:
                        raise LeanvitError(f"mask {m} is {b.size[0]}x{b.size[1]} but its image {im} is "
                                           f"{a.size[0]}x{a.size[1]}")
                    if not _mask_mode_ok(b.mode):
                        raise LeanvitError(f"mask {m} has {b.mode} pixels; a mask is a single-channel image of "
                                           f"class indices")
                    try:  # the whole file, checked without decoding it (PNG: every chunk's CRC): truncated
                        b.verify()  # masks are found now, not at the first validation
                    except (OSError, ValueError, SyntaxError) as e:
                        raise LeanvitError(f"cannot read mask {m}: {e}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        return load_image(self.samples[index][0])

    def label_map(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        try:
            with Image.open(path) as m:
                if not _mask_mode_ok(m.mode):
                    raise LeanvitError(f"mask {path} has {m.mode} pixels; a mask is a single-channel image of "
                                       f"class indices")
                lab = np.array(m, dtype=np.int64)
        except (OSError, ValueError) as e:
            raise LeanvitError(f"cannot read mask {path}: {e}") from None
        if self.reduce_zero_label:
            lab = np.where(lab == 0, IGNORE_INDEX, lab - 1)
        bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= len(self.classes)))
        if bad.any():
            v = int(lab[bad][0]) + (1 if self.reduce_zero_label else 0)
            raise LeanvitError(f"mask {path} holds value {v}, outside the label set (0..{len(self.classes) - 1}"
                               f"{' after reduce_zero_label' if self.reduce_zero_label else ''}, {IGNORE_INDEX} = "
                               f"ignore)")
        return lab

    def __getitem__(self, index: int):
        img = self.image(index)
        lab = self.label_map(index)
        if lab.shape != (img.height, img.width):
            raise LeanvitError(f"mask {self.samples[index][1]} is {lab.shape[1]}x{lab.shape[0]} but its image is "
                               f"{img.width}x{img.height}")
        m = torch.from_numpy(lab)
        image = tv_tensors.Image(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous())
        target = {"mask": tv_tensors.Mask(m), "gt_mask": m.clone(), "image_id": index, "orig_size": tuple(lab.shape)}
        if self.transform is not None:
            return self.transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"SegmentationFolder({str(self.image_dir)!r}, images={len(self)}, classes={len(self.classes)})"


def _ade_classes(root: Path) -> List[str]:
    info = root / "objectInfo150.csv"
    if info.is_file():
        try:
            with info.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            names = [str(r["Name"]).split(";")[0].strip() for r in rows]
            if len(names) == ADE20K_CLASSES:
                return names
            problem = f"{len(names)} rows, not {ADE20K_CLASSES}"
        except (KeyError, AttributeError, csv.Error, UnicodeDecodeError, OSError) as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        log.warning(f"warning: {info}: {problem}; the classes are named class_1 ... class_{ADE20K_CLASSES}")
    return [f"class_{i}" for i in range(1, ADE20K_CLASSES + 1)]


class ADE20KKind(DatasetKind):
    """``--data DIR`` in the ADE20K layout (``images/training``, ``annotations/training``, ...)."""

    name = "ade20k"
    task = "segmentation"

    def matches(self, data: str) -> bool:
        root = Path(data)
        return (root / "images").is_dir() and (root / "annotations").is_dir() and any(
            (root / "images" / s).is_dir() for s in _ADE_SPLITS.values())

    @staticmethod
    def _dirs(data, split):
        root = Path(data)
        name = _ADE_SPLITS.get(split, split)
        im, an = root / "images" / name, root / "annotations" / name
        if not im.is_dir() or not an.is_dir():
            raise LeanvitError(f"{root} has no {name} split (expected {im} and {an})")
        return im, an

    def create(self, data, split, transform=None, options=None, classes=None, skip_corrupt=False):
        im, an = self._dirs(data, split)
        opts = dict(options or {})
        return SegmentationFolder(im, an, self.classes(data, split), reduce_zero_label=True, transform=transform,
                                  check_sizes=bool(opts.get("check_sizes", True)))

    def classes(self, data, split="val", options=None):
        return _ade_classes(Path(data))


def _scan_num_classes(mask_dirs) -> int:
    top = -1
    for d in mask_dirs:
        for p in _images(d):
            vals = np.unique(_read_mask(p))
            vals = vals[vals != IGNORE_INDEX]
            if vals.size:
                top = max(top, int(vals.max()))
    if top < 0:
        raise LeanvitError(f"the masks in {', '.join(map(str, mask_dirs))} hold no labels (only {IGNORE_INDEX})")
    return top + 1


class MaskFolderKind(DatasetKind):
    """``--data DIR`` with ``images/{train,val}/`` and ``masks/{train,val}/`` (classes: ``DIR/classes.txt``)."""

    name = "masks"
    task = "segmentation"
    _cache: Dict[str, List[str]] = {}

    def matches(self, data: str) -> bool:
        root = Path(data)
        return (root / "images").is_dir() and (root / "masks").is_dir()

    @staticmethod
    def _dirs(data, split):
        root = Path(data)
        im, m = root / "images" / split, root / "masks" / split
        if not im.is_dir() or not m.is_dir():
            raise LeanvitError(f"{root} has no {split} split (expected {im} and {m})")
        return im, m

    def create(self, data, split, transform=None, options=None, classes=None, skip_corrupt=False):
        im, m = self._dirs(data, split)
        names = self.classes(data, split)
        if classes is not None and list(classes) != names:
            raise LeanvitError(f"the classes of {data} differ from the expected ({len(names)} vs {len(classes)})")
        return SegmentationFolder(im, m, names, transform=transform)

    def classes(self, data, split="val", options=None):
        root = Path(data)
        listed = root / "classes.txt"
        if listed.is_file():
            try:
                text = listed.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise LeanvitError(f"{listed} is not UTF-8 text (byte {e.start}); write one class name per line "
                                   "in UTF-8") from None
            except OSError as e:
                raise LeanvitError(f"cannot read {listed}: {e.strerror or e}") from None
            names = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if not names:
                raise LeanvitError(f"{listed} names no classes")
            return names
        key = str(root.resolve())
        if key not in self._cache:
            dirs = [d for d in (root / "masks").iterdir() if d.is_dir()]
            self._cache[key] = [str(i) for i in range(_scan_num_classes(dirs))]
        return list(self._cache[key])


register_dataset(ADE20KKind())
register_dataset(MaskFolderKind())
