"""The data loaders of every task, built here and only here.

A task gives its datasets and how samples make a batch (:attr:`leanvit.tasks.Task.collate_fn`); the training
engine calls :func:`training_loaders` (a resumable order seeded per sample, one shard of it per process, this
process's shard of the validation set) and the commands :func:`eval_loader` (the whole split, in order).
A loader worker's :class:`LeanvitError` (a bad mask, an unreadable image) reaches the caller as the one-line
error it was (:class:`OneLineErrors`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch

from leanvit.data.sampling import ResumableSampler, SeededSamples, train_sampler
from leanvit.errors import LeanvitError

__all__ = ["OneLineErrors", "TrainLoaders", "training_loaders", "eval_loader"]


class OneLineErrors:
    """A data loader whose workers' :class:`LeanvitError` reaches the caller as the one-line error it was, not
    as the worker's traceback text that torch wraps it in."""

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


def _loader(dataset, batch_size: int, workers: int, pin_memory: bool, collate_fn: Optional[Callable],
            sampler=None, drop_last: bool = False) -> OneLineErrors:
    return OneLineErrors(torch.utils.data.DataLoader(
        dataset, batch_size=int(batch_size), sampler=sampler, shuffle=False, drop_last=drop_last,
        num_workers=int(workers), pin_memory=pin_memory, collate_fn=collate_fn))


def eval_loader(dataset, batch_size: int = 64, workers: int = 0, device="cpu",
                collate_fn: Optional[Callable] = None) -> OneLineErrors:
    """Batches of ``dataset`` in order (``collate_fn``: the task's; None: torch's default)."""
    return _loader(dataset, batch_size, workers, torch.device(device).type == "cuda", collate_fn)


class TrainLoaders(NamedTuple):
    """What :func:`training_loaders` builds."""
    train_set: Any           # the training set, its transforms seeded per sample (:class:`SeededSamples`)
    train_loader: Any
    val_loader: Any          # this process's shard of the validation set
    sampler: Any             # a :class:`ResumableSampler` (exact mid-epoch resumption)
    iters: int               # optimizer steps per epoch


def training_loaders(train_set, val_set, cfg: Dict[str, Any], env,
                     collate_fn: Optional[Callable] = None) -> TrainLoaders:
    """The loaders of a training run on process ``env.rank`` of ``env.world_size`` (``cfg``: the resolved
    recipe: ``batch_size`` per process, ``workers``, ``seed``, ``repeated_aug``, ``max_train_batches``,
    ``iterations``). Exact resumption: the order depends only on (seed, epoch) and can skip what was trained;
    each sample's transforms are seeded from (seed, epoch, rank, position). ``iterations`` (a budget in
    optimizer steps) sets ``cfg["epochs"]`` to the whole epochs that cover it."""
    bs = int(cfg["batch_size"])
    pin = env.device.type == "cuda"
    sampler = ResumableSampler(train_sampler(train_set, cfg, env), env.rank)
    train_set = SeededSamples(train_set, cfg["seed"], env.rank)
    train_loader = _loader(train_set, bs, cfg["workers"], pin, collate_fn, sampler=sampler, drop_last=True)
    if len(train_loader) == 0:
        raise LeanvitError(f"the training set ({len(train_set)} images per process) is smaller than one "
                           f"batch of {bs}")
    val_shard = torch.utils.data.Subset(val_set, list(range(env.rank, len(val_set), env.world_size)))
    val_loader = _loader(val_shard, bs, cfg["workers"], pin, collate_fn)
    iters = len(train_loader)
    if cfg.get("max_train_batches"):
        iters = min(iters, int(cfg["max_train_batches"]))
    if cfg.get("iterations"):
        cfg["epochs"] = max(1, math.ceil(int(cfg["iterations"]) / iters))
    return TrainLoaders(train_set, train_loader, val_loader, sampler, iters)
