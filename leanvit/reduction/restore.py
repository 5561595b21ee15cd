"""Restoration strategies: how a reduced ViT gives a dense head one feature per patch again.

Each reduction method owns its strategies (``ReductionMethod.restorations``, the default first, and
``ReductionMethod.restored_tokens``): EViT and every pruning method ``keep`` / ``reactivate`` / ``fused``
(:mod:`leanvit.reduction.pruning_restore`), ToMe ``unmerge`` / ``reactivate``. This module reads a strategy as
users write it and checks it against the method applied to a model; it names no method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction.registry import ReductionMethod, applied_reduction, get_reduction, list_reductions

__all__ = ["Restore", "parse_restore", "restoration_for", "restored_tokens", "restorations", "known_restorations",
           "reduction_with_restorations"]


def restorations() -> Dict[str, Tuple[str, ...]]:
    """The restoration strategies of every registered method that has some, the default first."""
    out = {}
    for name in list_reductions():
        names = tuple(get_reduction(name).restorations)
        if names:
            out[name] = names
    return out


def known_restorations() -> List[str]:
    return sorted({n for names in restorations().values() for n in names})


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
        raise LeanvitError(f"restore must be a strategy name ({', '.join(known_restorations())}), got {value!r}")
    name = name.strip().lower()
    known = known_restorations()
    if name not in known:
        raise LeanvitError(f"unknown restoration '{name}' (known: {', '.join(known)})")
    if name != "reactivate" and blocks != 1:
        raise LeanvitError(f"restore '{name}' takes no block count, got {value!r}")
    return Restore(name, blocks)


def reduction_with_restorations(vit: nn.Module) -> Optional[ReductionMethod]:
    """The method applied to ``vit`` (None without one); a clear error when it has no restoration."""
    method = applied_reduction(vit)
    if method is not None and not method.restorations:
        have = ", ".join(f"{m} ({'/'.join(r)})" for m, r in restorations().items())
        raise LeanvitError(f"reduction '{method.name}' has no restoration strategy for dense prediction "
                           f"(methods with one: {have})")
    return method


def restoration_for(vit: nn.Module, restore=None) -> Optional[Restore]:
    """The strategy for ``vit`` (its method's default when ``restore`` is None), checked against the method
    and the depth; None when no reduction is applied."""
    method = reduction_with_restorations(vit)
    restore = parse_restore(restore)
    if method is None:
        return restore
    if restore is None:
        return Restore(method.restorations[0])
    if restore.name not in method.restorations:
        raise LeanvitError(f"restore '{restore.name}' does not apply to {method.name} "
                           f"(choose one of {', '.join(method.restorations)})")
    if restore.name == "reactivate":
        room, where = method.restore_room(vit)
        if restore.blocks > room:
            raise LeanvitError(f"restore reactivate:{restore.blocks}: the model has only {room} block(s) {where}")
    return restore


def restored_tokens(vit: nn.Module, x: torch.Tensor, restore=None) -> torch.Tensor:
    """The last block's patch tokens of ``vit`` on images ``x``, after the final norm, one per patch
    (B, patches, C), whatever reduction ``vit`` runs, filled by ``restore`` (its method's strategies)."""
    method = reduction_with_restorations(vit)
    if method is None or method.is_off(vit):  # exactly the unreduced model
        return vit.forward_features(x)[:, vit.num_prefix_tokens:]
    return method.restored_tokens(vit, x, restoration_for(vit, restore))
