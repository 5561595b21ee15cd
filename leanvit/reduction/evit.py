"""EViT token reorganization for timm Vision Transformers.

``apply_evit(model, keep_rate, locations, fuse)`` turns a timm ``VisionTransformer`` with a class token
(DeiT, DeiT III, ViT, ...) into its EViT version *in place*: in the blocks at ``locations`` (0-indexed),
between attention and MLP, only the ``ceil(keep_rate x n)`` image tokens with the highest class-token
attention are kept and the rest are fused into one token (or dropped). No parameter is added, so the
model's checkpoints are unchanged; ``keep_rate=1`` computes exactly what the model computed before.

How it is done: the classes of the model and of the chosen blocks are swapped for subclasses that add
the reorganization (module objects, names and weights stay the same). The attention of a reorganizing
block runs the usual ``F.scaled_dot_product_attention`` and, beside it, computes only the class-token
row of the attention probabilities (O(N) per head) for the scores.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_function
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from leanvit.errors import LeanvitError
from leanvit.reduction.attention import ReducingBlockMixin
from leanvit.reduction.registry import ReductionMethod, applied_reduction, cosine_schedule, register_reduction
from leanvit.reduction.reorg import (
    FUSED_TOKEN_ID,
    check_keep_rate,
    kept_token_masks,
    num_kept,
    reorganize,
    reorganize_at_rate,
    tokens_to_grid,
    write_tokens,
)
from leanvit.reduction.swap import SwappedClass, check_timm_vit, restore_class, swap_class

__all__ = [
    "apply_evit", "remove_evit", "is_evit", "default_locations", "keep_rate_schedule",
    "kept_token_masks", "tokens_to_grid", "FUSED_TOKEN_ID", "per_layer_keep_rates", "EViTMethod",
]

KeepRate = Union[float, Sequence[float]]


def default_locations(depth: int) -> Tuple[int, ...]:
    """Reorganizing blocks for a model of ``depth`` blocks (0-indexed).

    The reference uses blocks 3, 6, 9 of 12 (layers 4, 7, 10), i.e. after each quarter of the depth.
    The rule for any depth: ``floor(depth * q / 4)`` for q = 1, 2, 3 (24 blocks: 6, 12, 18; 32: 8, 16, 24).
    """
    if depth < 2:
        raise LeanvitError(f"EViT needs at least 2 blocks, the model has {depth}")
    return tuple(sorted({max(1, depth * q // 4) for q in (1, 2, 3)} - {depth}))


def keep_rate_schedule(iteration: int, target: float, start_iter: int = 0, span_iters: int = 0) -> float:
    """Keep rate at a training iteration (EViT reference, ``adjust_keep_rate``).

    1.0 before ``start_iter``; then a cosine from 1.0 down to ``target`` over ``span_iters`` iterations;
    ``target`` afterwards. ``span_iters=0`` switches straight to ``target`` at ``start_iter``.
    From-scratch recipe: start = 10 epochs, span = 100 epochs (in iterations); fine-tuning: 0 and 0.
    """
    target = check_keep_rate(target, "target keep rate")
    return cosine_schedule(iteration, target, 1.0, start_iter, span_iters)


# ---------------------------------------------------------------------------------------------
# Block
class EViTBlockMixin(ReducingBlockMixin):
    """Added to a timm ``Block`` subclass: reorganize tokens between attention and MLP.

    Attributes: ``keep_rate`` (float, the block's own rate) and ``fuse`` (bool).
    """

    keep_rate: float = 1.0
    fuse: bool = True

    def forward_reorg(self, x: torch.Tensor, keep_rate: Optional[float] = None,
                      token_ids: Optional[torch.Tensor] = None, last_state: Optional[torch.Tensor] = None):
        """Block forward that may shorten the sequence; also maps ``token_ids`` along.

        Returns (x, token_ids), or, when ``last_state`` is given, (x, token_ids, last_state):
        ``last_state`` (B, num_patches + 1, C) holds each patch's latest features, and the tokens this
        block removes are written there as they were when removed (after attention, before the MLP); the
        last slot collects fused tokens. ``token_ids`` is required with it."""
        rate = self.keep_rate if keep_rate is None else keep_rate
        if isinstance(x, torch.fx.Proxy):  # torch.fx: sizes are unknown, the size-dependent step is one leaf
            out, scores, _ = self._reducing_attention(self.norm1(x), class_scores=True)
            x = reorganize_at_rate(x + self.drop_path1(self.ls1(out)), scores, rate, self.fuse, self.num_prefix_tokens)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), token_ids
        n = x.shape[1] - self.num_prefix_tokens
        k = num_kept(rate, n)
        if k >= n:  # nothing to remove: the unmodified block, bit for bit
            x = super().forward(x)
            return (x, token_ids) if last_state is None else (x, token_ids, last_state)
        out, scores, _ = self._reducing_attention(self.norm1(x), class_scores=True)
        x = x + self.drop_path1(self.ls1(out))
        if last_state is not None:
            last_state = write_tokens(last_state, x[:, self.num_prefix_tokens:], token_ids)
        x, token_ids = reorganize(x, scores, k, fuse=self.fuse, num_prefix_tokens=self.num_prefix_tokens,
                                  token_ids=token_ids)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, token_ids) if last_state is None else (x, token_ids, last_state)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise LeanvitError("EViT blocks do not support attention masks")
        return self.forward_reorg(x)[0]

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}"


# ---------------------------------------------------------------------------------------------
# Model
class EViTModelMixin(SwappedClass):
    """Added to a timm ``VisionTransformer`` subclass: per-call keep rate and kept-index bookkeeping."""

    evit_locations: Tuple[int, ...] = ()

    def _evit_blocks(self) -> List[nn.Module]:
        return [self.blocks[i] for i in self.evit_locations if i < len(self.blocks)]

    @property
    def keep_rate(self) -> Union[float, Tuple[float, ...]]:
        """The keep rate of the reorganizing blocks: a float if they share one, else a tuple.

        Assign a float (all blocks) or one value per location, e.g. from a training schedule."""
        rates = tuple(b.keep_rate for b in self._evit_blocks())
        if not rates:  # every reorganizing block was pruned away (features_only)
            return 1.0
        return rates[0] if len(set(rates)) == 1 else rates

    @keep_rate.setter
    def keep_rate(self, value: KeepRate) -> None:
        for blk, r in zip(self._evit_blocks(), per_layer_keep_rates(value, len(self.evit_locations))):
            blk.keep_rate = r

    @property
    def fuse(self) -> bool:
        return all(b.fuse for b in self._evit_blocks())

    def forward_features(self, x: torch.Tensor, keep_rate: Optional[KeepRate] = None,
                         return_kept_indices: bool = False):
        """Tokens after the final norm; with ``return_kept_indices`` also a list, per reorganizing block,
        of (B, k) original patch indices each sample kept (``FUSED_TOKEN_ID`` = -1 for a fused token)."""
        rates = None if keep_rate is None else per_layer_keep_rates(keep_rate, len(self.evit_locations))
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        token_ids = None
        if return_kept_indices:
            n = x.shape[1] - self.num_prefix_tokens
            token_ids = torch.arange(n, device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        kept = []
        reorg_pos = {loc: j for j, loc in enumerate(self.evit_locations)}
        ckpt = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        for i, blk in enumerate(self.blocks):
            j = reorg_pos.get(i)
            if j is None:
                x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
                continue
            rate = None if rates is None else rates[j]
            if ckpt:
                x, token_ids = checkpoint(blk.forward_reorg, x, rate, token_ids, use_reentrant=False)
            elif rate is None and token_ids is None:
                x = blk(x)  # through __call__: forward hooks and torch.fx's module paths see the block
            else:
                x, token_ids = blk.forward_reorg(x, rate, token_ids)
            if return_kept_indices:
                kept.append(token_ids)
        x = self.norm(x)
        return (x, kept) if return_kept_indices else x

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False, attn_mask=None, is_causal: bool = False,
                              keep_rate: Optional[KeepRate] = None):
        """timm's ``forward_intermediates`` for an EViT model (same arguments and outputs, plus ``keep_rate``).

        ``output_fmt="NLC"``: each block's tokens as they are (fewer after a reorganization; a fused token,
        if any, last). ``output_fmt="NCHW"`` (the default, what ``features_only=True`` returns): maps on the
        full patch grid. Blocks before the first reorganization give exactly the plain ViT's maps; after
        one, each kept token is scattered back to the grid cell of its original patch, and every removed
        patch takes the value of the fused token of the sequence (the one the latest reorganization
        appended), or zeros when tokens are dropped (``fuse=False``). See :func:`tokens_to_grid`.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise LeanvitError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise LeanvitError("EViT models do not support attention masks")
        reshape = output_fmt == "NCHW"
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        rates = None if keep_rate is None else per_layer_keep_rates(keep_rate, len(self.evit_locations))
        reorg_pos = {loc: j for j, loc in enumerate(self.evit_locations)}

        B, _, height, width = x.shape
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        P = self.num_prefix_tokens
        n = x.shape[1] - P
        token_ids = torch.arange(n, device=x.device).unsqueeze(0).expand(B, -1) if reshape else None
        reorganized = False
        blocks = self.blocks if (torch.jit.is_scripting() or not stop_early) else self.blocks[:max_index + 1]
        ckpt = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        intermediates, ids, moved = [], [], []
        for i, blk in enumerate(blocks):
            j = reorg_pos.get(i)
            if j is None:
                x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
            else:
                rate = blk.keep_rate if rates is None else rates[j]
                cur = x.shape[1] - P
                reorganized = reorganized or num_kept(rate, cur) < cur
                x, token_ids = blk.forward_reorg(x, rate, token_ids)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
                ids.append(token_ids)
                moved.append(reorganized)

        prefix_tokens = [y[:, :P] for y in intermediates] if P else None
        intermediates = [y[:, P:] for y in intermediates]
        if reshape:
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [
                (tokens_to_grid(y, t, n, self.fuse) if m else y).reshape(B, H, W, -1).permute(0, 3, 1, 2)
                .contiguous() for y, t, m in zip(intermediates, ids, moved)]

        if output_dict:
            result = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's pruning (used by ``features_only``); reorganizations in pruned blocks go with them."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        self.evit_locations = tuple(i for i in self.evit_locations if i < len(self.blocks))
        return take_indices

    # timm records the factory's keyword arguments in ``model._model_args`` (save_for_hf writes them to
    # config.json as ``model_args``). Registered ``evit_*`` models report their *current* keep rate,
    # locations and fuse flag there, so a saved model rebuilds as it is now.
    @property
    def _model_args(self) -> dict:
        args = dict(self.__dict__.get("_model_args", {}))
        if self.__dict__.get("evit_args_in_model_args"):
            rate = self.keep_rate
            args.update(keep_rate=list(rate) if isinstance(rate, tuple) else rate,
                        locations=list(self.evit_locations), fuse=self.fuse)
        return args

    @_model_args.setter
    def _model_args(self, value: dict) -> None:
        self.__dict__["_model_args"] = dict(value)

    def forward(self, x: torch.Tensor, keep_rate: Optional[KeepRate] = None, return_kept_indices: bool = False):
        """Logits; with ``return_kept_indices=True`` a tuple (logits, kept indices per reorganizing block)."""
        if isinstance(return_kept_indices, torch.fx.Proxy):  # torch.fx tracing: the model's own keep rates
            x = check_traced_call(x, keep_rate, return_kept_indices)
            keep_rate, return_kept_indices = None, False
        if return_kept_indices:
            feats, kept = self.forward_features(x, keep_rate, return_kept_indices=True)
            return self.forward_head(feats), kept
        return self.forward_head(self.forward_features(x, keep_rate))


@register_notrace_function  # runs in an FX graph with the call's real arguments
def check_traced_call(x: torch.Tensor, keep_rate=None, return_kept_indices=False) -> torch.Tensor:
    """``x``; in an FX-traced EViT model, a clear error for per-call arguments the graph cannot honour (the
    graph runs the keep rates the model had when it was traced and returns logits only)."""
    if keep_rate is not None or return_kept_indices:
        raise LeanvitError("an FX-traced EViT model runs the keep rates it was traced with and returns logits "
                           "only: set model.keep_rate before tracing instead of passing keep_rate / "
                           "return_kept_indices")
    return x


def per_layer_keep_rates(value: KeepRate, n: int) -> Tuple[float, ...]:
    if isinstance(value, (int, float, str)) or (torch.is_tensor(value) and value.ndim == 0):
        return (check_keep_rate(value),) * n
    values = tuple(value)
    if len(values) != n:
        raise LeanvitError(f"got {len(values)} keep rates for {n} reorganizing locations")
    return tuple(check_keep_rate(v, f"keep_rate[{i}]") for i, v in enumerate(values))


def is_evit(model: nn.Module) -> bool:
    return isinstance(model, EViTModelMixin)


def remove_evit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_evit` in place (the model computes as before; weights are untouched)."""
    if not is_evit(model):
        return model
    for blk in model.blocks:
        if isinstance(blk, EViTBlockMixin):
            restore_class(blk, ("keep_rate", "fuse", "num_prefix_tokens"))
    return restore_class(model, ("evit_locations",))


def apply_evit(model: nn.Module, keep_rate: KeepRate = 0.7, locations: Optional[Sequence[int]] = None,
               fuse: bool = True) -> nn.Module:
    """Reorganize the tokens of a timm ViT, in place; returns ``model``.

    Args:
        model: a timm ``VisionTransformer`` with a class token (pre-norm blocks).
        keep_rate: fraction of the non-class tokens kept at each location, in (0, 1]; one float or one
            per location. Changeable later with ``model.keep_rate = r`` or ``model(x, keep_rate=r)``.
        locations: 0-indexed blocks that reorganize; default :func:`default_locations` (3, 6, 9 for 12).
        fuse: fuse the inattentive tokens into one (EViT) instead of dropping them.
    """
    check_timm_vit(model, "EViT", ())
    blocks = model.blocks
    if getattr(model, "cls_token", None) is None or not getattr(model, "has_class_token", True):
        raise LeanvitError("EViT needs a class token (its attention scores the image tokens); "
                           "this model has none (class_token=False)")
    depth = len(blocks)
    locations = default_locations(depth) if locations is None else tuple(int(i) for i in locations)
    if not locations:
        raise LeanvitError("locations must name at least one block")
    bad = [i for i in locations if not 0 <= i < depth]
    if bad:
        raise LeanvitError(f"locations {bad} are outside the model's blocks 0..{depth - 1}")
    if len(set(locations)) != len(locations):
        raise LeanvitError(f"locations must be distinct, got {list(locations)}")
    locations = tuple(sorted(locations))
    rates = per_layer_keep_rates(keep_rate, len(locations))
    check_timm_vit(model, "EViT", locations)
    other = applied_reduction(model)  # EViT with other settings, or another method: undo it first
    if other is not None:
        other.remove(model)
    for i, r in zip(locations, rates):
        blk = swap_class(blocks[i], EViTBlockMixin, "EViT")
        blk.keep_rate = r
        blk.fuse = bool(fuse)
        blk.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
    swap_class(model, EViTModelMixin, "EViT")
    model.evit_locations = locations
    return model


# ---------------------------------------------------------------------------------------------
# The registry entry
class EViTMethod(ReductionMethod):
    """EViT in the reduction registry: knob ``keep_rate`` (1.0 = no reduction); ``fuse`` picks fusing
    (``"evit"``) or dropping (``"evit-drop"``) the inattentive tokens."""

    knob = "keep_rate"
    none_value = 1.0

    def __init__(self, name: str = "evit", fuse: bool = True):
        self.name = name
        self.fuse = fuse
        self.description = ("keep the most class-attended tokens, " +
                            ("fuse the rest into one token" if fuse else "drop the rest"))

    def apply(self, model: nn.Module, keep_rate: KeepRate = 0.7, locations: Optional[Sequence[int]] = None,
              fuse: Optional[bool] = None) -> nn.Module:
        return apply_evit(model, keep_rate=keep_rate, locations=locations,
                          fuse=self.fuse if fuse is None else fuse)

    def remove(self, model: nn.Module) -> nn.Module:
        return remove_evit(model)

    def is_applied(self, model: nn.Module) -> bool:
        return is_evit(model) and model.fuse == self.fuse

    def get_strength(self, model: nn.Module):
        return self.reduced_module(model).keep_rate

    def set_strength(self, model: nn.Module, value) -> None:
        self.reduced_module(model).keep_rate = value

    def check_strength(self, value):
        if isinstance(value, (list, tuple)):
            return tuple(check_keep_rate(v) for v in value)
        return check_keep_rate(value)

    def schedule(self, step: int, target, start_step: int = 0, span_steps: int = 0):
        if isinstance(target, (list, tuple)):
            return target
        return keep_rate_schedule(step, target, start_step, span_steps)

    def options(self, model: nn.Module) -> dict:
        rate = model.keep_rate
        return {"keep_rate": list(rate) if isinstance(rate, tuple) else rate,
                "locations": list(model.evit_locations)}


register_reduction(EViTMethod("evit", fuse=True))
register_reduction(EViTMethod("evit-drop", fuse=False))
