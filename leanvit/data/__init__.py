"""Datasets for training and evaluation: the embedded ``digits`` or an ImageFolder tree.

``data`` is either the string ``"digits"`` (:mod:`leanvit.data.digits`, needs nothing on disk) or a
folder holding ``train/<class>/*`` and ``val/<class>/*`` (a folder with only ``<class>/*`` is taken as
a validation set).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from leanvit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform
from leanvit.errors import LeanvitError

__all__ = ["DIGITS", "is_digits", "dataset_classes", "build_train_dataset", "build_eval_dataset",
           "normalization", "build_train_transform", "build_eval_transform"]

DIGITS = "digits"


def is_digits(data) -> bool:
    return str(data) == DIGITS


def normalization(model=None) -> Tuple[Sequence[float], Sequence[float]]:
    """(mean, std) from the model's pretrained config when it has one, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def dataset_classes(data, split: str = "val") -> Sequence[str]:
    if is_digits(data):
        from leanvit.data.digits import CLASSES

        return list(CLASSES)
    from leanvit.data.folder import ImageFolderDataset, find_split

    return ImageFolderDataset(find_split(data, split)).classes


def build_eval_dataset(data, img_size, model=None, split: str = "val", crop_ratio: float = 1.0,
                       digits: Optional[dict] = None, classes: Optional[Sequence[str]] = None):
    """The evaluation split at ``img_size`` (resize + centre crop, normalized for ``model``)."""
    mean, std = normalization(model)
    tf = build_eval_transform(img_size, crop_ratio=crop_ratio, mean=mean, std=std)
    if is_digits(data):
        from leanvit.data.digits import DigitsDataset

        if split not in ("val", "train"):
            raise LeanvitError(f"digits has the splits train and val, not '{split}'")
        return DigitsDataset(split=split, transform=tf, **(digits or {}))
    from leanvit.data.folder import ImageFolderDataset, find_split

    return ImageFolderDataset(find_split(data, split), transform=tf, classes=classes)


def build_train_dataset(data, img_size, model=None, transform: Optional[dict] = None,
                        digits: Optional[dict] = None, skip_corrupt: bool = False):
    """The training split with the training transform (``transform``: kwargs of
    :func:`build_train_transform`, e.g. ``crop``, ``three_augment``, ``color_jitter``)."""
    mean, std = normalization(model)
    tf = build_train_transform(img_size, mean=mean, std=std, **(transform or {}))
    if is_digits(data):
        from leanvit.data.digits import DigitsDataset

        return DigitsDataset(split="train", transform=tf, **(digits or {}))
    from leanvit.data.folder import ImageFolderDataset, find_split

    return ImageFolderDataset(find_split(data, "train"), transform=tf, skip_corrupt=skip_corrupt)
