"""What trains a run's model, whatever its task: optimizer, learning-rate schedule, grad scaler and EMA."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3

from leanvit.train.distributed import DistEnv
from leanvit.train.state import TrainState

__all__ = ["build_state"]


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
