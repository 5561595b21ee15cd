"""Token reduction inside a plain-ViT dense backbone, and getting the full token map back.

A dense head needs a feature for every patch, while EViT removes tokens and ToMe merges them. A
*restoration strategy* says how the last block's map is filled again; each one is a trade-off:

EViT (``evit``, ``evit-drop``):

- ``keep`` (default): a removed token keeps the features it had when it was removed (after the
  attention of the block that removed it); kept tokens take their final features. Cost: one scatter of
  the current tokens per reorganizing block and a (B, patches + 1, C) buffer, nothing per later block.
  (SViT, Liu et al. WACV 2024, keeps pruned tokens in the map the same way.)
- ``reactivate`` (``{"name": "reactivate", "blocks": N}``, N = 1 by default): as ``keep``, and the removed
  tokens re-enter the sequence, in place at their patch, for the last N blocks, which then run on all the
  tokens (Token Cropr's last-layer fusion, CVPR 2025; SViT's reactivation). Cost: those N blocks at full
  length. N cannot exceed the blocks after the last reorganizing one; a fused token is dropped then.
- ``fused``: every removed patch takes the fused token of the sequence (the mean of the kept tokens when
  tokens are dropped): the cheapest and the coarsest, kept for comparison.

ToMe (``tome``):

- ``unmerge`` (default): every patch takes the features of the token it was merged into, tracked
  through all the merges (tomesd's unmerge, Bolya & Hoffman 2023). Cost: a few (B, patches) index
  operations per block and one gather at the end.
- ``reactivate`` (N = 1 by default): the merged tokens are unmerged before the last N blocks, which run on
  every patch with no proportional attention (N at most depth - 1).

With the reduction off (keep rate 1, r = 0) every strategy gives exactly the unreduced model's map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from leanvit.errors import LeanvitError
from leanvit.reduction import applied_reduction
from leanvit.reduction.evit import is_evit
from leanvit.reduction.reorg import write_tokens
from leanvit.reduction.rows import put_rows_
from leanvit.reduction.tome import is_tome, per_layer_r
from leanvit.reduction.tome_merge import unmerge

__all__ = ["Restore", "RESTORATIONS", "DEFAULT_RESTORE", "parse_restore", "restoration_for", "restored_tokens",
           "method_family"]

#: The restoration strategies of each method family, the default first.
RESTORATIONS: Dict[str, Tuple[str, ...]] = {"evit": ("keep", "reactivate", "fused"), "tome": ("unmerge", "reactivate")}
DEFAULT_RESTORE = {family: names[0] for family, names in RESTORATIONS.items()}
_ALL = sorted({n for names in RESTORATIONS.values() for n in names})


@dataclass(frozen=True)
class Restore:
    """A restoration strategy: ``name`` and, for ``reactivate``, the number of last ``blocks``."""
    name: str
    blocks: int = 1

    def spec(self):
        """As a recipe or checkpoint writes it: the name, or a mapping for ``reactivate``."""
        return {"name": self.name, "blocks": self.blocks} if self.name == "reactivate" else self.name

    def __str__(self) -> str:
        return f"reactivate:{self.blocks}" if self.name == "reactivate" else self.name


def _blocks(value, where: str) -> int:
    try:
        n = int(value)
        ok = float(value) == n and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok or n < 1:
        raise LeanvitError(f"{where}: the number of reactivated blocks must be an integer >= 1, got {value!r}")
    return n


def parse_restore(value) -> Optional[Restore]:
    """A :class:`Restore` from ``None``, a name (``"keep"``, ``"reactivate"``, ``"reactivate:2"``), a
    mapping ``{"name": "reactivate", "blocks": 2}`` or a :class:`Restore`."""
    if value is None or isinstance(value, Restore):
        return value
    if isinstance(value, str):
        name, _, n = value.strip().partition(":")
        blocks = _blocks(n, f"restore {value!r}") if n else 1
    elif isinstance(value, dict):
        extra = set(value) - {"name", "blocks"}
        if extra or "name" not in value:
            raise LeanvitError(f"restore must be a name or {{name: ..., blocks: N}}, got {value!r}")
        name, blocks = str(value["name"]), _blocks(value.get("blocks", 1), f"restore {value!r}")
    else:
        raise LeanvitError(f"restore must be a strategy name ({', '.join(_ALL)}), got {value!r}")
    name = name.strip().lower()
    if name not in _ALL:
        raise LeanvitError(f"unknown restoration '{name}' (known: {', '.join(_ALL)})")
    if name != "reactivate" and blocks != 1:
        raise LeanvitError(f"restore '{name}' takes no block count, got {value!r}")
    return Restore(name, blocks)


def method_family(vit: nn.Module) -> Optional[str]:
    """``"evit"`` or ``"tome"`` for a ViT with that reduction applied, None without one."""
    if is_evit(vit):
        return "evit"
    if is_tome(vit):
        return "tome"
    method = applied_reduction(vit)
    if method is not None:
        raise LeanvitError(f"reduction '{method.name}' has no restoration strategy for dense prediction "
                           f"(supported: EViT and ToMe)")
    return None


def _remaining_blocks(vit: nn.Module, family: str) -> int:
    if family == "evit":
        return len(vit.blocks) - 1 - max(vit.evit_locations)
    return len(vit.blocks) - 1


def restoration_for(vit: nn.Module, restore=None) -> Optional[Restore]:
    """The strategy for ``vit`` (its method's default when ``restore`` is None), checked against the method
    and the depth; None when no reduction is applied."""
    family = method_family(vit)
    restore = parse_restore(restore)
    if family is None:
        return restore
    if restore is None:
        return Restore(DEFAULT_RESTORE[family])
    method = applied_reduction(vit).name
    if restore.name not in RESTORATIONS[family]:
        raise LeanvitError(f"restore '{restore.name}' does not apply to {method} "
                           f"(choose one of {', '.join(RESTORATIONS[family])})")
    if restore.name == "reactivate":
        room = _remaining_blocks(vit, family)
        if restore.blocks > room:
            where = "after the last reorganizing block" if family == "evit" else "after the first block"
            raise LeanvitError(f"restore reactivate:{restore.blocks}: the model has only {room} block(s) {where}")
    return restore


def _call(vit: nn.Module, fn, *args):
    if vit.grad_checkpointing and vit.training and not torch.jit.is_scripting():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def _evit_tokens(vit: nn.Module, x: torch.Tensor, restore: Restore) -> torch.Tensor:
    x = _embed(vit, x)
    P = vit.num_prefix_tokens
    B, N, C = x.shape
    n = N - P
    ids = torch.arange(n, device=x.device).unsqueeze(0).expand(B, -1)
    state = x.new_zeros(B, n + 1, C)   # each patch's latest features; the last slot collects fused tokens
    locations = set(vit.evit_locations)
    depth = len(vit.blocks)
    first_full = depth - restore.blocks if restore.name == "reactivate" else depth
    for i, blk in enumerate(vit.blocks):
        if i == first_full:  # removed tokens re-enter in place; a fused token is not a patch: it goes
            state = write_tokens(state, x[:, P:], ids)
            x = torch.cat([x[:, :P], state[:, :n]], dim=1)
            ids = torch.arange(n, device=x.device).unsqueeze(0).expand(B, -1)
        if i in locations and i < first_full:
            x, ids, state = _call(vit, blk.forward_reorg, x, None, ids, state)
        else:
            x = _call(vit, blk, x)
    state = write_tokens(state, x[:, P:], ids)
    return vit.norm(state[:, :n])


def _evit_fused(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every removed patch takes the fused token the latest reorganization appended (the mean of the kept
    tokens when tokens are dropped); an earlier fused token still in the sequence is not a patch."""
    tokens, kept = vit.forward_features(x, return_kept_indices=True)
    ids = kept[-1]
    patches = tokens[:, vit.num_prefix_tokens:]
    B, _, C = patches.shape
    H, W = vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    n = H * W
    if vit.fuse:
        fill = patches[:, -1:]
    else:
        fill = patches.mean(1, keepdim=True)
    grid = fill.expand(B, n + 1, C).clone()
    return put_rows_(grid, torch.where(ids < 0, torch.full_like(ids, n), ids), patches)[:, :n]


def _tome_tokens(vit: nn.Module, x: torch.Tensor, restore: Restore) -> torch.Tensor:
    x = _embed(vit, x)
    P = vit.num_prefix_tokens
    B, N, _ = x.shape
    n = N - P
    groups = torch.arange(n, device=x.device).unsqueeze(0).expand(B, -1)
    rs = per_layer_r(vit.r_per_block, len(vit.blocks))
    depth = len(vit.blocks)
    first_full = depth - restore.blocks if restore.name == "reactivate" else depth
    size = None
    for i, (blk, r) in enumerate(zip(vit.blocks, rs)):
        if i == first_full:  # every patch re-enters with the features of its token; sizes are 1 again
            x = torch.cat([x[:, :P], unmerge(x[:, P:], groups)], dim=1)
            groups = torch.arange(n, device=x.device).unsqueeze(0).expand(B, -1)
            size = None
        x, size, groups = _call(vit, blk.forward_merge, x, size, r if i < first_full else 0, groups)
    return unmerge(vit.norm(x[:, P:]), groups)


def _reduction_off(vit: nn.Module, family: str) -> bool:
    if family == "evit":
        rate = vit.keep_rate
        return all(float(r) >= 1.0 for r in (rate if isinstance(rate, tuple) else (rate,)))
    return not any(vit.r_per_block)


def restored_tokens(vit: nn.Module, x: torch.Tensor, restore=None) -> torch.Tensor:
    """The last block's patch tokens of ``vit`` on images ``x``, after the final norm, one per patch
    (B, patches, C), whatever reduction ``vit`` runs, filled by ``restore`` (see the module docstring)."""
    family = method_family(vit)
    if family is None or _reduction_off(vit, family):  # exactly the unreduced model
        return vit.forward_features(x)[:, vit.num_prefix_tokens:]
    restore = restoration_for(vit, restore)
    if family == "tome":
        return _tome_tokens(vit, x, restore)
    if restore.name == "fused":
        return _evit_fused(vit, x)
    return _evit_tokens(vit, x, restore)
