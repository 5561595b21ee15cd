"""The token-merging primitive of ToMe (Bolya et al., ICLR 2023), partitioned as the published code does.

Bipartite soft matching, as in facebookresearch/ToMe (``tome/merge.py``): the *whole* sequence is split
alternately into set A (even positions) and set B (odd positions), prefix tokens included. With a class
token at position 0, it lands in A and its row of similarities is set to -inf, so it is never merged
away; a distillation token (position 1) lands in B and its column is set to -inf, so nothing is merged
into it. Register tokens (timm's ``reg_tokens``, positions 1..R after the class token) are protected the
same way: those in A by their row, those in B by their column. Each A token is paired with its most
similar B token (cosine similarity of the metric); the ``r`` A tokens with the most similar partners are
merged into them. At most half of the non-prefix tokens can be merged in one block.

The new sequence is the prefix tokens in their original order (class token first), then the unmerged A
tokens, then the B tokens. As in the reference, the unmerged A tokens are put back in their original
order when the sequence has protected tokens (a class token); without prefix tokens (global-pool ViTs)
they stay in the order of the sort, as there.

Merging is a size-weighted average: every token carries its size (how many patches it stands for), a
merged token is the size-weighted mean of the tokens merged into it, and sizes add. Everything is
batched (fixed shapes, one sort and a few row reads and writes per block: :mod:`leanvit.reduction.rows`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from leanvit.reduction.rows import add_rows_, take_rows

__all__ = ["MergePlan", "bipartite_soft_matching", "merge_tokens", "merge_layout", "map_groups", "unmerge"]


class MergePlan(NamedTuple):
    """What one block merges. ``src`` (B, r): indices into set A of the merged tokens; ``dst`` (B, r):
    indices into set B of their partners; ``unm`` (B, |A| - r): indices into A of the tokens kept as they
    are, prefix tokens first, in the output order; ``num_prefix_tokens``: P."""
    src: torch.Tensor
    dst: torch.Tensor
    unm: torch.Tensor
    num_prefix_tokens: int


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix_tokens: int = 1) -> MergePlan:
    """Match the tokens of one block. ``metric``: (B, N, d) for the *whole* sequence (prefix tokens first);
    ``r`` must be at most ``(N - num_prefix_tokens) // 2``."""
    P = num_prefix_tokens
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)                 # (B, |A|, |B|) cosine similarities
        if P:
            scores[:, :(P + 1) // 2] = -torch.inf        # prefix tokens in A: never merged away
            scores[:, :, :P // 2] = -torch.inf           # prefix tokens in B: nothing merged into them
        best, partner = scores.max(dim=-1)                # each A token's most similar B token
        order = best.argsort(dim=-1, descending=True)     # most similar pairs first
        src = order[:, :r]
        unm = order[:, r:]
        if P:  # the prefix tokens (in A: the lowest indices) first, every kept A token in original order
            unm = unm.sort(dim=-1).values
        return MergePlan(src, partner.gather(1, src), unm, P)


def merge_layout(plan: MergePlan, N: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The output sequence as positions into the input (B, N') and the output position of every merged
    A token's partner (B, r)."""
    P = plan.num_prefix_tokens
    pa, pb = (P + 1) // 2, P // 2
    nb = N // 2
    B = plan.unm.shape[0]
    order = torch.cat([torch.arange(P, device=device).expand(B, -1), 2 * plan.unm[:, pa:],
                       (1 + 2 * torch.arange(pb, nb, device=device)).expand(B, -1)], dim=1)
    dst_out = P + (plan.unm.shape[1] - pa) + (plan.dst - pb)
    return order, dst_out


def merge_tokens(x: torch.Tensor, size: Optional[torch.Tensor], plan: MergePlan, layout=None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` (B, N, C) with token sizes ``size`` (B, N, 1), or None (all 1), as ``plan`` says
    (``layout``: :func:`merge_layout` of the plan, when already computed). Returns the new sequence
    (B, N - r, C) and its sizes."""
    B, N, C = x.shape
    if size is None:
        size = x.new_ones(B, N, 1)
    order, dst_out = merge_layout(plan, N, x.device) if layout is None else layout
    out = take_rows(x, order)
    new_size = take_rows(size, order)
    src_pos = 2 * plan.src                                   # positions in x of the merged A tokens
    src_size = take_rows(size, src_pos)                      # (B, r, 1)
    new_size = add_rows_(new_size, dst_out, src_size)
    # size-weighted average, touching only the merged rows:
    #   x_b' = (s_b x_b + sum s_i x_i) / S = x_b + sum s_i (x_i - x_b) / S,   S = s_b + sum s_i
    src_x = take_rows(x, src_pos)
    dst_x = take_rows(x, 1 + 2 * plan.dst)
    delta = (src_x - dst_x) * (src_size / take_rows(new_size, dst_out))
    add_rows_(out, dst_out, delta)  # out is a fresh copy
    return out, new_size


def map_groups(groups: torch.Tensor, plan: MergePlan, N: int, layout=None) -> torch.Tensor:
    """Follow a merge: ``groups`` (B, num_patches) holds, for each original patch, the index among the
    non-prefix tokens of the token holding it before the merge of a sequence of N tokens; returns the
    same after it."""
    P = plan.num_prefix_tokens
    order, dst_out = merge_layout(plan, N, groups.device) if layout is None else layout
    B = groups.shape[0]
    new_index = torch.empty(B, N, dtype=torch.long, device=groups.device)
    new_index.scatter_(1, order, torch.arange(order.shape[1], device=groups.device).expand(B, -1))
    new_index.scatter_(1, 2 * plan.src, dst_out)
    return new_index.gather(1, groups + P) - P


def unmerge(tokens: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The full token map back: ``tokens`` (B, L, C) non-prefix tokens after merging, ``groups``
    (B, num_patches) the token each patch was merged into; every patch takes that token's features
    (B, num_patches, C), as tomesd's unmerge copies a merged token back to its sources."""
    return take_rows(tokens, groups)
