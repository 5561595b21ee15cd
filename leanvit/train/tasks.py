"""What the training engine does differently per task: classification (the default), detection, segmentation.

The engine (:mod:`.engine`) asks the run's :class:`Task` for the model, the data, the loss of a batch,
the validation metrics and the metric that picks ``best.pth``; everything else (optimizer, schedule,
resumption, DDP, AMP, checkpoints, the metrics log) is shared.

* ``classification``: the existing path (:mod:`.setup` and :mod:`.loop`, top-1 picks the best).
* ``detection``: a torchvision detector from :func:`leanvit.dense.create_detector` (recipe ``detector``:
  retinanet | fcos | fasterrcnn | maskrcnn) on backbone ``model``; batches are (list of images, list of
  targets), the loss is the sum of the detector's losses; validation is COCO box mAP
  (:func:`leanvit.evaluate_dense.evaluate_detection`), ``val_map`` picks the best.
* ``segmentation``: :func:`leanvit.dense.create_segmenter` (recipe ``segmenter``: semantic_fpn | upernet);
  pixel cross-entropy ignoring label 255; validation is mIoU / pixel accuracy, ``val_miou`` picks the best.

The task is the recipe's ``task`` key, or, when it is not set, the data kind's (``digits-det`` is detection).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple

from leanvit.checkpoints import read_checkpoint, load_checkpoint
from leanvit.data import create_dataset, dataset_classes, dataset_options, resolve_dataset_kind
from leanvit.data.dense import IGNORE_INDEX, collate_fn, detection_transform, segmentation_transform, stack_masks
from leanvit.dense import DETECTORS, SEGMENTERS, create_detector, create_segmenter
from leanvit.evaluate_dense import evaluate_detection, evaluate_segmentation
from leanvit.errors import LeanvitError
from leanvit.train.loop import StepContext
from leanvit.train.setup import ResumableSampler, SeededSamples, TrainData, _train_sampler, build_state

__all__ = ["Task", "ClassificationTask", "DetectionTask", "SegmentationTask", "get_task", "task_name",
           "dense_model_spec", "build_dense_model", "load_dense_model", "TASKS"]

log = logging.getLogger(__name__)

TASKS = ("classification", "detection", "segmentation")


def task_name(cfg: Dict[str, Any]) -> str:
    """The recipe's ``task``, else the data kind's."""
    t = cfg.get("task")
    if t:
        if t not in TASKS:
            raise LeanvitError(f"task must be one of {', '.join(TASKS)}, got {t!r}")
        return t
    try:
        return resolve_dataset_kind(cfg["data"]).task
    except LeanvitError:
        return "classification"


class Task:
    name = "classification"
    main_metric = "val_top1"
    dense = False

    def message(self, row: Dict[str, Any]) -> str:
        """The validation part of the per-epoch log line."""
        return ""


class ClassificationTask(Task):
    """The engine's own path; defined so that ``Run.task`` always names the main metric."""


# ----------------------------------------------------------------------------------------------- dense


def dense_model_spec(cfg: Dict[str, Any], num_classes: int, task: str) -> Dict[str, Any]:
    """What :func:`build_dense_model` needs to rebuild the trained model (stored in checkpoints)."""
    kwargs = dict(cfg.get("model_kwargs") or {})
    img = cfg["img_size"]
    if img is not None:  # None: a backbone without an input size (timm pvt_v2_*)
        kwargs["img_size"] = list(img) if isinstance(img, (list, tuple)) else img
    kwargs.update(dict(cfg.get("head_kwargs") or {}))
    head = cfg["detector"] if task == "detection" else cfg["segmenter"]
    if task == "detection":
        if cfg.get("min_size"):
            kwargs.setdefault("min_size", int(cfg["min_size"]))
        if cfg.get("max_size"):
            kwargs.setdefault("max_size", int(cfg["max_size"]))
    return {"name": cfg["model"], "task": task, "head": head, "num_classes": int(num_classes), "kwargs": kwargs}


def build_dense_model(spec: Dict[str, Any], pretrained_backbone=None, drop_path: float = 0.0) -> nn.Module:
    """A detector or segmenter from a :func:`dense_model_spec`."""
    kwargs = dict(spec.get("kwargs") or {})
    img = kwargs.pop("img_size", None)
    if img is not None:
        kwargs["img_size"] = to_2tuple(img)
    if drop_path:
        kwargs["drop_path_rate"] = float(drop_path)
    create = create_detector if spec["task"] == "detection" else create_segmenter
    return create(spec["head"], spec["name"], int(spec["num_classes"]), pretrained_backbone=pretrained_backbone,
                  **kwargs)


def load_dense_model(checkpoint) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any], list]:
    """(model in eval mode with the checkpoint's weights, its spec, its training config, its classes) for a
    checkpoint written by a dense ``leanvit train`` run."""
    obj = read_checkpoint(checkpoint)
    spec = obj.get("model_spec") if isinstance(obj, dict) else None
    if not isinstance(spec, dict) or spec.get("task") not in ("detection", "segmentation"):
        raise LeanvitError(f"{checkpoint} is not a detection/segmentation checkpoint written by leanvit train")
    model = build_dense_model(spec)
    load_checkpoint(model, obj, strict=True, name=str(checkpoint))
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    return model.eval(), spec, config, list(obj.get("classes") or [])


def checkpoint_task(checkpoint) -> str:
    """``detection`` / ``segmentation`` for a dense training checkpoint, else ``classification``."""
    obj = read_checkpoint(checkpoint)
    spec = obj.get("model_spec") if isinstance(obj, dict) else None
    if isinstance(spec, dict) and spec.get("task") in ("detection", "segmentation"):
        return spec["task"]
    return "classification"


def dense_data_options(cfg: Dict[str, Any], task: str) -> Dict[str, Any]:
    options = dataset_options(cfg["data"], cfg)
    if task == "detection" and cfg.get("detector") == "maskrcnn":
        options["masks"] = True
    return options


def dense_eval_transform(cfg: Dict[str, Any], task: str):
    if task == "detection":
        return detection_transform(False, cfg.get("min_size"), cfg.get("max_size"))
    return segmentation_transform(False, cfg.get("min_size"), cfg.get("max_size"))


def build_dense_eval_dataset(data, cfg: Dict[str, Any], task: str, split: str = "val", options=None):
    """The evaluation split of dense ``data`` as a run with settings ``cfg`` validates on."""
    if options is None:
        options = dense_data_options({**cfg, "data": data}, task)
    _check_kind(data, task)
    ds = create_dataset(data, split, transform=dense_eval_transform(cfg, task), options=options)
    if len(ds) == 0:
        raise LeanvitError(f"the {split} split of {data} is empty")
    return ds


class _OneLineErrors:
    """A data loader whose workers' :class:`LeanvitError` (a bad mask, an unreadable image) reaches the
    caller as the one-line error it was, not as the worker's traceback text that torch wraps it in."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader
        self.dataset, self.sampler, self.batch_size = loader.dataset, loader.sampler, loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        try:
            yield from self.loader
        except LeanvitError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            if len(lines) <= 1:
                raise
            last = lines[-1].split("LeanvitError: ", 1)[-1]
            raise LeanvitError(last) from None


def dense_loader(dataset, task: str, batch_size: int, workers: int = 0, shuffle: bool = False, sampler=None,
                 drop_last: bool = False, pin_memory: bool = False):
    """A loader of (images, targets) batches for ``task`` (the collate of :mod:`leanvit.data.dense`)."""
    return _OneLineErrors(torch.utils.data.DataLoader(
        dataset, batch_size=int(batch_size), shuffle=shuffle, sampler=sampler, drop_last=drop_last,
        num_workers=int(workers), pin_memory=pin_memory, collate_fn=collate_fn(task)))


def _check_kind(data, task: str) -> None:
    kind = resolve_dataset_kind(data)
    if kind.task != task:
        raise LeanvitError(f"`data` {data} is {kind.task} data ({kind.name}), but the task is {task}")


class _DenseTask(Task):
    dense = True

    def __init__(self, cfg: Dict[str, Any]):
        self.cfg = cfg

    def check(self, cfg: Dict[str, Any]) -> None:
        key, names = ("detector", DETECTORS) if self.name == "detection" else ("segmenter", SEGMENTERS)
        if cfg.get(key) not in names:
            raise LeanvitError(f"a {self.name} run needs {key}: one of {', '.join(names)} (got {cfg.get(key)!r})")
        if cfg["mixup"] or cfg["cutmix"]:
            raise LeanvitError(f"mixup/cutmix are classification settings; set mixup: 0 and cutmix: 0 for {self.name}")
        _check_kind(cfg["data"], self.name)

    # -- the run
    def build_run(self, run) -> None:
        """Fill ``run`` (an :class:`~leanvit.train.engine.Run`): classes, model, data, state, step context."""
        cfg, env = run.cfg, run.env
        self.check(cfg)
        options = dense_data_options(cfg, self.name)
        classes = dataset_classes(cfg["data"], "train", options)
        run.num_classes = int(cfg["num_classes"] or len(classes))
        if run.num_classes < len(classes):
            raise LeanvitError(f"num_classes={run.num_classes} but the data has {len(classes)} classes")
        run.spec = dense_model_spec(cfg, run.num_classes, self.name)
        pretrained = cfg["finetune"] if cfg["finetune"] and not run.resume else None
        model = build_dense_model(run.spec, pretrained_backbone=pretrained, drop_path=cfg.get("drop_path") or 0.0)
        if pretrained and env.is_main:
            log.info(f"backbone initialized from {pretrained} (classifier dropped)")
        train_set = create_dataset(cfg["data"], "train", transform=self.train_transform(cfg), options=options,
                                   skip_corrupt=cfg["skip_corrupt"])
        val_set = build_dense_eval_dataset(cfg["data"], cfg, self.name, "val", options)
        bs = int(cfg["batch_size"])
        # exact mid-epoch resumption, as for classification: a skippable order, per-sample seeded transforms
        sampler = ResumableSampler(_train_sampler(train_set, cfg, env), env.rank)
        train_set = SeededSamples(train_set, cfg["seed"], env.rank)
        pin = env.device.type == "cuda"
        train_loader = dense_loader(train_set, self.name, bs, cfg["workers"], sampler=sampler, drop_last=True,
                                    pin_memory=pin)
        if len(train_loader) == 0:
            raise LeanvitError(f"the training set ({len(train_set)} images per process) is smaller than one "
                               f"batch of {bs}")
        val_shard = torch.utils.data.Subset(val_set, list(range(env.rank, len(val_set), env.world_size)))
        val_loader = dense_loader(val_shard, self.name, bs, cfg["workers"], pin_memory=pin)
        iters = len(train_loader)
        if cfg["max_train_batches"]:
            iters = min(iters, int(cfg["max_train_batches"]))
        if cfg.get("iterations"):  # a budget in optimizer steps (segmentation recipes): whole epochs cover it
            cfg["epochs"] = max(1, math.ceil(int(cfg["iterations"]) / iters))
        run.data = TrainData(train_set, val_set, train_loader, val_loader, sampler, list(classes), iters)
        model = model.to(env.device)
        run.state = build_state(cfg, model, iters, env)
        if run.resume:
            run._load_resume()
        forward_model = env.wrap(model)
        run.ctx = StepContext(cfg, env, forward_model, None, None, None, None, iters)
        run.ctx.task_step = self.step

    def train_transform(self, cfg):
        raise NotImplementedError

    def step(self, ctx, x, y) -> Tuple[torch.Tensor, int]:
        raise NotImplementedError

    def validate(self, model: nn.Module, loader, env, amp: bool) -> Dict[str, float]:
        raise NotImplementedError

    def skipped_notes(self, run) -> list:
        """The counted skips of the run's datasets (boxes clipped, images kept as negatives, ...)."""
        lines = []
        for ds in (run.data.train_set, run.data.val_set):
            counter = getattr(ds, "skips", None)
            if counter is not None:
                lines += counter.lines()  # logged once when the split was loaded
        return lines


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


class DetectionTask(_DenseTask):
    name = "detection"
    main_metric = "val_map"

    def train_transform(self, cfg):
        return detection_transform(True, cfg.get("min_size"), cfg.get("max_size"), hflip=cfg["hflip"])

    def step(self, ctx, images, targets):
        dev = ctx.env.device
        xs = [_plain(im).to(dev, non_blocking=True) for im in images]
        ts = [{k: _plain(v).to(dev, non_blocking=True) for k, v in t.items() if k in ("boxes", "labels", "masks")}
              for t in targets]
        with ctx.autocast():
            losses = ctx.forward_model(xs, ts)
        loss = sum(v.float() for v in losses.values())
        return loss, len(xs)

    def validate(self, model, loader, env, amp):
        res = evaluate_detection(model, loader, env.device, amp=amp, num_classes=getattr(model, "num_object_classes", None))
        if res["images"] == 0:
            raise LeanvitError("the validation set is empty")
        return {k: v for k, v in res.items() if k.startswith("val_")}

    def message(self, row):
        if "val_map" not in row:
            return ""
        masks = f" mask mAP {row['val_mask_map']:.3f}" if "val_mask_map" in row else ""
        return (f", val mAP {row['val_map']:.3f} mAP@0.5 {row['val_map50']:.3f} "
                f"AP small {row['val_map_small']:.3f}{masks}")


class SegmentationTask(_DenseTask):
    name = "segmentation"
    main_metric = "val_miou"

    def train_transform(self, cfg):
        return segmentation_transform(True, cfg.get("min_size"), cfg.get("max_size"), cfg.get("crop_size"),
                                      hflip=cfg["hflip"])

    def step(self, ctx, x, targets):
        dev = ctx.env.device
        x = x.to(dev, non_blocking=True)
        y = stack_masks(targets, x.shape[-2], x.shape[-1]).to(dev, non_blocking=True)
        with ctx.autocast():
            logits = ctx.forward_model(x)
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
        return loss, x.shape[0]

    def validate(self, model, loader, env, amp):
        ds = loader.dataset.dataset if isinstance(loader.dataset, torch.utils.data.Subset) else loader.dataset
        res = evaluate_segmentation(model, loader, int(model.num_classes), env.device, amp=amp,
                                    miou_classes=getattr(ds, "miou_classes", None))
        return {k: v for k, v in res.items() if k.startswith("val_")}

    def message(self, row):
        if "val_miou" not in row:
            return ""
        return f", val mIoU {row['val_miou']:.3f} (all classes {row['val_miou_all']:.3f}), pixel acc {row['val_pixel_acc']:.3f}"


def get_task(cfg: Dict[str, Any]) -> Task:
    name = task_name(cfg)
    if name == "detection":
        return DetectionTask(cfg)
    if name == "segmentation":
        return SegmentationTask(cfg)
    return ClassificationTask()
