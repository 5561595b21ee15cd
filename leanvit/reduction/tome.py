"""Token merging (ToMe; Bolya et al., ICLR 2023) for timm Vision Transformers.

``apply_tome(model, r)`` makes a timm ``VisionTransformer`` (DeiT, DeiT III, ViT, register-token ViTs,
global-pool ViTs) merge ``r`` tokens in every block, in place. In each block, between attention and MLP:

1. *Bipartite soft matching* (:mod:`leanvit.reduction.tome_merge`), partitioned as the published code
   (facebookresearch/ToMe): the block's attention keys, averaged over heads and L2-normalised, are the
   similarity metric; the whole sequence is split alternately into sets A and B, the class token (in A),
   a distillation token and register tokens (in A or B) being protected by a score of -inf; each A token
   is paired with its most similar B token and the ``r`` A tokens with the most similar partners are
   merged into them. At most half of the ``n`` non-prefix tokens can go in one block, so a block merges
   ``min(r, n // 2)`` of them.
2. *Size-weighted merging*: every token carries its size ``s`` (the number of patches it stands for); a
   merge is the average of the merged tokens weighted by their sizes, and the sizes add.
3. *Proportional attention*: once tokens have sizes, attention becomes ``softmax(q k^T / sqrt(d) + log s)``
   (a merged key counts as many). It runs through ``F.scaled_dot_product_attention`` with ``log s`` as a
   float attention mask (no explicit softmax); the explicit path is used only when the timm Attention has
   ``fused_attn=False`` (:mod:`leanvit.reduction.attention` holds the one copy of timm's attention).

Prefix tokens (class, distillation, registers) are never merged, neither away nor into. LayerScale
(``ls1``/``ls2``, DeiT III), q/k norms and attention gates of the timm block are kept. No parameter is
added; with ``r=0`` every block runs timm's own forward, so the logits are exactly the original model's.
Like EViT, the classes of the model and blocks are swapped for subclasses (names and weights stay);
:func:`remove_tome` swaps them back.

The merge schedule ``r`` is an int (the same in every block), one int per block, or, with
``schedule="decreasing"``, an int turned into a linearly decreasing per-block schedule (from ``2r`` down to
0, about the same total). ``model.r = 8`` changes it; ``model(x, r=8)`` overrides it for one call.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction.families import family_named, family_of
from leanvit.reduction.loop import ReducingBlockMixin, Tokens, embed, patch_ids, run_blocks
from leanvit.reduction.positions import MERGED_POSITIONS
from leanvit.reduction.registry import ReductionMethod, applied_reduction, cosine_schedule, register_reduction
from leanvit.reduction.swap import SwappedClass, restore_class, swap_class
from leanvit.reduction.tome_merge import (
    MergePlan,
    bipartite_soft_matching,
    map_groups,
    merge_layout,
    merge_tokens,
    unmerge,
)

__all__ = ["apply_tome", "remove_tome", "is_tome", "check_r", "per_layer_r", "decreasing_schedule",
           "bipartite_soft_matching", "merge_tokens", "map_groups", "unmerge", "MergePlan", "tokens_per_block",
           "ToMeMethod", "SCHEDULES"]

RValue = Union[int, Sequence[int]]
SCHEDULES = ("constant", "decreasing")


# ---------------------------------------------------------------------------------------------
# The knob
def check_r(value, where: str = "r") -> int:
    """``value`` as a merge count: an integer >= 0 (a clear error otherwise)."""
    try:
        v = value.item() if torch.is_tensor(value) else value
        f = float(v)
    except (TypeError, ValueError):
        raise LeanvitError(f"{where} must be an integer >= 0 (tokens merged per block), got {value!r}") from None
    if math.isnan(f) or f < 0 or f != int(f) or isinstance(v, bool):
        raise LeanvitError(f"{where} must be an integer >= 0 (tokens merged per block), got {value!r}")
    return int(f)


def decreasing_schedule(r: int, depth: int) -> Tuple[int, ...]:
    """A linearly decreasing per-block schedule, from ``2r`` in the first block to 0 in the last
    (about ``r x depth`` merges in all, as a constant ``r``)."""
    r = check_r(r)
    if depth <= 1:
        return (r,) * depth
    return tuple(int(round(2 * r * (depth - 1 - i) / (depth - 1))) for i in range(depth))


def per_layer_r(value: RValue, depth: int, schedule: str = "constant") -> Tuple[int, ...]:
    """One merge count per block from an int (``schedule`` constant or decreasing) or a per-block list."""
    if schedule not in SCHEDULES:
        raise LeanvitError(f"ToMe schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise LeanvitError(f"got {len(value)} merge counts r for a model of {depth} blocks")
        return tuple(check_r(v, f"r[{i}]") for i, v in enumerate(value))
    r = check_r(value)
    return decreasing_schedule(r, depth) if schedule == "decreasing" else (r,) * depth


def check_mergeable(model: nn.Module, rs: Sequence[int]) -> None:
    """A clear error for a merge count no block can reach: a block merges at most half of the patch tokens, so
    an r above ``num_patches // 2`` (at the model's input size) would be clamped at run time and recorded as a
    number the model never ran."""
    n = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if n and rs and max(rs) > n // 2:
        raise LeanvitError(f"tome:{max(rs)} merges more tokens than a block has to merge: ToMe merges at most "
                           f"{n // 2} per block here (half of the {n} patch tokens at the model's input size); "
                           f"give r <= {n // 2}")


def tokens_per_block(num_patches: int, r_per_block: Sequence[int]) -> List[int]:
    """Mergeable tokens entering each block (and, last, leaving the model) under the rule
    ``n -> n - min(r, n // 2)``."""
    counts = [num_patches]
    for r in r_per_block:
        n = counts[-1]
        counts.append(n - min(r, n // 2))
    return counts


# ---------------------------------------------------------------------------------------------
# Block
class ToMeBlockMixin(ReducingBlockMixin):
    """Added to a block's class: merge ``tome_r`` tokens between attention and MLP."""

    tome_r: int = 0
    prop_attn: bool = True

    def forward_merge(self, x: torch.Tensor, size: Optional[torch.Tensor] = None, r: Optional[int] = None,
                      groups: Optional[torch.Tensor] = None, pos=None):
        """Block forward that merges ``min(r, n // 2)`` of the ``n`` non-prefix tokens; returns
        (x, size, groups), plus the positions of the merged sequence when ``pos`` (RoPE) is given.
        ``groups`` (B, num_patches), if given, is mapped along (see :func:`map_groups`)."""
        r = self.tome_r if r is None else r
        P = self.num_prefix_tokens
        family = self.family
        r = min(int(r), (x.shape[1] - P) // 2)
        if r <= 0 and size is None:  # nothing merged so far nor here: the unmodified block, bit for bit
            out = (family.unmodified(self, x, pos), size, groups)
            return out if pos is None else out + (pos,)
        out, _, metric = family.attention(self, self.norm1(x), pos, P, size if self.prop_attn else None,
                                          keys=r > 0)
        x = family.attn_residual(self, x, out)
        if r > 0:
            plan = bipartite_soft_matching(metric, r, P)
            layout = merge_layout(plan, x.shape[1], x.device)
            if groups is not None:
                groups = map_groups(groups, plan, x.shape[1], layout)
            if pos is not None:
                pos = merge_positions(pos, size, plan, x.shape[1], layout)
            x, size = merge_tokens(x, size, plan, layout)
        x = family.mlp_residual(self, x)
        return (x, size, groups) if pos is None else (x, size, groups, pos)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rope = self.family.call_positions(args, kwargs)
        if rope is not None:  # called by timm's own loop with timm's rotary table
            if self.tome_r > 0:
                raise LeanvitError("a merging block under RoPE runs inside its model's loop "
                                   "(model.forward_features), which moves the rotary positions with the tokens")
            return self._swap_base.forward(self, x, rope=rope)
        return self.forward_merge(x)[0]

    def extra_repr(self) -> str:
        return f"tome_r={self.tome_r}"


def merge_positions(pos, size: Optional[torch.Tensor], plan: MergePlan, N: int, layout=None):
    """The rotary positions after a merge: every token keeps its row; a merged token the row of the token it
    was merged into, or (when ``pos`` carries angles: ``position="mean"``) the size-weighted mean of the
    angles of the tokens it absorbed (the angle of their mean coordinates)."""
    order, _ = merge_layout(plan, N, plan.unm.device) if layout is None else layout
    if pos.angles is None:
        return pos.rows(order)
    angles, _ = merge_tokens(pos.angles, size if size is None else size.to(pos.angles.dtype), plan, layout)
    return pos.with_angles(angles)


# ---------------------------------------------------------------------------------------------
# Model
class ToMeModelMixin(SwappedClass):
    """Added to the model's class: per-call ``r``, sizes and merge-group bookkeeping."""

    tome_schedule: str = "constant"
    tome_value: RValue = 0
    tome_position: str = "mean"
    family_name: str = "vit"

    @property
    def r(self) -> RValue:
        """The merge schedule as given (an int, or a tuple with one count per block). Assignable."""
        return self.tome_value

    @r.setter
    def r(self, value: RValue) -> None:
        rs = per_layer_r(value, len(self.blocks), self.tome_schedule)
        for blk, r in zip(self.blocks, rs):
            blk.tome_r = r
        self.tome_value = tuple(rs) if isinstance(value, (list, tuple)) else check_r(value)

    @property
    def r_per_block(self) -> Tuple[int, ...]:
        return tuple(b.tome_r for b in self.blocks)

    def tome_tokens(self, x: torch.Tensor, rs: Sequence[int], track: bool = False) -> Tokens:
        """The tokens entering the first block (sizes none yet, groups (B, patches) when ``track``)."""
        family = family_named(self.family_name)
        t = embed(family, self, x, angles=self.tome_position == "mean" and any(rs))
        if track:
            t = t._replace(ids=patch_ids(t.x.shape[0], t.x.shape[1] - self.num_prefix_tokens, t.x.device))
        return t

    def tome_step(self, rs: Sequence[int]):
        """The loop step merging ``rs[i]`` tokens in block i."""
        def step(i, blk, t: Tokens) -> Tokens:
            out = blk.forward_merge(t.x, t.size, rs[i], t.ids, t.pos)
            return t._replace(x=out[0], size=out[1], ids=out[2], pos=out[3] if t.pos is not None else None)
        return step

    def _tome_features(self, x: torch.Tensor, r: Optional[RValue] = None, return_groups: bool = False):
        rs = self.r_per_block if r is None else per_layer_r(r, len(self.blocks), self.tome_schedule)
        t = self.tome_tokens(x, rs, return_groups)
        t, taken = run_blocks(self, t, self.tome_step(rs), take=range(len(self.blocks)) if return_groups else ())
        return self.norm(t.x), t.size, [s.ids for s in taken]

    def forward_features(self, x: torch.Tensor, r: Optional[RValue] = None, return_groups: bool = False):
        """Tokens after the final norm; with ``return_groups`` also a list, per block, of (B, num_patches)
        long tensors: for each original patch, the index (among the non-prefix tokens after that block)
        of the token it was merged into. Patches with the same index form one merged group."""
        feats, _, groups = self._tome_features(x, r, return_groups)
        return (feats, groups) if return_groups else feats

    def _pool_sized(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Average pooling weighted by token size (the mean over the original patches), or None where
        timm's own pooling applies (class-token pooling, attention pooling, nothing merged)."""
        if size is None or self.global_pool != "avg" or getattr(self, "attn_pool", None) is not None \
                or getattr(self, "pool_include_prefix", False):
            return None
        P = self.num_prefix_tokens
        s = size[:, P:]
        return (x[:, P:] * s).sum(dim=1) / s.sum(dim=1)

    def forward(self, x: torch.Tensor, r: Optional[RValue] = None, return_groups: bool = False):
        """Logits; ``r`` overrides the merge schedule for this call; with ``return_groups=True`` a tuple
        (logits, merge groups per block) (see :meth:`forward_features`)."""
        feats, size, groups = self._tome_features(x, r, return_groups)
        pooled = self._pool_sized(feats, size)
        if pooled is None:
            logits = self.forward_head(feats)
        else:
            logits = self.head(self.head_drop(self.fc_norm(pooled)))
        return (logits, groups) if return_groups else logits

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        if any(self.r_per_block):
            raise LeanvitError("forward_intermediates is not available while ToMe merges tokens "
                               "(set model.r = 0 or remove the reduction)")
        return super().forward_intermediates(x, *args, **kwargs)


def is_tome(model: nn.Module) -> bool:
    return isinstance(model, ToMeModelMixin)


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome` in place (weights untouched)."""
    if not is_tome(model):
        return model
    for blk in model.blocks:
        if isinstance(blk, ToMeBlockMixin):
            restore_class(blk, ("tome_r", "num_prefix_tokens", "prop_attn", "family_name"))
    return restore_class(model, ("tome_schedule", "tome_value", "tome_position", "family_name"))


def apply_tome(model: nn.Module, r: RValue = 8, schedule: str = "constant", prop_attn: bool = True,
               position: str = "mean") -> nn.Module:
    """Merge tokens in every block of a timm ViT, in place; returns ``model``.

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` (pre-norm blocks; any number of prefix tokens, or none).
        r: tokens merged per block: an int, or one int per block (at most half of the block's mergeable
            tokens are merged whatever ``r`` says). Changeable later with ``model.r = ...`` or
            ``model(x, r=...)``.
        schedule: ``"constant"`` (``r`` in every block) or ``"decreasing"`` (an int ``r`` becomes a linear
            schedule from ``2r`` to 0).
        prop_attn: proportional attention (``+ log size`` in the attention logits), as the paper.
        position: under rotary position embeddings (EVA-02, DINOv3), the position a merged token takes:
            ``"mean"``, the size-weighted mean of the coordinates of its patches, or ``"dst"``, the position
            of the token it was merged into (:mod:`leanvit.reduction.positions`). No effect on ViTs with
            absolute position embeddings.
    """
    family = family_of(model, "ToMe", range(len(model.blocks)) if hasattr(model, "blocks") else ())
    blocks = model.blocks
    if schedule not in SCHEDULES:
        raise LeanvitError(f"ToMe schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if position not in MERGED_POSITIONS:
        raise LeanvitError(f"ToMe position must be one of {', '.join(MERGED_POSITIONS)} (how a merged token's "
                           f"rotary position is chosen), got {position!r}")
    rs = per_layer_r(r, len(blocks), schedule)  # validate before touching the model
    other = applied_reduction(model)  # ToMe with other settings, or another method: undo it first
    if other is not None:
        other.remove(model)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    for blk in blocks:
        swap_class(blk, ToMeBlockMixin, "ToMe")
        blk.num_prefix_tokens = prefix
        blk.prop_attn = bool(prop_attn)
        blk.family_name = family.name
    swap_class(model, ToMeModelMixin, "ToMe")
    model.family_name = family.name
    model.tome_schedule = schedule
    model.tome_position = position
    model.r = tuple(rs) if isinstance(r, (list, tuple)) else r
    return model


# ---------------------------------------------------------------------------------------------
# The registry entry
class ToMeMethod(ReductionMethod):
    """ToMe in the reduction registry: knob ``r`` (tokens merged per block; 0 = no reduction)."""

    name = "tome"
    knob = "r"
    none_value = 0
    description = "merge the r most similar token pairs in every block (bipartite soft matching)"

    restorations = ("unmerge", "reactivate")
    picture = "merged_groups"

    def apply(self, model: nn.Module, r: RValue = 8, schedule: str = "constant",
              prop_attn: bool = True, position: str = "mean") -> nn.Module:
        return apply_tome(model, r=r, schedule=schedule, prop_attn=prop_attn, position=position)

    def remove(self, model: nn.Module) -> nn.Module:
        return remove_tome(model)

    def is_applied(self, model: nn.Module) -> bool:
        return is_tome(model)

    def get_strength(self, model: nn.Module):
        return self.reduced_module(model).r

    def set_strength(self, model: nn.Module, value) -> None:
        self.reduced_module(model).r = value

    def check_strength(self, value):
        if isinstance(value, (list, tuple)):
            return tuple(check_r(v, f"r[{i}]") for i, v in enumerate(value))
        return check_r(value)

    def parse_strength(self, text: str):
        return check_r(float(text))

    def format_strength(self, value) -> str:
        if isinstance(value, (list, tuple)):
            return "/".join(str(int(v)) for v in value)
        return str(int(value))

    def schedule(self, step: int, target, start_step: int = 0, span_steps: int = 0):
        if isinstance(target, (list, tuple)):
            return target
        return int(round(cosine_schedule(step, float(target), 0.0, start_step, span_steps)))

    def options(self, model: nn.Module) -> dict:
        r = model.r
        options = {"r": list(r) if isinstance(r, tuple) else r, "schedule": model.tome_schedule,
                   "prop_attn": bool(model.blocks[0].prop_attn) if len(model.blocks) else True}
        if model.tome_position != "mean":
            options["position"] = model.tome_position
        return options

    # -- dense restorations and pictures ---------------------------------------------------------
    def is_off(self, model: nn.Module) -> bool:
        return not any(model.r_per_block)

    def restore_room(self, model: nn.Module) -> Tuple[int, str]:
        return len(model.blocks) - 1, "after the first block"

    def check_runs_as_given(self, model: nn.Module, value) -> None:
        check_mergeable(self.reduced_module(model), per_layer_r(value, len(self.reduced_module(model).blocks)))

    def restored_tokens(self, model: nn.Module, x: torch.Tensor, restore) -> torch.Tensor:
        """Every patch's features after the last block: ``unmerge`` (each patch takes its token's features)
        or ``reactivate`` (unmerged before the last ``restore.blocks`` blocks, which run on every patch)."""
        P = model.num_prefix_tokens
        rs = per_layer_r(model.r_per_block, len(model.blocks))
        depth = len(model.blocks)
        first_full = depth - restore.blocks if restore.name == "reactivate" else depth
        rs = tuple(r if i < first_full else 0 for i, r in enumerate(rs))
        t = model.tome_tokens(x, rs, track=True)
        n = t.ids.shape[1]
        start = t
        step = model.tome_step(rs)

        def restoring_step(i, blk, t: Tokens) -> Tokens:
            if i == first_full:  # every patch re-enters with its token's features and position; sizes are 1
                x = torch.cat([t.x[:, :P], unmerge(t.x[:, P:], t.ids)], dim=1)
                t = Tokens(x, start.pos, None, patch_ids(x.shape[0], n, x.device))
            return step(i, blk, t)

        t, _ = run_blocks(model, t, restoring_step)
        return unmerge(model.norm(t.x[:, P:]), t.ids)


register_reduction(ToMeMethod())
