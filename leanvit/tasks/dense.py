"""What detection and segmentation share: a torchvision-style model on a backbone, (images, targets) batches,
checkpoints that record the head, evaluation on the dense data kinds (``digits-det``, ``digits-seg``, COCO,
ADE20K, mask folders).

The model spec (``model_spec`` in checkpoints) is ``{"name": backbone, "task", "head", "num_classes",
"kwargs"}``: :func:`build_dense_model` rebuilds the model from it.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Optional

import torch.nn as nn

from leanvit.checkpoints import load_checkpoint, read_checkpoint
from leanvit.data import create_dataset, dataset_classes, dataset_options, with_data_overrides
from leanvit.dense import apply_dense_reduction, dense_reduction_spec
from leanvit.dense.reduction import BackbonePart, dense_backbone_of, dense_variants
from leanvit.errors import LeanvitError
from leanvit.models.build import BuiltModel
from leanvit.reduction import ReductionSpec, get_reduction
from leanvit.tasks.base import SweepVariant, Task
from leanvit.tasks.registry import get_task
from leanvit.utils import to_2tuple
from leanvit.viz.dense import visualize_dense

__all__ = ["DenseTask", "load_dense_model", "build_dense_model"]

log = logging.getLogger(__name__)


def _transfer_backbone(model: nn.Module, recorded: Dict[str, Any], path) -> int:
    """Load the dense backbone of the checkpoint ``path`` (a model of another head, task or class count on the
    same backbone, described by ``recorded``) into ``model``'s; returns the number of tensors loaded. Pyramid
    levels the checkpoint has but ``model`` does not use are skipped; every tensor ``model``'s backbone has
    must be in the checkpoint with its shape (a level the source never built is an error)."""
    source = build_dense_model({**recorded, "kwargs": {k: v for k, v in recorded.get("kwargs", {}).items()
                                                        if k not in ("reduction", "restore")}})
    load_checkpoint(source, path, strict=True, name=str(path))
    theirs = dense_backbone_of(source).state_dict()
    mine = dense_backbone_of(model)
    own = mine.state_dict()
    bad = [k for k, v in own.items() if k not in theirs or theirs[k].shape != v.shape]
    if bad:
        raise LeanvitError(f"finetune {path}: its {recorded.get('head')} backbone lacks or has other shapes for "
                           f"{len(bad)} of this model's backbone tensors ({', '.join(bad[:3])}"
                           f"{', ...' if len(bad) > 3 else ''}); build the pyramid levels it was trained with "
                           f"(out_indices)")
    mine.load_state_dict({k: theirs[k] for k in own}, strict=True)
    return len(own)


def build_dense_model(spec: Dict[str, Any], pretrained_backbone=None, drop_path: float = 0.0) -> nn.Module:
    """A detector or segmenter from a recorded model spec (see the module doc)."""
    kwargs = dict(spec.get("kwargs") or {})
    img = kwargs.pop("img_size", None)
    if img is not None:
        kwargs["img_size"] = to_2tuple(img)
    if drop_path:
        kwargs["drop_path_rate"] = float(drop_path)
    return get_task(spec["task"]).create(spec["head"], spec["name"], int(spec["num_classes"]),
                                         pretrained_backbone=pretrained_backbone, **kwargs)


def _is_dense_checkpoint(path) -> bool:
    obj = read_checkpoint(path)
    spec = obj.get("model_spec") if isinstance(obj, dict) else None
    return isinstance(spec, dict) and isinstance(spec.get("head"), str) and bool(spec.get("task"))


def load_dense_model(checkpoint):
    """(model in eval mode with the checkpoint's weights, its spec, its training config, its classes) for a
    checkpoint written by a detection or segmentation ``leanvit train`` run."""
    obj = read_checkpoint(checkpoint)
    spec = obj.get("model_spec") if isinstance(obj, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("head"), str) or not spec.get("task"):
        raise LeanvitError(f"{checkpoint} is not a detection/segmentation checkpoint written by leanvit train")
    model = build_dense_model(spec)
    load_checkpoint(model, obj, strict=True, name=str(checkpoint))
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    return model.eval(), spec, config, list(obj.get("classes") or [])


class DenseTask(Task):
    """A detector or segmenter (``head``, recipe key :attr:`head_key`) on the backbone ``model``."""

    head_key = ""           # the recipe key naming the head: detector / segmenter
    heads: tuple = ()       # the heads it knows
    settings = {
        "head_kwargs": {},  # detector/segmenter options (fpn_channels, head_convs, channels, anchor_sizes...)
        "min_size": None,   # shorter image side (detection: resize; segmentation: base of the random resize)
        "max_size": None,   # longer image side at most (detection)
        "hflip": 0.5,
    }

    def check_settings(self, cfg):
        for key in (k for k in self.settings if k.endswith("_size")):
            v = cfg.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or int(v) != v):
                raise LeanvitError(f"{key} must be a positive integer, got {v!r}")

    def create(self, head: str, backbone: str, num_classes: int, **kwargs) -> nn.Module:
        raise NotImplementedError

    def transform(self, cfg: Dict[str, Any], train: bool):
        raise NotImplementedError

    def data_options(self, cfg: Dict[str, Any]) -> Dict[str, Any]:
        return dataset_options(cfg["data"], cfg)

    def model_spec(self, cfg: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
        kwargs = dict(cfg.get("model_kwargs") or {})
        img = cfg["img_size"]
        if img is not None:  # None: a backbone without an input size (timm pvt_v2_*)
            kwargs["img_size"] = list(img) if isinstance(img, (list, tuple)) else img
        kwargs.update(dict(cfg.get("head_kwargs") or {}))
        return {"name": cfg["model"], "task": self.name, "head": cfg[self.head_key], "num_classes": int(num_classes),
                "kwargs": kwargs}

    # ------------------------------------------------------------------ training
    def check_config(self, cfg):
        if cfg.get(self.head_key) not in self.heads:
            raise LeanvitError(f"a {self.name} run needs {self.head_key}: one of {', '.join(self.heads)} "
                               f"(got {cfg.get(self.head_key)!r})")
        if cfg["mixup"] or cfg["cutmix"]:
            raise LeanvitError(f"mixup/cutmix are classification settings; set mixup: 0 and cutmix: 0 for {self.name}")

    def classes(self, cfg):
        return dataset_classes(cfg["data"], "train", self.data_options(cfg))

    def build_model(self, cfg, num_classes, reduction=None, finetune=None):
        """The detector or segmenter; ``reduction`` (at its target strength, with its ``restore``) runs in the
        backbone and is recorded in the spec. ``finetune``: a classification checkpoint (into the backbone,
        classifier dropped) or a checkpoint of this task (the whole model, e.g. a reduced fine-tune of an
        unreduced run: a reduction adds no weights)."""
        spec = self.model_spec(cfg, num_classes)
        if reduction is not None:
            spec["kwargs"]["reduction"] = dict(reduction)
        whole = finetune is not None and _is_dense_checkpoint(finetune)
        model = build_dense_model(spec, pretrained_backbone=None if whole else finetune,
                                  drop_path=cfg.get("drop_path") or 0.0)
        if whole:
            recorded = read_checkpoint(finetune)["model_spec"]
            if recorded.get("name") != spec["name"]:
                raise LeanvitError(f"finetune {finetune} holds a {recorded.get('head')} {recorded.get('task')} "
                                   f"model on {recorded.get('name')}, not on this run's backbone {spec['name']}")
            if any(recorded.get(key) != spec[key] for key in ("task", "head", "num_classes")):
                loaded = _transfer_backbone(model, recorded, finetune)
                return model, spec, (f"backbone initialized from the {recorded.get('head')} {recorded.get('task')} "
                                     f"checkpoint {finetune} ({loaded} tensors; the {spec['head']} head is new)")
            load_checkpoint(model, finetune, strict=True, name=str(finetune))
            return model, spec, f"initialized from the {self.name} checkpoint {finetune}"
        return model, spec, (f"backbone initialized from {finetune} (classifier dropped)" if finetune else None)

    def _eval_dataset(self, data, cfg, split="val"):
        cfg = {**cfg, "data": data}
        ds = create_dataset(data, split, transform=self.transform(cfg, False), options=self.data_options(cfg))
        if len(ds) == 0:
            raise LeanvitError(f"the {split} split of {data} is empty")
        return ds

    def datasets(self, cfg, model):
        train_set = create_dataset(cfg["data"], "train", transform=self.transform(cfg, True),
                                   options=self.data_options(cfg), skip_corrupt=cfg["skip_corrupt"])
        val_set = self._eval_dataset(cfg["data"], cfg, "val")
        return train_set, val_set, list(getattr(val_set, "classes", []) or self.classes(cfg))

    # ------------------------------------------------------------------ a trained model
    def load_model(self, checkpoint=None, name=None, reduction=None, img_size=None, num_classes=None, data=None,
                   split="val", data_overrides=None):
        if checkpoint is None:
            raise LeanvitError(f"a {self.name} model is loaded from a checkpoint written by leanvit train")
        for what, v in (("another input size", img_size), ("another number of classes", num_classes)):
            if v is not None:
                raise LeanvitError(f"{what} cannot be given for the {self.name} checkpoint {checkpoint}")
        model, spec, config, _ = load_dense_model(checkpoint)
        if isinstance(reduction, dict) and set(reduction) == {"restore"}:  # the trained reduction, restored anew
            apply_dense_reduction(model, None, reduction["restore"])
        elif reduction is not None:  # another reduction (or restoration) than the one it was trained with
            apply_dense_reduction(model, reduction)
        if name is not None and name != spec["name"]:
            raise LeanvitError(f"{checkpoint} holds a {spec['name']} backbone, not {name}")
        hw = self.input_size(spec, config)
        return BuiltModel(model, spec["name"], hw, with_data_overrides(config, data_overrides),
                          read_checkpoint(checkpoint))

    def input_size(self, spec: Dict[str, Any], config: Dict[str, Any]):
        """(H, W) the recipe feeds the model (what the sweep times it at)."""
        size = config.get("min_size") or (spec.get("kwargs") or {}).get("img_size") or config.get("img_size")
        return to_2tuple(size) if size else (224, 224)

    def title(self, built) -> str:
        spec = built.checkpoint["model_spec"]
        rec = self.record(built)
        red = rec["reduction"]
        shown = "no token reduction" if red is None else f"{ReductionSpec.parse(red)}, restore {rec['restore']}"
        return f"{spec['head']} on {spec['name']} ({self.name}; {shown})"

    def record(self, built) -> Dict[str, Any]:
        """The head, the backbone's token reduction (None without one) and its restoration."""
        red = dense_reduction_spec(built.model)
        restore = None if red is None else red.pop("restore", None)
        return {"head": built.checkpoint["model_spec"]["head"], "reduction": red, "restore": restore}

    def data_record(self, built, data) -> Dict[str, Any]:
        return self.data_options({**(built.config or {}), "data": data})

    def eval_data(self, built, data, split="val", batch_size=64, workers=0, device="cpu", **options):
        dataset = self._eval_dataset(data, built.config, split)
        n = int(built.checkpoint["model_spec"]["num_classes"])
        data_classes = list(getattr(dataset, "classes", []))
        if len(data_classes) != n:
            raise LeanvitError(f"the model has {n} classes but {data} has {len(data_classes)}; "
                               "evaluate on data with the model's classes")
        return dataset, self.loader(dataset, batch_size, workers, device)

    def sweep_variants(self, model, plain, grid, restore=None, **options):
        """The unreduced model, then every (method, strength) of ``grid`` with each restoration strategy of
        the method (``restore``: a list of strategy names to sweep instead of all of them)."""
        if any(v is not None for v in options.values()):
            raise LeanvitError(f"{', '.join(f'`{k}`' for k in options)} does not apply to a {self.name} sweep")
        if dense_reduction_spec(plain) is not None:  # trained with a reduction: the unreduced model is the base
            plain = apply_dense_reduction(copy.deepcopy(plain), "none")
        yield SweepVariant("none", "-", None, plain)
        for method, value, rest, view in dense_variants(plain, grid, restore):
            m = get_reduction(method)
            yield SweepVariant(f"{method}/{rest}", m.format_strength(value), value, view, method=method,
                               restore=str(rest))

    def can_reduce(self, model):
        """Only a plain-ViT backbone takes a token reduction (Shunted and PVT v2 are hierarchical)."""
        return hasattr(dense_backbone_of(model), "vit")

    def backbone_part(self, model):
        """The input's preparation and the dense backbone's maps, at ``model``'s reduction point."""
        return BackbonePart(model)

    def draw(self, built, images, out_dir, names, class_names=None, device="cpu", score_thresh=0.3, **options):
        """Predicted boxes (class and score) and masks, or the predicted label map, over the images."""
        classes = list(built.checkpoint.get("classes") or []) or class_names
        return visualize_dense(built.model.to(device), self.pictures, list(images), out_dir, names=list(names),
                               class_names=classes or None, score_thresh=score_thresh, device=device,
                               min_size=self.draw_size(built.config))

    def pictures(self, model: nn.Module, images, class_names=None, device="cpu", **options) -> list:
        """The task's drawing of ``model``'s predictions over each image (uint8 3 x H x W tensors)."""
        raise NotImplementedError

    def draw_size(self, config: Dict[str, Any]) -> Optional[int]:
        return None

    def eval_images(self, data, config, split="val"):
        """The untransformed evaluation dataset (``image(i)`` gives its PIL images)."""
        cfg = {**config, "data": data}
        return create_dataset(data, split, options=self.data_options(cfg))
