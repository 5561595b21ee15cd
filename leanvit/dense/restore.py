"""Token reduction inside a plain-ViT dense backbone, and getting the full token map back.

A dense head needs a feature for every patch, while EViT removes tokens and ToMe merges them. A *restoration
strategy* says how the last block's map is filled again; each reduction method owns its strategies (the
default first) and says what each costs:

- EViT and every token-pruning method (:mod:`leanvit.reduction.pruning_restore`): ``keep`` (a removed token
  keeps the features it had when removed), ``reactivate`` (``{"name": "reactivate", "blocks": N}``: removed
  tokens re-enter for the last N blocks), ``fused`` (every removed patch takes the fused token);
- ToMe (:mod:`leanvit.reduction.tome`): ``unmerge`` (every patch takes the features of the token it was merged
  into, tomesd's unmerge), ``reactivate`` (unmerged before the last N blocks).

With the reduction off (keep rate 1, r = 0) every strategy gives exactly the unreduced model's map. This
module keeps the dense side's names for :mod:`leanvit.reduction.restore`.
"""
from __future__ import annotations

from leanvit.reduction.restore import (
    Restore,
    known_restorations,
    parse_restore,
    restoration_for,
    restorations,
    restored_tokens,
)

__all__ = ["Restore", "parse_restore", "restoration_for", "restored_tokens", "restorations", "known_restorations"]


def __getattr__(name):
    # the strategies of every registered method, read when asked (a method registered later is included)
    if name == "RESTORATIONS":
        return restorations()
    if name == "DEFAULT_RESTORE":
        return {method: names[0] for method, names in restorations().items()}
    raise AttributeError(name)
