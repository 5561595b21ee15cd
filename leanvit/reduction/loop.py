"""The one block loop every reduction runs: embedding prologue, one step per block, gradient checkpointing,
intermediates.

A method customises the loop by its per-block ``step(i, block, tokens) -> tokens``. :class:`Tokens` is what
travels between blocks: the sequence ``x`` (prefix tokens first), its rotary positions ``pos`` (None for
absolute-position ViTs), and what a method tracks (``size``: ToMe's token sizes; ``ids``: which patches the
tokens are; ``memory``: features a dense restoration keeps of removed tokens). A step returns a new
:class:`Tokens` (``tokens._replace(...)``) and never changes the one it got, so gradient checkpointing can
run it again in the backward pass.
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from leanvit.reduction.families import BackboneFamily, family_named
from leanvit.reduction.swap import SwappedClass

__all__ = ["Tokens", "embed", "run_blocks", "plain_step", "ReducingBlockMixin", "patch_ids"]


class Tokens(NamedTuple):
    x: torch.Tensor
    pos: Any = None                        # RotaryPositions or None
    size: Optional[torch.Tensor] = None    # (B, N, 1) token sizes (merging)
    ids: Optional[torch.Tensor] = None     # method bookkeeping of which patches the tokens are
    memory: Optional[torch.Tensor] = None  # (B, patches + 1, C) features kept of removed tokens


def patch_ids(batch: int, n: int, device) -> torch.Tensor:
    """(B, n): patch i at position i."""
    return torch.arange(n, device=device).unsqueeze(0).expand(batch, -1)


def embed(family: BackboneFamily, model: nn.Module, images: torch.Tensor, angles: bool = False) -> Tokens:
    """The tokens entering the first block (the family's prologue)."""
    x, pos = family.embed(model, images, angles=angles)
    return Tokens(x, pos)


def plain_step(family: BackboneFamily) -> Callable:
    """The step of a block that does not reduce: the block's own forward."""
    def step(i: int, blk: nn.Module, t: Tokens) -> Tokens:
        return t._replace(x=family.block(blk, t.x, t.pos))
    return step


def run_blocks(model: nn.Module, tokens: Tokens, step: Callable, blocks: Optional[Sequence[nn.Module]] = None,
               take: Sequence[int] = ()) -> Tuple[Tokens, List[Tokens]]:
    """Run ``step(i, block, tokens)`` for each block of ``model`` (or ``blocks``), recomputed in the backward
    pass when the model checkpoints gradients; returns the last tokens and those after the blocks ``take``."""
    ckpt = getattr(model, "grad_checkpointing", False) and model.training and not torch.jit.is_scripting()
    taken = []
    for i, blk in enumerate(model.blocks if blocks is None else blocks):
        tokens = checkpoint(step, i, blk, tokens, use_reentrant=False) if ckpt else step(i, blk, tokens)
        if i in take:
            taken.append(tokens)
    return tokens, taken


class ReducingBlockMixin(SwappedClass):
    """Base of the block mixins of reduction methods: the block's family and prefix-token count."""

    num_prefix_tokens: int = 1
    family_name: str = "vit"

    @property
    def family(self) -> BackboneFamily:
        return family_named(self.family_name)
