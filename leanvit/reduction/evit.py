"""EViT token reorganization (Liang et al., ICLR 2022) for timm Vision Transformers.

``apply_evit(model, keep_rate, locations, fuse)`` turns a timm ViT with a class token (DeiT, DeiT III, ViT,
register ViTs; EVA-02 and DINOv3 through timm ``Eva``) into its EViT version *in place*: in the blocks at
``locations`` (0-indexed), between attention and MLP, only the ``ceil(keep_rate x n)`` image tokens with the
highest class-token attention are kept and the rest are fused into one token (or dropped). No parameter is
added, so the model's checkpoints are unchanged; ``keep_rate=1`` computes exactly what the model computed
before.

EViT is the :class:`leanvit.reduction.pruning.PruningMethod` whose score is the class token's attention row,
averaged over heads: the attention runs the usual ``F.scaled_dot_product_attention`` and, beside it, only the
class-token row of the attention probabilities is computed (O(N) per head). Everything else (the knob, the
bookkeeping, the dense restorations, the picture) is the pruning base's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.reduction.families import family_of
from leanvit.reduction.pruning import (
    KeepRate,
    PruningMethod,
    default_locations,
    is_pruning,
    per_layer_keep_rates,
)
from leanvit.reduction.registry import cosine_schedule, register_reduction
from leanvit.reduction.reorg import FUSED_TOKEN_ID, check_keep_rate, kept_token_masks, tokens_to_grid

__all__ = [
    "apply_evit", "remove_evit", "is_evit", "default_locations", "keep_rate_schedule",
    "kept_token_masks", "tokens_to_grid", "FUSED_TOKEN_ID", "per_layer_keep_rates", "EViTMethod", "KeepRate",
]


def keep_rate_schedule(iteration: int, target: float, start_iter: int = 0, span_iters: int = 0) -> float:
    """Keep rate at a training iteration (EViT reference, ``adjust_keep_rate``).

    1.0 before ``start_iter``; then a cosine from 1.0 down to ``target`` over ``span_iters`` iterations;
    ``target`` afterwards. ``span_iters=0`` switches straight to ``target`` at ``start_iter``.
    From-scratch recipe: start = 10 epochs, span = 100 epochs (in iterations); fine-tuning: 0 and 0.
    """
    target = check_keep_rate(target, "target keep rate")
    return cosine_schedule(iteration, target, 1.0, start_iter, span_iters)


class EViTMethod(PruningMethod):
    """EViT in the reduction registry: knob ``keep_rate`` (1.0 = no reduction); ``fuse`` picks fusing
    (``"evit"``) or dropping (``"evit-drop"``) the inattentive tokens."""

    uses_class_attention = True
    score_name = "evit"

    def __init__(self, name: str = "evit", fuse: bool = True):
        self.name = name
        self.fuse = fuse
        self.description = ("keep the most class-attended tokens, " +
                            ("fuse the rest into one token" if fuse else "drop the rest"))

    def token_scores(self, block, x, class_attention):
        return class_attention

    def is_applied(self, model: nn.Module) -> bool:
        return self.owns(model) and model.fuse == self.fuse


def is_evit(model: nn.Module) -> bool:
    """``model`` runs EViT (fused or dropping)."""
    return is_pruning(model) and model.score_method == "evit"


def remove_evit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_evit` in place (the model computes as before; weights are untouched)."""
    return _EVIT.remove(model) if is_evit(model) else model


def apply_evit(model: nn.Module, keep_rate: KeepRate = 0.7, locations: Optional[Sequence[int]] = None,
               fuse: bool = True) -> nn.Module:
    """Reorganize the tokens of a timm ViT, in place; returns ``model``.

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` with a class token (pre-norm blocks).
        keep_rate: fraction of the non-class tokens kept at each location, in (0, 1]; one float or one per
            location. Changeable later with ``model.keep_rate = r`` or ``model(x, keep_rate=r)``.
        locations: 0-indexed blocks that reorganize; default :func:`default_locations` (3, 6, 9 for 12).
        fuse: fuse the inattentive tokens into one (EViT) instead of dropping them.
    """
    family_of(model, "EViT")
    if getattr(model, "cls_token", None) is None or not getattr(model, "has_class_token", True):
        raise LeanvitError("EViT needs a class token (its attention scores the image tokens); "
                           "this model has none (class_token=False)")
    return (_EVIT if fuse else _EVIT_DROP).apply(model, keep_rate=keep_rate, locations=locations, fuse=fuse)


_EVIT = register_reduction(EViTMethod("evit", fuse=True))
_EVIT_DROP = register_reduction(EViTMethod("evit-drop", fuse=False))
