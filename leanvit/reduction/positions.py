"""Rotary positions that travel with their tokens.

Under rotary position embeddings (RoPE: EVA-02, DINOv3, timm ``Eva``) a token's position is not added to it
once: every attention rotates its query and key by angles computed from the token's patch coordinates. A
reduction that removes or merges tokens must therefore carry the rotations along:

- a kept token keeps exactly its own rotation (its row of the rotary table is gathered with it, as timm does
  for patch dropout with ``apply_keep_indices_nlc``);
- a fused token (EViT) stands for no patch: it gets no rotation, as the prefix tokens (class, registers);
- a merged token (ToMe) gets the size-weighted mean of the coordinates of the patches it absorbed
  (``position="mean"``, the default) or keeps the position of the token it was merged into (``"dst"``).
  Both RoPE families compute their angles linearly from the coordinates, so the mean of the coordinates is
  the mean of the angles: :class:`RotaryPositions` merges angles with the same size-weighted average as the
  tokens and evaluates sine and cosine of the result.

:class:`RotaryPositions` holds one row per token of the *whole* sequence (prefix tokens included, with the
identity rotation: sine 0, cosine 1), so that the row operations that move tokens move their positions too.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction.rows import take_rows

__all__ = ["RotaryPositions", "rope_angles", "rope_table", "MERGED_POSITIONS"]

#: How a merged token's position is chosen (ToMe under RoPE).
MERGED_POSITIONS = ("mean", "dst")


def _layout(x: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """Per-frequency values (..., F) in the channel layout of timm's rotary tables (..., 2F)."""
    return torch.cat([x, x], dim=-1) if rotate_half else x.repeat_interleave(2, -1)


def rope_table(angles: torch.Tensor, rotate_half: bool, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """timm's concatenated ``[sin, cos]`` rotary table (..., 4F) from per-frequency angles (..., F)."""
    sin, cos = _layout(angles.sin(), rotate_half), _layout(angles.cos(), rotate_half)
    table = torch.cat([sin, cos], dim=-1)
    return table if dtype is None else table.to(dtype)


def rope_angles(rope: nn.Module, grid: tuple, device=None) -> torch.Tensor:
    """The angles (H * W, F) of timm's rotary module ``rope`` on a ``grid`` = (H, W) of patches, in the order
    of its table, such that :func:`rope_table` gives its ``get_embed`` (checked in the tests).

    Supported: ``RotaryEmbeddingCat`` (EVA-02) and ``RotaryEmbeddingDinoV3`` (DINOv3); both compute the angles
    as coordinates times frequencies, which is what makes a mean position a mean angle.
    """
    from timm.layers.pos_embed_sincos import _build_grid  # timm's own grid, for tables equal to timm's

    kind = type(rope).__name__
    grid = [int(g) for g in grid]
    if kind == "RotaryEmbeddingDinoV3":
        coords = _build_grid(grid, grid_type="centered", grid_offset=rope.grid_offset,
                             grid_indexing=rope.grid_indexing, normalize_coords=rope.normalize_coords,
                             ndim=2).flatten(0, -2)
        periods = rope.periods
        coords = coords[:, :, None].to(device=periods.device, dtype=periods.dtype)
        angles = (2 * math.pi * coords / periods[None, None, :]).flatten(1)
    elif kind == "RotaryEmbeddingCat":
        bands = rope.bands
        coords = _build_grid(grid, grid_type=rope.grid_type, ref_feat_shape=rope.ref_feat_shape,
                             grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                             normalize_coords=rope.normalize_coords, device=bands.device)
        angles = (coords.unsqueeze(-1) * bands).flatten(-2).flatten(0, -2)
    else:
        raise LeanvitError(f"rotary embedding {kind} is not supported for merged positions "
                           "(supported: RotaryEmbeddingCat of EVA-02, RotaryEmbeddingDinoV3 of DINOv3)")
    return angles if device is None else angles.to(device)


class RotaryPositions:
    """The rotary positions of a token sequence, as reductions move them.

    Until a reduction moves tokens it holds timm's own table (``timm_rope``, (n, D) for the patch tokens), which
    the blocks get unchanged; afterwards ``table`` (B, N, D), one row per token of the whole sequence, prefix
    tokens first (identity rows), and, when merged tokens take mean positions, the ``angles`` (B, N, F) the
    rows are computed from. ``rotate_half``: the table's channel layout (timm's ``rotate_half``).
    """

    __slots__ = ("timm_rope", "_table", "angles", "rotate_half", "num_prefix_tokens", "batch")

    def __init__(self, timm_rope: Optional[torch.Tensor], table: Optional[torch.Tensor],
                 angles: Optional[torch.Tensor], rotate_half: bool, num_prefix_tokens: int, batch: int):
        self.timm_rope, self._table, self.angles = timm_rope, table, angles
        self.rotate_half, self.num_prefix_tokens, self.batch = rotate_half, num_prefix_tokens, batch

    @classmethod
    def from_timm(cls, rope: torch.Tensor, batch: int, num_prefix_tokens: int, rotate_half: bool,
                  angles: Optional[torch.Tensor] = None) -> "RotaryPositions":
        """From timm's table for the patch tokens ((n, D), or per sample (B, 1, n, D) after patch dropout) and
        optionally the angles (n, F) it was computed from."""
        if angles is not None:
            angles = angles.unsqueeze(0).expand(batch, -1, -1)
            angles = torch.cat([angles.new_zeros(batch, num_prefix_tokens, angles.shape[-1]), angles], dim=1)
        return cls(rope, None, angles, rotate_half, num_prefix_tokens, batch)

    @property
    def table(self) -> torch.Tensor:
        """(B, N, D): one row per token of the whole sequence (computed from the angles when the positions
        carry them: a gathered angle gives exactly the row timm computes for it)."""
        if self._table is None:
            if self.timm_rope is None:
                self._table = rope_table(self.angles, self.rotate_half)
            else:
                rope = self.timm_rope
                rope = rope[:, 0] if rope.ndim == 4 else rope.unsqueeze(0).expand(self.batch, -1, -1)
                self._table = torch.cat([_identity(rope, self.num_prefix_tokens), rope], dim=1)
        return self._table

    def rope(self) -> torch.Tensor:
        """The rotations of the non-prefix tokens as timm's attention takes them: timm's own table until
        tokens moved, then (B, 1, n, D)."""
        if self.timm_rope is not None:
            return self.timm_rope
        return self.table[:, self.num_prefix_tokens:].unsqueeze(1)

    def _new(self, table, angles) -> "RotaryPositions":
        return RotaryPositions(None, table, angles, self.rotate_half, self.num_prefix_tokens, self.batch)

    def take(self, index: torch.Tensor, append_identity: bool = False) -> "RotaryPositions":
        """The rows ``index`` (B, M) of the whole sequence, optionally followed by one identity row (a fused
        token: no rotation)."""
        if self.angles is not None:  # the rows follow from the angles when asked
            angles = take_rows(self.angles, index)
            if append_identity:
                angles = torch.cat([angles, angles.new_zeros(angles.shape[0], 1, angles.shape[-1])], dim=1)
            return self._new(None, angles)
        table = take_rows(self.table, index)
        if append_identity:
            table = torch.cat([table, _identity(table, 1)], dim=1)
        return self._new(table, None)

    def rows(self, order: torch.Tensor) -> "RotaryPositions":
        """The rows ``order`` (B, N') of the sequence (after a merge: a merged token keeps the row of the token
        it was merged into)."""
        return self._new(take_rows(self.table, order), None)

    def with_angles(self, angles: torch.Tensor) -> "RotaryPositions":
        """Positions given by per-token angles (B, N, F) (after a merge: size-weighted mean angles)."""
        return self._new(None, angles)


def _identity(like: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` identity rows (sine 0, cosine 1) per sample for a table like ``like`` (B, *, D)."""
    B, D = like.shape[0], like.shape[-1]
    return torch.cat([like.new_zeros(B, count, D // 2), like.new_ones(B, count, D // 2)], dim=-1)
