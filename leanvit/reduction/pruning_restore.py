"""The full token map of a pruned ViT (EViT and every :class:`~leanvit.reduction.pruning.PruningMethod`), for
dense heads.

- ``keep`` (default): a removed token keeps the features it had when it was removed (after the attention of
  the block that removed it); kept tokens take their final features. Cost: one row write of the current
  tokens per pruning block and a (B, patches + 1, C) buffer, nothing per later block. (SViT, Liu et al.
  WACV 2024, keeps pruned tokens in the map the same way.)
- ``reactivate`` (N last blocks, 1 by default): as ``keep``, and the removed tokens re-enter the sequence, in
  place at their patch (with their own rotary positions under RoPE), for the last N blocks, which then run on
  all the tokens (Token Cropr's last-layer fusion, CVPR 2025; SViT's reactivation). N cannot exceed the
  blocks after the last pruning one; a fused token is dropped then.
- ``fused``: every removed patch takes the fused token of the sequence (the mean of the kept tokens when
  tokens are dropped): the cheapest and the coarsest, kept for comparison.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from leanvit.reduction.loop import Tokens, patch_ids, run_blocks
from leanvit.reduction.reorg import write_tokens
from leanvit.reduction.rows import put_rows_

__all__ = ["restored_tokens"]


def _kept_map(model: nn.Module, x: torch.Tensor, restore) -> torch.Tensor:
    family = model.reduction_family
    t = model._tokens(x, track=True)
    P = model.num_prefix_tokens
    B, N, C = t.x.shape
    n = N - P
    start = t
    t = t._replace(memory=t.x.new_zeros(B, n + 1, C))  # each patch's latest features; last slot: fused tokens
    locations = set(model.evit_locations)
    depth = len(model.blocks)
    first_full = depth - restore.blocks if restore.name == "reactivate" else depth

    def step(i, blk, t: Tokens) -> Tokens:
        if i == first_full:  # removed tokens re-enter in place; a fused token is not a patch: it goes
            memory = write_tokens(t.memory, t.x[:, P:], t.ids)
            t = Tokens(torch.cat([t.x[:, :P], memory[:, :n]], dim=1), start.pos, None, patch_ids(B, n, t.x.device),
                       memory)
        if i in locations and i < first_full:
            out = blk.forward_reorg(t.x, None, t.ids, t.memory, pos=t.pos)
            return t._replace(x=out[0], ids=out[1], memory=out[2], pos=out[3] if t.pos is not None else None)
        return t._replace(x=family.block(blk, t.x, t.pos))

    t, _ = run_blocks(model, t, step)
    memory = write_tokens(t.memory, t.x[:, P:], t.ids)
    return model.norm(memory[:, :n])


def _fused_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every removed patch takes the fused token the latest pruning appended (the mean of the kept tokens when
    tokens are dropped); an earlier fused token still in the sequence is not a patch."""
    tokens, kept = model.forward_features(x, return_kept_indices=True)
    ids = kept[-1]
    patches = tokens[:, model.num_prefix_tokens:]
    B, _, C = patches.shape
    H, W = model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    n = H * W
    fill = patches[:, -1:] if model.fuse else patches.mean(1, keepdim=True)
    grid = fill.expand(B, n + 1, C).clone()
    return put_rows_(grid, torch.where(ids < 0, torch.full_like(ids, n), ids), patches)[:, :n]


def restored_tokens(model: nn.Module, x: torch.Tensor, restore) -> torch.Tensor:
    """The last block's patch tokens of the pruned ``model`` on images ``x`` after the final norm, one per
    patch (B, patches, C), filled by the strategy ``restore`` (see the module docstring)."""
    if restore.name == "fused":
        return _fused_map(model, x)
    return _kept_map(model, x, restore)
