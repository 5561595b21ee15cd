"""Building a run from its resolved config: the data, and the model with what trains it."""
from __future__ import annotations

import hashlib
import logging
import random
from typing import Any, Dict, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3

from leanvit.checkpoints import load_checkpoint
from leanvit.data import build_eval_dataset, build_train_dataset, dataset_options
from leanvit.data.folder import check_same_classes
from leanvit.errors import LeanvitError
from leanvit.models.factory import create_model
from leanvit.runtime import to_2tuple
from leanvit.train.distributed import DistEnv
from leanvit.train.recipes import reduction_settings
from leanvit.train.state import TrainState

__all__ = ["TrainData", "build_data", "build_state", "model_spec_from_config", "build_training_model",
           "build_mixup", "build_loss", "finetune_from", "ResumableSampler", "SeededSamples", "sample_seed",
           "FINETUNE_MIN_SHARE"]

log = logging.getLogger(__name__)


class TrainData(NamedTuple):
    train_set: Any
    val_set: Any
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    sampler: Any
    classes: list
    iters: int  # optimizer steps per epoch


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A random order that depends only on (seed, epoch): reproducible across resumption."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7_777 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# ---------------------------------------------------------------------------------------------
# Exact mid-epoch resumption: the data position and per-sample random transforms
def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The seed of one training sample's random transforms: a hash of (seed, epoch, rank, position in the
    epoch's order), so it is the same in every run, process and loader worker, resumed or not."""
    h = hashlib.blake2b(f"{int(seed)},{int(epoch)},{int(rank)},{int(position)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") % (2 ** 63)


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a training sampler (``EpochShuffleSampler``, ``DistributedSampler``, ``RepeatAugSampler``):
    yields ``(index, position)`` so that :class:`SeededSamples` can seed each sample's transforms, and can
    skip the first ``n`` positions of the next epoch's order (:meth:`skip_next`, resuming mid-epoch)."""

    def __init__(self, sampler, rank: int = 0):
        self.sampler, self.rank, self._skip = sampler, int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def skip_next(self, n: int) -> None:
        """The next iteration starts at position ``n`` of the epoch's order."""
        self._skip = int(n)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for pos, idx in enumerate(self.sampler):
            if pos >= skip:
                yield int(idx), pos

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self._skip)


class SeededSamples(torch.utils.data.Dataset):
    """A training set whose random transforms are seeded per sample from (seed, epoch, rank, position): the
    transforms of a sample do not depend on what ran before it (the loader worker, the batches skipped when
    resuming). It seeds Python's, NumPy's and torch's CPU generators before each sample and leaves them so
    (restoring them would cost more than the transforms): the engine reseeds them before every step."""

    def __init__(self, dataset, seed: int, rank: int = 0):
        self.dataset, self.seed, self.rank, self.epoch = dataset, int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # classes, num_skipped, image, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        index, position = key if isinstance(key, tuple) else (key, key)
        s = sample_seed(self.seed, self.epoch, self.rank, position)
        random.seed(s)
        np.random.seed(s % (2 ** 32))
        torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also seeds every device (slow)
        return self.dataset[index]


def _train_sampler(dataset, cfg, env: DistEnv):
    if hasattr(dataset, "train_sampler") and not cfg["repeated_aug"]:  # e.g. tar shards: a locality-keeping order
        return dataset.train_sampler(env.world_size, env.rank, cfg["seed"])
    if cfg["repeated_aug"]:
        return RepeatAugSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, num_repeats=3)
    if env.distributed:
        return torch.utils.data.DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                                   shuffle=True, seed=cfg["seed"], drop_last=True)
    return EpochShuffleSampler(len(dataset), cfg["seed"])


def build_data(cfg: Dict[str, Any], env: DistEnv, model: nn.Module) -> TrainData:
    """Training and validation data, normalized for ``model``. Validation is built by the same
    :func:`leanvit.data.build_eval_dataset` that ``leanvit eval`` uses, so both see the same images."""
    img_size = to_2tuple(cfg["img_size"])
    tf = {k: cfg[k] for k in ("crop", "hflip", "three_augment", "color_jitter", "auto_augment", "reprob")}
    tf.update(scale=tuple(cfg["scale"]), src_padding=cfg["src_padding"])
    options = dataset_options(cfg["data"], cfg)
    train_set = build_train_dataset(cfg["data"], img_size, model, transform=tf, options=options,
                                    skip_corrupt=cfg["skip_corrupt"])
    classes = list(getattr(train_set, "classes"))
    val_set = build_eval_dataset(cfg["data"], model, img_size, config=cfg, split="val", classes=classes,
                                 options=options)
    check_same_classes(classes, val_set.classes, f" ({cfg['data']})")
    bs = int(cfg["batch_size"])
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and bs % 2:
        raise LeanvitError(f"mixup/cutmix need an even batch size, got {bs}")
    sampler = ResumableSampler(_train_sampler(train_set, cfg, env), env.rank)
    train_set = SeededSamples(train_set, cfg["seed"], env.rank)
    loader_kw = dict(num_workers=int(cfg["workers"]), pin_memory=env.device.type == "cuda",
                     persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=bs, sampler=sampler, drop_last=True,
                                               **loader_kw)
    if len(train_loader) == 0:
        raise LeanvitError(f"the training set ({len(train_set)} images per process) is smaller than one "
                           f"batch of {bs}")
    val_shard = torch.utils.data.Subset(val_set, list(range(env.rank, len(val_set), env.world_size)))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=bs, shuffle=False, **loader_kw)
    iters = len(train_loader)
    if cfg["max_train_batches"]:
        iters = min(iters, int(cfg["max_train_batches"]))
    return TrainData(train_set, val_set, train_loader, val_loader, sampler, classes, iters)


def model_spec_from_config(cfg: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """What :func:`leanvit.create_model` needs to rebuild the trained model (stored in checkpoints):
    ``{"name", "kwargs", "reduction"}``; the reduction at its target strength, without its schedule."""
    kwargs = dict(cfg.get("model_kwargs") or {})
    img = cfg["img_size"]
    kwargs["img_size"] = list(img) if isinstance(img, (list, tuple)) else img
    kwargs["num_classes"] = num_classes
    red = reduction_settings(cfg)
    if red is not None:
        red = {k: (list(v) if isinstance(v, tuple) else v) for k, v in red.items()
               if k not in ("start_epoch", "epochs")}
    return {"name": cfg["model"], "kwargs": kwargs, "reduction": red}


def build_training_model(cfg: Dict[str, Any], num_classes: int) -> nn.Module:
    spec = model_spec_from_config(cfg, num_classes)
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
        raise LeanvitError(f"--finetune: {e}") from None
    loaded = total - len(res.missing_keys) - len(res.skipped_keys)
    notes = [f"loaded {loaded}/{total} tensors"]
    if res.skipped_keys:
        notes.append(f"re-initialized {', '.join(res.skipped_keys)}")
    if res.missing_keys:
        notes.append(f"not in the checkpoint: {', '.join(res.missing_keys[:6])}")
    if res.unexpected_keys:
        notes.append(f"unused: {', '.join(res.unexpected_keys[:6])}")
    if loaded < FINETUNE_MIN_SHARE * total and not partial:
        raise LeanvitError(f"--finetune {path}: only {loaded}/{total} of the model's tensors loaded (less than "
                           f"{FINETUNE_MIN_SHARE:.0%}; is it a checkpoint of another model?); give "
                           "--finetune-partial to train from it anyway")
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


def build_state(cfg: Dict[str, Any], model: nn.Module, iters: int, env: DistEnv) -> TrainState:
    """Optimizer, per-iteration cosine schedule, grad scaler (AMP on CUDA) and EMA around ``model``."""
    opt_kwargs = {"eps": cfg["opt_eps"]} if cfg["opt"] in ("lamb", "adamw") else {}
    optimizer = create_optimizer_v2(model, opt=cfg["opt"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                    **opt_kwargs)
    sched_kw = dict(t_initial=int(cfg["epochs"]) * iters, lr_min=cfg["min_lr"],
                    warmup_t=int(round(cfg["warmup_epochs"] * iters)), warmup_lr_init=cfg["warmup_lr"],
                    t_in_epochs=False)
    if cfg.get("schedule") == "poly":  # mmsegmentation's poly (power 0.9), as PVT's Semantic FPN / UperNet use it
        scheduler = PolyLRScheduler(optimizer, power=0.9, **sched_kw)
    else:
        scheduler = CosineLRScheduler(optimizer, **sched_kw)
    scaler = torch.amp.GradScaler("cuda") if cfg["amp"] and env.device.type == "cuda" else None
    ema = ModelEmaV3(model, decay=cfg["model_ema_decay"]) if cfg["model_ema"] else None
    return TrainState(model, optimizer, scheduler, scaler, ema)
