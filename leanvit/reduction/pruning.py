"""Token pruning by a score: keep the top-scoring image tokens of chosen blocks, fuse or drop the rest.

EViT (Liang et al., ICLR 2022) is the pruning method whose score is the class token's attention; any other
score (a feature norm, a learned predictor) is a :class:`PruningMethod` subclass that implements
:meth:`PruningMethod.token_scores` and inherits everything else: the keep-rate knob and its schedule,
per-call keep rates, kept-index bookkeeping, ``forward_intermediates``, the dense restorations (``keep``,
``reactivate``, ``fused``: :mod:`leanvit.reduction.pruning_restore`), the picture of kept tokens, export.

In the blocks at ``locations`` (0-indexed), between attention and MLP, only the ``ceil(keep_rate x n)`` image
tokens with the highest scores are kept (in descending score order) and the rest are fused into one token
(their sum weighted by the scores, appended last) or dropped. No parameter is added; ``keep_rate=1`` computes
exactly what the model computed before. Applied by swapping the classes of the model and of the chosen blocks
(module objects, names and weights stay); works on every backbone family (:mod:`leanvit.reduction.families`):
under RoPE the kept tokens keep their rotations and the fused token gets none.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_function
from timm.models._features import feature_take_indices

from leanvit.errors import LeanvitError
from leanvit.reduction.families import family_named, family_of
from leanvit.reduction.loop import ReducingBlockMixin, Tokens, embed, patch_ids, run_blocks
from leanvit.reduction.registry import ReductionMethod, applied_reduction, cosine_schedule, get_reduction
from leanvit.reduction.reorg import (
    check_keep_rate,
    num_kept,
    reorganize,
    reorganize_at_rate,
    tokens_to_grid,
    write_tokens,
)
from leanvit.reduction.swap import SwappedClass, restore_class, swap_class

__all__ = ["PruningMethod", "PruningBlockMixin", "PruningModelMixin", "per_layer_keep_rates", "default_locations",
           "is_pruning", "KeepRate"]

KeepRate = Union[float, Sequence[float]]


def default_locations(depth: int) -> Tuple[int, ...]:
    """Pruning blocks for a model of ``depth`` blocks (0-indexed): after each quarter of the depth,
    ``floor(depth * q / 4)`` for q = 1, 2, 3 (EViT's blocks 3, 6, 9 of 12; 24 blocks: 6, 12, 18)."""
    if depth < 2:
        raise LeanvitError(f"token pruning needs at least 2 blocks, the model has {depth}")
    return tuple(sorted({max(1, depth * q // 4) for q in (1, 2, 3)} - {depth}))


def per_layer_keep_rates(value: KeepRate, n: int) -> Tuple[float, ...]:
    if isinstance(value, (int, float, str)) or (torch.is_tensor(value) and value.ndim == 0):
        return (check_keep_rate(value),) * n
    values = tuple(value)
    if len(values) != n:
        raise LeanvitError(f"got {len(values)} keep rates for {n} reorganizing locations")
    return tuple(check_keep_rate(v, f"keep_rate[{i}]") for i, v in enumerate(values))


# ---------------------------------------------------------------------------------------------
# Block
class PruningBlockMixin(ReducingBlockMixin):
    """Added to a block's class: prune tokens between attention and MLP. Attributes: ``keep_rate``, ``fuse``,
    ``score_method`` (the registered method whose :meth:`PruningMethod.token_scores` ranks the tokens)."""

    keep_rate: float = 1.0
    fuse: bool = True
    score_method: str = "evit"

    def _attention(self, x_normed: torch.Tensor, pos):
        """The scoring method, the attention output and the class token's attention row (when the method
        reads it)."""
        method = get_reduction(self.score_method)
        out, cls_attn, _ = self.family.attention(self, x_normed, pos, self.num_prefix_tokens,
                                                 class_scores=method.uses_class_attention)
        return method, out, cls_attn

    def forward_reorg(self, x: torch.Tensor, keep_rate: Optional[float] = None,
                      token_ids: Optional[torch.Tensor] = None, last_state: Optional[torch.Tensor] = None,
                      pos=None):
        """Block forward that may shorten the sequence; maps ``token_ids`` and the positions ``pos`` along.

        Returns (x, token_ids), or (x, token_ids, last_state) when ``last_state`` is given: (B, num_patches + 1,
        C) each patch's latest features, where the tokens this block removes are written as they were when
        removed (after attention, before the MLP; the last slot collects fused tokens). With positions
        (RoPE), the positions of the new sequence are appended to the tuple."""
        rate = self.keep_rate if keep_rate is None else keep_rate
        family, P = self.family, self.num_prefix_tokens
        if isinstance(x, torch.fx.Proxy):  # torch.fx: sizes are unknown, the size-dependent step is one leaf
            method, out, cls_attn = self._attention(self.norm1(x), pos)
            x = family.attn_residual(self, x, out)
            scores = method.token_scores(self, x, cls_attn)
            x = reorganize_at_rate(x, scores, rate, self.fuse, P)
            return family.mlp_residual(self, x), token_ids
        n = x.shape[1] - P
        k = num_kept(rate, n)
        if k >= n:  # nothing to remove: the unmodified block, bit for bit
            out = (family.unmodified(self, x, pos), token_ids)
            out = out if last_state is None else out + (last_state,)
            return out if pos is None else out + (pos,)
        method, out, cls_attn = self._attention(self.norm1(x), pos)
        x = family.attn_residual(self, x, out)
        scores = method.token_scores(self, x, cls_attn)
        if last_state is not None:
            last_state = write_tokens(last_state, x[:, P:], token_ids)
        moved = reorganize(x, scores, k, fuse=self.fuse, num_prefix_tokens=P, token_ids=token_ids, positions=pos)
        x, token_ids = moved[0], moved[1]
        x = family.mlp_residual(self, x)
        out = (x, token_ids) if last_state is None else (x, token_ids, last_state)
        return out if pos is None else out + (moved[2],)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rope = self.family.call_positions(args, kwargs)
        if rope is not None:  # called by timm's own loop with timm's rotary table
            if num_kept(self.keep_rate, x.shape[1] - self.num_prefix_tokens) < x.shape[1] - self.num_prefix_tokens:
                raise LeanvitError("a pruning block under RoPE runs inside its model's loop "
                                   "(model.forward_features), which moves the rotary positions with the tokens")
            return self._swap_base.forward(self, x, rope=rope)
        return self.forward_reorg(x)[0]

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}"


# ---------------------------------------------------------------------------------------------
# Model
class PruningModelMixin(SwappedClass):
    """Added to the model's class: per-call keep rate, kept-index bookkeeping, intermediates."""

    evit_locations: Tuple[int, ...] = ()
    family_name: str = "vit"
    score_method: str = "evit"

    @property
    def reduce_locations(self) -> Tuple[int, ...]:
        """The pruning blocks (0-indexed); ``evit_locations`` is the same."""
        return self.evit_locations

    def _pruning_blocks(self) -> List[nn.Module]:
        return [self.blocks[i] for i in self.evit_locations if i < len(self.blocks)]

    @property
    def keep_rate(self) -> Union[float, Tuple[float, ...]]:
        """The keep rate of the pruning blocks: a float if they share one, else a tuple. Assignable (a float,
        or one value per location)."""
        rates = tuple(b.keep_rate for b in self._pruning_blocks())
        if not rates:  # every pruning block was pruned away (features_only)
            return 1.0
        return rates[0] if len(set(rates)) == 1 else rates

    @keep_rate.setter
    def keep_rate(self, value: KeepRate) -> None:
        for blk, r in zip(self._pruning_blocks(), per_layer_keep_rates(value, len(self.evit_locations))):
            blk.keep_rate = r

    @property
    def fuse(self) -> bool:
        return all(b.fuse for b in self._pruning_blocks())

    def _pruning_step(self, rates, track: bool):
        family = self.reduction_family
        where = {loc: j for j, loc in enumerate(self.evit_locations)}

        def step(i, blk, t: Tokens) -> Tokens:
            j = where.get(i)
            if j is None:
                return t._replace(x=family.block(blk, t.x, t.pos))
            rate = blk.keep_rate if rates is None else rates[j]
            if t.pos is None and not track and rates is None:
                return t._replace(x=blk(t.x))  # through __call__: forward hooks see the block
            out = blk.forward_reorg(t.x, rate, t.ids, pos=t.pos)
            return t._replace(x=out[0], ids=out[1], pos=out[2] if t.pos is not None else None)
        return step

    @property
    def reduction_family(self):
        return family_named(self.family_name)

    def _tokens(self, x: torch.Tensor, track: bool) -> Tokens:
        t = embed(self.reduction_family, self, x)
        if track:
            t = t._replace(ids=patch_ids(t.x.shape[0], t.x.shape[1] - self.num_prefix_tokens, t.x.device))
        return t

    def forward_features(self, x: torch.Tensor, keep_rate: Optional[KeepRate] = None,
                         return_kept_indices: bool = False):
        """Tokens after the final norm; with ``return_kept_indices`` also a list, per pruning block, of (B, k)
        original patch indices each sample kept (``FUSED_TOKEN_ID`` = -1 for a fused token)."""
        rates = None if keep_rate is None else per_layer_keep_rates(keep_rate, len(self.evit_locations))
        t = self._tokens(x, return_kept_indices)
        locs = set(self.evit_locations)
        t, taken = run_blocks(self, t, self._pruning_step(rates, return_kept_indices),
                              take=locs if return_kept_indices else ())
        x = self.norm(t.x)
        return (x, [s.ids for s in taken]) if return_kept_indices else x

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False, attn_mask=None, is_causal: bool = False,
                              keep_rate: Optional[KeepRate] = None):
        """timm's ``forward_intermediates`` for a pruned model (same arguments and outputs, plus ``keep_rate``).

        ``output_fmt="NLC"``: each block's tokens as they are (fewer after pruning; a fused token, if any,
        last). ``output_fmt="NCHW"`` (the default, what ``features_only=True`` returns): maps on the full patch
        grid. Blocks before the first pruning give exactly the plain ViT's maps; after one, each kept token is
        scattered back to the grid cell of its original patch, and every removed patch takes the value of the
        fused token of the sequence (the one the latest pruning appended), or zeros when tokens are dropped
        (``fuse=False``). See :func:`leanvit.reduction.reorg.tokens_to_grid`.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise LeanvitError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise LeanvitError("token-pruning models do not support attention masks")
        reshape = output_fmt == "NCHW"
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        rates = None if keep_rate is None else per_layer_keep_rates(keep_rate, len(self.evit_locations))
        B, _, height, width = x.shape
        P = self.num_prefix_tokens
        t = self._tokens(x, reshape)
        n = t.x.shape[1] - P
        blocks = self.blocks if (torch.jit.is_scripting() or not stop_early) else self.blocks[:max_index + 1]
        step = self._pruning_step(rates if rates is not None else tuple(b.keep_rate for b in self._pruning_blocks()),
                                  True)
        t, taken = run_blocks(self, t, step, blocks=blocks, take=take_indices)
        intermediates = [self.norm(s.x) if norm else s.x for s in taken]
        prefix_tokens = [y[:, :P] for y in intermediates] if P else None
        intermediates = [y[:, P:] for y in intermediates]
        if reshape:
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [tokens_to_grid(y, s.ids, n, self.fuse).reshape(B, H, W, -1).permute(0, 3, 1, 2)
                             .contiguous() for y, s in zip(intermediates, taken)]
        if output_dict:
            result = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(t.x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(t.x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's pruning (used by ``features_only``); pruning blocks among the pruned layers go with them."""
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
        """Logits; with ``return_kept_indices=True`` a tuple (logits, kept indices per pruning block)."""
        if isinstance(return_kept_indices, torch.fx.Proxy):  # torch.fx tracing: the model's own keep rates
            x = check_traced_call(x, keep_rate, return_kept_indices)
            keep_rate, return_kept_indices = None, False
        if return_kept_indices:
            feats, kept = self.forward_features(x, keep_rate, return_kept_indices=True)
            return self.forward_head(feats), kept
        return self.forward_head(self.forward_features(x, keep_rate))


@register_notrace_function  # runs in an FX graph with the call's real arguments
def check_traced_call(x: torch.Tensor, keep_rate=None, return_kept_indices=False) -> torch.Tensor:
    """``x``; in an FX-traced pruned model, a clear error for per-call arguments the graph cannot honour (the
    graph runs the keep rates the model had when it was traced and returns logits only)."""
    if keep_rate is not None or return_kept_indices:
        raise LeanvitError("an FX-traced EViT model runs the keep rates it was traced with and returns logits "
                           "only: set model.keep_rate before tracing instead of passing keep_rate / "
                           "return_kept_indices")
    return x


def is_pruning(model: nn.Module) -> bool:
    return isinstance(model, PruningModelMixin)


# ---------------------------------------------------------------------------------------------
# The method
class PruningMethod(ReductionMethod):
    """A token-pruning method: knob ``keep_rate`` (1.0 = no reduction). Subclasses set ``name`` and implement
    :meth:`token_scores` (set ``uses_class_attention`` when it reads the class token's attention row)."""

    knob = "keep_rate"
    none_value = 1.0
    fuse = True
    uses_class_attention = False
    score_name = ""          # the registered method whose token_scores rank the tokens (default: this one)
    restorations = ("keep", "reactivate", "fused")
    picture = "kept_tokens"

    def token_scores(self, block: nn.Module, x: torch.Tensor, class_attention: Optional[torch.Tensor]
                     ) -> torch.Tensor:
        """Scores (B, N - P) of the non-prefix tokens of ``x`` (B, N, C), the residual stream after the block's
        attention; the top ones are kept, and the fused token is the sum of the others weighted by them.
        ``class_attention`` (B, N - P): the class token's head-averaged attention (when
        ``uses_class_attention``)."""
        raise NotImplementedError

    def apply(self, model: nn.Module, keep_rate: KeepRate = 0.7, locations: Optional[Sequence[int]] = None,
              fuse: Optional[bool] = None) -> nn.Module:
        fuse = self.fuse if fuse is None else bool(fuse)
        blocks = getattr(model, "blocks", None)
        family = family_of(model, self.name)
        if fuse and (getattr(model, "cls_token", None) is None or not getattr(model, "has_class_token", True)) \
                and self.uses_class_attention:
            raise LeanvitError(f"{self.name} needs a class token (its attention scores the image tokens); "
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
        family_of(model, self.name, locations)
        other = applied_reduction(model)  # this method with other settings, or another one: undo it first
        if other is not None:
            other.remove(model)
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        tag = "EViT" if self.uses_class_attention else self.name.title().replace("-", "")
        for i, r in zip(locations, rates):
            blk = swap_class(blocks[i], PruningBlockMixin, tag)
            blk.keep_rate, blk.fuse, blk.num_prefix_tokens = r, fuse, prefix
            blk.family_name, blk.score_method = family.name, self.score_name or self.name
        swap_class(model, PruningModelMixin, tag)
        model.evit_locations = locations
        model.family_name = family.name
        model.score_method = self.score_name or self.name
        return model

    def remove(self, model: nn.Module) -> nn.Module:
        if not is_pruning(model):
            return model
        for blk in model.blocks:
            if isinstance(blk, PruningBlockMixin):
                restore_class(blk, ("keep_rate", "fuse", "num_prefix_tokens", "family_name", "score_method"))
        return restore_class(model, ("evit_locations", "family_name", "score_method"))

    def owns(self, model: nn.Module) -> bool:
        """``model`` is pruned by this method's scores (whatever its fuse flag)."""
        return is_pruning(model) and model.score_method == (self.score_name or self.name)

    def is_applied(self, model: nn.Module) -> bool:
        return self.owns(model)

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
        return cosine_schedule(step, check_keep_rate(target, "target keep rate"), 1.0, start_step, span_steps)

    def options(self, model: nn.Module) -> dict:
        rate = model.keep_rate
        return {"keep_rate": list(rate) if isinstance(rate, tuple) else rate,
                "locations": list(model.evit_locations)}

    # -- dense restorations and pictures ---------------------------------------------------------
    def is_off(self, model: nn.Module) -> bool:
        rate = model.keep_rate
        return all(float(r) >= 1.0 for r in (rate if isinstance(rate, tuple) else (rate,)))

    def restore_room(self, model: nn.Module) -> Tuple[int, str]:
        return len(model.blocks) - 1 - max(model.evit_locations), "after the last reorganizing block"

    def restored_tokens(self, model: nn.Module, x: torch.Tensor, restore) -> torch.Tensor:
        from leanvit.reduction.pruning_restore import restored_tokens
        return restored_tokens(model, x, restore)
