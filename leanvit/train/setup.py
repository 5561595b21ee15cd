"""What trains a run's model, whatever its task: data loaders, optimizer, learning-rate schedule, grad scaler
and EMA."""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3

from leanvit.data.loaders import training_loaders
from leanvit.errors import LeanvitError
from leanvit.tasks import Task, TrainData
from leanvit.train.distributed import DistEnv
from leanvit.train.state import TrainState

__all__ = ["build_state", "build_train_data", "freeze_parameters"]


def build_train_data(task: Task, cfg: Dict[str, Any], env: DistEnv, model: nn.Module) -> TrainData:
    """The run's loaders over the task's datasets (:meth:`leanvit.tasks.Task.datasets`), batched by its
    :attr:`~leanvit.tasks.Task.collate_fn`: see :func:`leanvit.data.loaders.training_loaders`."""
    train_set, val_set, classes = task.datasets(cfg, model)
    ld = training_loaders(train_set, val_set, cfg, env, task.collate_fn)
    return TrainData(ld.train_set, val_set, ld.train_loader, ld.val_loader, ld.sampler, list(classes), ld.iters)


def freeze_parameters(model: nn.Module, patterns) -> Tuple[int, int]:
    """Keep the parameters whose names match one of ``patterns`` (shell-style, ``fnmatch``: a name or a
    prefix such as ``backbone.vit.blocks.0.*``) fixed in training: ``requires_grad_(False)``, so the
    optimizer (timm's parameter groups) and DDP leave them out. Returns (tensors, parameters) frozen.

    Why: a reduction whose ranking is computed from the model (EViT ranks by the class token's attention)
    drifts when those weights are fine-tuned with a loss that does not read the class token (a segmenter);
    freezing what the ranking is computed from keeps it."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        return 0, 0
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) and p for p in patterns):
        raise LeanvitError(f"freeze must be a list of parameter-name patterns, got {patterns!r}")
    params = dict(model.named_parameters())
    chosen = set()
    for pat in patterns:
        hits = fnmatch.filter(params, pat)
        if not hits:
            example = next(iter(params), "-")
            raise LeanvitError(f"freeze pattern {pat!r} matches no parameter of the model (names look like "
                               f"{example!r}; use * for the rest of a name)")
        chosen.update(hits)
    if len(chosen) == len(params):
        raise LeanvitError(f"freeze {list(patterns)} leaves no parameter to train")
    for name in chosen:
        params[name].requires_grad_(False)
    tensors, count = len(chosen), sum(params[n].numel() for n in chosen)
    return tensors, count


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
