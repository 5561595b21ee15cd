"""The token-reorganization primitive of EViT (Liang et al., ICLR 2022).

Given the residual stream after attention and each token's head-averaged class-token attention, keep
the ``k`` most attended non-prefix tokens (in descending score order, as the reference's sorted top-k
does) and, optionally, fuse the rest into one token: their sum weighted by the raw attention scores
(not renormalized), appended last. Prefix tokens (class, distillation, registers) always stay in front.

Everything is batched: one sort and one row read per call, fixed shapes, no per-sample Python
(batch-1 latency counts every kernel launch: see ``benchmarks/bench_export.py``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from timm.layers import register_notrace_function

from leanvit.errors import LeanvitError
from leanvit.reduction.rows import put_rows, put_rows_, take_rows

__all__ = ["num_kept", "class_token_attention", "reorganize", "reorganize_at_rate", "FUSED_TOKEN_ID",
           "kept_token_masks", "tokens_to_grid", "write_tokens"]

#: Patch id used in the kept-index bookkeeping for a fused token (never a real patch index).
FUSED_TOKEN_ID = -1


def check_keep_rate(keep_rate: float, where: str = "keep_rate") -> float:
    try:
        r = float(keep_rate.item() if torch.is_tensor(keep_rate) else keep_rate)
    except (TypeError, ValueError):
        raise LeanvitError(f"{where} must be a number in (0, 1], got {keep_rate!r}") from None
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise LeanvitError(f"{where} must be in (0, 1], got {keep_rate!r}")
    return r


def num_kept(keep_rate: float, num_tokens: int) -> int:
    """Number of tokens kept out of ``num_tokens`` non-prefix tokens: ``ceil(keep_rate * n)``, at least 1."""
    return max(1, min(num_tokens, math.ceil(keep_rate * num_tokens)))


def class_token_attention(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int = 1
                          ) -> torch.Tensor:
    """Head-averaged attention of the class query (token 0) to the non-prefix keys.

    ``q``, ``k``: (B, H, N, d). Returns (B, N - num_prefix_tokens): softmax over all N keys of the class
    token's row, then averaged over heads, then restricted to the non-prefix tokens — the score EViT
    reads from the full attention matrix, computed here in O(N) without building it.
    """
    # a broadcast multiply-and-sum, not ``q0 @ k.T``: k is a strided view of the qkv projection, and the
    # matmul would first copy it (4x slower at batch 8, as slow at batch 1)
    logits = (k * (q[:, :, :1] * scale)).sum(dim=-1)  # (B, H, N)
    # softmax in fp32 (no-op casts for fp32 input; no dtype branch, so torch.fx traces it wherever it is called)
    probs = logits.float().softmax(dim=-1).to(q.dtype)
    return probs[:, :, num_prefix_tokens:].mean(dim=1)


def reorganize(x: torch.Tensor, scores: torch.Tensor, num_keep: int, fuse: bool = True,
               num_prefix_tokens: int = 1, token_ids: Optional[torch.Tensor] = None, positions=None):
    """Keep the ``num_keep`` top-scoring non-prefix tokens of ``x`` and fuse (or drop) the others.

    x: (B, N, C); scores: (B, N - P) for the non-prefix tokens; token_ids: optional (B, N - P) long
    tensor of the original patch index of each non-prefix token (``FUSED_TOKEN_ID`` for a fused one);
    positions: optional :class:`leanvit.reduction.positions.RotaryPositions` of the sequence.
    Returns the new sequence (B, P + num_keep [+1], C) and the updated token ids (or None), and, when
    ``positions`` is given, the positions of the new sequence (kept tokens keep their rows, a fused token gets
    no rotation).
    """
    P = num_prefix_tokens
    B, N, C = x.shape
    n = N - P
    if scores.ndim != 2 or scores.shape[0] != B or scores.shape[1] != n:
        raise LeanvitError(f"scores must have shape ({B}, {n}), got {list(scores.shape)}")
    if num_keep < 1 or num_keep > n:
        raise LeanvitError(f"num_keep must be in [1, {n}], got {num_keep}")
    order_scores, order = scores.sort(dim=1, descending=True)
    new_ids = None if token_ids is None else token_ids.gather(1, order[:, :num_keep])
    fusing = fuse and num_keep < n
    if positions is not None:
        rows = torch.cat([torch.arange(P, device=x.device).expand(B, -1), order[:, :num_keep] + P], dim=1)
        positions = positions.take(rows, append_identity=fusing)
    # One row read of the tokens in score order (leanvit.reduction.rows); kept and fused tokens are views of it.
    if not fusing:  # dropping: read only the rows that stay
        order = order[:, :num_keep]
    ordered = take_rows(x, order + P)
    if not fusing:
        out = torch.cat([x[:, :P], ordered], dim=1)
        return (out, new_ids) if positions is None else (out, new_ids, positions)
    weights = order_scores[:, num_keep:].unsqueeze(-1)
    if weights.dtype != x.dtype:
        weights = weights.to(x.dtype)
    fused = (ordered[:, num_keep:] * weights).sum(dim=1, keepdim=True)
    if new_ids is not None:
        new_ids = torch.cat([new_ids, new_ids.new_full((B, 1), FUSED_TOKEN_ID)], dim=1)
    out = torch.cat([x[:, :P], ordered[:, :num_keep], fused], dim=1)
    return (out, new_ids) if positions is None else (out, new_ids, positions)


@register_notrace_function  # an FX leaf: how many tokens stay depends on the input's size
def reorganize_at_rate(x: torch.Tensor, scores: torch.Tensor, keep_rate: float, fuse: bool = True,
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """:func:`reorganize` keeping ``num_kept(keep_rate, n)`` of the ``n`` non-prefix tokens of ``x``; ``x``
    itself when that is all of them. The reorganizing step of an FX-traced EViT block (torch.fx traces
    sizes as proxies, so this step runs as one call on the real tensors; also scriptable)."""
    n = x.shape[1] - num_prefix_tokens
    k = num_kept(keep_rate, n)
    if k >= n:
        return x
    return reorganize(x, scores, k, fuse=fuse, num_prefix_tokens=num_prefix_tokens)[0]


# ---------------------------------------------------------------------------------------------
# Bookkeeping: which patches a reorganized sequence still holds
def kept_token_masks(kept_indices: Sequence[torch.Tensor], num_patches: int) -> List[torch.Tensor]:
    """Turn per-layer kept patch indices (as returned with ``return_kept_indices=True``) into
    boolean masks of shape (B, num_patches): True where the original patch is still a token of its own.
    The fused token (index ``FUSED_TOKEN_ID``) is not a patch and marks nothing."""
    masks = []
    for ids in kept_indices:
        mask = torch.zeros(ids.shape[0], num_patches + 1, dtype=torch.bool, device=ids.device)
        safe = torch.where(ids == FUSED_TOKEN_ID, torch.full_like(ids, num_patches), ids)
        mask.scatter_(1, safe, True)
        masks.append(mask[:, :num_patches])
    return masks


def tokens_to_grid(tokens: torch.Tensor, token_ids: torch.Tensor, num_patches: int, fuse: bool = True
                   ) -> torch.Tensor:
    """Scatter the image tokens of a reorganized sequence back onto the patch grid.

    tokens: (B, L, C) non-prefix tokens; token_ids: (B, L) their original patch indices
    (``FUSED_TOKEN_ID`` for a fused token). Returns (B, num_patches, C): each kept token at its patch;
    every other patch holds the sequence's last token when that is a fused token (``fuse=True``: the
    token the latest reorganization fused the removed ones into) and zeros otherwise.
    """
    B, L, C = tokens.shape
    if fuse:
        is_fused = (token_ids[:, -1:] == FUSED_TOKEN_ID).unsqueeze(-1)              # (B, 1, 1)
        fill = torch.where(is_fused, tokens[:, -1:], torch.zeros_like(tokens[:, -1:]))
    else:
        fill = tokens.new_zeros(B, 1, C)
    grid = fill.expand(B, num_patches + 1, C).clone()  # the extra slot collects fused tokens
    safe = torch.where(token_ids < 0, torch.full_like(token_ids, num_patches), token_ids)
    return put_rows_(grid, safe, tokens)[:, :num_patches]


def write_tokens(state: torch.Tensor, tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``state`` (B, num_patches + 1, C) with the non-prefix ``tokens`` (B, L, C) written at their patches
    (``token_ids`` (B, L)); fused tokens (``FUSED_TOKEN_ID``) go to the last slot. Out of place (autograd).
    What a dense backbone keeps of the tokens a reorganization removes: their features at removal."""
    spare = state.shape[1] - 1
    safe = torch.where(token_ids < 0, torch.full_like(token_ids, spare), token_ids)
    return put_rows(state, safe, tokens.to(state.dtype))
