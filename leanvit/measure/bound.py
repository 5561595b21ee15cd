"""The token-count bound of a reduced ViT: what its sequence lengths cost with no reduction work.

A reduced ViT runs each block's attention on the tokens entering it and the MLP on the tokens left after the
reduction. :class:`TokenCountBound` runs the *unreduced* model at exactly those lengths, truncating the sequence
instead of selecting or merging (no scores, no sorting, no row moves, no position bookkeeping): the speed-up a
reduction could reach if its own work were free. Benchmarks print the measured speed-up beside it.
"""
from __future__ import annotations

import copy
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from leanvit.reduction import remove_reduction
from leanvit.reduction.families import family_of
from leanvit.reduction.positions import RotaryPositions

__all__ = ["sequence_lengths", "TokenCountBound", "truncated_tokens"]


@torch.inference_mode()
def sequence_lengths(vit: nn.Module, x: torch.Tensor) -> List[Tuple[int, int]]:
    """(attention length, MLP length) of every block of ``vit`` (reduced or not) on images ``x``."""
    lengths, hooks = [], []
    for blk in vit.blocks:
        entry = []
        hooks.append(blk.norm1.register_forward_hook(lambda m, a, o, e=entry: e.append(a[0].shape[1])))
        hooks.append(blk.norm2.register_forward_hook(lambda m, a, o, e=entry: e.append(a[0].shape[1])))
        lengths.append(entry)
    try:
        was = vit.training
        vit.eval()
        vit(x)
        vit.train(was)
    finally:
        for h in hooks:
            h.remove()
    return [(e[0], e[-1]) for e in lengths]


def truncated_tokens(vit: nn.Module, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """The tokens (before the final norm) of the unreduced ``vit`` on images ``x`` when, after each block's
    attention, only the first ``lengths[i]`` tokens go on (rotary rows sliced alike): no reduction work."""
    family = family_of(vit, "the token-count bound")
    P = vit.num_prefix_tokens
    t, pos = family.embed(vit, x)
    for blk, n in zip(vit.blocks, lengths):
        p = None if pos is None else RotaryPositions(pos.timm_rope[..., :t.shape[1] - P, :], None, None,
                                                     pos.rotate_half, P, pos.batch)
        t = family.attn_residual(blk, t, family.attention(blk, blk.norm1(t), p, P)[0])[:, :n]
        t = family.mlp_residual(blk, t)
    return t


class TokenCountBound(nn.Module):
    """A copy of ``vit`` without its reduction, running the sequence ``lengths`` ((attention, MLP) per block,
    from :func:`sequence_lengths`) by truncation. ``forward`` gives logits, ``forward_features`` the tokens."""

    def __init__(self, vit: nn.Module, lengths: Sequence[Tuple[int, int]]):
        super().__init__()
        self.vit = remove_reduction(copy.deepcopy(vit))
        self.lengths = [tuple(n) for n in lengths]
        family_of(self.vit, "the token-count bound", range(len(self.vit.blocks)))  # a clear error now, not later

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.norm(truncated_tokens(self.vit, x, [m for _, m in self.lengths]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.forward_features(x))
