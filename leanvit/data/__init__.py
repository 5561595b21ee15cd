"""Data: a registry of dataset kinds (``create_dataset``), the embedded ``digits``, ImageFolder trees,
the training transforms and the one evaluation-data builder.

``data`` is a registered name (``digits``: :mod:`leanvit.data.digits`, needs nothing on disk) or a folder
(``train/<class>/*`` and ``val/<class>/*``; a folder with only ``<class>/*`` is taken as a validation set).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import timm.data
import torch.nn as nn

from leanvit.data.registry import (DatasetKind, create_dataset, dataset_classes, dataset_options,
                                   list_dataset_kinds, register_dataset, resolve_dataset_kind, with_data_overrides)
from leanvit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform
from leanvit.data import digits as _digits  # noqa: F401,E402  (registers "digits")
from leanvit.data import folder as _folder  # noqa: F401,E402  (registers ImageFolder trees)
# dense data: embedded digits-det / digits-seg, COCO and segmentation-mask layouts
from leanvit.data import digits_dense as _digits_dense  # noqa: F401,E402
from leanvit.data import scenes as _scenes  # noqa: F401,E402  (scenes-seg / scenes-det)
from leanvit.data import segmentation as _segmentation  # noqa: F401,E402
from leanvit.data import coco as _coco  # noqa: F401,E402
# sharded and hub data: WebDataset tar shards, Hugging Face datasets
from leanvit.data import shards as _shards  # noqa: F401,E402
from leanvit.data import hf as _hf  # noqa: F401,E402
from leanvit.utils import model_input_size, to_2tuple

__all__ = ["create_dataset", "dataset_classes", "dataset_options", "register_dataset", "DatasetKind",
           "resolve_dataset_kind", "list_dataset_kinds", "normalization", "build_train_dataset",
           "eval_data_config", "build_eval_dataset", "build_train_transform", "build_eval_transform",
           "with_data_overrides"]


def normalization(model: Optional[nn.Module] = None) -> Tuple[Sequence[float], Sequence[float]]:
    """(mean, std) from the model's pretrained config when it has one, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def eval_data_config(model: Optional[nn.Module], img_size, config: Optional[Dict[str, Any]] = None,
                     crop_pct: Optional[float] = None, interpolation: Optional[str] = None) -> Dict[str, Any]:
    """How evaluation images are prepared: ``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``.

    For a leanvit run (``config``: the training settings its checkpoint records) the settings its
    validation used (``eval_crop_ratio``, bicubic); for any other model timm's own data config
    (``timm.data.resolve_model_data_config``: the model's ``pretrained_cfg`` crop_pct, interpolation,
    mean/std), as timm's ``validate.py`` does. ``crop_pct`` / ``interpolation`` override either."""
    h, w = to_2tuple(img_size)
    if isinstance(config, dict) and "eval_crop_ratio" in config:
        mean, std = normalization(model)
        cfg = dict(crop_pct=float(config["eval_crop_ratio"]), interpolation="bicubic", mean=mean, std=std)
    else:
        cfg = dict(timm.data.resolve_model_data_config(model)) if model is not None else dict(
            crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        cfg = {k: cfg[k] for k in ("crop_pct", "interpolation", "mean", "std") if k in cfg}
    if crop_pct is not None:
        cfg["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        cfg["interpolation"] = interpolation
    cfg["input_size"] = (3, h, w)
    return cfg


def build_eval_dataset(data, model: Optional[nn.Module] = None, img_size=None, config: Optional[Dict] = None,
                       split: str = "val", crop_pct: Optional[float] = None, interpolation: Optional[str] = None,
                       classes: Optional[Sequence[str]] = None, options: Optional[Dict] = None):
    """The evaluation split of ``data``, prepared as :func:`eval_data_config` says. Used by training's
    validation, ``leanvit eval``, ``viz`` and the demo, so they all see the same images.

    ``options``: the data kind's options (default: those ``config`` records, e.g. its ``digits:``)."""
    if img_size is None:
        img_size = model_input_size(model)
    cfg = eval_data_config(model, img_size, config, crop_pct, interpolation)
    tf = build_eval_transform(cfg["input_size"][1:], crop_ratio=cfg["crop_pct"],
                              interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])
    if options is None:
        options = dataset_options(data, config)
    return create_dataset(data, split, transform=tf, options=options, classes=classes)


def build_train_dataset(data, img_size, model: Optional[nn.Module] = None, transform: Optional[dict] = None,
                        options: Optional[dict] = None, skip_corrupt: bool = False):
    """The training split with the training transform (``transform``: kwargs of
    :func:`build_train_transform`, e.g. ``crop``, ``three_augment``, ``color_jitter``)."""
    mean, std = normalization(model)
    tf = build_train_transform(img_size, mean=mean, std=std, **(transform or {}))
    return create_dataset(data, "train", transform=tf, options=options, skip_corrupt=skip_corrupt)
