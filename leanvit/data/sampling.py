"""Training-set order and per-sample seeding for exact resumption, shared by every task's training data.

A run resumed from any checkpoint, at an epoch boundary or mid-epoch, sees the same samples in the same order
with the same random transforms: the order depends only on (seed, epoch) (:class:`EpochShuffleSampler`, or
torch's ``DistributedSampler`` / timm's ``RepeatAugSampler`` under several processes),
:class:`ResumableSampler` can skip the positions already trained, and :class:`SeededSamples` seeds each
sample's transforms from (seed, epoch, rank, position).
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Dict

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler

__all__ = ["EpochShuffleSampler", "ResumableSampler", "SeededSamples", "sample_seed", "train_sampler"]


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


def train_sampler(dataset, cfg: Dict[str, Any], env):
    """The training order of ``dataset`` for process ``env.rank`` of ``env.world_size`` (see the module doc).
    A dataset with its own ``train_sampler(world_size, rank, seed)`` (tar shards: a locality-keeping order)
    gives it, unless ``repeated_aug``."""
    if hasattr(dataset, "train_sampler") and not cfg["repeated_aug"]:
        return dataset.train_sampler(env.world_size, env.rank, cfg["seed"])
    if cfg["repeated_aug"]:
        return RepeatAugSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, num_repeats=3)
    if env.distributed:
        return torch.utils.data.DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                                   shuffle=True, seed=cfg["seed"], drop_last=True)
    return EpochShuffleSampler(len(dataset), cfg["seed"])
