"""ImageFolder-style datasets (``root/<class>/<image>``) that fail early and clearly.

torchvision's ``ImageFolder`` finds the files; this module adds what a long training run needs before
it starts: an empty class folder, a split without images or a validation split whose classes differ
from training are errors naming the folder, and an unreadable image is either an error naming the
file (default) or, with ``skip_corrupt=True``, replaced by another image and counted, with a warning.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from leanvit.data.registry import DatasetKind, register_dataset
from leanvit.errors import LeanvitError

__all__ = ["ImageFolderDataset", "SkippingImageDataset", "find_split", "check_same_classes", "IMG_EXTENSIONS",
           "ImageFolderKind", "load_image"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def find_split(root, split: str) -> Path:
    """``root/split`` if it exists; ``root`` itself for the val split of a tree without splits."""
    root = Path(root)
    if not root.is_dir():
        raise LeanvitError(f"data folder not found: {root}")
    if (root / split).is_dir():
        return root / split
    if split in ("val", "test") and not (root / "train").is_dir():
        return root
    raise LeanvitError(f"{root} has no '{split}' folder (expected {root}/{split}/<class>/<images>)")


def _to_rgb8(img: "Image.Image") -> "Image.Image":
    """RGB with 8 bits per channel. PIL's ``convert("RGB")`` clips 16-bit and 32-bit grey images to 255
    (almost all white) instead of scaling them: scale their full range (16-bit: /257) first."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            top = 1.0 if a.size and a.max() <= 1.0 else 255.0
        elif mode.startswith("I;16") or img.format in ("PNG", "TIFF") or (a.size and a.max() > 255):
            top = 65535.0 if not a.size or a.max() <= 65535 else float(a.max())
        else:
            top = 255.0
        a = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    return img.convert("RGB")


to_rgb8 = _to_rgb8  # public: tar shards and Hugging Face datasets convert their images the same way


def no_buffer_repr(e: BaseException) -> str:
    """PIL's message for image bytes read from memory, without the buffer's repr (``cannot identify image
    file <_io.BytesIO object at 0x...>`` -> ``cannot identify image file``): the caller names the image."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


def load_image(path) -> "Image.Image":
    """An RGB PIL image from any file PIL reads; a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise LeanvitError(f"image not found: {path}")
    if path.is_dir():
        raise LeanvitError(f"not an image file but a folder: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb8(img)
    except UnidentifiedImageError:
        raise LeanvitError(f"cannot read image {path}: not an image format PIL recognizes") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data, unreadable file
        raise LeanvitError(f"cannot read image {path}: {e}") from None


class SharedSkips:
    """The indices of the samples skipped so far, shared by the DataLoader worker processes (a byte per
    sample in shared memory): the count at the end of a run includes what every worker skipped. Behaves as
    the set it replaces (``i in s``, ``s.add(i)``, ``len(s)``)."""

    def __init__(self, n: int):
        self.mask = torch.zeros(max(int(n), 1), dtype=torch.uint8).share_memory_()

    def __contains__(self, i) -> bool:
        return bool(self.mask[int(i)])

    def add(self, i) -> None:
        self.mask[int(i)] = 1

    def __len__(self) -> int:
        return int(self.mask.sum())


class SkippingImageDataset:
    """What the image datasets (ImageFolder trees, tar shards, Hugging Face tables) share: ``__getitem__``
    returns ``(transform(load(i)), int(targets[i]))``; with ``skip_corrupt`` an unreadable image is skipped
    (the next readable one is returned instead), warned about once and counted in :attr:`num_skipped`.
    Subclasses set ``targets``, ``transform``, ``skip_corrupt``, ``skipped = SharedSkips(len(targets))``
    (counted across loader workers) and give ``load(i)``
    (raising :class:`LeanvitError` for an unreadable image) and ``source`` (named when nothing is readable)."""

    source = "the dataset"

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        n = len(self.targets)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                img = self.load(i)
            except LeanvitError as e:
                if not self.skip_corrupt:
                    raise
                if i not in self.skipped:
                    self.skipped.add(i)
                    warnings.warn(f"skipping unreadable image ({len(self.skipped)} so far): {e}", stacklevel=2)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, int(self.targets[i])
        raise LeanvitError(f"no readable image in {self.source}")


class ImageFolderDataset(SkippingImageDataset):
    """Images under ``root/<class>/`` as (transformed image, class index).

    Args:
        root: the split folder (e.g. ``data/train``).
        transform: applied to the RGB PIL image.
        classes: expected class names (e.g. those of the train split); a mismatch is an error.
        skip_corrupt: replace unreadable images by the next readable one (counted in
            ``num_skipped``, warned once per file) instead of raising.
    """

    def __init__(self, root, transform: Optional[Callable] = None, classes: Optional[Sequence[str]] = None,
                 skip_corrupt: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LeanvitError(f"data folder not found: {self.root}")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise LeanvitError(f"{self.root} has no class folders (expected {self.root}/<class>/<images>)")
        if classes is not None and list(classes) != found:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise LeanvitError(f"the classes of {self.root} differ from training's: missing {missing or 'none'}, "
                               f"unexpected {extra or 'none'}")
        self.classes: List[str] = found
        self.class_to_idx = {c: i for i, c in enumerate(found)}
        self.samples = []
        for c in found:
            files = sorted(p for p in (self.root / c).rglob("*")
                           if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                raise LeanvitError(f"class folder {self.root / c} holds no images "
                                   f"({', '.join(IMG_EXTENSIONS)})")
            self.samples += [(str(p), self.class_to_idx[c]) for p in files]
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped = SharedSkips(len(self.targets))

    @property
    def source(self) -> str:
        return str(self.root)

    def load(self, index: int):
        """The untransformed RGB image ``index`` (a clear error for an unreadable file)."""
        return load_image(self.samples[index][0])

    image = load


    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, classes={len(self.classes)}, images={len(self)})"


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str], where: str = "") -> None:
    if list(train_classes) != list(val_classes):
        raise LeanvitError(f"validation classes differ from training classes{where}: "
                           f"train has {len(train_classes)}, val has {len(val_classes)}")


class ImageFolderKind(DatasetKind):
    """``--data DIR``: an ImageFolder tree (``DIR/train/<class>/*``, ``DIR/val/<class>/*``, or only
    ``DIR/<class>/*`` as a validation set)."""

    name = "imagefolder"

    def matches(self, data: str) -> bool:
        return Path(data).is_dir()

    def create(self, data, split, transform=None, options=None, classes=None, skip_corrupt=False):
        return ImageFolderDataset(find_split(data, split), transform=transform, classes=classes,
                                  skip_corrupt=skip_corrupt)

    def classes(self, data, split="val", options=None):
        root = find_split(data, split)
        return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


register_dataset(ImageFolderKind())
