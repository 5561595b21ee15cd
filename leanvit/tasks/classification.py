"""Classification: a timm model (ViT, DeiT III, EViT, Shunted, ...) over (image, label) batches.

Training: timm's Mixup/CutMix, cross-entropy or DeiT III's binary cross-entropy; validation top-1 / top-5 /
loss (``val_top1`` picks ``best.pth``). Evaluation: :func:`leanvit.tasks.classification_eval.evaluate` on
:func:`leanvit.data.build_eval_dataset` (training's validation, ``leanvit eval``, ``viz`` and ``sweep`` see
the same images). Pictures: the tokens EViT keeps, or the patches ToMe merges.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from leanvit.checkpoints import load_checkpoint
from leanvit.data import build_eval_dataset, build_train_dataset, dataset_classes, dataset_options, with_data_overrides
from leanvit.data.folder import check_same_classes
from leanvit.errors import LeanvitError
from leanvit.models.build import build_model, recorded_config
from leanvit.models.factory import create_model
from leanvit.reduction import applied_reduction
from leanvit.tasks.base import Metric, Task
from leanvit.tasks.classification_eval import evaluate
from leanvit.tasks.registry import register_task
from leanvit.utils import check_input_size, to_2tuple
from leanvit.viz import draw_reduction

__all__ = ["ClassificationTask", "build_datasets", "model_spec_from_config", "build_training_model", "finetune_from",
           "build_mixup", "build_loss", "check_class_names", "FINETUNE_MIN_SHARE"]

log = logging.getLogger(__name__)


def build_datasets(cfg: Dict[str, Any], model: nn.Module) -> Tuple[Any, Any, List[str]]:
    """(training set, validation set, class names), normalized for ``model``. Validation is built by the same
    :func:`leanvit.data.build_eval_dataset` that ``leanvit eval`` uses, so both see the same images."""
    img_size = to_2tuple(cfg["img_size"])
    tf = {k: cfg[k] for k in ("crop", "hflip", "three_augment", "color_jitter", "auto_augment", "reprob")}
    tf.update(scale=tuple(cfg["scale"]), src_padding=cfg["src_padding"])
    options = dataset_options(cfg["data"], cfg)
    train_set = build_train_dataset(cfg["data"], img_size, model, transform=tf, options=options,
                                    skip_corrupt=cfg["skip_corrupt"])
    classes = list(train_set.classes)
    val_set = build_eval_dataset(cfg["data"], model, img_size, config=cfg, split="val", classes=classes,
                                 options=options)
    check_same_classes(classes, val_set.classes, f" ({cfg['data']})")
    bs = int(cfg["batch_size"])
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and bs % 2:
        raise LeanvitError(f"mixup/cutmix need an even batch size, got {bs}")
    return train_set, val_set, classes


def model_spec_from_config(cfg: Dict[str, Any], num_classes: int, reduction: Optional[dict] = None) -> Dict[str, Any]:
    """What :func:`leanvit.create_model` needs to rebuild the trained model (stored in checkpoints):
    ``{"name", "kwargs", "reduction"}``; the reduction at its target strength, without its schedule."""
    kwargs = dict(cfg.get("model_kwargs") or {})
    img = cfg["img_size"]
    kwargs["img_size"] = list(img) if isinstance(img, (list, tuple)) else img
    kwargs["num_classes"] = num_classes
    red = reduction
    if red is not None:
        red = {k: (list(v) if isinstance(v, tuple) else v) for k, v in red.items()
               if k not in ("start_epoch", "epochs")}
    return {"name": cfg["model"], "kwargs": kwargs, "reduction": red}


def build_training_model(cfg: Dict[str, Any], num_classes: int, reduction: Optional[dict] = None) -> nn.Module:
    spec = model_spec_from_config(cfg, num_classes, reduction)
    kwargs = dict(spec["kwargs"])
    if cfg.get("drop_path"):
        kwargs["drop_path_rate"] = cfg["drop_path"]
    img = kwargs.pop("img_size")
    return create_model(spec["name"], reduction=spec["reduction"], img_size=to_2tuple(img), **kwargs)


FINETUNE_MIN_SHARE = 0.5  # --finetune fails when fewer of the model's tensors load (unless finetune_partial)


def finetune_from(model: nn.Module, path, partial: bool = False) -> str:
    """Load ``path``'s weights for fine-tuning (classifier re-initialized if it differs); returns a note
    that always says ``loaded N/M tensors``. Fewer than :data:`FINETUNE_MIN_SHARE` of the model's tensors
    loaded is an error (an incompatible checkpoint would silently train from scratch) unless ``partial``."""
    total = len(model.state_dict())
    try:
        res = load_checkpoint(model, path, strict=False, ignore_classifier=True)
    except LeanvitError as e:
        raise LeanvitError(f"`finetune`: {e}") from None
    loaded = total - len(res.missing_keys) - len(res.skipped_keys)
    notes = [f"loaded {loaded}/{total} tensors"]
    if res.skipped_keys:
        notes.append(f"re-initialized {', '.join(res.skipped_keys)}")
    if res.missing_keys:
        notes.append(f"not in the checkpoint: {', '.join(res.missing_keys[:6])}")
    if res.unexpected_keys:
        notes.append(f"unused: {', '.join(res.unexpected_keys[:6])}")
    if loaded < FINETUNE_MIN_SHARE * total and not partial:
        raise LeanvitError(f"`finetune` {path}: only {loaded}/{total} of the model's tensors loaded (less than "
                           f"{FINETUNE_MIN_SHARE:.0%}; is it a checkpoint of another model?); give "
                           "`finetune_partial` to train from it anyway")
    return f"fine-tuning from {path} ({'; '.join(notes)})"


def build_mixup(cfg: Dict[str, Any], num_classes: int) -> Optional[Mixup]:
    if not (cfg["mixup"] > 0 or cfg["cutmix"] > 0):
        return None
    return Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=cfg["mixup_prob"],
                 switch_prob=cfg["mixup_switch_prob"], mode="batch", label_smoothing=cfg["smoothing"],
                 num_classes=num_classes)


def build_loss(cfg: Dict[str, Any], mixing: bool) -> nn.Module:
    if cfg["loss"] == "bce":
        # DeiT III: after mixup/cutmix every class with a non-zero weight is a positive (targets.gt(0))
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0 if mixing else None)
    if mixing:
        return SoftTargetCrossEntropy()  # smoothing is applied inside Mixup
    return nn.CrossEntropyLoss(label_smoothing=float(cfg["smoothing"]))


class _Step:
    """One batch: mixup/cutmix (if set), the forward pass under autocast and the loss."""

    def __init__(self, criterion: nn.Module, mixup: Optional[Mixup]):
        self.criterion, self.mixup = criterion, mixup

    def __call__(self, ctx, x, y):
        dev = ctx.env.device
        x, y = x.to(dev, non_blocking=True), torch.as_tensor(y).to(dev, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        with ctx.autocast():
            loss = self.criterion(ctx.forward_model(x).float(), y)
        return loss, x.shape[0]


def check_class_names(recorded, classes, checkpoint, data) -> None:
    """The data's class names must be the checkpoint's (same names, same order), or the accuracy is wrong."""
    if recorded is None or list(map(str, recorded)) == list(map(str, classes)):
        return
    recorded, classes = list(map(str, recorded)), list(map(str, classes))
    missing = [c for c in recorded if c not in classes]
    extra = [c for c in classes if c not in recorded]

    def some(names):
        return ", ".join(map(repr, names[:6])) + (", ..." if len(names) > 6 else "")
    if not missing and not extra:
        what = f"are those {checkpoint} was trained with, in another order"
    else:
        parts = ([f"{len(missing)} of its classes are not in the data ({some(missing)})"] if missing else []) + \
                ([f"{len(extra)} of the data's classes are not among its classes ({some(extra)})"] if extra else [])
        what = f"differ from those {checkpoint} was trained with: {'; '.join(parts)}"
    raise LeanvitError(f"the class names of {data} {what}; the accuracy would be meaningless "
                       "(give `ignore_class_names` to evaluate by label position anyway)")


class ClassificationTask(Task):
    name = "classification"
    main_metric = "val_top1"
    sweep_columns = (("top1", "top-1", ".2f"), ("top5", "top-5", ".2f"))
    metrics = (Metric("top1", "top-1", ".2f", "%"), Metric("top5", "top-5", ".2f", "%"),
               Metric("loss", "loss", ".4f", brief=False))
    settings = {
        "crop": "rrc",               # rrc | src | none
        "scale": [0.08, 1.0],
        "src_padding": 4,
        "hflip": 0.5,
        "three_augment": True,
        "color_jitter": 0.3,
        "auto_augment": None,        # a timm RandAugment policy instead of 3-Augment (e.g. rand-m9-mstd0.5-inc1)
        "reprob": 0.0,               # random erasing probability
        "eval_crop_ratio": 1.0,
        "loss": "bce",               # bce (DeiT III: targets > 0 after mixup) | ce
        "smoothing": 0.0,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
    }

    def check_settings(self, cfg):
        if cfg["loss"] not in ("bce", "ce"):
            raise LeanvitError(f"loss must be bce or ce, got {cfg['loss']!r}")
        if cfg["loss"] == "bce" and cfg["smoothing"]:
            raise LeanvitError("the DeiT III BCE loss needs smoothing 0 (targets are thresholded at 0 after mixup)")
        for key in ("mixup", "cutmix", "smoothing"):
            if not isinstance(cfg[key], (int, float)) or cfg[key] < 0:
                raise LeanvitError(f"{key} must be a number >= 0, got {cfg[key]!r}")

    # ------------------------------------------------------------------ training
    def check_config(self, cfg):
        if cfg["img_size"] is None:
            raise LeanvitError("img_size must be a positive integer or [H, W], got None")

    def classes(self, cfg):
        return dataset_classes(cfg["data"], "train", dataset_options(cfg["data"], cfg))

    def build_model(self, cfg, num_classes, reduction=None, finetune=None):
        model = build_training_model(cfg, num_classes, reduction)
        check_input_size(model, to_2tuple(cfg["img_size"]))  # e.g. --img-size 7 with 8 px patches
        method = applied_reduction(model)
        if method is not None and reduction and method.knob in reduction:
            method.check_runs_as_given(model, reduction[method.knob])  # the target a schedule records
        note = finetune_from(model, finetune, partial=bool(cfg.get("finetune_partial"))) if finetune else None
        return model, model_spec_from_config(cfg, num_classes, reduction), note

    def datasets(self, cfg, model):
        return build_datasets(cfg, model)

    def training_step(self, cfg, num_classes):
        mixup = build_mixup(cfg, num_classes)
        return _Step(build_loss(cfg, mixup is not None), mixup)

    def summary(self, best, row):
        return {"best_top1": best, "last_top1": row.get("val_top1")}

    def done_message(self, res):
        if res["best_top1"] is None or res["best_top1"] < 0:
            return ""
        last = res["last_top1"]
        return (f"done in {res['seconds']:.0f} s: best val top-1 {res['best_top1']:.2f}%, "
                f"last {'n/a' if last is None else f'{last:.2f}%'}; checkpoints in {res['output']}")

    # ------------------------------------------------------------------ a trained model
    def load_model(self, checkpoint=None, name=None, reduction=None, img_size=None, num_classes=None, data=None,
                   split="val", data_overrides=None):
        if isinstance(reduction, dict) and "restore" in reduction or "restore" in getattr(reduction, "options", {}):
            raise LeanvitError("`restore` (how a dense backbone restores its token map) applies to detection and "
                               "segmentation models, not to a classifier")
        data_classes = None
        if data is not None:  # counted with the data options the checkpoint records (and the overrides)
            config = with_data_overrides(recorded_config(checkpoint), data_overrides)
            data_classes = len(dataset_classes(data, split, dataset_options(data, config)))
        built = build_model(name, checkpoint, reduction, img_size, num_classes, data_classes=data_classes)
        if data_overrides:
            built = built._replace(config=with_data_overrides(built.config, data_overrides))
        n_out = getattr(built.model, "num_classes", None)
        if data_classes is not None and n_out is not None and n_out != data_classes:
            raise LeanvitError(f"the model has {n_out} classes but the data has {data_classes} "
                               f"({data}); evaluate on data with the model's classes")
        return built

    def eval_data(self, built, data, split="val", batch_size=64, workers=0, device="cpu", crop_pct=None,
                  interpolation=None, check_classes=True, source=None, **options):
        if check_classes and built.checkpoint is not None:
            check_class_names(built.checkpoint.get("classes"),
                              dataset_classes(data, split, dataset_options(data, built.config)), source, data)
        dataset = build_eval_dataset(data, built.model, built.img_size, config=built.config, split=split,
                                     crop_pct=crop_pct, interpolation=interpolation,
                                     options=dataset_options(data, built.config))
        return dataset, self.loader(dataset, batch_size, workers, device)

    def evaluate(self, model, loader, device="cpu", amp=False, progress=False, max_batches=None, dataset=None):
        return evaluate(model, loader, device=device, amp=amp, progress=progress, max_batches=max_batches)

    def draw(self, built, images, out_dir, names, class_names=None, device="cpu", batch_size=16, **options):
        """The picture of the model's reduction (its method draws it: EViT's kept tokens, ToMe's merged
        groups, ...)."""
        model = built.model
        method = applied_reduction(model)
        if method is None:
            raise LeanvitError(f"{built.name} does not reduce tokens: use an EViT model (evit_*), or pass "
                               "`keep_rate` / `reduction` (e.g. evit:0.7 or tome:8) to a plain ViT")
        return draw_reduction(model.to(device), list(images), out_dir, names=list(names), class_names=class_names,
                              batch_size=batch_size)

    def title(self, built):
        method = applied_reduction(built.model)
        shown = (f" {method.knob}={method.format_strength(method.get_strength(built.model))}" if method
                 else ", no token reduction")
        return f"{built.description}{shown}"

    def record(self, built):
        method = applied_reduction(built.model)
        return {"reduction": method.spec(built.model) if method else None, "restore": None,
                "keep_rate": getattr(built.model, "keep_rate", None)}


register_task(ClassificationTask())
