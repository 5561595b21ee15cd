"""The process group of a run: one process, or many under ``torchrun`` (DistributedDataParallel)."""
from __future__ import annotations

import os
import random
import sys
import threading
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistEnv", "seed_everything", "seed_step"]


INIT_TIMEOUT_ENV = "LEANVIT_INIT_TIMEOUT"


@contextmanager
def _init_watchdog():
    """Under ``torchrun --max-restarts N`` (N > 0): a worker whose ``init_process_group`` has not returned
    after ``$LEANVIT_INIT_TIMEOUT`` seconds (default 60; 0 disables) exits with status 3, so that torchrun
    restarts the group again. Restarted gloo workers sometimes wait forever in gloo's full-mesh connect
    (seen with torch 2.14 on CPU, also without leanvit: benchmarks/elastic_gloo_check.py)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    seconds = float(os.environ.get(INIT_TIMEOUT_ENV, "60") or 0)
    if restarts <= 0 or seconds <= 0:
        yield
        return

    def fire():
        sys.stderr.write(f"leanvit: the process group did not connect within {seconds:.0f} s ({INIT_TIMEOUT_ENV}); "
                         "exiting with status 3 so that torchrun restarts the workers\n")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class DistEnv:
    """Rank, world size and device of this process (torchrun's environment variables, else one process)."""

    def __init__(self, device: Optional[str] = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        self._owns_group = False
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with _init_watchdog():
                dist.init_process_group(backend=backend)
            self._owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values) -> list:
        t = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            if dist.get_backend() == "nccl":
                t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model the training step calls: ``model`` in DistributedDataParallel when distributed."""
        if not self.distributed:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = (int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank) * 104_729) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed Python, NumPy and torch before optimizer step ``step`` (drop-path, mixup, ...): a step's
    random numbers depend only on (seed, step, rank), so a run resumed mid-epoch draws the same ones."""
    s = (int(seed) * 2_654_435_761 + int(step) * 40_503 + int(rank) * 104_729 + 12_345) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
