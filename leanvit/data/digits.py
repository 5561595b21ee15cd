"""The embedded default dataset: real handwritten digit scans on cluttered, larger canvases.

No dataset can be downloaded where leanvit's demo runs, so it builds one from scikit-learn's bundled
handwritten digits (1,797 real 8x8 scans, 10 classes, ``sklearn.datasets.load_digits``): each scan is
upscaled and placed on a larger canvas among distractors, so that most patches are background, which
is the situation token reorganization (EViT) is made for.

How an image is made (:func:`render`)
    * canvas ``canvas_size`` px (default 32), dark background of random level plus pixel noise;
    * ``num_fragments`` distractors: dim fragments (a random quarter) of *other* scans of the same split,
      anywhere on the canvas;
    * the digit: the scan upscaled to ``digit_size`` px (default 16, bicubic) with a random contrast,
      its centre at a random offset of at most ``max_offset`` px (default 6) from the canvas centre,
      drawn over the distractors; ink and distractors get a random colour each.

Sizes
    ViTs learn translation slowly from 1,500 scans: a tiny ViT trained on digits placed *anywhere* on a
    48-64 px canvas stays at chance for hundreds of steps, while digits that fill the canvas train at once.
    The demo recipes (``leanvit/train/recipes/*_demo.yaml``, which set these options through their
    ``digits:`` mapping) use a 48 px canvas, 22 px digits at most 3 px off-centre and 8 px patches: a 6x6
    grid of 36 tokens of which the digit covers 9-16, so at least 55 % of the patches are background for
    token reduction to remove. Training draws a fresh placement and fresh clutter every epoch and every
    render (``renders_per_epoch`` renders of each scan per epoch), so the model sees each scan at many
    positions instead of memorizing one. The class defaults (32 px canvas, 16 px digits, offset 6) are a
    smaller variant for quick experiments and tests.

Determinism and split
    The split is by *source scan* (stratified per class, ``val_fraction`` of each class to val), from
    ``seed``: no scan is in both splits. An image depends only on (seed, split, epoch, index), never on
    global random state: validation images are fixed (epoch 0, ``renders_per_epoch`` = ``val_renders``);
    training images change with :meth:`DigitsDataset.set_epoch`, and the same epoch gives the same images
    on every run, process or data-loader worker.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image

from leanvit.data.registry import DatasetKind, check_keyword_options, register_dataset
from leanvit.errors import LeanvitError

__all__ = ["DigitsDataset", "DigitsKind", "load_scans", "split_indices", "render", "CLASSES"]

CLASSES = tuple(str(i) for i in range(10))
_SPLIT_CODE = {"train": 1, "val": 2}

_SCANS: Optional[Tuple[np.ndarray, np.ndarray]] = None


def load_scans() -> Tuple[np.ndarray, np.ndarray]:
    """The 1,797 scans as float32 (N, 8, 8) in [0, 1] and their int64 labels (cached)."""
    global _SCANS
    if _SCANS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _SCANS = (d.images.astype(np.float32) / 16.0, d.target.astype(np.int64))
    return _SCANS


def split_indices(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified split of scan indices into (train, val), deterministic from ``seed``."""
    if not 0.0 < val_fraction < 1.0:
        raise LeanvitError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng([seed, 7919])
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def split_scans(split: str, renders_per_epoch: int, val_renders: int, val_fraction: float, seed: int):
    """The scans and labels of ``split`` (train or val), their indices among all scans, and how many times
    each is rendered per epoch (a clear error below 1)."""
    renders = int(renders_per_epoch if split == "train" else val_renders)
    if renders < 1:
        raise LeanvitError(f"renders per epoch must be >= 1, got {renders}")
    scans, labels = load_scans()
    train_idx, val_idx = split_indices(labels, val_fraction, seed)
    idx = train_idx if split == "train" else val_idx
    return scans[idx], labels[idx], idx, renders


def resize_scan(a: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 scan (values in [0, 1]) resized bicubically to ``size`` x ``size``."""
    img = Image.fromarray(a.astype(np.float32), mode="F")
    return np.clip(np.asarray(img.resize((size, size), Image.BICUBIC)), 0.0, 1.0)


def random_color(rng: np.random.Generator, lo: float) -> np.ndarray:
    """A random RGB colour whose brightest channel is 1 and the others in [lo, 1]."""
    c = rng.uniform(lo, 1.0, size=3)
    c[rng.integers(3)] = 1.0
    return c.astype(np.float32)


def render(scan: np.ndarray, rng: np.random.Generator, others: np.ndarray, canvas_size: int = 32,
           digit_size: int = 16, max_offset: int = 6, num_fragments: int = 3, noise: float = 0.06
           ) -> np.ndarray:
    """One (canvas, canvas, 3) uint8 image of ``scan`` (8x8 in [0, 1]) with distractors cut from ``others``.

    All randomness comes from ``rng``."""
    s = canvas_size
    # background: a dark level and pixel noise, slightly coloured
    bg = rng.uniform(0.0, 0.15) * random_color(rng, 0.6)
    canvas = np.broadcast_to(bg, (s, s, 3)).copy()
    canvas += rng.normal(0.0, noise, size=(s, s, 1)).astype(np.float32)
    # distractors: a quarter-scan fragment of another digit, dim, anywhere
    frag_size = max(2, digit_size // 2)
    for _ in range(num_fragments):
        other = others[rng.integers(len(others))]
        r0, c0 = rng.integers(0, 5, size=2)
        piece = resize_scan(other[r0:r0 + 4, c0:c0 + 4], frag_size) * rng.uniform(0.25, 0.5)
        y, x = rng.integers(0, s - frag_size + 1, size=2)
        region = canvas[y:y + frag_size, x:x + frag_size]
        np.maximum(region, piece[..., None] * random_color(rng, 0.3), out=region)
    # the digit, over everything
    ink = resize_scan(scan, digit_size) * rng.uniform(0.75, 1.0)
    centre = (s - digit_size) / 2.0
    lo = int(np.floor(max(0.0, centre - max_offset)))
    hi = int(np.ceil(min(s - digit_size, centre + max_offset)))
    y, x = rng.integers(lo, hi + 1, size=2)
    region = canvas[y:y + digit_size, x:x + digit_size]
    np.maximum(region, ink[..., None] * random_color(rng, 0.4), out=region)
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class DigitsDataset:
    """The embedded digits as a map-style dataset of (PIL RGB image, label).

    Args:
        split: ``"train"`` or ``"val"``.
        transform: applied to the PIL image (e.g. from :mod:`leanvit.data.transforms`).
        renders_per_epoch: renders of each scan per epoch (train; the dataset length is scans x renders).
        val_renders: renders of each val scan (fixed images).
        canvas_size: see :func:`render`, as for ``digit_size``, ``max_offset``, ``num_fragments`` and ``noise``.
        val_fraction: the share of each class's source scans held out for validation.
        seed: the split and every render derive from it.
    """

    classes = list(CLASSES)

    def __init__(self, split: str = "train", transform: Optional[Callable] = None, canvas_size: int = 32,
                 digit_size: int = 16, max_offset: int = 6, num_fragments: int = 3, noise: float = 0.06,
                 renders_per_epoch: int = 1, val_renders: int = 2, val_fraction: float = 0.2, seed: int = 0):
        if split not in _SPLIT_CODE:
            raise LeanvitError(f"digits split must be 'train' or 'val', got '{split}'")
        if not 8 <= digit_size <= canvas_size:
            raise LeanvitError(f"digit_size must be in [8, canvas_size={canvas_size}], got {digit_size}")
        if max_offset < 0:
            raise LeanvitError(f"max_offset must be >= 0, got {max_offset}")
        scans, labels, idx, renders = split_scans(split, renders_per_epoch, val_renders, val_fraction, seed)
        self.split = split
        self.transform = transform
        self.scans = scans
        self.labels = labels
        self.source_indices = idx
        self.renders = renders
        self.seed = int(seed)
        self.epoch = 0
        self.render_kwargs = dict(canvas_size=int(canvas_size), digit_size=int(digit_size),
                                  max_offset=int(max_offset), num_fragments=int(num_fragments), noise=float(noise))
        self.targets = np.tile(self.labels, renders).tolist()

    def set_epoch(self, epoch: int) -> None:
        """Training images are redrawn per epoch (validation images never change)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.scans) * self.renders

    def image(self, index: int) -> Image.Image:
        n = len(self.scans)
        if not 0 <= index < len(self):
            raise IndexError(index)
        epoch = self.epoch if self.split == "train" else 0
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], epoch, index])
        arr = render(self.scans[index % n], rng, self.scans, **self.render_kwargs)
        return Image.fromarray(arr, mode="RGB")

    def __getitem__(self, index: int):
        img = self.image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index % len(self.scans)])

    def __repr__(self) -> str:
        return (f"DigitsDataset(split={self.split!r}, scans={len(self.scans)}, renders={self.renders}, "
                f"{', '.join(f'{k}={v}' for k, v in self.render_kwargs.items())}, seed={self.seed})")


class DigitsKind(DatasetKind):
    """``--data digits``: the embedded data; its options are the recipe's ``digits:`` mapping."""

    name = "digits"
    embedded = True
    options_key = "digits"

    def matches(self, data: str) -> bool:
        return data == self.name

    def create(self, data, split, transform=None, options=None, classes=None, skip_corrupt=False):
        if split not in _SPLIT_CODE:
            raise LeanvitError(f"digits has the splits train and val, not '{split}'")
        ds = DigitsDataset(split=split, transform=transform, **(options or {}))
        if classes is not None and list(classes) != list(CLASSES):
            raise LeanvitError(f"the digits classes {list(CLASSES)} differ from the expected {list(classes)}")
        return ds

    def classes(self, data, split="val", options=None):
        return list(CLASSES)

    def check_options(self, options):
        check_keyword_options("digits", options, DigitsDataset.__init__)


register_dataset(DigitsKind())
