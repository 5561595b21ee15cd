"""Everything a run carries from step to step, and how it goes into and out of a checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """The model and what trains it, plus where the run stands.

    ``epoch``: epochs completed; ``step``: optimizer steps taken; ``best``: the best value of the task's main
    metric so far (-1 before any evaluation); ``history``: one metrics row per completed epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[Any] = None
    ema: Optional[Any] = None
    epoch: int = 0
    step: int = 0
    best: float = -1.0
    history: List[Dict[str, Any]] = field(default_factory=list)

    def checkpoint(self, **extra) -> Dict[str, Any]:
        """A resumable checkpoint (``extra``: model spec, classes, config, ...)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "step": self.step, "best_metric": self.best, "history": self.history,
                **extra}

    def load(self, obj: Dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint`."""
        self.model.load_state_dict(obj["model"])
        self.optimizer.load_state_dict(obj["optimizer"])
        if self.ema is not None and obj.get("ema") is not None:
            self.ema.module.load_state_dict(obj["ema"])
        if self.scaler is not None and obj.get("scaler"):
            self.scaler.load_state_dict(obj["scaler"])
        self.epoch = int(obj["epoch"])
        self.step = int(obj.get("step", 0))
        self.best = float(obj.get("best_metric", obj.get("best_top1", -1.0)))  # best_top1: older checkpoints
        # rows of older runs named the reduction's strength ``keep_rate`` whatever the method: read as ``strength``
        self.history = [{("strength" if k == "keep_rate" else k): v for k, v in row.items()}
                        for row in obj.get("history", [])]
