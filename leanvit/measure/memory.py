"""Peak memory of one inference forward pass, exact and repeatable on CPU too."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from leanvit.measure.timing import prepare_model_input
from leanvit.utils import sync_device

__all__ = ["forward_peak_memory_mb"]


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that operators create and that are still alive; keeps the peak.

    As a ``TorchDispatchMode`` it sees every operator's outputs; each new storage is counted once (views
    share it) and uncounted when it is freed (a weak reference's callback). Storages in ``ignore`` (the
    model's weights and the input) are not counted."""

    def __init__(self, ignore=()):
        super().__init__()
        self.ignore = set(ignore)
        self.seen = WeakIdKeyDictionary()
        self.refs = set()
        self.current = 0
        self.peak = 0

    def _freed(self, nbytes: int, ref) -> None:
        self.current -= nbytes
        self.refs.discard(ref)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st in self.seen or st.data_ptr() in self.ignore:
                continue
            n = st.nbytes()
            self.seen[st] = n
            self.refs.add(weakref.ref(st, lambda ref, n=n: self._freed(n, ref)))
            self.current += n
            self.peak = max(self.peak, self.current)
        return out


@torch.inference_mode()
def forward_peak_memory_mb(model: nn.Module, batch_size: int = 32, img_size=224, device="cpu",
                           dtype=torch.float32, in_chans: int = 3) -> Optional[float]:
    """Memory one inference forward pass needs on top of the loaded model and its input, in MiB.

    CUDA: the allocator's peak during the pass minus what was allocated before it.
    Other devices (CPU): the peak total size of the tensors the pass creates (activations, attention
    outputs, logits) that are alive at the same time, counted operator by operator; exact and
    repeatable, but scratch buffers a kernel allocates internally and frees before returning are not
    seen (process RSS would be too noisy on a shared machine to compare models)."""
    model, x, device, _ = prepare_model_input(model, batch_size, img_size, device, dtype, in_chans)
    if device.type == "cuda":
        model(x)  # first-call allocations (cuBLAS workspaces, lazy init) are not the forward's working memory
        sync_device(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(x)
        sync_device(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    owned = [*model.parameters(), *model.buffers(), x]
    with _LiveTensorBytes(ignore={t.untyped_storage().data_ptr() for t in owned}) as counter:
        model(x)
    return counter.peak / 2**20


